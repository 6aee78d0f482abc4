/* Paged decode attention on the CPU: one query token per sequence over its cached keys and values.
 *
 * Built at first use by pagellm/kernels/cpu/decode_attention.py (gcc -O3 -march=native -fopenmp)
 * and called through ctypes; the OpenMP runtime is the one PyTorch has already loaded.
 *
 * Layout (the engine's): caches [num_blocks, block_size, num_kv_heads, head_dim] with the given
 * element strides; query/out [S, H, D] with row and head strides; block_tables [S, width] int32;
 * seq_lens [S] int32 (context length including the token being decoded, whose K/V are cached).
 * Each K/V row an item loads serves the G = H / Hkv query heads that share it.
 * Scores and the online softmax are fp32; one rescale per cache block rather than per key. Where
 * the CPU has AVX512-BF16, bf16 caches go through its pair-dot instruction: scores on the raw bf16
 * rows, sixteen keys at a time, and P @ V two keys per instruction with P rounded to bf16 (as the
 * GPU kernel rounds it).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define MAX_HEAD_DIM 256
#define MAX_GROUP 16 /* query heads per KV head */
#define MAX_BLOCK 64

/* e^x for x <= 0 (scores minus their running max), written so a loop of it vectorizes: x log2(e)
 * = k + f with k an integer and |f| <= 1/2, 2^f from its degree-6 Taylor polynomial (relative
 * error ~1e-7, below fp32's rounding of the softmax), 2^k put straight into the exponent bits. */
static inline float exp_nonpositive(float x) {
    float t = x * 1.4426950408889634f;
    t = t < -126.0f ? -126.0f : t;
    const float k = nearbyintf(t);
    const float f = t - k;
    float p = 1.5403530393381606e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)((int32_t)k + 127) << 23;
    return p * scale.f;
}

static inline void load_row(const void *base, int64_t offset, int is_bf16, int d, float *dst) {
    if (is_bf16) {
        const uint16_t *src = (const uint16_t *)base + offset;
#pragma omp simd
        for (int i = 0; i < d; i++) dst[i] = bf16_to_f32(src[i]);
    } else {
        memcpy(dst, (const float *)base + offset, (size_t)d * sizeof(float));
    }
}

#if defined(__AVX512BF16__)
/* Lane t of the result is the sum of v[t]'s 16 lanes: a transpose-and-add tree, ~3 vector ops per
 * sum instead of the ~8 of a horizontal reduction each. */
static inline __m512 sum_lanes16(const __m512 v[16]) {
    __m512 w[8], y[4], z[2];
    for (int k = 0; k < 8; k++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++) /* per 128-bit lane: the lane's sums of 4 consecutive inputs */
        y[k] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int k = 0; k < 2; k++) /* then across the four 128-bit lanes */
        z[k] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * k], y[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(y[2 * k], y[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* out[t] = scale * (q . key t) for n <= 16 consecutive keys key_stride elements apart (bf16, d a
 * multiple of 32): the query half-rows are loaded once for all n keys. */
static inline void dots16_bf16(const uint16_t *q, const uint16_t *keys, int64_t key_stride, int n, int d,
                               float scale, float *out) {
    __m512 acc[16];
    for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
    for (int i = 0; i < d; i += 32) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512((const void *)(q + i));
        for (int t = 0; t < n; t++)
            acc[t] = _mm512_dpbf16_ps(acc[t], qv,
                                      (__m512bh)_mm512_loadu_si512((const void *)(keys + t * key_stride + i)));
    }
    _mm512_mask_storeu_ps(out, (__mmask16)((1u << n) - 1), _mm512_mul_ps(sum_lanes16(acc), _mm512_set1_ps(scale)));
}

/* acc[g] += p[g][0] * v0 + p[g][1] * v1 for `group` heads sharing the bf16 value rows v0, v1 (d a
 * multiple of 32): the rows are interleaved into pairs and the weights rounded to bf16, as P is
 * for P @ V on the GPU, so one pair-dot instruction takes two keys. */
static inline void accumulate_pair_bf16(float *acc, int acc_stride, const uint16_t *v0, const uint16_t *v1,
                                        const float *w0, const float *w1, int w0_stride, int w1_stride,
                                        int group, int d) {
    static const uint16_t order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i idx = _mm512_loadu_si512((const void *)order);
    __m512bh weights[MAX_GROUP];
    for (int g = 0; g < group; g++)
        weights[g] = (__m512bh)_mm512_set1_epi32((int32_t)((uint32_t)f32_to_bf16(w0[g * w0_stride])
                                                           | (uint32_t)f32_to_bf16(w1[g * w1_stride]) << 16));
    for (int i = 0; i < d; i += 16) {
        const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(v0 + i)));
        const __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(v1 + i)));
        const __m512bh pairs = (__m512bh)_mm512_permutex2var_epi16(a, idx, b);
        for (int g = 0; g < group; g++) {
            float *ag = acc + g * acc_stride + i;
            _mm512_storeu_ps(ag, _mm512_dpbf16_ps(_mm512_loadu_ps(ag), pairs, weights[g]));
        }
    }
}
#endif

static inline void store_row(void *base, int64_t offset, int is_bf16, int d, const float *src) {
    if (is_bf16) {
        uint16_t *dst = (uint16_t *)base + offset;
        for (int i = 0; i < d; i++) dst[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)base + offset, src, (size_t)d * sizeof(float));
    }
}

/* Returns 0, or -1 when a size exceeds the compiled limits (the caller checks them first).
 *
 * A work item is one sequence and a run of `kv_per_item` KV heads. With the heads of a cache row
 * together, an item reads its blocks front to back; splitting a sequence's heads over items (as a
 * batch of one must, to use every core) makes several items stream the same blocks, and the
 * hardware prefetchers fetch the other heads' bytes too.
 */
int paged_decode_attention(
    const void *query, const void *k_cache, const void *v_cache, void *out,
    const int32_t *block_tables, const int32_t *seq_lens,
    int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size,
    int64_t q_stride_t, int64_t q_stride_h, int64_t o_stride_t, int64_t o_stride_h,
    int64_t c_stride_block, int64_t c_stride_slot, int64_t c_stride_head,
    int64_t table_stride, float scale, int window, float soft_cap, int is_bf16, int kv_per_item) {
    const int group = num_heads / num_kv_heads;
    const int d = head_dim;
    if (d > MAX_HEAD_DIM || group > MAX_GROUP || block_size > MAX_BLOCK || kv_per_item < 1
        || num_kv_heads % kv_per_item) return -1;
    const int items_per_seq = num_kv_heads / kv_per_item;
    const int64_t items = (int64_t)num_seqs * items_per_seq;
    const int nh = kv_per_item * group; /* query heads per item */

#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; item++) {
        const int s = (int)(item / items_per_seq);
        const int kv0 = (int)(item % items_per_seq) * kv_per_item;
        float q[nh][d], acc[nh][d], p[nh][MAX_BLOCK], m[nh], l[nh];
        float row[MAX_HEAD_DIM];
        int use_dpbf16 = 0;
#if defined(__AVX512BF16__)
        /* bf16 caches: the query stays bf16 (unscaled) for the pair-dot instruction. */
        use_dpbf16 = is_bf16 && d % 32 == 0;
        const uint16_t *q16[nh];
        for (int h = 0; h < nh; h++)
            q16[h] = (const uint16_t *)query + s * q_stride_t + (kv0 * group + h) * q_stride_h;
#endif
        for (int h = 0; h < nh; h++) {
            load_row(query, s * q_stride_t + (kv0 * group + h) * q_stride_h, is_bf16, d, q[h]);
            for (int i = 0; i < d; i++) q[h][i] *= scale;
            memset(acc[h], 0, sizeof(float) * d);
            m[h] = -INFINITY;
            l[h] = 0.0f;
        }
        const int len = seq_lens[s];
        /* The query sits at position len - 1; with a window it sees keys p > len - 1 - window. */
        const int first = (window > 0 && len > window) ? len - window : 0;
        const int32_t *table = block_tables + (int64_t)s * table_stride;
        const int elem_size = is_bf16 ? 2 : 4;
        for (int blk = first / block_size; blk * block_size < len; blk++) {
            const int64_t base = (int64_t)table[blk] * c_stride_block;
            const int has_next = (blk + 1) * block_size < len;
            const int64_t next = has_next ? (int64_t)table[blk + 1] * c_stride_block : base;
            const int t0 = blk * block_size > first ? blk * block_size : first;
            const int t1 = (blk + 1) * block_size < len ? (blk + 1) * block_size : len;
            const int n = t1 - t0;
            const int64_t first_slot = base + (int64_t)(t0 - blk * block_size) * c_stride_slot;
#if defined(__AVX512BF16__)
            if (use_dpbf16) {
                /* Sixteen keys' scores per query head at a time, no horizontal sum per key. */
                for (int kv = 0; kv < kv_per_item; kv++) {
                    const uint16_t *keys = (const uint16_t *)k_cache + first_slot + (int64_t)(kv0 + kv) * c_stride_head;
                    for (int g = 0; g < group; g++) {
                        float *ph = p[kv * group + g];
                        for (int c = 0; c < n; c += 16)
                            dots16_bf16(q16[kv * group + g], keys + c * c_stride_slot, c_stride_slot,
                                        n - c < 16 ? n - c : 16, d, scale, ph + c);
                        for (int t = 0; soft_cap > 0.0f && t < n; t++) ph[t] = soft_cap * tanhf(ph[t] / soft_cap);
                    }
                }
            }
#endif
            for (int t = 0; !use_dpbf16 && t < n; t++) {
                const int64_t slot = first_slot + (int64_t)t * c_stride_slot;
                for (int kv = 0; kv < kv_per_item; kv++) {
                    const int64_t key = slot + (int64_t)(kv0 + kv) * c_stride_head;
                    load_row(k_cache, key, is_bf16, d, row);
                    for (int g = 0; g < group; g++) {
                        const float *qh = q[kv * group + g];
                        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                        for (int i = 0; i < d; i++) dot += qh[i] * row[i];
                        if (soft_cap > 0.0f) dot = soft_cap * tanhf(dot / soft_cap);
                        p[kv * group + g][t] = dot;
                    }
                }
            }
            for (int h = 0; h < nh; h++) {
                float block_max = p[h][0];
                for (int t = 1; t < n; t++) block_max = p[h][t] > block_max ? p[h][t] : block_max;
                const float m_new = block_max > m[h] ? block_max : m[h];
                const float alpha = m[h] == -INFINITY ? 0.0f : exp_nonpositive(m[h] - m_new);
                float sum = 0.0f;
                float *ph = p[h];
#pragma omp simd reduction(+ : sum)
                for (int t = 0; t < n; t++) {
                    ph[t] = exp_nonpositive(ph[t] - m_new);
                    sum += ph[t];
                }
                l[h] = l[h] * alpha + sum;
                m[h] = m_new;
                if (alpha != 1.0f) {
#pragma omp simd
                    for (int i = 0; i < d; i++) acc[h][i] *= alpha;
                }
            }
            for (int t = 0; t < n; t++) {
                const int64_t slot = first_slot + (int64_t)t * c_stride_slot;
                if (has_next) {
                    /* The next block lies anywhere in the cache, beyond the hardware prefetchers'
                     * guess: ask for its rows of this item's heads one key at a time, spread over
                     * this block's keys (a burst of them stalls on the line-fill buffers). */
                    const char *kn = (const char *)k_cache + (next + (int64_t)t * c_stride_slot
                                                               + (int64_t)kv0 * c_stride_head) * elem_size;
                    const char *vn = (const char *)v_cache + (kn - (const char *)k_cache);
                    for (int b = 0; b < kv_per_item * d * elem_size; b += 64) {
                        __builtin_prefetch(kn + b, 0, 3);
                        __builtin_prefetch(vn + b, 0, 3);
                    }
                }
#if defined(__AVX512BF16__)
                if (use_dpbf16) {
                    if (t % 2) continue; /* keys t and t + 1 together; a missing t + 1 weighs 0 */
                    const int pair = t + 1 < n;
                    const float no_weight = 0.0f;
                    for (int kv = 0; kv < kv_per_item; kv++) {
                        const uint16_t *v0 = (const uint16_t *)v_cache + slot + (int64_t)(kv0 + kv) * c_stride_head;
                        const uint16_t *v1 = pair ? v0 + c_stride_slot : v0;
                        const float *w0 = &p[kv * group][t];
                        accumulate_pair_bf16(acc[kv * group], d, v0, v1, w0, pair ? w0 + 1 : &no_weight,
                                             MAX_BLOCK, pair ? MAX_BLOCK : 0, group, d);
                    }
                    continue;
                }
#endif
                for (int kv = 0; kv < kv_per_item; kv++) {
                    load_row(v_cache, slot + (int64_t)(kv0 + kv) * c_stride_head, is_bf16, d, row);
                    for (int g = 0; g < group; g++) {
                        float *ah = acc[kv * group + g];
                        const float w = p[kv * group + g][t];
#pragma omp simd
                        for (int i = 0; i < d; i++) ah[i] += w * row[i];
                    }
                }
            }
        }
        for (int h = 0; h < nh; h++) {
            const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
            for (int i = 0; i < d; i++) acc[h][i] *= inv;
            store_row(out, s * o_stride_t + (kv0 * group + h) * o_stride_h, is_bf16, d, acc[h]);
        }
    }
    return 0;
}
