/* Weight-only GEMV for a few rows of float32 activations (LLM decoding, batch 1-8): int8 or
 * int4 weight codes are read once per output row, dequantized into a float32 row buffer that
 * stays in L1 (code * scale: the very values numerics.dequantize gives), and dotted with each
 * activation row. The weight traffic is 1 or 0.5 byte per weight instead of 4. Plain C, no
 * torch headers (builds in under a second at first use); the AVX2 + FMA paths are compiled
 * with a function target attribute and only called on CPUs whose flags have avx2 and fma
 * (kernels/gemv.py checks).
 *
 * y[m, n] = sum_k x[m, k] * (w[n, k] * scale) + bias[n], for rows [n0, n1) only: the caller
 * splits N over threads (ctypes releases the GIL) and gives each call its own 32-byte aligned
 * scratch row `buf` of K floats.
 */
#include <stdint.h>
#include <immintrin.h>

__attribute__((target("avx2,fma")))
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma")))
static float dot(const float *x, const float *w, int k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int j = 0;
    for (; j + 32 <= k; j += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_load_ps(w + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), _mm256_load_ps(w + j + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 16), _mm256_load_ps(w + j + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 24), _mm256_load_ps(w + j + 24), a3);
    }
    for (; j < k; j += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_load_ps(w + j), a0);
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* four activation rows at once: each weight vector is loaded once for all four */
__attribute__((target("avx2,fma")))
static void dot4(const float *x, int k, const float *w, float *out) {
    __m256 a[4][2];
    for (int i = 0; i < 4; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
    int j = 0;
    for (; j + 16 <= k; j += 16) {
        __m256 w0 = _mm256_load_ps(w + j), w1 = _mm256_load_ps(w + j + 8);
        for (int i = 0; i < 4; i++) {
            const float *xr = x + (int64_t)i * k + j;
            a[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, a[i][0]);
            a[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), w1, a[i][1]);
        }
    }
    for (; j < k; j += 8) {
        __m256 w0 = _mm256_load_ps(w + j);
        for (int i = 0; i < 4; i++)
            a[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (int64_t)i * k + j), w0, a[i][0]);
    }
    for (int i = 0; i < 4; i++) out[i] = hsum(_mm256_add_ps(a[i][0], a[i][1]));
}

__attribute__((target("avx2,fma")))
static void rows_out(const float *x, int m, int k, const float *buf, const float *bias,
                     float *y, int n, int r) {
    int i = 0;
    for (; i + 4 <= m; i += 4) {
        float v[4];
        dot4(x + (int64_t)i * k, k, buf, v);
        for (int t = 0; t < 4; t++) y[(int64_t)(i + t) * n + r] = bias ? v[t] + bias[r] : v[t];
    }
    for (; i < m; i++) {
        float v = dot(x + (int64_t)i * k, buf, k);
        y[(int64_t)i * n + r] = bias ? v + bias[r] : v;
    }
}

/* int8 codes w [N, K] (K % 8 == 0), one scale per row n. */
__attribute__((target("avx2,fma")))
void qw_gemv_i8(const float *x, int m, int k, const int8_t *w, const float *scale,
                const float *bias, float *y, int n, int n0, int n1, float *buf) {
    for (int r = n0; r < n1; r++) {
        const int8_t *wr = w + (int64_t)r * k;
        __m256 s = _mm256_set1_ps(scale[r]);
        for (int j = 0; j < k; j += 8) {
            __m128i c = _mm_loadl_epi64((const __m128i *)(wr + j));
            _mm256_store_ps(buf + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), s));
        }
        rows_out(x, m, k, buf, bias, y, n, r);
    }
}

/* int4 codes in blocks of 32 (K % group == 0, group % 32 == 0): byte b of a block holds code b
 * in its low nibble and code b + 16 in its high nibble, as (code + 8) in 0..15; packed [N, K/2],
 * scale [N, K / group]. */
__attribute__((target("avx2,fma")))
void qw_gemv_i4(const float *x, int m, int k, const uint8_t *w, const float *scale, int group,
                const float *bias, float *y, int n, int n0, int n1, float *buf) {
    const __m128i mask = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    const int groups = k / group;
    for (int r = n0; r < n1; r++) {
        const uint8_t *wr = w + (int64_t)r * (k / 2);
        const float *sr = scale + (int64_t)r * groups;
        for (int j = 0; j < k; j += 32) {
            __m256 s = _mm256_set1_ps(sr[j / group]);
            __m128i b = _mm_loadu_si128((const __m128i *)(wr + j / 2));
            __m128i lo = _mm_sub_epi8(_mm_and_si128(b, mask), eight);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), mask), eight);
            _mm256_store_ps(buf + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), s));
            _mm256_store_ps(buf + j + 8, _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), s));
            _mm256_store_ps(buf + j + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), s));
            _mm256_store_ps(buf + j + 24, _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), s));
        }
        rows_out(x, m, k, buf, bias, y, n, r);
    }
}
