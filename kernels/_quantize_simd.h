/* Hot loops of the quantization kernels, written so GCC auto-vectorizes them.
 *
 * Owned by kernels/_quantize.pyx, which declares these functions with
 * `cdef extern from "_quantize_simd.h"` and calls them without the GIL. The
 * NumPy twins in kernels/_reference.py define the semantics; every float32
 * operation here happens in the same order as there, so codes and float bits
 * are identical (setup.py compiles with -O3 -ffp-contract=off, never
 * -ffast-math, so GCC neither fuses nor reassociates float operations).
 *
 * Why the loops look the way they do:
 * - With portable flags GCC vectorizes neither rintf() nor a float `a > m ? a : m`
 *   reduction. So the block absmax is an integer max over the sign-cleared bit
 *   patterns (order-preserving for finite floats; NaN/Inf have patterns above
 *   0x7f7fffff, so the finiteness check comes free), and rounding uses the
 *   add-and-subtract 1.5 * 2^23 trick, which is round-half-to-even (np.rint)
 *   for |v| < 2^22; every quantized value here has |v| <= 256.
 * - On x86-64 with GCC, the whole-array functions are compiled twice
 *   (target_clones: AVX2 and the baseline) and picked at load time by the CPU,
 *   so wheels stay portable (no -march flags). On ARMv8 NEON is baseline.
 * - Plain block quantization checks for NaN/Inf as it goes, per group of blocks
 *   (the absmax it needs anyway exposes them) before writing that group, so the
 *   input is read once. Affine quantization learns it from its min/max pass,
 *   before writing. In-place error feedback assumes finite input, which the
 *   Cython layer checks first (fq_max_absbits_sum), so a non-finite value leaves
 *   the residual untouched; out-of-place feedback checks
 *   as it goes and only reads the old residual.
 */
#ifndef FEDGE_QUANTIZE_SIMD_H
#define FEDGE_QUANTIZE_SIMD_H

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_stream.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FQ_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FQ_CLONES
#endif

#if defined(__GNUC__)
#define FQ_INLINE static inline __attribute__((always_inline))
#else
#define FQ_INLINE static inline
#endif

#define FQ_ABS_MASK 0x7fffffffu
#define FQ_MAX_FINITE_BITS 0x7f7fffffu /* bit pattern of FLT_MAX */
#define FQ_FINITE_BIAS 0x00800000u     /* absbits + this has the top bit set iff NaN/Inf */
#define FQ_MAGIC 12582912.0f           /* 1.5 * 2^23 */
#define FQ_CHUNK 256                   /* codes staged on the stack per step */

FQ_INLINE uint32_t fq_absbits(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b & FQ_ABS_MASK;
}

FQ_INLINE float fq_from_bits(uint32_t b) {
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

FQ_INLINE int32_t fq_sbits(float f) {
    int32_t b;
    memcpy(&b, &f, sizeof b);
    return b;
}

/* cond ? a : 0.0f as a bit mask, which GCC vectorizes (a float select it won't). */
FQ_INLINE float fq_keep_if(int cond, float a) {
    uint32_t b;
    memcpy(&b, &a, sizeof b);
    return fq_from_bits(b & (0u - (uint32_t)(cond != 0)));
}

/* ---- finiteness ---------------------------------------------------------- */

/* Largest sign-cleared bit pattern of x; > FQ_MAX_FINITE_BITS means NaN/Inf. */
FQ_CLONES static uint32_t fq_max_absbits(const float *x, size_t n) {
    uint32_t m = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b = fq_absbits(x[i]);
        m = b > m ? b : m;
    }
    return m;
}

/* Same for the float32 sums a[i] + b[i] (error feedback checks residual + update). */
FQ_CLONES static uint32_t fq_max_absbits_sum(const float *a, const float *b, size_t n) {
    uint32_t m = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t s = fq_absbits(a[i] + b[i]);
        m = s > m ? s : m;
    }
    return m;
}

static int64_t fq_first_nonfinite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (fq_absbits(x[i]) > FQ_MAX_FINITE_BITS) return (int64_t)i;
    return -1;
}

static int64_t fq_first_nonfinite_sum(const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (fq_absbits(a[i] + b[i]) > FQ_MAX_FINITE_BITS) return (int64_t)i;
    return -1;
}

/* ---- residual + update --------------------------------------------------- */

/* out = r + u, returning -1, or the index of the first NaN/Inf sum, found after
 * the pass (out then holds every sum, the bad ones included). out may be r or u
 * itself. Large arrays are written with non-temporal stores, as the fused
 * error-feedback kernels write their new residual: this is the memory traffic
 * every form of error feedback needs (read two arrays, write one) and nothing
 * else. Four floats at a time (GCC's vector extensions: SSE2 on x86-64, NEON on
 * ARM), stored straight from the register: going through a stack stage, as the
 * auto-vectorized loops must for streamed stores, cost a fifth more time. A sum
 * is NaN/Inf exactly when its sign-cleared bits plus FQ_FINITE_BIAS reach the top bit. */
#if defined(__GNUC__)
typedef float fq_v4f __attribute__((vector_size(16)));
typedef uint32_t fq_v4u __attribute__((vector_size(16)));
#endif

static int64_t fq_residual_add(const float *r, const float *u, float *out, size_t n) {
    const int stream = fs_stream_worth(out, n);
    uint32_t bad = 0;
    size_t k = 0;
#if defined(__GNUC__)
    fq_v4u vbad = {0u, 0u, 0u, 0u};
    for (; k + 4 <= n; k += 4) {
        fq_v4f a, b;
        fq_v4u v;
        memcpy(&a, r + k, sizeof a);
        memcpy(&b, u + k, sizeof b);
        a = a + b;
        fs_store4(out + k, (const float *)&a, stream);
        memcpy(&v, &a, sizeof v);
        vbad |= (v & FQ_ABS_MASK) + FQ_FINITE_BIAS;
    }
    bad = vbad[0] | vbad[1] | vbad[2] | vbad[3];
#endif
    for (; k < n; k++) {
        float v = r[k] + u[k];
        out[k] = v;
        bad |= fq_absbits(v) + FQ_FINITE_BIAS;
    }
    fs_stream_done(stream);
    return (bad & 0x80000000u) ? fq_first_nonfinite_sum(r, u, n) : -1;
}

/* ---- affine uint8 -------------------------------------------------------- */

/* Min and max of x (n > 0) via an order-preserving int32 key of the bits. The keys
 * of +NaN/+Inf sort above every finite one and those of -NaN/-Inf below, so
 * lo and hi are both finite exactly when every element is. */
FQ_CLONES static void fq_minmax(const float *x, size_t n, float *lo, float *hi) {
    int32_t kmin = INT32_MAX, kmax = INT32_MIN;
    for (size_t i = 0; i < n; i++) {
        int32_t b;
        memcpy(&b, &x[i], sizeof b);
        int32_t k = b ^ ((b >> 31) & 0x7fffffff); /* negative floats: reverse order */
        kmin = k < kmin ? k : kmin;
        kmax = k > kmax ? k : kmax;
    }
    kmin = kmin ^ ((kmin >> 31) & 0x7fffffff); /* the key map is its own inverse */
    kmax = kmax ^ ((kmax >> 31) & 0x7fffffff);
    *lo = fq_from_bits((uint32_t)kmin);
    *hi = fq_from_bits((uint32_t)kmax);
}

/* code = clamp(rint(x * inv) + zero_point, 0, 255); rint via the bit pattern of
 * v + 1.5 * 2^23 (see fq_codes_rint). */
FQ_CLONES static void fq_affine_quantize(const float *x, size_t n, float inv, int32_t zp,
                                         uint8_t *out) {
    for (size_t i = 0; i < n; i++) {
        float v = x[i] * inv;
        int32_t q = fq_sbits(v + FQ_MAGIC) - 0x4B400000 + zp;
        q = q < 255 ? q : 255;
        q = q > 0 ? q : 0;
        out[i] = (uint8_t)q;
    }
}

FQ_CLONES static void fq_affine_dequantize(const uint8_t *codes, size_t n, float scale, float zp,
                                           float *out) {
    for (size_t i = 0; i < n; i++) out[i] = ((float)codes[i] - zp) * scale;
}

FQ_CLONES static void fq_affine_dequantize_acc(const uint8_t *codes, size_t n, float scale,
                                               float zp, float weight, float *acc) {
    for (size_t i = 0; i < n; i++) acc[i] = acc[i] + weight * (((float)codes[i] - zp) * scale);
}

/* ---- symmetric blocks ---------------------------------------------------- */

#define FQ_GROUP 16        /* blocks whose scales are computed together */
#define FQ_GROUP_ELEMS 4096 /* a group spans at most this many elements (16 KiB) if it can */

FQ_INLINE int fq_qmax(int bits) { return bits == 8 ? 127 : (bits == 4 ? 7 : 1); }

/* Blocks per group: FQ_GROUP, fewer when that would span more than FQ_GROUP_ELEMS
 * elements, at least one. */
FQ_INLINE size_t fq_group_blocks(size_t bs) {
    size_t g = bs >= FQ_GROUP_ELEMS / FQ_GROUP ? FQ_GROUP_ELEMS / bs : FQ_GROUP;
    return g == 0 ? 1 : g;
}

/* The largest float32 scale s with qmax * s finite in float32 (the twin's
 * _SCALE_MAX). FLT_MAX / 127 rounds up, so without this cap a block holding
 * values near FLT_MAX would decode to inf. */
FQ_INLINE float fq_scale_max(float fq) {
    return fq_from_bits(fq == 127.0f ? 0x7c010203u : (fq == 7.0f ? 0x7e124924u : 0x7f7fffffu));
}

/* Prefetch x[0:len] for reading (nothing when x is NULL). The block loops read
 * a group's blocks twice: absmax, then codes from L1. While the second pass
 * computes, no load goes to memory, and on large arrays the hardware prefetcher
 * does not run far enough ahead to fill that gap; asking for the lines a couple
 * of groups ahead overlaps computing with loading (16 M elements, Xeon: block
 * int8 quantize 30 % faster, error feedback 20 %). */
FQ_INLINE void fq_prefetch(const float *x, size_t len) {
    if (x)
        for (size_t k = 0; k < len; k += 16) __builtin_prefetch(x + k, 0, 3);
}

/* How many elements ahead of the block being coded to prefetch: two groups. */
FQ_INLINE size_t fq_prefetch_ahead(size_t bs) { return 2 * fq_group_blocks(bs) * bs; }

/* Scales and reciprocals of FQ_GROUP blocks from their absmax bit patterns. The
 * divisions are independent, so they vectorize instead of stalling once per block.
 * scale = min(max(absmax / qmax, FLT_MIN), fq_scale_max) keeps 1/scale and
 * qmax * scale finite; absmax 0 gives 0, 0. */
FQ_INLINE void fq_group_scales(const uint32_t *absbits, float fq, float *scale, float *inv) {
    const float smax = fq_scale_max(fq);
    for (int j = 0; j < FQ_GROUP; j++) {
        float s = fq_from_bits(absbits[j]) / fq;
        s = s < FLT_MIN ? FLT_MIN : s;
        s = s > smax ? smax : s;
        float iv = 1.0f / s;
        int nonzero = absbits[j] != 0;
        scale[j] = fq_keep_if(nonzero, s);
        inv[j] = fq_keep_if(nonzero, iv);
    }
}

/* splitmix64 output number (index + 1) of a generator seeded with `seed`,
 * top 24 bits as a float in [0, 1): counter-based, so any slice is reproducible. */
FQ_INLINE float fq_uniform(uint64_t seed, uint64_t index) {
    uint64_t z = seed + (index + 1u) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    return (float)(int32_t)(z >> 40) * (1.0f / 16777216.0f);
}

/* Codes of x[0:len], nearest-even: rint(x * inv), clamped to [-qmax, qmax].
 * For |v| < 2^22, v + 1.5 * 2^23 lies in [2^23, 2^24), where the float spacing
 * is 1, so its bit pattern is 0x4B400000 + rint(v): the integer comes out of the
 * bits, with no float-to-int conversion, and is clamped as an integer. */
FQ_INLINE int32_t fq_code_rint(float v, int32_t qmax) {
    int32_t q = fq_sbits(v + FQ_MAGIC) - 0x4B400000;
    q = q < qmax ? q : qmax;
    return q > -qmax ? q : -qmax;
}

FQ_INLINE void fq_codes_rint(const float *x, size_t len, float inv, int32_t qmax,
                             int8_t *codes) {
    for (size_t k = 0; k < len; k++) codes[k] = (int8_t)fq_code_rint(x[k] * inv, qmax);
}

/* Stochastic: floor(v) + (u < v - floor(v)), so E[code] = v (unbiased). With
 * -ftrapping-math (the default) GCC will not vectorize a float compare-and-select,
 * so the comparisons are done on bit patterns (sign of r - v, which is exact;
 * order of the non-negative floats u and frac) and the select is a bit mask. */
FQ_INLINE void fq_codes_stochastic(const float *x, size_t len, float inv, float fq, uint64_t seed,
                                   uint64_t base, int8_t *codes) {
    for (size_t k = 0; k < len; k++) {
        float v = x[k] * inv;
        float r = (v + FQ_MAGIC) - FQ_MAGIC;
        float f = r - fq_keep_if(fq_sbits(r - v) > 0, 1.0f); /* floor(v): r > v */
        float frac = v - f;                                   /* in [0, 1), or -0.0 */
        float u = fq_uniform(seed, base + k);
        float q = f + fq_keep_if(fq_sbits(u) < fq_sbits(frac), 1.0f); /* u < frac */
        q = q < fq ? q : fq;
        q = q > -fq ? q : -fq;
        codes[k] = (int8_t)(int32_t)q;
    }
}

/* Pack len codes starting at an element index that is a multiple of 8/bits;
 * a trailing partial byte gets zero padding codes. */
FQ_INLINE void fq_pack(const int8_t *codes, size_t len, int bits, uint8_t *dst) {
    if (bits == 4) {
        size_t pairs = len / 2;
        for (size_t j = 0; j < pairs; j++)
            dst[j] = (uint8_t)((codes[2 * j] & 0x0f) | ((codes[2 * j + 1] & 0x0f) << 4));
        if (len & 1) dst[pairs] = (uint8_t)(codes[len - 1] & 0x0f);
    } else { /* bits == 2 */
        size_t quads = len / 4;
        for (size_t j = 0; j < quads; j++)
            dst[j] = (uint8_t)((codes[4 * j] & 3) | ((codes[4 * j + 1] & 3) << 2) |
                               ((codes[4 * j + 2] & 3) << 4) | ((codes[4 * j + 3] & 3) << 6));
        size_t rest = len & 3;
        if (rest) {
            uint8_t b = 0;
            for (size_t k = 0; k < rest; k++)
                b |= (uint8_t)((codes[4 * quads + k] & 3) << (2 * k));
            dst[quads] = b;
        }
    }
}

/* Absmax bit pattern of a block; with `update` set, first residual += update. */
FQ_INLINE uint32_t fq_block_absbits(float *xw, const float *update, const float *x, size_t len) {
    if (xw)
        for (size_t k = 0; k < len; k++) xw[k] = xw[k] + update[k];
    uint32_t m = 0;
    for (size_t k = 0; k < len; k++) {
        uint32_t b = fq_absbits(x[k]);
        m = b > m ? b : m;
    }
    return m;
}

/* Codes of one block x[0:len] (global element index `start`) into packed storage;
 * with xw set (error feedback, xw == x is the residual), then
 * residual -= code * scale. */
FQ_INLINE void fq_block_quantize(float *xw, const float *x, size_t len, size_t start, int bits,
                                 int stochastic, uint64_t seed, float scale, float inv,
                                 uint8_t *packed) {
    const float fq = (float)fq_qmax(bits);
    int8_t stage[FQ_CHUNK];
    for (size_t off = 0; off < len; off += FQ_CHUNK) {
        size_t m = len - off < FQ_CHUNK ? len - off : FQ_CHUNK;
        int8_t *codes = bits == 8 ? (int8_t *)packed + start + off : stage;
        if (xw && !stochastic) {
            /* Error feedback: the code and what it leaves over in one loop. */
            const int32_t qmax = fq_qmax(bits);
            float *r = xw + off;
            for (size_t k = 0; k < m; k++) {
                float rk = r[k];
                int32_t q = fq_code_rint(rk * inv, qmax);
                codes[k] = (int8_t)q;
                r[k] = rk - (float)q * scale;
            }
        } else {
            if (stochastic)
                fq_codes_stochastic(x + off, m, inv, fq, seed, (uint64_t)(start + off), codes);
            else
                fq_codes_rint(x + off, m, inv, fq_qmax(bits), codes);
            if (xw) {
                float *r = xw + off;
                for (size_t k = 0; k < m; k++) r[k] = r[k] - (float)codes[k] * scale;
            }
        }
        if (bits != 8) fq_pack(codes, m, bits, packed + (start + off) * (size_t)bits / 8);
    }
}

/* The block loop shared by plain quantization (xw == NULL) and error feedback
 * (xw == x == residual). Blocks go in groups of up to FQ_GROUP that fit in L1:
 * absmax of each, then all their scales at once, then the codes. A block length
 * of 64 (the default) is passed as a constant so GCC unrolls it completely. */
FQ_INLINE int64_t fq_blocks(float *xw, const float *update, const float *x, size_t n, int bits,
                            size_t bs, int stochastic, uint64_t seed, uint8_t *packed,
                            float *scales) {
    const float fq = (float)fq_qmax(bits);
    size_t nblocks = (n + bs - 1) / bs;
    size_t gmax = fq_group_blocks(bs);
    const size_t ahead = fq_prefetch_ahead(bs);
    for (size_t b0 = 0; b0 < nblocks; b0 += gmax) {
        size_t g = nblocks - b0 < gmax ? nblocks - b0 : gmax;
        uint32_t ab[FQ_GROUP] = {0};
        float sc[FQ_GROUP], iv[FQ_GROUP];
        for (size_t j = 0; j < g; j++) {
            size_t start = (b0 + j) * bs;
            size_t len = n - start < bs ? n - start : bs;
            float *w = xw ? xw + start : NULL;
            const float *u = update ? update + start : NULL;
            ab[j] = len == 64 ? fq_block_absbits(w, u, x + start, 64)
                              : fq_block_absbits(w, u, x + start, len);
        }
        if (!xw) { /* plain quantization checks for NaN/Inf here, before writing the group */
            uint32_t worst = 0;
            for (size_t j = 0; j < g; j++) worst = ab[j] > worst ? ab[j] : worst;
            if (worst > FQ_MAX_FINITE_BITS) {
                size_t s0 = b0 * bs, end = (b0 + g) * bs < n ? (b0 + g) * bs : n;
                return (int64_t)s0 + fq_first_nonfinite(x + s0, end - s0);
            }
        }
        fq_group_scales(ab, fq, sc, iv);
        for (size_t j = 0; j < g; j++) {
            size_t start = (b0 + j) * bs;
            size_t len = n - start < bs ? n - start : bs;
            float *w = xw ? xw + start : NULL;
            scales[b0 + j] = sc[j];
            if (start + ahead + bs <= n) {
                fq_prefetch(x + start + ahead, bs);
                fq_prefetch(update ? update + start + ahead : NULL, bs);
            }
            if (len == 64)
                fq_block_quantize(w, x + start, 64, start, bits, stochastic, seed, sc[j], iv[j],
                                  packed);
            else
                fq_block_quantize(w, x + start, len, start, bits, stochastic, seed, sc[j], iv[j],
                                  packed);
        }
    }
    return -1;
}

/* Whole array, n > 0, buffers sized by the caller. Returns -1, or the index of
 * the first NaN/Inf, found group by group as the pass goes: the outputs then hold
 * the groups before it. */
FQ_CLONES static int64_t fq_quantize_block(const float *x, size_t n, int bits, size_t block_size,
                                           int stochastic, uint64_t seed, uint8_t *packed,
                                           float *scales) {
    if (bits == 8)
        return fq_blocks(NULL, NULL, x, n, 8, block_size, stochastic, seed, packed, scales);
    if (bits == 4)
        return fq_blocks(NULL, NULL, x, n, 4, block_size, stochastic, seed, packed, scales);
    return fq_blocks(NULL, NULL, x, n, 2, block_size, stochastic, seed, packed, scales);
}

/* Error feedback, one cache-resident pass per group of blocks:
 * residual += update; codes = quantize(residual); residual -= dequantize(codes).
 * The caller has checked that every residual + update is finite. */
FQ_CLONES static void fq_quantize_block_feedback(const float *update, float *residual, size_t n,
                                                 int bits, size_t block_size, int stochastic,
                                                 uint64_t seed, uint8_t *packed, float *scales) {
    if (bits == 8)
        fq_blocks(residual, update, residual, n, 8, block_size, stochastic, seed, packed, scales);
    else if (bits == 4)
        fq_blocks(residual, update, residual, n, 4, block_size, stochastic, seed, packed, scales);
    else
        fq_blocks(residual, update, residual, n, 2, block_size, stochastic, seed, packed, scales);
}

/* Absmax bit pattern of the sums r[k] + u[k] of a block (nothing is written). */
FQ_INLINE uint32_t fq_block_absbits_sum(const float *r, const float *u, size_t len) {
    uint32_t m = 0;
    for (size_t k = 0; k < len; k++) {
        uint32_t b = fq_absbits(r[k] + u[k]);
        m = b > m ? b : m;
    }
    return m;
}

/* One block of out-of-place error feedback (pointers at the block's start): the
 * sums s = r + u go through a stack stage chunk by chunk, the codes of s go to
 * packed storage, and ro = s - code * scale. Same operations, so the same bits,
 * as the in-place fq_block_quantize path. */
FQ_INLINE void fq_block_feedback_to(const float *r, const float *u, float *ro, int stream,
                                    size_t len, size_t start, int bits, int stochastic, uint64_t seed,
                                    float scale, float inv, uint8_t *packed) {
    const float fq = (float)fq_qmax(bits);
    float s[FQ_CHUNK];
    int8_t stage[FQ_CHUNK];
    for (size_t off = 0; off < len; off += FQ_CHUNK) {
        size_t m = len - off < FQ_CHUNK ? len - off : FQ_CHUNK;
        int8_t *codes = bits == 8 ? (int8_t *)packed + start + off : stage;
        /* Streamed stores go out from a stack stage; otherwise write ro directly. */
        float *dst = stream ? s : ro + off;
        if (stochastic) {
            for (size_t k = 0; k < m; k++) dst[k] = r[off + k] + u[off + k];
            fq_codes_stochastic(dst, m, inv, fq, seed, (uint64_t)(start + off), codes);
            for (size_t k = 0; k < m; k++) dst[k] = dst[k] - (float)codes[k] * scale;
        } else {
            /* One loop: sum, code, and what the code leaves over. */
            const int32_t qmax = fq_qmax(bits);
            for (size_t k = 0; k < m; k++) {
                float sk = r[off + k] + u[off + k];
                int32_t q = fq_code_rint(sk * inv, qmax);
                codes[k] = (int8_t)q;
                dst[k] = sk - (float)q * scale;
            }
        }
        if (bits != 8) fq_pack(codes, m, bits, packed + (start + off) * (size_t)bits / 8);
        if (stream) fs_store(ro + off, s, m, 1);
    }
}

/* The block loop of out-of-place error feedback. Per group of blocks (<= 16 KiB of
 * each input, so the second read hits L1/L2): absmax of every block's sums, which
 * also finds NaN/Inf, then the scales, then codes and new residual. Returns -1, or
 * the index of the first non-finite sum (the outputs then hold partial results;
 * residual and update are only ever read). */
FQ_INLINE int64_t fq_blocks_to(const float *u, const float *r, float *ro, size_t n, int bits,
                               size_t bs, int stochastic, uint64_t seed, uint8_t *packed,
                               float *scales) {
    const float fq = (float)fq_qmax(bits);
    const int stream = fs_stream_worth(ro, n);
    size_t nblocks = (n + bs - 1) / bs;
    size_t gmax = fq_group_blocks(bs);
    const size_t ahead = fq_prefetch_ahead(bs);
    for (size_t b0 = 0; b0 < nblocks; b0 += gmax) {
        size_t g = nblocks - b0 < gmax ? nblocks - b0 : gmax;
        uint32_t ab[FQ_GROUP] = {0};
        uint32_t worst = 0;
        float sc[FQ_GROUP], iv[FQ_GROUP];
        for (size_t j = 0; j < g; j++) {
            size_t start = (b0 + j) * bs;
            size_t len = n - start < bs ? n - start : bs;
            ab[j] = len == 64 ? fq_block_absbits_sum(r + start, u + start, 64)
                              : fq_block_absbits_sum(r + start, u + start, len);
            worst = ab[j] > worst ? ab[j] : worst;
        }
        if (worst > FQ_MAX_FINITE_BITS) {
            size_t gstart = b0 * bs;
            size_t gend = (b0 + g) * bs < n ? (b0 + g) * bs : n;
            fs_stream_done(stream);
            return (int64_t)gstart + fq_first_nonfinite_sum(r + gstart, u + gstart, gend - gstart);
        }
        fq_group_scales(ab, fq, sc, iv);
        for (size_t j = 0; j < g; j++) {
            size_t start = (b0 + j) * bs;
            size_t len = n - start < bs ? n - start : bs;
            scales[b0 + j] = sc[j];
            if (start + ahead + bs <= n) {
                fq_prefetch(r + start + ahead, bs);
                fq_prefetch(u + start + ahead, bs);
            }
            if (len == 64)
                fq_block_feedback_to(r + start, u + start, ro + start, stream, 64, start, bits,
                                     stochastic, seed, sc[j], iv[j], packed);
            else
                fq_block_feedback_to(r + start, u + start, ro + start, stream, len, start, bits,
                                     stochastic, seed, sc[j], iv[j], packed);
        }
    }
    fs_stream_done(stream);
    return -1;
}

/* Error feedback out of place: the new residual goes to ro (not overlapping
 * residual or update), in one pass with no separate check. See fq_blocks_to. */
FQ_CLONES static int64_t fq_quantize_block_feedback_to(const float *update, const float *residual,
                                                       float *ro, size_t n, int bits,
                                                       size_t block_size, int stochastic,
                                                       uint64_t seed, uint8_t *packed,
                                                       float *scales) {
    if (bits == 8)
        return fq_blocks_to(update, residual, ro, n, 8, block_size, stochastic, seed, packed,
                            scales);
    if (bits == 4)
        return fq_blocks_to(update, residual, ro, n, 4, block_size, stochastic, seed, packed,
                            scales);
    return fq_blocks_to(update, residual, ro, n, 2, block_size, stochastic, seed, packed, scales);
}

/* A decoded code as a float, clamped to [-qmax, qmax]. Encoders never write
 * -(qmax + 1) (-128, -8, -2), but a corrupt payload can hold it, and with the
 * largest scale the payload check admits (FLT_MAX / qmax) it would overflow to -inf. */
FQ_INLINE float fq_code_f(int32_t c, int32_t qmax) {
    return (float)(c + (int32_t)(c == -qmax - 1)); /* the only code below -qmax */
}

/* Decode one block's codes into out[0:len] as code * scale, or, when acc is
 * set, acc[k] = acc[k] + weight * (code * scale). */
FQ_INLINE void fq_dequantize_one_block(const uint8_t *p, size_t len, int bits, float s,
                                       float *out, int accumulate, float weight) {
    const int32_t qmax = fq_qmax(bits);
    if (bits == 8) {
        const int8_t *c = (const int8_t *)p;
        if (accumulate)
            for (size_t k = 0; k < len; k++)
                out[k] = out[k] + weight * (fq_code_f(c[k], qmax) * s);
        else
            for (size_t k = 0; k < len; k++) out[k] = fq_code_f(c[k], qmax) * s;
    } else if (bits == 4) {
        size_t pairs = len / 2;
        if (accumulate) {
            for (size_t j = 0; j < pairs; j++) {
                uint8_t v = p[j];
                float lo = fq_code_f((int8_t)(uint8_t)(v << 4) >> 4, qmax);
                float hi = fq_code_f((int8_t)v >> 4, qmax);
                out[2 * j] = out[2 * j] + weight * (lo * s);
                out[2 * j + 1] = out[2 * j + 1] + weight * (hi * s);
            }
        } else {
            for (size_t j = 0; j < pairs; j++) {
                uint8_t v = p[j];
                out[2 * j] = fq_code_f((int8_t)(uint8_t)(v << 4) >> 4, qmax) * s;
                out[2 * j + 1] = fq_code_f((int8_t)v >> 4, qmax) * s;
            }
        }
        if (len & 1) {
            float lo = fq_code_f((int8_t)(uint8_t)(p[pairs] << 4) >> 4, qmax);
            size_t k = len - 1;
            out[k] = accumulate ? out[k] + weight * (lo * s) : lo * s;
        }
    } else { /* bits == 2 */
        size_t quads = len / 4;
        for (size_t j = 0; j < quads; j++) {
            uint8_t v = p[j];
            float c0 = fq_code_f((int8_t)(uint8_t)(v << 6) >> 6, qmax);
            float c1 = fq_code_f((int8_t)(uint8_t)(v << 4) >> 6, qmax);
            float c2 = fq_code_f((int8_t)(uint8_t)(v << 2) >> 6, qmax);
            float c3 = fq_code_f((int8_t)v >> 6, qmax);
            float *o = out + 4 * j;
            if (accumulate) {
                o[0] = o[0] + weight * (c0 * s);
                o[1] = o[1] + weight * (c1 * s);
                o[2] = o[2] + weight * (c2 * s);
                o[3] = o[3] + weight * (c3 * s);
            } else {
                o[0] = c0 * s;
                o[1] = c1 * s;
                o[2] = c2 * s;
                o[3] = c3 * s;
            }
        }
        for (size_t k = 4 * quads; k < len; k++) {
            int sh = (int)(2 * (k & 3));
            float c = fq_code_f((int8_t)(uint8_t)(p[quads] << (6 - sh)) >> 6, qmax);
            out[k] = accumulate ? out[k] + weight * (c * s) : c * s;
        }
    }
}

FQ_CLONES static void fq_dequantize_block(const uint8_t *packed, const float *scales, size_t n,
                                          int bits, size_t block_size, float *out) {
    size_t b = 0;
    for (size_t start = 0; start < n; start += block_size, b++) {
        size_t len = n - start < block_size ? n - start : block_size;
        fq_dequantize_one_block(packed + start * (size_t)bits / 8, len, bits, scales[b],
                                out + start, 0, 0.0f);
    }
}

FQ_CLONES static void fq_dequantize_block_acc(const uint8_t *packed, const float *scales,
                                              size_t n, int bits, size_t block_size, float weight,
                                              float *acc) {
    size_t b = 0;
    for (size_t start = 0; start < n; start += block_size, b++) {
        size_t len = n - start < block_size ? n - start : block_size;
        fq_dequantize_one_block(packed + start * (size_t)bits / 8, len, bits, scales[b],
                                acc + start, 1, weight);
    }
}

#endif /* FEDGE_QUANTIZE_SIMD_H */
