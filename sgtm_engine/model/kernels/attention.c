/* Fused causal / local-window attention for small heads on CPU (fp32), forward and backward.
 *
 * Why: GPT-Neo keeps 32 heads at every size, so the paper's small shapes have heads of 4-8 dims. Library kernels
 * then spend their time on [block x 4] x [4 x block] matmul calls and materialized score blocks rather than on
 * arithmetic; at the 8M TinyStories shape attention was over half of a CPU training step. Here one (batch, head)
 * pair is one task: its keys and values are transposed once into zero-padded [D][T] rows, and each query row is one
 * (backward) or two (forward) sweeps over 16-key chunks held in vector registers: scores, exp, and every weighted
 * sum of the same chunk are done while it is loaded, and nothing of size T x T is ever written.
 *
 * Semantics (those of scaled_dot_product_attention with a causal or banded mask): query i attends keys
 * t in [max(0, i - window + 1), i] (window <= 0: all t <= i), scores scale * q_i . k_t, softmax over t. The forward
 * stores each row's log-sum-exp; the backward recomputes the probabilities from it (FlashAttention-2's scheme):
 *   p = exp(s - lse), dp_t = dO_i . v_t, ds_t = p_t (dp_t - dO_i . O_i),
 *   dq_i = scale * sum_t ds_t k_t, dk_t += scale * ds_t q_i, dv_t += p_t dO_i.
 * Tensors are [B, T, H, D] with D contiguous and any B/T/H strides (the q/k/v projections' outputs as views); each
 * call handles the flattened (batch, head) range [bh_lo, bh_hi), so Python runs disjoint ranges on threads.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define MAX_D 64

typedef struct {
    int64_t b, t, h; /* element strides; D is contiguous */
} strides_t;

static inline int64_t first_key(int64_t i, int64_t window) {
    return (window > 0 && i - window + 1 > 0) ? i - window + 1 : 0;
}

/* Lanes of the chunk starting at key c that lie in [lo, hi]. */
static inline vi in_range(int64_t c, int64_t lo, int64_t hi) {
    static const vi iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const vi t = splat_i((int32_t)c) + iota;
    return (t >= splat_i((int32_t)lo)) & (t <= splat_i((int32_t)hi));
}

/* One (b, h)'s [T, D] rows into a zero-padded [D][Tp] block. */
static void gather_transposed(const float *x, strides_t s, int64_t b, int64_t h, int64_t T, int64_t Tp, int64_t D,
                              float *out) {
    memset(out, 0, sizeof(float) * (size_t)(D * Tp));
    const float *base = x + b * s.b + h * s.h;
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < D; j++) out[j * Tp + t] = base[t * s.t + j];
}

/* t rounded up to a multiple of LANES: the first chunk start at or after key t, and the padded row length. */
static inline int64_t chunk_ceil(int64_t t) { return (t + LANES - 1) / LANES * LANES; }

/* Scores of R rows against the 16 keys at c (masked lanes: -FLT_MAX, out of the max), stored, and folded into the
 * row maxima.
 * `masked` is a constant at each call site: interior chunks, where every lane is valid for every row, skip it. */
static inline __attribute__((always_inline)) void score_chunk(float qs[][MAX_D], const float *kt, float *s,
                                                              vf *row_max, const int64_t *lo, const int64_t *hi,
                                                              int64_t c, int64_t Tp, int64_t D, int64_t R,
                                                              int masked) {
    vf kc[D];
#pragma GCC unroll 16
    for (int64_t j = 0; j < D; j++) kc[j] = vload(kt + j * Tp + c);
#pragma GCC unroll 16
    for (int64_t r = 0; r < R; r++) {
        vf x = kc[0] * qs[r][0];
#pragma GCC unroll 16
        for (int64_t j = 1; j < D; j++) x += kc[j] * qs[r][j];
        if (masked) x = blend(in_range(c, lo[r], hi[r]), x, splat(-FLT_MAX));
        vstore(s + r * Tp + c, x);
        row_max[r] = vmax(x, row_max[r]);
    }
}

/* exp(score - max) of R rows for the 16 keys at c (masked lanes: exactly 0), summed and applied to the values. */
static inline __attribute__((always_inline)) void weigh_chunk(const float *s, const float *m, vf *sum,
                                                              vf acc[][MAX_D], const float *vt, const int64_t *lo,
                                                              const int64_t *hi, int64_t c, int64_t Tp, int64_t D,
                                                              int64_t R, int masked) {
    vf vc[D];
#pragma GCC unroll 16
    for (int64_t j = 0; j < D; j++) vc[j] = vload(vt + j * Tp + c);
#pragma GCC unroll 16
    for (int64_t r = 0; r < R; r++) {
        vf p = vexp(vload(s + r * Tp + c) - m[r]);
        if (masked) p = blend(in_range(c, lo[r], hi[r]), p, splat(0.0f));
        sum[r] += p;
#pragma GCC unroll 16
        for (int64_t j = 0; j < D; j++) acc[r][j] += p * vc[j];
    }
}

/* The backward's work on the 16 keys at c for R rows: dq accumulates in registers; dk/dv get one update. */
static inline __attribute__((always_inline)) void grad_chunk(
    float qs[][MAX_D], float qv[][MAX_D], float gv[][MAX_D], const float *delta, const float *row_lse,
    vf dq_acc[][MAX_D], const float *kt, const float *vt, float *dkt, float *dvt, const int64_t *lo,
    const int64_t *hi, int64_t c, int64_t Tp, int64_t D, int64_t R, float scale, int masked) {
    vf kc[D], vc[D], dk_acc[D], dv_acc[D];
#pragma GCC unroll 16
    for (int64_t j = 0; j < D; j++) {
        kc[j] = vload(kt + j * Tp + c);
        vc[j] = vload(vt + j * Tp + c);
        dk_acc[j] = splat(0.0f);
        dv_acc[j] = splat(0.0f);
    }
#pragma GCC unroll 16
    for (int64_t r = 0; r < R; r++) {
        vf x = kc[0] * qs[r][0], dp = vc[0] * gv[r][0];
#pragma GCC unroll 16
        for (int64_t j = 1; j < D; j++) {
            x += kc[j] * qs[r][j];
            dp += vc[j] * gv[r][j];
        }
        vf p = vexp(x - row_lse[r]);
        if (masked) p = blend(in_range(c, lo[r], hi[r]), p, splat(0.0f));
        const vf ds = p * (dp - delta[r]) * scale;
#pragma GCC unroll 16
        for (int64_t j = 0; j < D; j++) {
            dq_acc[r][j] += ds * kc[j];
            dk_acc[j] += ds * qv[r][j];
            dv_acc[j] += p * gv[r][j];
        }
    }
#pragma GCC unroll 16
    for (int64_t j = 0; j < D; j++) {
        vstore(dkt + j * Tp + c, vload(dkt + j * Tp + c) + dk_acc[j]);
        vstore(dvt + j * Tp + c, vload(dvt + j * Tp + c) + dv_acc[j]);
    }
}

/* Forward of R consecutive query rows [i0, i0 + R) of one (b, h), sharing each loaded key/value chunk across the
 * rows. R and D are compile-time constants after inlining into the dispatch below, so the row and dim loops unroll
 * into registers. Rows past T are not computed (their lanes are masked out and nothing is stored). */
static inline __attribute__((always_inline)) void forward_rows(
    const float *q, strides_t sq, const float *kt, const float *vt, float *o, strides_t so, float *lse, float *s,
    int64_t b, int64_t h, int64_t i0, int64_t T, int64_t Tp, int64_t D, int64_t R, int64_t window, float scale) {
    float qs[R][MAX_D];
    int64_t lo[R], hi[R];
#pragma GCC unroll 16
    for (int64_t r = 0; r < R; r++) {
        const int64_t i = i0 + r < T ? i0 + r : T - 1; /* a row past T repeats the last one; never stored */
        const float *qi = q + b * sq.b + i * sq.t + h * sq.h;
#pragma GCC unroll 16
        for (int64_t j = 0; j < D; j++) qs[r][j] = qi[j] * scale;
        lo[r] = first_key(i, window);
        hi[r] = i;
    }
    const int64_t c_lo = lo[0] / LANES * LANES, c_hi = hi[R - 1];
    vf row_max[R];
#pragma GCC unroll 16
    for (int64_t r = 0; r < R; r++) row_max[r] = splat(-FLT_MAX);
    const int64_t c_inner_lo = chunk_ceil(lo[R - 1]), c_inner_hi = (hi[0] + 1) / LANES * LANES;
    for (int64_t c = c_lo; c <= c_hi; c += LANES) {
        if (c >= c_inner_lo && c < c_inner_hi) /* every lane valid for every row: no masking */
            score_chunk(qs, kt, s, row_max, lo, hi, c, Tp, D, R, 0);
        else
            score_chunk(qs, kt, s, row_max, lo, hi, c, Tp, D, R, 1);
    }
    float m[R];
    vf sum[R], acc[R][MAX_D];
#pragma GCC unroll 16
    for (int64_t r = 0; r < R; r++) {
        m[r] = hmax(row_max[r]);
        sum[r] = splat(0.0f);
#pragma GCC unroll 16
        for (int64_t j = 0; j < D; j++) acc[r][j] = splat(0.0f);
    }
    for (int64_t c = c_lo; c <= c_hi; c += LANES) {
        if (c >= c_inner_lo && c < c_inner_hi)
            weigh_chunk(s, m, sum, acc, vt, lo, hi, c, Tp, D, R, 0);
        else
            weigh_chunk(s, m, sum, acc, vt, lo, hi, c, Tp, D, R, 1);
    }
#pragma GCC unroll 16
    for (int64_t r = 0; r < R && i0 + r < T; r++) {
        const float l = hsum(sum[r]);
        float *oi = o + b * so.b + (i0 + r) * so.t + h * so.h;
#pragma GCC unroll 16
        for (int64_t j = 0; j < D; j++) oi[j] = hsum(acc[r][j]) / l;
        lse[i0 + r] = m[r] + logf(l);
    }
}

/* Backward of R consecutive query rows [i0, i0 + R) of one (b, h): one sweep over their key chunks, accumulating
 * dq in registers and each chunk's dk/dv contributions of all R rows before one read-modify-write of dkt/dvt. */
static inline __attribute__((always_inline)) void backward_rows(
    const float *q, const float *o, const float *d_o, strides_t sq, strides_t so, strides_t sdo, const float *kt,
    const float *vt, float *dkt, float *dvt, const float *lse, float *dq, strides_t sg, int64_t b, int64_t h,
    int64_t i0, int64_t T, int64_t Tp, int64_t D, int64_t R, int64_t window, float scale) {
    float qs[R][MAX_D], qv[R][MAX_D], gv[R][MAX_D], delta[R], row_lse[R];
    int64_t lo[R], hi[R];
#pragma GCC unroll 16
    for (int64_t r = 0; r < R; r++) {
        const int64_t i = i0 + r < T ? i0 + r : T - 1;
        const float *qi = q + b * sq.b + i * sq.t + h * sq.h, *oi = o + b * so.b + i * so.t + h * so.h;
        const float *gi = d_o + b * sdo.b + i * sdo.t + h * sdo.h;
        delta[r] = 0.0f; /* dO_i . O_i = sum_t p_t dp_t */
#pragma GCC unroll 16
        for (int64_t j = 0; j < D; j++) {
            qs[r][j] = qi[j] * scale;
            qv[r][j] = qi[j];
            /* a row past T repeats the last one with a zero gradient, so it contributes nothing */
            gv[r][j] = i0 + r < T ? gi[j] : 0.0f;
            delta[r] += gv[r][j] * oi[j];
        }
        row_lse[r] = lse[i];
        lo[r] = first_key(i, window);
        hi[r] = i;
    }
    const int64_t c_lo = lo[0] / LANES * LANES, c_hi = hi[R - 1];
    vf dq_acc[R][MAX_D];
#pragma GCC unroll 16
    for (int64_t r = 0; r < R; r++)
#pragma GCC unroll 16
        for (int64_t j = 0; j < D; j++) dq_acc[r][j] = splat(0.0f);
    const int64_t c_inner_lo = chunk_ceil(lo[R - 1]), c_inner_hi = (hi[0] + 1) / LANES * LANES;
    for (int64_t c = c_lo; c <= c_hi; c += LANES) {
        if (c >= c_inner_lo && c < c_inner_hi) /* every lane valid for every row: no masking */
            grad_chunk(qs, qv, gv, delta, row_lse, dq_acc, kt, vt, dkt, dvt, lo, hi, c, Tp, D, R, scale, 0);
        else
            grad_chunk(qs, qv, gv, delta, row_lse, dq_acc, kt, vt, dkt, dvt, lo, hi, c, Tp, D, R, scale, 1);
    }
#pragma GCC unroll 16
    for (int64_t r = 0; r < R && i0 + r < T; r++) {
        float *dqi = dq + b * sg.b + (i0 + r) * sg.t + h * sg.h;
#pragma GCC unroll 16
        for (int64_t j = 0; j < D; j++) dqi[j] = hsum(dq_acc[r][j]);
    }
}

/* Rows per block: as many as keep the accumulators in registers. */
#define DISPATCH(D, CALL)                                                                                             \
    switch (D) {                                                                                                      \
    case 2: { const int64_t d_ = 2, r_ = 4; CALL; } break;                                                            \
    case 4: { const int64_t d_ = 4, r_ = 4; CALL; } break;                                                            \
    case 8: { const int64_t d_ = 8, r_ = 2; CALL; } break;                                                            \
    case 16: { const int64_t d_ = 16, r_ = 1; CALL; } break;                                                          \
    default: { const int64_t d_ = D, r_ = 1; CALL; } break;                                                           \
    }

/* Returns 0, 1 when out of memory, 2 when D is outside [1, MAX_D]. */
int sgtm_attention_forward(const float *q, const float *k, const float *v, strides_t sq, strides_t sk, strides_t sv,
                           float *o, strides_t so, float *lse, int64_t H, int64_t T, int64_t D, int64_t window,
                           float scale, int64_t bh_lo, int64_t bh_hi) {
    if (D < 1 || D > MAX_D) return 2;
    const int64_t Tp = chunk_ceil(T);
    float *kt = aligned_alloc(64, sizeof(float) * (size_t)((2 * D + 4) * Tp)); /* + scores of up to 4 rows */
    if (!kt) return 1;
    float *vt = kt + D * Tp, *s = vt + D * Tp;
    for (int64_t bh = bh_lo; bh < bh_hi; bh++) {
        const int64_t b = bh / H, h = bh % H;
        gather_transposed(k, sk, b, h, T, Tp, D, kt);
        gather_transposed(v, sv, b, h, T, Tp, D, vt);
        DISPATCH(D, for (int64_t i0 = 0; i0 < T; i0 += r_) forward_rows(q, sq, kt, vt, o, so, lse + bh * T, s, b, h, i0,
                                                                        T, Tp, d_, r_, window, scale))
    }
    free(kt);
    return 0;
}

int sgtm_attention_backward(const float *q, const float *k, const float *v, const float *o, const float *d_o,
                            const float *lse, strides_t sq, strides_t sk, strides_t sv, strides_t so, strides_t sdo,
                            float *dq, float *dk, float *dv, strides_t sg, int64_t H, int64_t T, int64_t D,
                            int64_t window, float scale, int64_t bh_lo, int64_t bh_hi) {
    if (D < 1 || D > MAX_D) return 2;
    const int64_t Tp = chunk_ceil(T);
    float *kt = aligned_alloc(64, sizeof(float) * (size_t)(4 * D * Tp));
    if (!kt) return 1;
    float *vt = kt + D * Tp, *dkt = vt + D * Tp, *dvt = dkt + D * Tp;
    for (int64_t bh = bh_lo; bh < bh_hi; bh++) {
        const int64_t b = bh / H, h = bh % H;
        gather_transposed(k, sk, b, h, T, Tp, D, kt);
        gather_transposed(v, sv, b, h, T, Tp, D, vt);
        memset(dkt, 0, sizeof(float) * (size_t)(2 * D * Tp));
        DISPATCH(D, for (int64_t i0 = 0; i0 < T; i0 += r_) backward_rows(q, o, d_o, sq, so, sdo, kt, vt, dkt, dvt,
                                                                         lse + bh * T, dq, sg, b, h, i0, T, Tp, d_,
                                                                         r_, window, scale))
        for (int64_t t = 0; t < T; t++) {
            float *dkr = dk + b * sg.b + t * sg.t + h * sg.h, *dvr = dv + b * sg.b + t * sg.t + h * sg.h;
            for (int64_t j = 0; j < D; j++) {
                dkr[j] = dkt[j * Tp + t];
                dvr[j] = dvt[j * Tp + t];
            }
        }
    }
    free(kt);
    return 0;
}
