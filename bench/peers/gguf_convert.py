"""Hugging Face folder -> GGUF with llama.cpp's own converter (convert_hf_to_gguf.py).

The converter is not in llama-cpp-python's wheel; its sdist carries it (vendor/llama.cpp, with the `conversion`
package and the matching gguf-py). We use the installed package's converter if a future wheel ships one, else
fetch the sdist of the installed version with pip and extract those files once into the work dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

OUTTYPES = {"bfloat16": "bf16", "float32": "f32"}
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def find_converter(work_dir: Path, fetch: bool = True) -> Path | None:
    """Path of convert_hf_to_gguf.py: in the installed llama_cpp package, else extracted from its sdist (fetched
    with pip into work_dir once; with fetch=False, None when that has not happened yet)."""
    import llama_cpp

    for candidate in Path(llama_cpp.__file__).parent.rglob("convert_hf_to_gguf.py"):
        return candidate
    version = metadata.version("llama-cpp-python")
    dest = work_dir / f"llama.cpp-{version}"
    script = dest / "convert_hf_to_gguf.py"
    if script.exists() or not fetch:
        return script if script.exists() else None
    sdist_dir = work_dir / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    "-d", str(sdist_dir), f"llama-cpp-python=={version}"], check=True, capture_output=True)
    (sdist,) = sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz")
    with tarfile.open(sdist) as tar:
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        for member in tar.getmembers():
            rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
            if rel and rel.startswith(_MEMBERS) and (member.isfile() or member.isdir()):
                member.name = rel
                tar.extract(member, dest, filter="data")
    if not script.exists():
        raise FileNotFoundError(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    return script


def convert(folder: Path, dtype: str, out_dir: Path, work_dir: Path) -> Path:
    """`folder` as out_dir/model.{bf16,f32}.gguf for `dtype` bfloat16/float32; an existing file is kept."""
    out = out_dir / f"model.{OUTTYPES[dtype]}.gguf"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    script = find_converter(work_dir)
    tmp = out.with_suffix(".partial")
    env = dict(os.environ)
    if not (script.parent / "gguf-py").exists():
        env["NO_LOCAL_GGUF"] = "1"  # use the `gguf` package instead of the vendored copy
    proc = subprocess.run([sys.executable, str(script), str(folder), "--outtype", OUTTYPES[dtype], "--outfile",
                           str(tmp)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} failed on {folder}:\n" + "\n".join(proc.stderr.splitlines()[-15:]))
    tmp.rename(out)
    return out


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (checks the conversion kept the asked precision)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts
