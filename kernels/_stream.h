/* Stores of a freshly computed float array that nothing reads back soon.
 *
 * Error feedback writes a whole new residual every round (a model-sized array)
 * that is next read one round later. On x86-64 a normal store first reads the
 * cache line it lands in (write-allocate), so writing N bytes moves 2N through
 * memory; a non-temporal store (SSE's MOVNTPS, part of the x86-64 baseline)
 * writes the line without reading it first and leaves the caches to the data
 * still in use. Arrays that fit in the last-level cache are better written
 * normally, so callers ask fs_stream_worth(). Other targets use plain stores.
 * The bits written are the same either way; only the memory traffic differs.
 */
#ifndef FEDGE_STREAM_H
#define FEDGE_STREAM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <xmmintrin.h>
#define FS_HAVE_STREAM 1
#else
#define FS_HAVE_STREAM 0
#endif

/* Arrays of at least this many bytes get non-temporal stores. */
#define FS_STREAM_MIN_BYTES ((size_t)16 << 20)

/* Non-zero when out[0:n] should be written with non-temporal stores. */
static inline int fs_stream_worth(const float *out, size_t n)
{
    return FS_HAVE_STREAM && n * sizeof(float) >= FS_STREAM_MIN_BYTES &&
           ((uintptr_t)out & 15u) == 0;
}

/* dst[0:4] = src[0:4]; with stream set, dst must be 16-byte aligned. */
static inline void fs_store4(float *dst, const float *src, int stream)
{
#if FS_HAVE_STREAM
    if (stream) {
        _mm_stream_ps(dst, _mm_loadu_ps(src));
        return;
    }
#else
    (void)stream;
#endif
    memcpy(dst, src, 4 * sizeof(float));
}

/* dst[0:n] = src[0:n]; with stream set, dst must be 16-byte aligned. */
static inline void fs_store(float *dst, const float *src, size_t n, int stream)
{
    size_t k = 0;
    if (stream)
        for (; k + 4 <= n; k += 4) fs_store4(dst + k, src + k, 1);
    memcpy(dst + k, src + k, (n - k) * sizeof(float));
}

/* Order the non-temporal stores before later ones (call once, after the last). */
static inline void fs_stream_done(int stream)
{
#if FS_HAVE_STREAM
    if (stream) _mm_sfence();
#else
    (void)stream;
#endif
}

#endif /* FEDGE_STREAM_H */
