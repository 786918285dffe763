/* The float glue of one decoding step of a Llama-family block (runtime/decoder.py), for one
 * token: RMSNorm of a row, and the attention step (rotary embedding of q and k, the K / V cache
 * write, grouped-query attention over the cached positions). Why in C: in torch these are ~25
 * small ops per block, ~100 us of a token's ~3.5 ms of framework time at TinyLlama's shape,
 * against ~5 us here. Float32 throughout, as transformers' eager Llama; sums in another order
 * (relative differences ~1e-6), exp by a degree-6 polynomial (relative error < 2e-7).
 * Compiled with gemv.c (AVX2 + FMA target, the same library and OpenMP runtime). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <immintrin.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "vec.h"

/* y = x / sqrt(mean(x^2) + eps) * w, one row of k floats (k % 8 == 0) */
AVX2 void qw_rmsnorm(const float *x, const float *w, float eps, float *y, int k) {
    __m256 s = _mm256_setzero_ps();
    for (int j = 0; j < k; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        s = _mm256_fmadd_ps(v, v, s);
    }
    const __m256 r = _mm256_set1_ps(1.0f / sqrtf(hsum8(s) / (float)k + eps));
    for (int j = 0; j < k; j += 8)
        _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_loadu_ps(w + j),
                                              _mm256_mul_ps(_mm256_loadu_ps(x + j), r)));
}

/* rotary embedding of `heads` vectors of d in place (transformers' rotate_half convention:
 * element i pairs with i + d/2), at one position's cos / sin [d] */
AVX2 static void rope(float *x, int heads, int d, const float *cos, const float *sin) {
    const int half = d / 2;
    for (int h = 0; h < heads; h++) {
        float *v = x + (int64_t)h * d;
        for (int i = 0; i < half; i += 8) {
            const __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + half + i);
            _mm256_storeu_ps(v + i, _mm256_fnmadd_ps(b, _mm256_loadu_ps(sin + i),
                                                     _mm256_mul_ps(a, _mm256_loadu_ps(cos + i))));
            _mm256_storeu_ps(v + half + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(sin + half + i),
                                                           _mm256_mul_ps(b, _mm256_loadu_ps(cos + half + i))));
        }
    }
}

/* One block's cache and shape, built once per generation (runtime/decoder.py). */
typedef struct {
    float *keys, *values;  /* [kv_heads, max_len, d] each, this block's */
    int heads, kv_heads, d, max_len;
    float scale;           /* 1 / sqrt(d) */
} qw_attn;

/* One token at position `pos`: rope q [heads, d] and k [kv_heads, d] in place, write k and v
 * [kv_heads, d] into the cache at pos, and out [heads, d] = softmax(q K^T scale) V over
 * positions 0..pos. d % 16 == 0. `threads` OpenMP threads over the heads. */
AVX2 void qw_attend(const qw_attn *A, float *q, float *k, const float *v, const float *cos,
                    const float *sin, int pos, float *out, int threads) {
    const int d = A->d, group = A->heads / A->kv_heads, end = pos + 1;
    const int64_t hstride = (int64_t)A->max_len * d;
    rope(q, A->heads, d, cos, sin);
    rope(k, A->kv_heads, d, cos, sin);
    for (int h = 0; h < A->kv_heads; h++)
        for (int i = 0; i < d; i++) {
            A->keys[h * hstride + (int64_t)pos * d + i] = k[h * d + i];
            A->values[h * hstride + (int64_t)pos * d + i] = v[h * d + i];
        }
    if (threads < 1 || (int64_t)A->heads * end * d < (1 << 16)) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int h = 0; h < A->heads; h++) {
        const float *qh = q + (int64_t)h * d;
        const float *K = A->keys + (h / group) * hstride, *V = A->values + (h / group) * hstride;
        float *s = malloc(((size_t)end + 8) * sizeof(float));
        float top = -INFINITY;
        if (!s) {  /* no memory for the scores: this head's output is NaN, not garbage */
            for (int i = 0; i < d; i++) out[(int64_t)h * d + i] = NAN;
            continue;
        }
        for (int t = 0; t < end; t++) {
            __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
            for (int i = 0; i < d; i += 16) {
                a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(K + (int64_t)t * d + i), a);
                b = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i + 8), _mm256_loadu_ps(K + (int64_t)t * d + i + 8), b);
            }
            s[t] = hsum8(_mm256_add_ps(a, b)) * A->scale;
            top = s[t] > top ? s[t] : top;
        }
        for (int t = end; t < ((end + 7) & ~7); t++) s[t] = -INFINITY;  /* pad to 8 */
        __m256 sum = _mm256_setzero_ps();
        const __m256 m = _mm256_set1_ps(top);
        for (int t = 0; t < end; t += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
            _mm256_storeu_ps(s + t, e);
            sum = _mm256_add_ps(sum, e);
        }
        const float inv = 1.0f / hsum8(sum);
        for (int i = 0; i < d; i += 16) {
            __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
            for (int t = 0; t < end; t++) {
                const __m256 p = _mm256_set1_ps(s[t]);
                a = _mm256_fmadd_ps(p, _mm256_loadu_ps(V + (int64_t)t * d + i), a);
                b = _mm256_fmadd_ps(p, _mm256_loadu_ps(V + (int64_t)t * d + i + 8), b);
            }
            _mm256_storeu_ps(out + (int64_t)h * d + i, _mm256_mul_ps(a, _mm256_set1_ps(inv)));
            _mm256_storeu_ps(out + (int64_t)h * d + i + 8, _mm256_mul_ps(b, _mm256_set1_ps(inv)));
        }
        free(s);
    }
}
