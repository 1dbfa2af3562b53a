"""Errors raised by the kernels and codecs: one tree, rooted at :class:`CodecError`.

``CodecError`` subclasses ``ValueError`` so callers that only know the standard
library can still catch bad input; callers that care catch the specific subclass.
"""

from __future__ import annotations


class CodecError(ValueError):
    """Base class of every error the kernels and codecs raise on bad input."""


class UnknownCodecError(CodecError):
    """A codec config names an id that is not registered."""


class InvalidConfigError(CodecError):
    """A codec config has a missing, unknown or out-of-range parameter."""


class NonFiniteInputError(CodecError):
    """The input contains NaN or +/-Inf; kernels refuse it rather than emit garbage."""


class CorruptPayloadError(CodecError):
    """A payload is truncated, has trailing bytes, or decodes to something impossible."""


class BadBufferError(CodecError):
    """A caller-provided buffer has the wrong dtype, size, or is not contiguous/writable."""


def unaligned_message(name: str, itemsize: int) -> str:
    """The :class:`BadBufferError` message for an array whose items are not aligned.

    x86-64 and aarch64 load unaligned floats, but 32-bit ARM (Raspberry Pi OS
    32-bit) stops the process with SIGBUS, so the kernels take them on no platform.
    """
    return (
        f"{name} is not aligned to its {itemsize}-byte items (a view at an odd byte "
        f"offset of a buffer?); pass an aligned copy, np.array({name})"
    )


__all__ = [
    "BadBufferError",
    "CodecError",
    "CorruptPayloadError",
    "InvalidConfigError",
    "NonFiniteInputError",
    "UnknownCodecError",
    "unaligned_message",
]
