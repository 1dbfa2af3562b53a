/* Hot loops of the sparsification kernels (kernels/_sparsify.pyx), in plain C.
 *
 * Rules of this file:
 *  - Portable C99 only: no target attributes, and no intrinsics except the
 *    non-temporal stores behind _stream.h and prefetch hints (GCC/Clang builtins,
 *    which change timing, never results). The loops are written so that GCC/Clang
 *    at -O3 auto-vectorize them with the baseline SIMD of the target (SSE2 on
 *    x86-64, NEON on aarch64), which is what a cross-built Pi wheel gets. Never
 *    rely on -march=native.
 *  - Nothing here allocates or touches Python; every function runs without the GIL.
 *  - Magnitudes are compared as integer "keys": the float32 bit pattern with the
 *    sign bit cleared. For finite values, key order == |x| order (and -0.0 == +0.0),
 *    and key >= 0x7f800000 exactly when the value is NaN or +/-Inf. Reading the
 *    float bits through a uint32_t pointer relies on -fno-strict-aliasing (set in
 *    setup.py; MSVC does not exploit strict aliasing).
 */
#ifndef FEDGE_SPARSIFY_SIMD_H
#define FEDGE_SPARSIFY_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_stream.h"

#define FE_ABS_MASK 0x7fffffffu
#define FE_NONFINITE_KEY 0x7f800000u
/* key + FE_FINITE_BIAS has its top bit set exactly when key >= 0x7f800000. */
#define FE_FINITE_BIAS 0x00800000u
#define FE_TOP_BIT 0x80000000u
#define FE_BLOCK 16

static inline uint32_t fe_key(float v)
{
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    return b & FE_ABS_MASK;
}

/* Block primitives. With GCC/Clang they use generic vector extensions (4 x 32-bit,
 * lowered to SSE2 on x86-64 and NEON on aarch64/armv7 without any -m flag); other
 * compilers get the scalar loops, with the same results. An "any" word has its top
 * bit set exactly when some key in the block is >= t (computed as (t - 1) - key,
 * which wraps for t == 0 so that every key counts); a "bad" word has its top bit set
 * when some key is NaN/Inf. */
#if defined(__GNUC__) || defined(__clang__)
#define FE_VECTOR 1
typedef uint32_t fe_v4u __attribute__((vector_size(16)));
typedef float fe_v4f __attribute__((vector_size(16)));
typedef fe_v4u fe_acc;
#define FE_ACC_ZERO {0u, 0u, 0u, 0u}

static inline uint32_t fe_acc_or(fe_acc a)
{
    return a[0] | a[1] | a[2] | a[3];
}

/* keys of xb[0..FE_BLOCK): OR of (tm1 - key) returned, key + bias ORed into *bad. */
static inline uint32_t fe_block_any_ge(const uint32_t *xb, uint32_t tm1, fe_acc *bad)
{
    fe_v4u any = FE_ACC_ZERO;
    for (int j = 0; j < FE_BLOCK; j += 4) {
        fe_v4u v;
        memcpy(&v, xb + j, sizeof v);
        v &= FE_ABS_MASK;
        any |= tm1 - v;
        *bad |= v + FE_FINITE_BIAS;
    }
    return fe_acc_or(any);
}

/* ro[j] = r[j] + u[j] over the block (ro is r itself, or apart from r and u);
 * returns the OR of (tm1 - key) of the sums and ORs key + bias into *bad. */
static inline uint32_t fe_block_add_to_any_ge(const float *r, const float *u, float *ro,
                                              int stream, uint32_t tm1, fe_acc *bad)
{
    fe_v4u any = FE_ACC_ZERO;
    for (int j = 0; j < FE_BLOCK; j += 4) {
        fe_v4f a, b;
        fe_v4u v;
        memcpy(&a, r + j, sizeof a);
        memcpy(&b, u + j, sizeof b);
        a = a + b;
        fs_store4(ro + j, (const float *)&a, stream);
        memcpy(&v, &a, sizeof v);
        v &= FE_ABS_MASK;
        any |= tm1 - v;
        *bad |= v + FE_FINITE_BIAS;
    }
    return fe_acc_or(any);
}

/* ORs key(r[j] + u[j]) + bias over the block into *bad (read-only). */
static inline void fe_block_sum_bad(const float *r, const float *u, fe_acc *bad)
{
    for (int j = 0; j < FE_BLOCK; j += 4) {
        fe_v4f a, b;
        fe_v4u v;
        memcpy(&a, r + j, sizeof a);
        memcpy(&b, u + j, sizeof b);
        a = a + b;
        memcpy(&v, &a, sizeof v);
        *bad |= (v & FE_ABS_MASK) + FE_FINITE_BIAS;
    }
}

/* Appends base + j and bits[j] to cand/cbits for each j < FE_BLOCK with key >= t,
 * in order; the caller guarantees room for FE_BLOCK entries. A block usually
 * holds one or two candidates, so the loop runs over the set bits of a mask
 * (bit j: element j qualifies) rather than over all sixteen elements. */
static inline ptrdiff_t fe_block_take_ge(const uint32_t *bits, uint32_t tm1, uint32_t base,
                                         uint32_t *cand, uint32_t *cbits, ptrdiff_t c)
{
    typedef int32_t fe_v4i __attribute__((vector_size(16)));
    const fe_v4u lane = {1u, 2u, 4u, 8u};
    fe_v4u m = FE_ACC_ZERO;
    for (int j = 0; j < FE_BLOCK; j += 4) {
        fe_v4u v;
        memcpy(&v, bits + j, sizeof v);
        fe_v4i ge = (fe_v4i)(tm1 - (v & FE_ABS_MASK)) >> 31; /* all ones where key >= t */
        m |= ((fe_v4u)ge & lane) << (uint32_t)j;
    }
    uint32_t mask = fe_acc_or(m);
    while (mask) {
        int j = __builtin_ctz(mask);
        cand[c] = base + (uint32_t)j;
        cbits[c++] = bits[j];
        mask &= mask - 1u;
    }
    return c;
}
#else
typedef uint32_t fe_acc;
#define FE_ACC_ZERO 0u

static inline uint32_t fe_acc_or(fe_acc a)
{
    return a;
}

static inline uint32_t fe_block_any_ge(const uint32_t *xb, uint32_t tm1, fe_acc *bad)
{
    uint32_t any = 0;
    for (int j = 0; j < FE_BLOCK; j++) {
        uint32_t key = xb[j] & FE_ABS_MASK;
        any |= tm1 - key;
        *bad |= key + FE_FINITE_BIAS;
    }
    return any;
}

static inline uint32_t fe_block_add_to_any_ge(const float *r, const float *u, float *ro,
                                              int stream, uint32_t tm1, fe_acc *bad)
{
    uint32_t any = 0;
    (void)stream;
    for (int j = 0; j < FE_BLOCK; j++) {
        float s = r[j] + u[j];
        ro[j] = s;
        any |= tm1 - fe_key(s);
        *bad |= fe_key(s) + FE_FINITE_BIAS;
    }
    return any;
}

static inline void fe_block_sum_bad(const float *r, const float *u, fe_acc *bad)
{
    for (int j = 0; j < FE_BLOCK; j++) {
        *bad |= fe_key(r[j] + u[j]) + FE_FINITE_BIAS;
    }
}

static inline ptrdiff_t fe_block_take_ge(const uint32_t *bits, uint32_t tm1, uint32_t base,
                                         uint32_t *cand, uint32_t *cbits, ptrdiff_t c)
{
    for (int j = 0; j < FE_BLOCK; j++) { /* branch-free stores */
        uint32_t b = bits[j];
        cand[c] = base + (uint32_t)j;
        cbits[c] = b;
        c += (tm1 - (b & FE_ABS_MASK)) >> 31;
    }
    return c;
}
#endif

/* Non-zero when some element of x[0..n) is NaN or +/-Inf (vectorizes: add/or only). */
static inline int fe_any_nonfinite(const uint32_t *xb, ptrdiff_t n)
{
    uint32_t bad = 0;
    for (ptrdiff_t i = 0; i < n; i++) {
        bad |= (xb[i] & FE_ABS_MASK) + FE_FINITE_BIAS;
    }
    return (bad & FE_TOP_BIT) != 0;
}

/* Non-zero when some r[i] + u[i] is NaN or +/-Inf (which covers non-finite r or u too). */
static inline int fe_any_nonfinite_sum(const float *r, const float *u, ptrdiff_t n)
{
    fe_acc vbad = FE_ACC_ZERO;
    uint32_t bad = 0;
    ptrdiff_t i = 0;
    for (; i + FE_BLOCK <= n; i += FE_BLOCK) {
        fe_block_sum_bad(r + i, u + i, &vbad);
    }
    for (; i < n; i++) {
        bad |= fe_key(r[i] + u[i]) + FE_FINITE_BIAS;
    }
    return ((bad | fe_acc_or(vbad)) & FE_TOP_BIT) != 0;
}

/* splitmix64 (Steele, Lea, Flood 2014): the m-th output (m >= 1) of the stream seeded
 * with `seed`. Counter-based, so the NumPy twin computes the same sample positions. */
static inline uint64_t fe_splitmix64(uint64_t seed, uint64_t m)
{
    uint64_t z = seed + m * UINT64_C(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* Sample position m (0-based) in [0, n): the top 32 bits of the hash scaled by n. */
static inline ptrdiff_t fe_sample_position(uint64_t seed, uint64_t m, uint64_t n)
{
    return (ptrdiff_t)(((fe_splitmix64(seed, m + 1) >> 32) * n) >> 32);
}

/* Walk a histogram from the top bin down until `k` elements are covered.
 * Returns the bin holding the k-th largest; *k becomes its rank inside that bin. */
static inline uint32_t fe_walk(const uint64_t *hist, uint32_t nbins, ptrdiff_t *k)
{
    uint64_t above = 0;
    uint32_t b = nbins;
    while (b > 0) {
        b--;
        if (above + hist[b] >= (uint64_t)*k) {
            break;
        }
        above += hist[b];
    }
    *k -= (ptrdiff_t)above;
    return b;
}

/* hist[0..1024) = histogram of bits [lo, lo + 10) of the keys whose bits from
 * `hi` up equal `sel`, of which there are `count`. When they are a sizeable share
 * of the input, whether a key matches is a coin flip for the branch predictor,
 * so the count is added unconditionally (a trimmed candidate list, whose keys
 * crowd into a few bins); when they are rare, a branch skips the store. */
static inline void fe_hist_within(const uint32_t *xb, ptrdiff_t n, unsigned hi, uint32_t sel,
                                  unsigned lo, uint64_t count, uint64_t *hist)
{
    memset(hist, 0, 1024 * sizeof hist[0]);
    if (count * 16 > (uint64_t)n) {
        for (ptrdiff_t i = 0; i < n; i++) {
            uint32_t key = xb[i] & FE_ABS_MASK;
            hist[(key >> lo) & 1023u] += (key >> hi) == sel;
        }
        return;
    }
    for (ptrdiff_t i = 0; i < n; i++) {
        uint32_t key = xb[i] & FE_ABS_MASK;
        if ((key >> hi) == sel) {
            hist[(key >> lo) & 1023u]++;
        }
    }
}

/* Exact radix select: the k-th largest key (1 <= k <= n) of xb[0..n) & FE_ABS_MASK,
 * in three histogram passes (11 + 10 + 10 bits) over the input, no scratch buffer.
 * *need_eq receives how many elements equal to the threshold belong to the top k
 * (the rest of the top k are strictly greater). *nonfinite is set when some key is
 * NaN/Inf (found in the first pass; the select then stops and returns 0). */
static uint32_t fe_radix_kth(const uint32_t *xb, ptrdiff_t n, ptrdiff_t k, ptrdiff_t *need_eq,
                             int *nonfinite)
{
    /* Four sub-histograms break the store-to-load dependency when consecutive
     * elements fall into the same bin (the common case for Gaussian-like data).
     * n < 2^32, so uint32_t counts cannot overflow. 32 KiB of stack. */
    uint32_t h4[4][2048];
    uint64_t hist[2048];
    uint32_t mx = 0;
    ptrdiff_t i = 0;
    memset(h4, 0, sizeof h4);
    for (; i + 4 <= n; i += 4) {
        uint32_t k0 = xb[i] & FE_ABS_MASK, k1 = xb[i + 1] & FE_ABS_MASK;
        uint32_t k2 = xb[i + 2] & FE_ABS_MASK, k3 = xb[i + 3] & FE_ABS_MASK;
        h4[0][k0 >> 20]++;
        h4[1][k1 >> 20]++;
        h4[2][k2 >> 20]++;
        h4[3][k3 >> 20]++;
        mx |= (k0 + FE_FINITE_BIAS) | (k1 + FE_FINITE_BIAS) | (k2 + FE_FINITE_BIAS)
              | (k3 + FE_FINITE_BIAS);
    }
    for (; i < n; i++) {
        uint32_t k0 = xb[i] & FE_ABS_MASK;
        h4[0][k0 >> 20]++;
        mx |= k0 + FE_FINITE_BIAS;
    }
    *nonfinite = (mx & FE_TOP_BIT) != 0;
    if (*nonfinite) {
        *need_eq = 0;
        return 0;
    }
    for (uint32_t b = 0; b < 2048; b++) {
        hist[b] = (uint64_t)h4[0][b] + h4[1][b] + h4[2][b] + h4[3][b];
    }
    uint32_t b1 = fe_walk(hist, 2048, &k);
    uint64_t in_b1 = hist[b1];

    fe_hist_within(xb, n, 20, b1, 10, in_b1, hist);
    uint32_t b2 = fe_walk(hist, 1024, &k);
    uint32_t prefix = (b1 << 10) | b2;

    fe_hist_within(xb, n, 10, prefix, 0, hist[b2], hist);
    uint32_t b3 = fe_walk(hist, 1024, &k);
    *need_eq = k;
    return (prefix << 10) | b3;
}

/* Write the indices (and values) of the top-k elements of x[0..n) given the
 * threshold key t and need_eq from fe_radix_kth: every key > t, plus the first
 * need_eq keys == t in index order. out_* hold exactly k entries. Returns k. */
static ptrdiff_t fe_take_top(const float *x, ptrdiff_t n, uint32_t t, ptrdiff_t need_eq,
                             ptrdiff_t k, uint32_t *out_i, float *out_v)
{
    const uint32_t *xb = (const uint32_t *)x;
    const uint32_t tm1 = t - 1u; /* top bit of (tm1 - key) set <=> key >= t (wraps for t == 0) */
    fe_acc unused = FE_ACC_ZERO;
    ptrdiff_t c = 0, eq = 0, i = 0;
    for (; i + FE_BLOCK <= n; i += FE_BLOCK) {
        if (!(fe_block_any_ge(xb + i, tm1, &unused) & FE_TOP_BIT)) {
            continue;
        }
        if (c + FE_BLOCK <= k) { /* room for branch-free stores */
            for (int j = 0; j < FE_BLOCK; j++) {
                uint32_t key = xb[i + j] & FE_ABS_MASK;
                ptrdiff_t is_eq = key == t;
                ptrdiff_t take = (key > t) | (is_eq & (eq < need_eq));
                eq += is_eq;
                out_i[c] = (uint32_t)(i + j);
                out_v[c] = x[i + j];
                c += take;
            }
        } else {
            for (int j = 0; j < FE_BLOCK; j++) {
                uint32_t key = xb[i + j] & FE_ABS_MASK;
                if (key > t || (key == t && eq++ < need_eq)) {
                    out_i[c] = (uint32_t)(i + j);
                    out_v[c] = x[i + j];
                    c++;
                }
            }
        }
    }
    for (; i < n; i++) {
        uint32_t key = xb[i] & FE_ABS_MASK;
        if (key > t || (key == t && eq++ < need_eq)) {
            out_i[c] = (uint32_t)i;
            out_v[c] = x[i];
            c++;
        }
    }
    return c;
}

/* fe_block_take_ge, also near the end of cand: stores up to cap entries in all.
 * Returns 1 when the block holds more candidates than fit (*c is then cap). */
static inline int fe_block_take_ge_capped(const uint32_t *bits, uint32_t tm1, uint32_t base,
                                          uint32_t *cand, uint32_t *cbits, ptrdiff_t *c,
                                          ptrdiff_t cap)
{
    if (*c + FE_BLOCK <= cap) {
        *c = fe_block_take_ge(bits, tm1, base, cand, cbits, *c);
        return 0;
    }
    for (int j = 0; j < FE_BLOCK; j++) {
        if ((tm1 - (bits[j] & FE_ABS_MASK)) >> 31) {
            if (*c == cap) {
                return 1;
            }
            cand[*c] = base + (uint32_t)j;
            cbits[(*c)++] = bits[j];
        }
    }
    return 0;
}

/* Software prefetch. Three access patterns here outrun the hardware prefetchers:
 * the sample (random positions), the scatters below (ascending indices with gaps
 * of ~1/fraction elements), and the candidate passes, which stream through the
 * input but stop between chunks to look at the blocks holding a candidate, so
 * that no load is in flight meanwhile. For the first two, asking for lines
 * FE_AHEAD elements early roughly halves the time; the candidate passes ask for
 * the line FE_STREAM_AHEAD elements ahead of the block they read (16 M elements,
 * Xeon: sampled top-k about twice as fast, its error feedback 20 % faster, with
 * 1,024 elements ahead; on an EPYC (Zen 5), 2,048 rather than 1,024 took the
 * fused feedback pass from 4.1 to 3.8 ms, as fast as a plain residual + update,
 * and the candidate pass from 2.4 to 2.3 ms). Other compilers get no prefetch
 * and the same results. */
#define FE_AHEAD 128
#define FE_STREAM_AHEAD 2048
#if defined(__GNUC__) || defined(__clang__)
#define FE_PREFETCH_R(p) __builtin_prefetch((p), 0, 3)
#define FE_PREFETCH_W(p) __builtin_prefetch((p), 1, 3)
#else
#define FE_PREFETCH_R(p) ((void)(p))
#define FE_PREFETCH_W(p) ((void)(p))
#endif

/* Blocks scanned per chunk (16 KiB of input, so the second look hits L1). */
#define FE_CHUNK_BLOCKS 128

/* Streaming candidate pass: store every i with key(x[i]) >= t into cand[0..cap),
 * and the float bits of x[i] into cbits (so trimming needs no gather from x).
 * Returns the count, or -1 when more than cap candidates exist (the pass stops).
 * *nonfinite is set when a NaN/Inf was seen in the part scanned.
 *
 * Around a 1 % threshold a fifth of the 16-element blocks hold a candidate, at
 * random, so a branch on "this block has one" mispredicts often. Each chunk is
 * therefore scanned twice: first, without branching, into a list of the blocks
 * that hold a candidate; then those blocks only, from L1. */
static ptrdiff_t fe_select_ge(const float *x, ptrdiff_t n, uint32_t t, uint32_t *cand,
                              uint32_t *cbits, ptrdiff_t cap, int *nonfinite)
{
    const uint32_t *xb = (const uint32_t *)x;
    const uint32_t tm1 = t - 1u;
    fe_acc vbad = FE_ACC_ZERO;
    uint32_t bad = 0;
    ptrdiff_t c = 0, i = 0;
    uint32_t hits[FE_CHUNK_BLOCKS];
    while (i + FE_BLOCK <= n) {
        ptrdiff_t nblk = (n - i) / FE_BLOCK;
        nblk = nblk < FE_CHUNK_BLOCKS ? nblk : FE_CHUNK_BLOCKS;
        ptrdiff_t nh = 0;
        const int ahead = i + nblk * FE_BLOCK + FE_STREAM_AHEAD <= n;
        for (ptrdiff_t b = 0; b < nblk; b++) {
            if (ahead) FE_PREFETCH_R(xb + i + b * FE_BLOCK + FE_STREAM_AHEAD);
            uint32_t any = fe_block_any_ge(xb + i + b * FE_BLOCK, tm1, &vbad);
            hits[nh] = (uint32_t)b;
            nh += any >> 31;
        }
        for (ptrdiff_t h = 0; h < nh; h++) {
            ptrdiff_t at = i + (ptrdiff_t)hits[h] * FE_BLOCK;
            if (fe_block_take_ge_capped(xb + at, tm1, (uint32_t)at, cand, cbits, &c, cap)) {
                *nonfinite = ((bad | fe_acc_or(vbad)) & FE_TOP_BIT) != 0;
                return -1;
            }
        }
        i += nblk * FE_BLOCK;
    }
    for (; i < n; i++) {
        uint32_t key = xb[i] & FE_ABS_MASK;
        bad |= key + FE_FINITE_BIAS;
        if (key >= t) {
            if (c == cap) {
                *nonfinite = ((bad | fe_acc_or(vbad)) & FE_TOP_BIT) != 0;
                return -1;
            }
            cand[c] = (uint32_t)i;
            cbits[c++] = xb[i];
        }
    }
    *nonfinite = ((bad | fe_acc_or(vbad)) & FE_TOP_BIT) != 0;
    return c;
}

/* Fused error-feedback pass: ro[i] = r[i] + u[i] for every i, and every i with
 * key(ro[i]) >= t stored into cand[0..cap), its bits into cbits. ro is r itself
 * (in place: the caller must have checked every sum for NaN/Inf first, since the
 * residual is overwritten as the pass goes) or apart from r and u, which are then
 * only read (one pass, no check beforehand; large arrays get streamed stores).
 * Chunk by chunk like fe_select_ge: the sums are written and the blocks holding
 * a candidate listed without branching, then those blocks are looked at again.
 * Returns the count, or -1 when more than cap candidates exist (ro is still
 * written to the end). Out of place, *nonfinite is set when some sum is NaN/Inf. */
static inline ptrdiff_t fe_add_select_ge_as(const float *r, const float *u, float *ro, ptrdiff_t n,
                                            uint32_t t, uint32_t *cand, uint32_t *cbits,
                                            ptrdiff_t cap, int *nonfinite, const int in_place)
{
    const uint32_t tm1 = t - 1u;
    const int stream = !in_place && fs_stream_worth(ro, (size_t)n);
    fe_acc vbad = FE_ACC_ZERO;
    uint32_t bad = 0;
    ptrdiff_t c = 0, i = 0;
    int overflow = 0;
    uint32_t hits[FE_CHUNK_BLOCKS];
    while (i + FE_BLOCK <= n) {
        ptrdiff_t nblk = (n - i) / FE_BLOCK;
        nblk = nblk < FE_CHUNK_BLOCKS ? nblk : FE_CHUNK_BLOCKS;
        ptrdiff_t nh = 0;
        const int ahead = i + nblk * FE_BLOCK + FE_STREAM_AHEAD <= n;
        for (ptrdiff_t b = 0; b < nblk; b++) {
            ptrdiff_t at = i + b * FE_BLOCK;
            if (ahead) {
                FE_PREFETCH_R(r + at + FE_STREAM_AHEAD);
                FE_PREFETCH_R(u + at + FE_STREAM_AHEAD);
            }
            uint32_t any = fe_block_add_to_any_ge(r + at, u + at, ro + at, stream, tm1, &vbad);
            hits[nh] = (uint32_t)b;
            nh += any >> 31;
        }
        for (ptrdiff_t h = 0; h < nh && !overflow; h++) {
            ptrdiff_t at = i + (ptrdiff_t)hits[h] * FE_BLOCK;
            /* The sums of a candidate block: read back in place; out of place
             * recomputed from r and u (still in L1), since streamed stores bypass
             * the cache. */
            float sums[FE_BLOCK];
            const uint32_t *sb = (const uint32_t *)sums;
            if (in_place) {
                sb = (const uint32_t *)(ro + at);
            } else {
                for (int j = 0; j < FE_BLOCK; j++) sums[j] = r[at + j] + u[at + j];
            }
            overflow = fe_block_take_ge_capped(sb, tm1, (uint32_t)at, cand, cbits, &c, cap);
        }
        i += nblk * FE_BLOCK;
    }
    for (; i < n; i++) {
        float s = r[i] + u[i];
        uint32_t b;
        memcpy(&b, &s, sizeof b);
        ro[i] = s;
        bad |= (b & FE_ABS_MASK) + FE_FINITE_BIAS;
        if (!overflow && (b & FE_ABS_MASK) >= t) {
            if (c == cap) {
                overflow = 1;
            } else {
                cand[c] = (uint32_t)i;
                cbits[c++] = b;
            }
        }
    }
    fs_stream_done(stream);
    *nonfinite = !in_place && ((bad | fe_acc_or(vbad)) & FE_TOP_BIT) != 0;
    return overflow ? -1 : c;
}

/* Compiled once per case (in_place a constant), so the in-place loop carries
 * neither the finiteness bookkeeping nor the branches of the other. */
static ptrdiff_t fe_add_select_ge(const float *r, const float *u, float *ro, ptrdiff_t n,
                                  uint32_t t, uint32_t *cand, uint32_t *cbits, ptrdiff_t cap,
                                  int *nonfinite)
{
    if (ro == r) {
        return fe_add_select_ge_as(r, u, ro, n, t, cand, cbits, cap, nonfinite, 1);
    }
    return fe_add_select_ge_as(r, u, ro, n, t, cand, cbits, cap, nonfinite, 0);
}

/* res[idx[i]] -= v[i] for i < m, in order (indices already checked < len(res)). */
static void fe_subtract_at(float *res, const uint32_t *idx, const float *v, ptrdiff_t m)
{
    ptrdiff_t i = 0;
    for (; i + FE_AHEAD < m; i++) {
        FE_PREFETCH_W(res + idx[i + FE_AHEAD]);
        res[idx[i]] = res[idx[i]] - v[i];
    }
    for (; i < m; i++) {
        res[idx[i]] = res[idx[i]] - v[i];
    }
}

/* res[idx[i]] = v[i] for i < m, in order (indices already checked < len(res)).
 * Stores only: no load waits on a miss, so it beats fe_subtract_at. */
static void fe_put_at(float *res, const uint32_t *idx, const float *v, ptrdiff_t m)
{
    ptrdiff_t i = 0;
    for (; i + FE_AHEAD < m; i++) {
        FE_PREFETCH_W(res + idx[i + FE_AHEAD]);
        res[idx[i]] = v[i];
    }
    for (; i < m; i++) {
        res[idx[i]] = v[i];
    }
}

/* The sample: positions from the counter-based hash, prefetched FE_SAMPLE_AHEAD
 * draws early through a small ring (the hash is cheap to keep in flight). 64
 * rather than 32 draws: 25,600 keys of a 16 M sum in 0.26 instead of 0.29 ms,
 * of one array in 0.09 instead of 0.14 ms (EPYC, Zen 5). */
#define FE_SAMPLE_AHEAD 64

/* Magnitude keys of the sample, keys[m] = key(v(pos(seed, m))) for m < s, where
 * v(j) is r[j], or r[j] + u[j] when u is used (compiled once per case, `sum` a
 * constant, like fe_add_select_ge_as). */
static inline void fe_sample_keys_as(const float *r, const float *u, ptrdiff_t n, uint64_t seed,
                                     ptrdiff_t s, uint32_t *keys, const int sum)
{
    ptrdiff_t ring[FE_SAMPLE_AHEAD];
    for (ptrdiff_t m = 0; m < FE_SAMPLE_AHEAD && m < s; m++) {
        ring[m] = fe_sample_position(seed, (uint64_t)m, (uint64_t)n);
        FE_PREFETCH_R(r + ring[m]);
        if (sum) FE_PREFETCH_R(u + ring[m]);
    }
    for (ptrdiff_t m = 0; m < s; m++) {
        ptrdiff_t j = ring[m % FE_SAMPLE_AHEAD];
        if (m + FE_SAMPLE_AHEAD < s) {
            ptrdiff_t q = fe_sample_position(seed, (uint64_t)(m + FE_SAMPLE_AHEAD), (uint64_t)n);
            ring[m % FE_SAMPLE_AHEAD] = q;
            FE_PREFETCH_R(r + q);
            if (sum) FE_PREFETCH_R(u + q);
        }
        keys[m] = fe_key(sum ? r[j] + u[j] : r[j]);
    }
}

static void fe_sample_keys(const float *x, ptrdiff_t n, uint64_t seed, ptrdiff_t s, uint32_t *keys)
{
    fe_sample_keys_as(x, NULL, n, seed, s, keys, 0);
}

/* Same, for the values the residual will hold after the add: key(r[j] + u[j]). */
static void fe_sample_keys_sum(const float *r, const float *u, ptrdiff_t n, uint64_t seed, ptrdiff_t s,
                               uint32_t *keys)
{
    fe_sample_keys_as(r, u, n, seed, s, keys, 1);
}

/* Exact rule applied to ascending candidates with their float bits: keep keys > t
 * and the first need_eq keys == t, k of them in all (out_* hold k entries).
 * Most candidates are kept, the rest at random, so the stores are unconditional
 * and only the output position depends on the test. Returns the number written (k). */
static ptrdiff_t fe_take_candidates(const uint32_t *cand, const uint32_t *cbits, ptrdiff_t c,
                                    uint32_t t, ptrdiff_t need_eq, ptrdiff_t k, uint32_t *out_i,
                                    float *out_v)
{
    ptrdiff_t w = 0, eq = 0;
    for (ptrdiff_t j = 0; j < c && w < k; j++) {
        uint32_t key = cbits[j] & FE_ABS_MASK;
        ptrdiff_t is_eq = key == t;
        ptrdiff_t take = (key > t) | (is_eq & (eq < need_eq));
        eq += is_eq;
        out_i[w] = cand[j];
        memcpy(&out_v[w], &cbits[j], sizeof out_v[w]);
        w += take;
    }
    return w;
}

/* Copy all candidates out. */
static void fe_copy_candidates(const uint32_t *cand, const uint32_t *cbits, ptrdiff_t c,
                               uint32_t *out_i, float *out_v)
{
    memcpy(out_i, cand, (size_t)c * sizeof *out_i);
    memcpy(out_v, cbits, (size_t)c * sizeof *out_v);
}

#endif /* FEDGE_SPARSIFY_SIMD_H */
