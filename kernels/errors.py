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


__all__ = [
    "BadBufferError",
    "CodecError",
    "CorruptPayloadError",
    "InvalidConfigError",
    "NonFiniteInputError",
    "UnknownCodecError",
]
