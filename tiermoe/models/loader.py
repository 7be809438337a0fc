"""Load a Hugging Face folder: build the family's modules, read every non-expert weight, check every expert.

Memory: the modules are built on the meta device with torch's initialisers switched off (nothing is allocated or
randomly filled, and torch._dynamo, which the meta initialisers import, ~70 MiB, stays unloaded); each weight is read
once with O_DIRECT into the page-aligned buffer that becomes the parameter (no second copy, no page cache left
behind). With `embedding_on_disk` the token embedding stays in the file and a forward reads only its tokens' rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from tiermoe.checkpoint import CheckpointIndex, TensorInfo
from tiermoe.errors import CheckpointError
from tiermoe.kernels import weight_dtype
from tiermoe.models.registry import family, read_config
from tiermoe.models.transformer import CausalLM
from tiermoe.offload.tiers.direct_io import BufferPool, DirectReader

EMBEDDING = "model.embed_tokens.weight"
# torch.nn.init functions module constructors call; on the meta device they would only cost time and imports.
_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
          "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


def load_model(folder: str | Path, dtype: torch.dtype,
               embedding_on_disk: bool = False) -> tuple[CausalLM, CheckpointIndex, dict]:
    """Returns the model with non-expert weights loaded, the checkpoint index for the experts, and config.json.

    The model computes in `dtype`; its weights are kept as `kept_dtype` says.

    Tensors the model does not use (e.g. DeepSeek-V3's multi-token-prediction layer) are ignored, as transformers
    does; a tensor it needs that is absent raises CheckpointError naming it. `embedding_on_disk` (ignored for tied
    embeddings, whose matrix the head keeps resident anyway) leaves the token embedding in the checkpoint file.
    """
    config = read_config(folder)
    fam = family(config["model_type"])
    with torch.device("meta"), _no_init():
        model = fam.build(config)
    index = CheckpointIndex(folder, fam.sanitize)
    index.check_experts([b.layer for b in model.moe_blocks], model.shape.num_experts)
    tied = model.shape.tie_word_embeddings
    on_disk = embedding_on_disk and not tied
    infos = {}
    for name, meta in model.state_dict().items():
        if (name == "lm_head.weight" and tied) or (name == EMBEDDING and on_disk):
            continue
        infos[name] = _checked(index, folder, name, meta)
    state = read_weights(infos, {name: kept_dtype(name, info, dtype) for name, info in infos.items()})
    if tied:
        state["lm_head.weight"] = state[EMBEDDING]
    if on_disk:
        model.model.embed_tokens = DiskEmbedding(_checked(index, folder, EMBEDDING, model.model.embed_tokens.weight),
                                                 dtype)
    model.load_state_dict(state, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.fuse_weights()
    return model.eval(), index, config


def checkpoint_bytes(folder: str | Path, dtype: torch.dtype) -> int:
    """Bytes of every tensor of the checkpoint once loaded for compute dtype `dtype` (read from the headers only)."""
    index = CheckpointIndex(folder, family(read_config(folder)["model_type"]).sanitize)
    return sum(t.nbytes // t.dtype.itemsize * kept_dtype(name, t, dtype).itemsize for name, t in index.tensors.items())


def kept_dtype(name: str, info: TensorInfo, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is loaded in for compute dtype `dtype`: the matrices of products (every tensor of 2 or more
    dims but the token embedding: projections, experts, routers, the head) as kernels.weight_dtype says (bf16 stays
    bf16 under fp32), the rest (embedding, norms, biases) in `dtype`."""
    return weight_dtype(info.dtype, dtype) if len(info.shape) >= 2 and name != EMBEDDING else dtype


def _checked(index: CheckpointIndex, folder, name: str, meta: torch.Tensor) -> TensorInfo:
    if not index.has(name):
        raise CheckpointError(f"{folder}: missing tensor {name}")
    info = index.tensors[name]
    if tuple(info.shape) != tuple(meta.shape):
        raise CheckpointError(f"{folder}: tensor {name} has shape {tuple(info.shape)}, "
                              f"config.json implies {tuple(meta.shape)}")
    return info


def read_weights(infos: dict[str, TensorInfo], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Each tensor read with O_DIRECT into its own page-aligned buffer, which the returned tensor keeps (a tensor
    stored in another dtype than `dtypes[name]` is converted and its buffer freed at once)."""
    out = {}
    with DirectReader(max_workers=1, pool=BufferPool(0)) as reader:
        for name, info in infos.items():
            dtype = dtypes[name]
            seg = reader.read(info.file, info.offset, info.nbytes)
            tensor = seg.as_tensor(info.dtype, info.shape)
            out[name] = tensor if info.dtype == dtype else tensor.to(dtype)
            del seg, tensor  # a converted tensor's read buffer is unmapped here
    return out


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    saved = {name: getattr(nn.init, name) for name in _INITS}
    for name in _INITS:
        setattr(nn.init, name, _keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _keep(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


class DiskEmbedding(nn.Module):
    """The token embedding left in the checkpoint file: a forward reads the rows of its distinct tokens (O_DIRECT,
    one page-rounded read each) and converts them to `dtype`. For memory limits far below the vocabulary's bytes."""

    def __init__(self, info: TensorInfo, dtype: torch.dtype):
        super().__init__()
        self.info, self.dtype = info, dtype
        self.num_embeddings, self.embedding_dim = info.shape
        self.reader = DirectReader(max_workers=1, pool=BufferPool(0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, H]"""
        ids, where = torch.unique(input_ids.cpu(), return_inverse=True)
        rows = torch.empty(len(ids), self.embedding_dim, dtype=self.dtype)  # [U, H]
        for i, token in enumerate(ids.tolist()):
            row = self.info.row_slice(token, 1)
            with self.reader.read(row.file, row.offset, row.nbytes) as seg:
                rows[i] = seg.as_tensor(row.dtype, (self.embedding_dim,))
        return rows[where]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on disk: {self.info.file.name}"
