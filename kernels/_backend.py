"""Pick the compiled kernels or their NumPy twins, once, at import time.

This is the only module that imports the compiled extension modules. The rules:

* ``KERNELS_PUREPYTHON=1`` forces the NumPy reference path (the test suite runs
  twice, once each way, so both paths stay correct).
* Otherwise each compiled family (``_quantize``, ``_sparsify``) is used; a family
  that is missing (no compiler at install time, an unsupported platform) falls
  back to the reference path and a warning is logged once.

``BACKEND`` is ``"cython"`` when every family is compiled, else ``"python"``;
``quantize_impl`` and ``sparsify_impl`` are modules (compiled or
``kernels._reference``) exposing the same functions with the same signatures.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Final

from kernels import _reference

logger = logging.getLogger("kernels")

FAMILIES: Final = ("quantize", "sparsify")


def _load(family: str) -> ModuleType | None:
    if os.environ.get("KERNELS_PUREPYTHON") == "1":
        return None
    try:
        return importlib.import_module(f"kernels._{family}")
    except ImportError as exc:
        logger.warning(
            "compiled %s kernels unavailable (%s); using the NumPy reference path. "
            "Reinstall with a C compiler and Cython (pip install -e .) to compile them.",
            family,
            exc,
        )
        return None


_compiled = {family: _load(family) for family in FAMILIES}
if os.environ.get("KERNELS_PUREPYTHON") == "1":
    logger.info("KERNELS_PUREPYTHON=1: using the NumPy reference kernels")

quantize_impl: Final[ModuleType] = _compiled["quantize"] or _reference
sparsify_impl: Final[ModuleType] = _compiled["sparsify"] or _reference
BACKEND: Final[str] = "cython" if all(_compiled.values()) else "python"
