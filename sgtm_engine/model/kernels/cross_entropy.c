/* Softmax cross-entropy over the rows of a logit matrix, in place: the elementwise half of loss.py's fused output
 * projection + loss (the matmuls stay with torch's BLAS).
 *
 * Why: at the paper's small shapes the [tokens, 50257] logit matrix is ~400 MB per 2k tokens; torch's ops walk it
 * once per op (bias, max, subtract, exp, sum; then scale, one-hot, bias-gradient sum). Here a row (200 KB, L2-sized)
 * is finished while it is cached: the forward reads it from memory once, the backward once.
 *
 * Forward: each row holds hidden @ W^T on entry; it gets the bias added, its max m and its target's logit recorded,
 * and is overwritten by exp(x - m) (unnormalized probabilities); row_sum = sum, lse = m + log(sum), and row_max = m
 * when asked (evaluation: the target is a top-1 prediction when its logit equals the max).
 * Backward: each row becomes g_r * (softmax - onehot(label)), the logit gradient, where g_r is the loss gradient
 * per row (0 for ignored rows); bias_grad (per calling thread) accumulates its column sums.
 * Rows are independent: each call takes rows [lo, hi). Returns 0, or 3 when a label is outside [0, V).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#include "simd.h"

static inline int valid_label(int64_t label, int64_t ignore_index, int64_t V) {
    return label != ignore_index && label >= 0 && label < V;
}

int sgtm_ce_forward(float *logits, int64_t V, const float *bias, const int64_t *labels, int64_t ignore_index,
                    float *target, float *row_sum, float *lse, float *row_max, int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
        const int64_t label = labels[r];
        if (label != ignore_index && !valid_label(label, ignore_index, V)) return 3;
        float *x = logits + r * V;
        vf m = splat(-FLT_MAX);
        int64_t t = 0;
        for (; t + LANES <= V; t += LANES) {
            vf y = vload_u(x + t);
            if (bias) {
                y += vload_u(bias + t);
                vstore_u(x + t, y);
            }
            m = vmax(m, y);
        }
        float mx = hmax(m);
        for (int64_t u = t; u < V; u++) {
            if (bias) x[u] += bias[u];
            mx = x[u] > mx ? x[u] : mx;
        }
        target[r] = valid_label(label, ignore_index, V) ? x[label] : 0.0f;
        vf s = splat(0.0f);
        for (t = 0; t + LANES <= V; t += LANES) {
            const vf p = vexp(vload_u(x + t) - mx);
            vstore_u(x + t, p);
            s += p;
        }
        float sum = hsum(s);
        for (int64_t u = t; u < V; u++) {
            x[u] = vexp(splat(x[u] - mx))[0]; /* x - max <= 0, as vexp wants */
            sum += x[u];
        }
        row_sum[r] = sum;
        lse[r] = mx + logf(sum);
        if (row_max) row_max[r] = mx;
    }
    return 0;
}

int sgtm_ce_backward(float *probs, int64_t V, const int64_t *labels, int64_t ignore_index, const float *row_grad,
                     const float *row_sum, float *bias_grad, int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
        const float g = row_grad[r], c = g / row_sum[r];
        float *x = probs + r * V;
        int64_t t = 0;
        for (; t + LANES <= V; t += LANES) {
            const vf y = vload_u(x + t) * c;
            vstore_u(x + t, y);
            if (bias_grad) vstore_u(bias_grad + t, vload_u(bias_grad + t) + y);
        }
        for (; t < V; t++) {
            x[t] *= c;
            if (bias_grad) bias_grad[t] += x[t];
        }
        const int64_t label = labels[r];
        if (valid_label(label, ignore_index, V)) {
            x[label] -= g;
            if (bias_grad) bias_grad[label] -= g;
        }
    }
    return 0;
}
