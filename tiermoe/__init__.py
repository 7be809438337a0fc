"""tiermoe: run Mixture-of-Experts language models whose experts do not fit in memory, token-identically."""

from tiermoe.llm import LLM
from tiermoe.outputs import CompletionOutput, Logprob, RequestOutput
from tiermoe.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
