"""Compression kernels and codecs for model updates.

``kernels`` imports none of fedge's other packages. The compiled (Cython) kernels
and their NumPy twins expose the same functions; ``BACKEND`` says which one is in
use (``"cython"`` or ``"python"``). Codecs are built from JSON-safe configs with
:func:`get_codec`.
"""

from __future__ import annotations

from kernels._backend import BACKEND
from kernels.errors import (
    BadBufferError,
    CodecError,
    CorruptPayloadError,
    InvalidConfigError,
    NonFiniteInputError,
    UnknownCodecError,
)

__all__ = [
    "BACKEND",
    "BadBufferError",
    "CodecError",
    "CorruptPayloadError",
    "InvalidConfigError",
    "NonFiniteInputError",
    "UnknownCodecError",
]
