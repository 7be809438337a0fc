"""tiermoe side by side with llama.cpp and transformers: `python -m bench.peers --help`."""
