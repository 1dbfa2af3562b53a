"""Per-thread scratch buffers that the kernel wrappers reuse from call to call.

A large array allocated afresh on every call is page-faulted in again whenever
the C allocator has handed the memory back to the system, which glibc does for
blocks that large as soon as they are freed. At 16 M elements that cost 1-2 ms
per sampled top-k and about 10 ms per block-codec encode. So each thread keeps
the largest buffer of each kind it has needed; callers use it only until they
return (or, for a payload, until the next encode on the same thread).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt

_local = threading.local()


def thread_buffer(name: str, dtype: type[np.generic], size: int) -> npt.NDArray[Any]:
    """This thread's buffer called ``name``: ``size`` elements of ``dtype``, reused."""
    buf: npt.NDArray[Any] | None = getattr(_local, name, None)
    if buf is None or buf.shape[0] < size:
        buf = np.empty(size, dtype=dtype)
        setattr(_local, name, buf)
    return buf[:size]
