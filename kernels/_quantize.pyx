# cython: language_level=3
"""Compiled quantization kernels; the NumPy twins in ``kernels._reference`` define them.

Each function here has a same-name, same-signature twin in ``_reference.py`` and
must give identical integer codes and identical float32 bits. Rules:

* Outputs go into caller-provided buffers; nothing is allocated.
* Inputs are never modified, except the arguments named ``residual`` and ``acc``.
* The whole input is checked before anything is written: NaN/+-Inf raises
  :class:`kernels.errors.NonFiniteInputError` naming the first bad index, and
  every output (and the error-feedback residual) is left untouched. The one
  exception is error feedback into a separate ``residual_out``: it makes a single
  pass, so on error its outputs hold partial results, while ``residual`` (the
  device's state) is only read and stays as it was.
* The loops run without the GIL in ``_quantize_simd.h`` (auto-vectorized C,
  AVX2 picked at run time on x86-64); this file checks arguments and calls them.

Only ``kernels._backend`` imports this module.
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from kernels.errors import BadBufferError, InvalidConfigError, NonFiniteInputError


cdef extern from "_quantize_simd.h" nogil:
    uint32_t FQ_MAX_FINITE_BITS
    uint32_t fq_max_absbits(const float *x, size_t n)
    uint32_t fq_max_absbits_sum(const float *a, const float *b, size_t n)
    int64_t fq_first_nonfinite(const float *x, size_t n)
    int64_t fq_first_nonfinite_sum(const float *a, const float *b, size_t n)
    int64_t fq_residual_add(const float *r, const float *u, float *out, size_t n)
    void fq_minmax(const float *x, size_t n, float *lo, float *hi)
    void fq_affine_quantize(const float *x, size_t n, float inv, int zp, uint8_t *out)
    void fq_affine_dequantize(const uint8_t *codes, size_t n, float scale, float zp, float *out)
    void fq_affine_dequantize_acc(const uint8_t *codes, size_t n, float scale, float zp,
                                  float weight, float *acc)
    int64_t fq_quantize_block(const float *x, size_t n, int bits, size_t block_size,
                              int stochastic, uint64_t seed, uint8_t *packed, float *scales)
    void fq_quantize_block_feedback(const float *update, float *residual, size_t n, int bits,
                                    size_t block_size, int stochastic, uint64_t seed,
                                    uint8_t *packed, float *scales)
    int64_t fq_quantize_block_feedback_to(const float *update, const float *residual,
                                          float *residual_out, size_t n, int bits,
                                          size_t block_size, int stochastic, uint64_t seed,
                                          uint8_t *packed, float *scales)
    void fq_dequantize_block(const uint8_t *packed, const float *scales, size_t n, int bits,
                             size_t block_size, float *out)
    void fq_dequantize_block_acc(const uint8_t *packed, const float *scales, size_t n,
                                 int bits, size_t block_size, float weight, float *acc)


cdef extern from "<math.h>" nogil:
    double rint(double x)
    bint isfinite(double x)


cdef float FLT_MIN_F = 1.1754943508222875e-38  # smallest normal float32

MAX_BLOCK_SIZE = 1 << 20


# ---- argument checks (shared wording with kernels._reference) ----

cdef int _qmax(int bits) except -1:
    if bits == 8:
        return 127
    if bits == 4:
        return 7
    if bits == 2:
        return 1
    raise InvalidConfigError(f"bits must be 8, 4 or 2, got {bits}")


cdef int _check_block_size(Py_ssize_t block_size) except -1:
    if block_size < 4 or block_size > MAX_BLOCK_SIZE or block_size % 4 != 0:
        raise InvalidConfigError(
            f"block_size must be a multiple of 4 in [4, {MAX_BLOCK_SIZE}], got {block_size}"
        )
    return 0


cdef int _check_len(str name, Py_ssize_t have, Py_ssize_t need) except -1:
    if have < need:
        raise BadBufferError(f"{name} holds {have} elements but {need} are needed; "
                             f"allocate at least {need}")
    return 0


cdef int _check_apart(str a, const float *pa, str b, const float *pb, size_t n) except -1:
    if pa < pb + n and pb < pa + n:
        raise BadBufferError(f"{a} overlaps {b}; pass a separate array, or the residual "
                             "itself to update it in place")
    return 0


cdef int _check_feedback_lengths(Py_ssize_t n_update, Py_ssize_t n_residual, str out_name,
                                 Py_ssize_t n_out) except -1:
    if n_residual != n_update:
        raise BadBufferError(f"residual has {n_residual} elements but update has {n_update}; "
                             "keep one residual per parameter vector")
    if n_out != n_update:
        raise BadBufferError(f"{out_name} has {n_out} elements but update has {n_update}")
    return 0


cdef int _check_sum_finite(const float *r, const float *u, size_t n) except -1:
    """Raise for the first NaN/Inf residual + update, writing nothing (n > 0)."""
    cdef uint32_t m
    cdef int64_t i
    with nogil:
        m = fq_max_absbits_sum(r, u, n)
    if m > FQ_MAX_FINITE_BITS:
        i = fq_first_nonfinite_sum(r, u, n)
        raise _nonfinite("residual + update", i, <float>(r[i] + u[i]))
    return 0


cdef bint _check_feedback_target(str out_name, const float *out, const float *r,
                                 const float *u, size_t n) except -1:
    """Whether ``out`` (n > 0) is apart from ``r``: then it must overlap neither
    input; in place (``out`` is ``r``), every r + u is checked before any write."""
    if out != r:
        _check_apart(out_name, out, "residual", r, n)
        _check_apart(out_name, out, "update", u, n)
        return True
    _check_sum_finite(r, u, n)
    return False


cdef Py_ssize_t _num_blocks(Py_ssize_t n, Py_ssize_t block_size):
    return (n + block_size - 1) // block_size


cdef Py_ssize_t _packed_nbytes(Py_ssize_t n, int bits):
    return (n * bits + 7) // 8


cdef object _nonfinite(str what, Py_ssize_t index, double value):
    return NonFiniteInputError(
        f"{what}[{index}] is {value!r}: the kernels quantize only finite values; "
        "drop or repair the update (NaN/Inf usually means training diverged)"
    )


cdef int _check_finite(str name, const float[::1] x) except -1:
    cdef size_t n = <size_t>x.shape[0]
    cdef uint32_t m = 0
    cdef int64_t i
    if n == 0:
        return 0
    with nogil:
        m = fq_max_absbits(&x[0], n)
    if m > FQ_MAX_FINITE_BITS:
        i = fq_first_nonfinite(&x[0], n)
        raise _nonfinite(name, i, x[i])
    return 0


cdef int _check_scales(const float[::1] scales, Py_ssize_t nb) except -1:
    cdef Py_ssize_t b
    for b in range(nb):
        if not isfinite(scales[b]):
            raise _nonfinite("scales", b, scales[b])
    return 0


cdef int _check_weight(float weight) except -1:
    if not isfinite(weight):
        raise NonFiniteInputError(f"weight is {weight!r}; pass a finite aggregation weight")
    return 0


# ---- affine uint8 ----

def quantize_affine_u8(const float[::1] x, uint8_t[::1] out_u8):
    """Quantize x to uint8 codes in out_u8; return (scale, zero_point)."""
    cdef size_t n = <size_t>x.shape[0]
    cdef float lo = 0.0, hi = 0.0, scale, inv
    cdef int zp
    _check_len("out_u8", out_u8.shape[0], x.shape[0])
    if n == 0:
        return 1.0, 0
    with nogil:
        fq_minmax(&x[0], n, &lo, &hi)
    if not (isfinite(lo) and isfinite(hi)):  # NaN/Inf keys sort past every finite one
        _check_finite("x", x)
    lo = lo if lo < 0.0 else 0.0
    hi = hi if hi > 0.0 else 0.0
    if hi == lo:  # all zeros: any scale works; 1.0 keeps the parameters ordinary
        out_u8[:n] = 0
        return 1.0, 0
    scale = <float>((<double>hi - <double>lo) / 255.0)
    if scale < FLT_MIN_F:
        scale = FLT_MIN_F
    zp = <int>rint(-<double>lo / <double>scale)
    zp = 0 if zp < 0 else (255 if zp > 255 else zp)
    inv = 1.0 / scale
    with nogil:
        fq_affine_quantize(&x[0], n, inv, zp, &out_u8[0])
    return float(scale), zp


def dequantize_affine_u8(const uint8_t[::1] codes, float scale, int zero_point, float[::1] out):
    """Write (code - zero_point) * scale into out."""
    cdef size_t n = <size_t>codes.shape[0]
    _check_len("out", out.shape[0], codes.shape[0])
    if not isfinite(scale):
        raise _nonfinite("scale", 0, scale)
    if n == 0:
        return
    with nogil:
        fq_affine_dequantize(&codes[0], n, scale, <float>zero_point, &out[0])


def dequantize_affine_u8_accumulate(const uint8_t[::1] codes, float scale, int zero_point,
                                    float weight, float[::1] acc):
    """acc += weight * ((code - zero_point) * scale), float32, in that order."""
    cdef size_t n = <size_t>codes.shape[0]
    _check_len("acc", acc.shape[0], codes.shape[0])
    if not isfinite(scale):
        raise _nonfinite("scale", 0, scale)
    _check_weight(weight)
    if n == 0:
        return
    with nogil:
        fq_affine_dequantize_acc(&codes[0], n, scale, <float>zero_point, weight, &acc[0])


# ---- residual + update ----

def residual_add(const float[::1] residual, const float[::1] update, float[::1] out):
    """out = residual + update (float32).

    ``out`` is either ``residual`` itself (in place: the whole sum is checked
    first, so on error nothing is written) or a separate array (one pass that
    only reads ``residual``; on error ``out`` holds the sums).
    """
    cdef size_t n = <size_t>update.shape[0]
    cdef int64_t i
    _check_feedback_lengths(update.shape[0], residual.shape[0], "out", out.shape[0])
    if n == 0:
        return
    _check_feedback_target("out", &out[0], &residual[0], &update[0], n)
    with nogil:
        i = fq_residual_add(&residual[0], &update[0], &out[0], n)
    if i >= 0:
        raise _nonfinite("residual + update", i, <float>(residual[i] + update[i]))


# ---- symmetric blocks ----

def quantize_block(const float[::1] x, int bits, Py_ssize_t block_size, bint stochastic,
                   uint64_t seed, uint8_t[::1] packed_out, float[::1] scales_out):
    """Quantize x in blocks of block_size to packed signed codes and per-block scales."""
    cdef size_t n = <size_t>x.shape[0]
    _qmax(bits)
    _check_block_size(block_size)
    _check_len("packed_out", packed_out.shape[0], _packed_nbytes(x.shape[0], bits))
    _check_len("scales_out", scales_out.shape[0], _num_blocks(x.shape[0], block_size))
    if n == 0:
        return
    cdef int64_t i
    with nogil:
        i = fq_quantize_block(&x[0], n, bits, <size_t>block_size, stochastic, seed,
                              &packed_out[0], &scales_out[0])
    if i >= 0:
        raise _nonfinite("x", i, x[i])


def quantize_block_feedback(const float[::1] update, const float[::1] residual, int bits,
                            Py_ssize_t block_size, bint stochastic, uint64_t seed,
                            uint8_t[::1] packed_out, float[::1] scales_out,
                            float[::1] residual_out):
    """residual_out = residual + update - dequantize(codes); codes = quantize(residual + update).

    ``residual_out`` is either ``residual`` itself (updated in place: the whole sum
    is checked first, then one fused pass) or a separate array (one pass that only
    reads ``residual``; on error the outputs hold partial results).
    """
    cdef size_t n = <size_t>update.shape[0]
    cdef int64_t i
    _qmax(bits)
    _check_block_size(block_size)
    _check_feedback_lengths(update.shape[0], residual.shape[0], "residual_out",
                            residual_out.shape[0])
    _check_len("packed_out", packed_out.shape[0], _packed_nbytes(update.shape[0], bits))
    _check_len("scales_out", scales_out.shape[0], _num_blocks(update.shape[0], block_size))
    if n == 0:
        return
    if _check_feedback_target("residual_out", &residual_out[0], &residual[0], &update[0], n):
        with nogil:
            i = fq_quantize_block_feedback_to(&update[0], &residual[0], &residual_out[0], n,
                                              bits, <size_t>block_size, stochastic, seed,
                                              &packed_out[0], &scales_out[0])
        if i >= 0:
            raise _nonfinite("residual + update", i, <float>(residual[i] + update[i]))
        return
    # In place: every residual + update was checked before this write, so a bad
    # update leaves the residual (device state kept between rounds) as it was.
    with nogil:
        fq_quantize_block_feedback(&update[0], &residual_out[0], n, bits, <size_t>block_size,
                                   stochastic, seed, &packed_out[0], &scales_out[0])


cdef Py_ssize_t _check_dequantize_args(const uint8_t[::1] packed, const float[::1] scales,
                                       Py_ssize_t n, int bits, Py_ssize_t block_size,
                                       str out_name, Py_ssize_t out_len) except -1:
    """The argument checks both dequantizers share; return the number of blocks."""
    cdef Py_ssize_t nb
    _qmax(bits)
    _check_block_size(block_size)
    if n < 0:
        raise InvalidConfigError(f"n must be >= 0, got {n}")
    nb = _num_blocks(n, block_size)
    _check_len("packed", packed.shape[0], _packed_nbytes(n, bits))
    _check_len("scales", scales.shape[0], nb)
    _check_len(out_name, out_len, n)
    return nb


def dequantize_block(const uint8_t[::1] packed, const float[::1] scales, Py_ssize_t n, int bits,
                     Py_ssize_t block_size, float[::1] out):
    """Write code * scale of the first n elements into out."""
    cdef Py_ssize_t nb = _check_dequantize_args(packed, scales, n, bits, block_size, "out",
                                                out.shape[0])
    if n == 0:
        return
    _check_scales(scales, nb)
    with nogil:
        fq_dequantize_block(&packed[0], &scales[0], <size_t>n, bits, <size_t>block_size, &out[0])


def dequantize_block_accumulate(const uint8_t[::1] packed, const float[::1] scales,
                                Py_ssize_t n, int bits, Py_ssize_t block_size, float weight,
                                float[::1] acc):
    """acc[i] += weight * (code * scale) for the first n elements, float32, in that order."""
    cdef Py_ssize_t nb = _check_dequantize_args(packed, scales, n, bits, block_size, "acc",
                                                acc.shape[0])
    _check_weight(weight)
    if n == 0:
        return
    _check_scales(scales, nb)
    with nogil:
        fq_dequantize_block_acc(&packed[0], &scales[0], <size_t>n, bits, <size_t>block_size,
                                weight, &acc[0])
