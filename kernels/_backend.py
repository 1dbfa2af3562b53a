"""Pick the compiled kernels or their NumPy twins, once, at import time.

This is the only module that imports the compiled extension modules. The rules:

* ``KERNELS_PUREPYTHON=1`` forces the NumPy reference path (the test suite runs
  twice, once each way, so both paths stay correct).
* Otherwise the Cython modules are used; when they are missing (no compiler at
  install time, an unsupported platform) the reference path is used and a
  warning is logged once.

``BACKEND`` is ``"cython"`` or ``"python"``; ``quantize_impl`` and ``sparsify_impl``
are modules (compiled or ``kernels._reference``) exposing the same functions with
the same signatures.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Final

from kernels import _reference

logger = logging.getLogger("kernels")


def _load() -> tuple[str, ModuleType, ModuleType]:
    if os.environ.get("KERNELS_PUREPYTHON") == "1":
        logger.info("KERNELS_PUREPYTHON=1: using the NumPy reference kernels")
        return "python", _reference, _reference
    try:
        from kernels import _quantize, _sparsify  # type: ignore[attr-defined]
    except ImportError as exc:
        logger.warning(
            "compiled kernels unavailable (%s); using the NumPy reference path. "
            "Reinstall with a C compiler and Cython (pip install -e .) to compile them.",
            exc,
        )
        return "python", _reference, _reference
    return "cython", _quantize, _sparsify


BACKEND: Final[str]
quantize_impl: Final[ModuleType]
sparsify_impl: Final[ModuleType]
BACKEND, quantize_impl, sparsify_impl = _load()
