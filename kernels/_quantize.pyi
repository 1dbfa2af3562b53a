"""Typing stub of the compiled kernels (kernels/_quantize.pyx).

Signatures match the NumPy twins in kernels/_reference.py exactly.
"""

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_U8 = npt.NDArray[np.uint8]

MAX_BLOCK_SIZE: int

def quantize_affine_u8(x: _F32, out_u8: _U8) -> tuple[float, int]: ...
def dequantize_affine_u8(codes: _U8, scale: float, zero_point: int, out: _F32) -> None: ...
def dequantize_affine_u8_accumulate(
    codes: _U8, scale: float, zero_point: int, weight: float, acc: _F32
) -> None: ...
def quantize_block(
    x: _F32,
    bits: int,
    block_size: int,
    stochastic: bool,
    seed: int,
    packed_out: _U8,
    scales_out: _F32,
) -> None: ...
def residual_add(residual: _F32, update: _F32, out: _F32) -> None: ...
def quantize_block_feedback(
    update: _F32,
    residual: _F32,
    bits: int,
    block_size: int,
    stochastic: bool,
    seed: int,
    packed_out: _U8,
    scales_out: _F32,
    residual_out: _F32,
) -> None: ...
def dequantize_block(
    packed: _U8, scales: _F32, n: int, bits: int, block_size: int, out: _F32
) -> None: ...
def dequantize_block_accumulate(
    packed: _U8, scales: _F32, n: int, bits: int, block_size: int, weight: float, acc: _F32
) -> None: ...
