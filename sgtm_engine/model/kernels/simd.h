/* 16-float vectors with GCC/Clang vector extensions, which every target lowers to its own SIMD (AVX-512 zmm,
 * 2 x AVX2 ymm, 4 x NEON q registers), and the few helpers the kernels share.
 * Compile WITHOUT -ffast-math: vexp's rounding trick relies on IEEE evaluation order. */
#ifndef SGTM_SIMD_H
#define SGTM_SIMD_H

#include <stdint.h>
#include <string.h>

#define LANES 16

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

static inline vf splat(float x) { return (vf){0} + x; }
static inline vi splat_i(int32_t x) { return (vi){0} + x; }
static inline vf blend(vi mask, vf yes, vf no) { return (vf)((mask & (vi)yes) | (~mask & (vi)no)); }
static inline vf vload(const float *p) { return *(const vf *)p; } /* p must be 64-byte aligned */
static inline void vstore(float *p, vf x) { *(vf *)p = x; }
static inline vf vload_u(const float *p) { vf x; memcpy(&x, p, sizeof x); return x; } /* any alignment */
static inline void vstore_u(float *p, vf x) { memcpy(p, &x, sizeof x); }
static inline vf vmax(vf a, vf b) { return blend(a > b, a, b); }

/* Tree reductions: 4 dependent steps instead of 15. */
static inline float hsum(vf x) {
    const vf a = x + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    const vf b = a + __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    const vf c = b + __builtin_shufflevector(b, b, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    return c[0] + c[1];
}
static inline float hmax(vf x) {
    const vf a = vmax(x, __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    const vf b = vmax(a, __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    const vf c = vmax(b, __builtin_shufflevector(b, b, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    return c[0] > c[1] ? c[0] : c[1];
}

/* exp(x) to ~1 ulp for x <= 88. Below -87 it returns exp(-87) ~ 1.6e-38 instead of a denormal or 0 (callers
 * zero their masked lanes themselves): one max instead of two compares and blends per call in the hot loops. */
static inline vf vexp(vf x) {
    x = vmax(x, splat(-87.0f));
    const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2), |x / ln 2| < 2^22 */
    const vf r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f; /* |r| <= ln(2) / 2 */
    vf p = splat(1.0f / 5040.0f);                                              /* Taylor to r^7: error < 6e-9 */
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi two_n = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)two_n;
}

#endif
