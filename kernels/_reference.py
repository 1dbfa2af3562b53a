"""NumPy twins of every compiled kernel: same names, same signatures, and the semantics.

The compiled kernels in ``_quantize.pyx`` and ``_sparsify.pyx`` must give the same
integer codes and the same float bits (within 1 ulp where documented) as these
functions; the tests compare the two on hypothesis-generated input. Where the
two disagree, this file is right.

Conventions shared by both: outputs are written into caller-provided buffers;
inputs are never modified (except in-place arguments named ``residual`` or ``acc``);
non-finite input raises :class:`kernels.errors.NonFiniteInputError`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kernels.errors import NonFiniteInputError

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


# ---- quantize section (owned by the quantize kernels; edit only between these markers) ----

# ---- end of quantize section ----


# ---- sparsify section (owned by the sparsify kernels; edit only between these markers) ----

# ---- end of sparsify section ----
