/* RMSNorm with the residual add fused in, on the CPU: one pass over each row.
 *
 * Built at first use by pagellm/kernels/cpu/rms_norm.py (gcc -O3 -march=native -fopenmp) and
 * called through ctypes. Rounds as torch does on the CPU: s = x + residual rounded to the dtype,
 * then out = s * rsqrt(mean(s^2) + eps) * weight in fp32, rounded once. Rows are [rows, cols] with
 * a row stride (elements) and contiguous columns; OpenMP over rows.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

#define MAX_COLS 16384
#define LANES 16

/* Sum of squares in LANES independent fp32 partial sums (vectorisable without reassociation). */
static inline float sum_squares(const float *s, int cols) {
    float acc[LANES] = {0};
    int c = 0;
    for (; c + LANES <= cols; c += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += s[c + j] * s[c + j];
    for (; c < cols; c++) acc[c % LANES] += s[c] * s[c];
    float sum = 0.0f;
    for (int j = 0; j < LANES; j++) sum += acc[j];
    return sum;
}

static void row_bf16(const uint16_t *x, const uint16_t *res, const uint16_t *w, uint16_t *out,
                     uint16_t *res_out, int cols, float eps) {
    float s[MAX_COLS];
    if (res) {
        for (int c = 0; c < cols; c++) {
            uint16_t r = f32_to_bf16(bf16_to_f32(x[c]) + bf16_to_f32(res[c]));
            res_out[c] = r;
            s[c] = bf16_to_f32(r);
        }
    } else {
        for (int c = 0; c < cols; c++) s[c] = bf16_to_f32(x[c]);
    }
    float inv = 1.0f / sqrtf(sum_squares(s, cols) / (float)cols + eps);
    for (int c = 0; c < cols; c++) out[c] = f32_to_bf16(s[c] * inv * bf16_to_f32(w[c]));
}

static void row_f32(const float *x, const float *res, const float *w, float *out, float *res_out,
                    int cols, float eps) {
    const float *s = x;
    if (res) {
        for (int c = 0; c < cols; c++) res_out[c] = x[c] + res[c];
        s = res_out;
    }
    float inv = 1.0f / sqrtf(sum_squares(s, cols) / (float)cols + eps);
    for (int c = 0; c < cols; c++) out[c] = s[c] * inv * w[c];
}

/* x, residual (or NULL), weight [cols], out, residual_out (or NULL); strides in elements.
 * Returns 0, or -1 when cols is out of range. */
int rms_norm(const void *x, const void *res, const void *w, void *out, void *res_out,
             int rows, int cols, int64_t stride_x, int64_t stride_r, int64_t stride_o, int64_t stride_ro,
             float eps, int is_bf16) {
    if (cols < 1 || cols > MAX_COLS) return -1;
#pragma omp parallel for schedule(static) if (rows >= 8)
    for (int r = 0; r < rows; r++) {
        if (is_bf16) {
            row_bf16((const uint16_t *)x + r * stride_x, res ? (const uint16_t *)res + r * stride_r : 0,
                     (const uint16_t *)w, (uint16_t *)out + r * stride_o,
                     res ? (uint16_t *)res_out + r * stride_ro : 0, cols, eps);
        } else {
            row_f32((const float *)x + r * stride_x, res ? (const float *)res + r * stride_r : 0,
                    (const float *)w, (float *)out + r * stride_o,
                    res ? (float *)res_out + r * stride_ro : 0, cols, eps);
        }
    }
    return 0;
}
