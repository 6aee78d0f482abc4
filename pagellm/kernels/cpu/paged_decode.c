/* Paged decode attention on the CPU: one query token per sequence over its cached keys and values.
 *
 * Built at first use by pagellm/kernels/cpu/decode_attention.py (gcc -O3 -march=native -fopenmp)
 * and called through ctypes; the OpenMP runtime is the one PyTorch has already loaded.
 *
 * Layout (the engine's): caches [num_blocks, block_size, num_kv_heads, head_dim] with the given
 * element strides; query/out [S, H, D] with row and head strides; block_tables [S, width] int32;
 * seq_lens [S] int32 (context length including the token being decoded, whose K/V are cached).
 * Work item = (sequence, KV head): its G = H / Hkv query heads share every K/V row it loads.
 * Scores and the online softmax are fp32; one rescale per cache block rather than per key.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_HEAD_DIM 256
#define MAX_GROUP 16
#define MAX_BLOCK 64

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {
    /* Round to nearest even, as PyTorch's conversion does (inputs here are finite). */
    union { uint32_t u; float f; } v;
    v.f = f;
    uint32_t rounding = 0x7FFF + ((v.u >> 16) & 1);
    return (uint16_t)((v.u + rounding) >> 16);
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

static inline void store_row(void *base, int64_t offset, int is_bf16, int d, const float *src) {
    if (is_bf16) {
        uint16_t *dst = (uint16_t *)base + offset;
        for (int i = 0; i < d; i++) dst[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)base + offset, src, (size_t)d * sizeof(float));
    }
}

/* Returns 0, or -1 when a size exceeds the compiled limits (the caller checks them first). */
int paged_decode_attention(
    const void *query, const void *k_cache, const void *v_cache, void *out,
    const int32_t *block_tables, const int32_t *seq_lens,
    int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size,
    int64_t q_stride_t, int64_t q_stride_h, int64_t o_stride_t, int64_t o_stride_h,
    int64_t c_stride_block, int64_t c_stride_slot, int64_t c_stride_head,
    int64_t table_stride, float scale, int window, float soft_cap, int is_bf16) {
    const int group = num_heads / num_kv_heads;
    const int d = head_dim;
    if (d > MAX_HEAD_DIM || group > MAX_GROUP || block_size > MAX_BLOCK) return -1;
    const int64_t items = (int64_t)num_seqs * num_kv_heads;

#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; item++) {
        const int s = (int)(item / num_kv_heads);
        const int kvh = (int)(item % num_kv_heads);
        float q[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];
        float p[MAX_GROUP][MAX_BLOCK];
        float m[MAX_GROUP], l[MAX_GROUP];
        float row[MAX_HEAD_DIM];
        for (int g = 0; g < group; g++) {
            const int h = kvh * group + g;
            load_row(query, s * q_stride_t + h * q_stride_h, is_bf16, d, q[g]);
            for (int i = 0; i < d; i++) q[g][i] *= scale;
            memset(acc[g], 0, sizeof(float) * d);
            m[g] = -INFINITY;
            l[g] = 0.0f;
        }
        const int len = seq_lens[s];
        /* The query sits at position len - 1; with a window it sees keys p > len - 1 - window. */
        const int first = (window > 0 && len > window) ? len - window : 0;
        const int32_t *table = block_tables + (int64_t)s * table_stride;
        for (int blk = first / block_size; blk * block_size < len; blk++) {
            const int64_t base = (int64_t)table[blk] * c_stride_block + (int64_t)kvh * c_stride_head;
            const int t0 = blk * block_size > first ? blk * block_size : first;
            const int t1 = (blk + 1) * block_size < len ? (blk + 1) * block_size : len;
            const int n = t1 - t0;
            for (int t = 0; t < n; t++) {
                load_row(k_cache, base + (int64_t)(t0 + t - blk * block_size) * c_stride_slot, is_bf16, d, row);
                for (int g = 0; g < group; g++) {
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int i = 0; i < d; i++) dot += q[g][i] * row[i];
                    if (soft_cap > 0.0f) dot = soft_cap * tanhf(dot / soft_cap);
                    p[g][t] = dot;
                }
            }
            for (int g = 0; g < group; g++) {
                float block_max = p[g][0];
                for (int t = 1; t < n; t++) block_max = p[g][t] > block_max ? p[g][t] : block_max;
                const float m_new = block_max > m[g] ? block_max : m[g];
                const float alpha = expf(m[g] - m_new); /* 0 on the first block (m = -inf) */
                float sum = 0.0f;
                for (int t = 0; t < n; t++) {
                    p[g][t] = expf(p[g][t] - m_new);
                    sum += p[g][t];
                }
                l[g] = l[g] * alpha + sum;
                m[g] = m_new;
                if (alpha != 1.0f) {
#pragma omp simd
                    for (int i = 0; i < d; i++) acc[g][i] *= alpha;
                }
            }
            for (int t = 0; t < n; t++) {
                load_row(v_cache, base + (int64_t)(t0 + t - blk * block_size) * c_stride_slot, is_bf16, d, row);
                for (int g = 0; g < group; g++) {
                    const float w = p[g][t];
#pragma omp simd
                    for (int i = 0; i < d; i++) acc[g][i] += w * row[i];
                }
            }
        }
        for (int g = 0; g < group; g++) {
            const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
            for (int i = 0; i < d; i++) acc[g][i] *= inv;
            store_row(out, s * o_stride_t + (kvh * group + g) * o_stride_h, is_bf16, d, acc[g]);
        }
    }
    return 0;
}
