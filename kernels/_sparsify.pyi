"""Typing stub of the compiled sparsify kernels (same signatures as their twins in _reference)."""

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_U32 = npt.NDArray[np.uint32]
_U8 = npt.NDArray[np.uint8]

MAX_SPARSE_LENGTH: int
VARINT_MAX_NBYTES: int

def topk_exact(x: _F32, k: int, out_indices: _U32, out_values: _F32) -> int: ...
def topk_sampled(
    x: _F32,
    k: int,
    seed: int,
    sample_size: int,
    sample_rank: int,
    exact: bool,
    cand: _U32,
    scratch: _U32,
    out_indices: _U32,
    out_values: _F32,
) -> int: ...
def topk_feedback(
    update: _F32,
    residual: _F32,
    k: int,
    seed: int,
    sample_size: int,
    sample_rank: int,
    exact: bool,
    cand: _U32,
    scratch: _U32,
    out_indices: _U32,
    out_values: _F32,
    residual_out: _F32,
) -> int: ...
def subtract_at(residual: _F32, indices: _U32, values: _F32) -> None: ...
def put_at(residual: _F32, indices: _U32, values: _F32) -> None: ...
def scatter_accumulate(indices: _U32, values: _F32, weight: float, acc: _F32) -> None: ...
def encode_indices(indices: _U32, n: int, out: _U8) -> int: ...
def decode_indices(buf: _U8, count: int, n: int, out: _U32) -> int: ...
