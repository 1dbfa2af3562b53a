# cython: language_level=3
"""Compiled sparsification kernels; the NumPy twins in ``kernels._reference`` define them.

Each function here has a same-name, same-signature twin in ``_reference.py`` and
must return identical indices and identical float32 bits. Rules:

* Outputs and scratch go into caller-provided buffers; nothing is allocated.
* Inputs are never modified, except the arguments named ``residual`` and ``acc``.
* NaN/+-Inf raises :class:`kernels.errors.NonFiniteInputError` naming the first bad
  index, before any output, ``residual`` or ``acc`` is written.
* Empty input is handled before any ``&x[0]``.
* The loops run without the GIL in ``_sparsify_simd.h`` (portable, auto-vectorized
  C); this file checks arguments, calls them and turns failures into exceptions.

Only ``kernels._backend`` imports this module (and the tests, to compare twins).
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t

from kernels.errors import BadBufferError, CorruptPayloadError, NonFiniteInputError


cdef extern from "_sparsify_simd.h" nogil:
    int fe_any_nonfinite(const uint32_t *xb, Py_ssize_t n)
    int fe_any_nonfinite_sum(const float *r, const float *u, Py_ssize_t n)
    uint32_t fe_radix_kth(const uint32_t *xb, Py_ssize_t n, Py_ssize_t k, Py_ssize_t *need_eq,
                          int *nonfinite)
    Py_ssize_t fe_take_top(const float *x, Py_ssize_t n, uint32_t t, Py_ssize_t need_eq,
                           Py_ssize_t k, uint32_t *out_i, float *out_v)
    Py_ssize_t fe_select_ge(const float *x, Py_ssize_t n, uint32_t t, uint32_t *cand,
                            uint32_t *cbits, Py_ssize_t cap, int *nonfinite)
    Py_ssize_t fe_add_select_ge(const float *r, const float *u, float *ro, Py_ssize_t n,
                                uint32_t t, uint32_t *cand, uint32_t *cbits, Py_ssize_t cap,
                                int *nonfinite)
    void fe_sample_keys(const float *x, Py_ssize_t n, uint64_t seed, Py_ssize_t s, uint32_t *keys)
    void fe_sample_keys_sum(const float *r, const float *u, Py_ssize_t n, uint64_t seed,
                            Py_ssize_t s, uint32_t *keys)
    Py_ssize_t fe_take_candidates(const uint32_t *cand, const uint32_t *cbits, Py_ssize_t c,
                                  uint32_t t, Py_ssize_t need_eq, Py_ssize_t k, uint32_t *out_i,
                                  float *out_v)
    void fe_subtract_at(float *res, const uint32_t *idx, const float *v, Py_ssize_t m)
    void fe_put_at(float *res, const uint32_t *idx, const float *v, Py_ssize_t m)
    void fe_copy_candidates(const uint32_t *cand, const uint32_t *cbits, Py_ssize_t c,
                            uint32_t *out_i, float *out_v)


MAX_SPARSE_LENGTH = 2**32 - 1
VARINT_MAX_NBYTES = 5

# 64-bit: a 32-bit Py_ssize_t (Raspberry Pi OS 32-bit) cannot hold 2**32 - 1, and as
# Py_ssize_t this constant wrapped to -1 there, refusing every length.
cdef uint64_t _MAX_LENGTH = 4294967295u


# ---- argument checks and messages (identical to the twins in _reference.py) ----

cdef str _nonfinite_message(str name, Py_ssize_t i, float value):
    return (
        f"{name}[{i}] is {float(value)!r}, not finite: the update diverged; "
        "drop it or clip it before sparsifying"
    )


cdef Py_ssize_t _first_nonfinite(const float[::1] x) noexcept:
    cdef Py_ssize_t i
    cdef float v
    for i in range(x.shape[0]):
        v = x[i]
        if v != v or v - v != 0.0:  # NaN, or +/-Inf (Inf - Inf is NaN)
            return i
    return -1


cdef int _raise_nonfinite(const float[::1] x, str name) except -1:
    cdef Py_ssize_t i = _first_nonfinite(x)
    raise NonFiniteInputError(_nonfinite_message(name, i, x[i]))


cdef int _raise_nonfinite_sum(const float[::1] update, const float[::1] residual) except -1:
    cdef Py_ssize_t i = 0
    cdef float s
    for i in range(residual.shape[0]):
        s = residual[i] + update[i]
        if s != s or s - s != 0.0:
            break
    if _first_nonfinite(residual[i:i + 1]) == 0:
        raise NonFiniteInputError(_nonfinite_message("residual", i, residual[i]))
    if _first_nonfinite(update[i:i + 1]) == 0:
        raise NonFiniteInputError(_nonfinite_message("update", i, update[i]))
    raise NonFiniteInputError(
        f"residual[{i}] + update[{i}] = {float(residual[i])!r} + {float(update[i])!r} "
        "overflows float32: clip the update before sparsifying"
    )


cdef int _check_topk_args(Py_ssize_t n, Py_ssize_t k, Py_ssize_t n_indices, Py_ssize_t n_values,
                          Py_ssize_t need) except -1:
    if <uint64_t>n > _MAX_LENGTH:  # n is a length, never negative
        raise BadBufferError(f"length {n} exceeds {MAX_SPARSE_LENGTH}: split the vector")
    if not 0 <= k <= n:
        raise BadBufferError(f"k = {k} is outside [0, {n}]")
    if n_indices < need or n_values < need:
        raise BadBufferError(
            f"out_indices and out_values need at least {need} entries, "
            f"got {n_indices} and {n_values}"
        )
    return 0


cdef int _check_sample_args(Py_ssize_t k, Py_ssize_t sample_size, Py_ssize_t sample_rank,
                            bint exact, Py_ssize_t n_cand, Py_ssize_t n_scratch,
                            Py_ssize_t n_indices, Py_ssize_t n_values, Py_ssize_t n) except -1:
    if sample_size < 0 or (sample_size > 0 and not 1 <= sample_rank <= sample_size):
        raise BadBufferError(
            f"sample_size = {sample_size}, sample_rank = {sample_rank}: need sample_size >= 0 "
            "and 1 <= sample_rank <= sample_size (sample_size 0 selects the exact path)"
        )
    if n_scratch < max(sample_size, n_cand):
        raise BadBufferError(
            f"scratch needs at least max(sample_size, len(cand)) = "
            f"{max(sample_size, n_cand)} entries, got {n_scratch}"
        )
    _check_topk_args(n, k, n_indices, n_values, k if exact else max(k, n_cand))
    return 0


# ---- top-k ----

cdef Py_ssize_t _exact_nogil(const float *x, Py_ssize_t n, Py_ssize_t k, uint32_t *out_i,
                             float *out_v, int *nonfinite) noexcept nogil:
    """Exact top-k of a non-empty x with 0 < k <= n; sets *nonfinite instead of selecting."""
    cdef Py_ssize_t need_eq = 0
    cdef uint32_t t = fe_radix_kth(<const uint32_t *>x, n, k, &need_eq, nonfinite)
    if nonfinite[0]:
        return 0
    return fe_take_top(x, n, t, need_eq, k, out_i, out_v)


cdef Py_ssize_t _candidates_nogil(Py_ssize_t k, bint exact, const uint32_t *cand,
                                  const uint32_t *cbits, Py_ssize_t c, uint32_t *out_i,
                                  float *out_v) noexcept nogil:
    """Turn c candidates (k <= c, ascending) into the output (trimmed to k when exact)."""
    cdef Py_ssize_t need_eq = 0
    cdef int unused = 0
    cdef uint32_t t
    if not exact or c == k:
        fe_copy_candidates(cand, cbits, c, out_i, out_v)
        return c
    t = fe_radix_kth(cbits, c, k, &need_eq, &unused)
    return fe_take_candidates(cand, cbits, c, t, need_eq, k, out_i, out_v)


def topk_exact(const float[::1] x, Py_ssize_t k, uint32_t[::1] out_indices,
               float[::1] out_values):
    """Write the exact top-k (by |x|, ties to the lower index) in ascending index order; return k."""
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t count = 0
    cdef int nonfinite = 0
    _check_topk_args(n, k, out_indices.shape[0], out_values.shape[0], k)
    if n == 0:
        return 0
    with nogil:
        if k == 0:
            nonfinite = fe_any_nonfinite(<const uint32_t *>&x[0], n)
        else:
            count = _exact_nogil(&x[0], n, k, &out_indices[0], &out_values[0], &nonfinite)
    if nonfinite:
        _raise_nonfinite(x, "x")
    return count


def topk_sampled(const float[::1] x, Py_ssize_t k, uint64_t seed, Py_ssize_t sample_size,
                 Py_ssize_t sample_rank, bint exact, uint32_t[::1] cand, uint32_t[::1] scratch,
                 uint32_t[::1] out_indices, float[::1] out_values):
    """Top-k through a threshold estimated from a hashed sample; return the count written.

    See the twin in ``kernels._reference`` for the full contract.
    """
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t cap = cand.shape[0]
    cdef Py_ssize_t count = 0, c = -1
    cdef int nonfinite = 0
    cdef uint32_t t
    cdef Py_ssize_t unused_eq = 0
    cdef int unused_nf = 0
    _check_sample_args(k, sample_size, sample_rank, exact, cap, scratch.shape[0],
                       out_indices.shape[0], out_values.shape[0], n)
    if n == 0:
        return 0
    with nogil:
        if k == 0:
            nonfinite = fe_any_nonfinite(<const uint32_t *>&x[0], n)
        elif sample_size == 0 or k == n:
            count = _exact_nogil(&x[0], n, k, &out_indices[0], &out_values[0], &nonfinite)
        else:
            # The sample may hold NaN keys; then the pass below sees them too and
            # reports them (or overflows, and the exact fallback reports them).
            fe_sample_keys(&x[0], n, seed, sample_size, &scratch[0])
            t = fe_radix_kth(&scratch[0], sample_size, sample_rank, &unused_eq, &unused_nf)
            # scratch is free again: it now receives the candidates' float bits.
            c = fe_select_ge(&x[0], n, t, &cand[0] if cap > 0 else NULL, &scratch[0], cap,
                             &nonfinite)
            if not nonfinite:
                if c < k:  # too few candidates, or more than cap (c == -1)
                    count = _exact_nogil(&x[0], n, k, &out_indices[0], &out_values[0],
                                         &nonfinite)
                else:
                    count = _candidates_nogil(k, exact, &cand[0], &scratch[0], c,
                                              &out_indices[0], &out_values[0])
    if nonfinite:
        _raise_nonfinite(x, "x")
    return count


def topk_feedback(const float[::1] update, const float[::1] residual, Py_ssize_t k,
                  uint64_t seed, Py_ssize_t sample_size, Py_ssize_t sample_rank, bint exact,
                  uint32_t[::1] cand, uint32_t[::1] scratch, uint32_t[::1] out_indices,
                  float[::1] out_values, float[::1] residual_out):
    """``residual_out = residual + update`` fused with :func:`topk_sampled` of it.

    ``residual_out`` is ``residual`` itself (in place: the sum is checked for
    NaN/Inf first) or a separate array (one pass; ``residual`` is only read).
    See the twin in ``kernels._reference`` for the full contract.
    """
    cdef Py_ssize_t n = residual.shape[0]
    cdef Py_ssize_t cap = cand.shape[0]
    cdef Py_ssize_t count = 0, c = -1, i
    cdef int nonfinite = 0
    cdef uint32_t t
    cdef Py_ssize_t unused_eq = 0
    cdef int unused_nf = 0
    cdef float *r
    cdef const float *rin
    cdef bint apart
    if update.shape[0] != n:
        raise BadBufferError(f"update has {update.shape[0]} entries but residual has {n}")
    if residual_out.shape[0] != n:
        raise BadBufferError(f"residual_out has {residual_out.shape[0]} entries but residual "
                             f"has {n}")
    _check_sample_args(k, sample_size, sample_rank, exact, cap, scratch.shape[0],
                       out_indices.shape[0], out_values.shape[0], n)
    if n == 0:
        return 0
    r = &residual_out[0]
    rin = &residual[0]
    apart = r != rin
    if apart:
        _check_apart(r, rin, n, "residual")
        _check_apart(r, &update[0], n, "update")
    with nogil:
        if not apart:
            # In place: a read-only check first, so a non-finite sum leaves the
            # residual untouched (the fused pass below writes it as it goes).
            nonfinite = fe_any_nonfinite_sum(r, &update[0], n)
        if nonfinite:
            pass
        elif k == 0 or sample_size == 0 or k == n:
            for i in range(n):
                r[i] = rin[i] + update[i]
            if k > 0:
                count = _exact_nogil(r, n, k, &out_indices[0], &out_values[0], &nonfinite)
            elif apart:  # in place the sums were checked above
                nonfinite = fe_any_nonfinite(<const uint32_t *>r, n)
        else:
            fe_sample_keys_sum(rin, &update[0], n, seed, sample_size, &scratch[0])
            t = fe_radix_kth(&scratch[0], sample_size, sample_rank, &unused_eq, &unused_nf)
            c = fe_add_select_ge(rin, &update[0], r, n, t, &cand[0] if cap > 0 else NULL,
                                 &scratch[0], cap, &nonfinite)
            if nonfinite:
                pass
            elif c < k:
                count = _exact_nogil(r, n, k, &out_indices[0], &out_values[0], &nonfinite)
            else:
                count = _candidates_nogil(k, exact, &cand[0], &scratch[0], c,
                                          &out_indices[0], &out_values[0])
    if nonfinite:
        _raise_nonfinite_sum(update, residual)
    return count


cdef int _check_apart(const float *ro, const float *other, Py_ssize_t n, str name) except -1:
    if ro < other + n and other < ro + n:
        raise BadBufferError(f"residual_out overlaps {name}; pass a separate array, or the "
                             "residual itself to update it in place")
    return 0


# ---- scatter ----

cdef int _check_scatter(const uint32_t[::1] indices, const float[::1] values,
                        Py_ssize_t target_len, str name) except -1:
    cdef Py_ssize_t i, m = indices.shape[0]
    cdef Py_ssize_t bad = -1
    if m != values.shape[0]:
        raise BadBufferError(f"indices has {m} entries but values has {values.shape[0]}")
    with nogil:
        for i in range(m):
            if <uint64_t>indices[i] >= <uint64_t>target_len:  # also right with a 32-bit Py_ssize_t
                bad = i
                break
    if bad >= 0:
        raise BadBufferError(
            f"indices[{bad}] = {indices[bad]} is out of range for {name} of length {target_len}"
        )
    if m > 0 and _first_nonfinite(values) >= 0:
        _raise_nonfinite(values, "values")
    return 0


def subtract_at(float[::1] residual, const uint32_t[::1] indices, const float[::1] values):
    """``residual[indices[i]] -= values[i]`` for each i in order (float32)."""
    _check_scatter(indices, values, residual.shape[0], "residual")
    if indices.shape[0] == 0:
        return
    with nogil:
        fe_subtract_at(&residual[0], &indices[0], &values[0], indices.shape[0])


def put_at(float[::1] residual, const uint32_t[::1] indices, const float[::1] values):
    """``residual[indices[i]] = values[i]`` for each i in order (the last write wins)."""
    _check_scatter(indices, values, residual.shape[0], "residual")
    if indices.shape[0] == 0:
        return
    with nogil:
        fe_put_at(&residual[0], &indices[0], &values[0], indices.shape[0])


def scatter_accumulate(const uint32_t[::1] indices, const float[::1] values, double weight,
                       float[::1] acc):
    """``acc[indices[i]] += float32(weight) * values[i]`` for each i in order (float32)."""
    cdef Py_ssize_t i
    cdef float w = <float>weight
    cdef float p
    if not (w == w and w - w == 0.0):
        raise NonFiniteInputError(f"weight {weight!r} is not a finite float32")
    _check_scatter(indices, values, acc.shape[0], "acc")
    with nogil:
        for i in range(indices.shape[0]):
            p = w * values[i]
            acc[indices[i]] = acc[indices[i]] + p


# ---- index coding ----

def encode_indices(const uint32_t[::1] indices, uint64_t n, uint8_t[::1] out):
    """Write strictly increasing indices < n as delta-minus-one LEB128; return the byte count."""
    cdef Py_ssize_t count = indices.shape[0]
    cdef Py_ssize_t i, pos = 0, bad = -1
    cdef bint bad_order = False
    cdef uint32_t v, prev = 0
    if out.shape[0] < VARINT_MAX_NBYTES * count:
        raise BadBufferError(
            f"out needs {VARINT_MAX_NBYTES} * {count} bytes (max_encoded_index_nbytes), "
            f"got {out.shape[0]}"
        )
    with nogil:
        for i in range(count):  # validate everything before writing
            if i > 0 and indices[i] <= indices[i - 1]:
                bad = i
                bad_order = True
                break
            if indices[i] >= n:
                bad = i
                break
        if bad < 0:
            for i in range(count):
                v = indices[i] if i == 0 else indices[i] - prev - 1
                prev = indices[i]
                while v >= 0x80:
                    out[pos] = <uint8_t>((v & 0x7F) | 0x80)
                    v >>= 7
                    pos += 1
                out[pos] = <uint8_t>v
                pos += 1
    if bad >= 0:
        if bad_order:
            raise BadBufferError(
                f"indices must be strictly increasing: indices[{bad}] = {indices[bad]} "
                f"follows {indices[bad - 1]}"
            )
        raise BadBufferError(f"indices[{bad}] = {indices[bad]} is out of range for n = {n}")
    return pos


def decode_indices(const uint8_t[::1] buf, Py_ssize_t count, uint64_t n, uint32_t[::1] out):
    """Decode ``count`` indices written by :func:`encode_indices`; return the bytes consumed.

    Raises :class:`kernels.errors.CorruptPayloadError` on truncation, a varint longer
    than 5 bytes or above 32 bits, or an index >= n. Never reads past ``buf``.
    """
    cdef Py_ssize_t size = buf.shape[0]
    cdef Py_ssize_t i = 0, pos = 0, nbytes
    cdef uint64_t v, index = 0
    cdef uint8_t b
    cdef int err = 0  # 1 truncated, 2 too wide, 3 out of range
    if count < 0 or out.shape[0] < count:
        raise BadBufferError(f"out needs at least count = {count} entries, got {out.shape[0]}")
    with nogil:
        while i < count:
            v = 0
            nbytes = 0
            while True:
                if pos >= size:
                    err = 1
                    break
                b = buf[pos]
                pos += 1
                if nbytes == 4 and b > 0x0F:  # 5th byte: 4 payload bits left, no continuation
                    err = 2
                    break
                v |= <uint64_t>(b & 0x7F) << (7 * nbytes)
                nbytes += 1
                if b < 0x80:
                    break
            if err:
                break
            index = v if i == 0 else index + 1 + v
            if index >= n:
                err = 3
                break
            out[i] = <uint32_t>index
            i += 1
    if err == 1:
        raise CorruptPayloadError(
            f"index data truncated: {count} indices announced, {i} complete in {size} bytes"
        )
    if err == 2:
        raise CorruptPayloadError(f"varint {i} does not fit in 32 bits")
    if err == 3:
        raise CorruptPayloadError(
            f"decoded index {index} (position {i}) is out of range for n = {n}"
        )
    return pos
