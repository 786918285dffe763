/* Per-token quantization before a dynamic int8 GEMM (kernels/rowquant.py): the row's max |x|,
 * then its codes, while the row is in cache. Bit-identical to torch's amax / amin / div /
 * round: IEEE division (not a multiply by the reciprocal), round half to even.
 * Compiled with gemv.c (AVX2 target, the same library and OpenMP runtime). */
#include <math.h>
#include <stdint.h>
#include <immintrin.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "vec.h"

/* The row's scale from its max |x|: at least `tiny`; NaN if the row held a NaN, Inf if an Inf. */
static inline float row_scale(float amax, int nan, float qmax, float tiny) {
    float s = nan ? NAN : amax / qmax;
    return s < tiny ? tiny : s;  /* false for NaN: the scale stays NaN */
}

/* codes round(x / s) as float32, in place allowed. A non-finite scale gets zero codes: the
 * output row is then 0 x (NaN or Inf) = NaN after the rescale, never a clamped NaN code. */
AVX2 static void row_codes(const float *x, float *c, int k, float s, int exact) {
    int j = 0;
    if (!isfinite(s)) {
        for (; j < k; j++) c[j] = 0.0f;
        return;
    }
    const __m256 vs = _mm256_set1_ps(s), vr = _mm256_set1_ps(1.0f / s);
    /* exact: IEEE division as torch; else x * (1 / s), which differs only where x / s lies
     * within a float32 step of a half-integer (vdivps costs ~8 cycles per 8 values on Zen 1) */
    for (; j + 8 <= k; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        _mm256_storeu_ps(c + j, _mm256_round_ps(exact ? _mm256_div_ps(v, vs) : _mm256_mul_ps(v, vr),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; j < k; j++) c[j] = nearbyintf(exact ? x[j] / s : x[j] * (1.0f / s));
}

/* One row: its scale max|x| / qmax and codes round(x / scale). */
AVX2 static float quantize_row(const float *x, float *c, int k, float qmax, float tiny) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= k; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v));
    }
    float amax = hmax8(mx);
    int nan = _mm256_movemask_ps(bad) != 0;
    for (; j < k; j++) {
        if (isnan(x[j])) nan = 1;
        const float a = fabsf(x[j]);
        if (a > amax) amax = a;
    }
    const float s = row_scale(amax, nan, qmax, tiny);
    row_codes(x, c, k, s, 1);
    return s;
}

/* x [m, k] -> codes [m, k] and scale [m] */
AVX2 void qw_row_quantize(const float *x, float *codes, float *scale, int m, int k, float qmax,
                          float tiny, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int i = 0; i < m; i++)
        scale[i] = quantize_row(x + (int64_t)i * k, codes + (int64_t)i * k, k, qmax, tiny);
}

/* erf(z) = z P(z^2) / Q(z^2) on |z| <= 4 (P of degree 6, Q of degree 5: a least-squares
 * rational fit made for this file), +-1 beyond (erf(4) rounds to 1 in float32). Absolute error
 * < 3.1e-7 in float32 arithmetic; GELU from it is within 1.1e-6 of the exact one on [-10, 10]
 * (torch's own: 3.8e-7), i.e. about one float32 step at the largest outputs. */
static const float ERF_P[7] = {1.128379226e+00f, 1.846422106e-01f, 5.432954431e-02f,
                               3.837554483e-03f, 3.828970366e-04f, 4.787274065e-06f,
                               -1.369479818e-08f};
static const float ERF_Q[6] = {1.0f, 4.969684482e-01f, 1.138034463e-01f, 1.545024198e-02f,
                               1.309459913e-03f, 6.407436013e-05f};

AVX2 static inline __m256 erf8(__m256 z) {
    z = _mm256_min_ps(_mm256_max_ps(z, _mm256_set1_ps(-4.0f)), _mm256_set1_ps(4.0f));
    const __m256 u = _mm256_mul_ps(z, z);
    __m256 p = _mm256_set1_ps(ERF_P[6]), q = _mm256_set1_ps(ERF_Q[5]);
    for (int d = 5; d >= 0; d--) p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(ERF_P[d]));
    for (int d = 4; d >= 0; d--) q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(ERF_Q[d]));
    const __m256 r = _mm256_div_ps(_mm256_mul_ps(z, p), q);
    return _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-1.0f)), _mm256_set1_ps(1.0f));
}

static float erf1(float z) {
    if (isnan(z)) return z;
    z = z < -4.0f ? -4.0f : (z > 4.0f ? 4.0f : z);
    const float u = z * z;
    float p = ERF_P[6], q = ERF_Q[5];
    for (int d = 5; d >= 0; d--) p = fmaf(p, u, ERF_P[d]);
    for (int d = 4; d >= 0; d--) q = fmaf(q, u, ERF_Q[d]);
    const float r = z * p / q;
    return r < -1.0f ? -1.0f : (r > 1.0f ? 1.0f : r);
}

/* GELU(acc * s + bias) / smooth for 8 values (bias, smooth: NULL for none): acc * s + bias
 * with one rounding as torch's addcmul, then x * 0.5 * (1 + erf(x / sqrt 2)) in torch's order */
AVX2 static inline __m256 gelu8(__m256 v, __m256 vs, const float *bias, const float *smooth) {
    v = bias ? _mm256_fmadd_ps(v, vs, _mm256_loadu_ps(bias)) : _mm256_mul_ps(v, vs);
    v = _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(0.5f)),
                      _mm256_add_ps(_mm256_set1_ps(1.0f),
                                    erf8(_mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f)))));
    return smooth ? _mm256_div_ps(v, _mm256_loadu_ps(smooth)) : v;
}

/* The FFN's middle in one pass per row, before a per-token dynamic GEMM: y = GELU(acc * s +
 * bias) (erf form, acc * s + bias as torch's addcmul: one rounding), divided by `smooth` where
 * SmoothQuant left a division, then its scale and codes; y is overwritten by the codes. */
AVX2 void qw_bias_gelu_quantize(float *y, const float *s, const float *bias, const float *smooth,
                                float *scale, int m, int n, float qmax, float tiny, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int i = 0; i < m; i++) {
        float *r = y + (int64_t)i * n;
        const __m256 vs = _mm256_set1_ps(s[i]), sign = _mm256_set1_ps(-0.0f);
        __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        int j = 0;
        /* two vectors per step: their Horner chains (~50 cycles of latency each) overlap */
        for (; j + 16 <= n; j += 16) {
            const __m256 a = gelu8(_mm256_loadu_ps(r + j), vs, bias ? bias + j : 0, smooth ? smooth + j : 0);
            const __m256 b = gelu8(_mm256_loadu_ps(r + j + 8), vs, bias ? bias + j + 8 : 0,
                                   smooth ? smooth + j + 8 : 0);
            _mm256_storeu_ps(r + j, a);
            _mm256_storeu_ps(r + j + 8, b);
            bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q),
                                                 _mm256_cmp_ps(b, b, _CMP_UNORD_Q)));
            mx = _mm256_max_ps(mx, _mm256_max_ps(_mm256_andnot_ps(sign, a), _mm256_andnot_ps(sign, b)));
        }
        for (; j + 8 <= n; j += 8) {
            const __m256 v = gelu8(_mm256_loadu_ps(r + j), vs, bias ? bias + j : 0, smooth ? smooth + j : 0);
            _mm256_storeu_ps(r + j, v);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v));
        }
        float amax = hmax8(mx);
        int nan = _mm256_movemask_ps(bad) != 0;
        for (; j < n; j++) {
            float v = bias ? fmaf(r[j], s[i], bias[j]) : r[j] * s[i];
            v = v * 0.5f * (1.0f + erf1(v * 0.70710678118654752f));
            if (smooth) v = v / smooth[j];
            r[j] = v;
            if (isnan(v)) nan = 1;
            if (fabsf(v) > amax) amax = fabsf(v);
        }
        scale[i] = row_scale(amax, nan, qmax, tiny);
        row_codes(r, r, n, scale[i], 0);
    }
}

/* Softmax over the last axis of rows x n scores, in place: the maximum, e^(x - max) (exp8:
 * relative error < 2e-7) and their sum, then x * (1 / sum), as torch's softmax does the steps.
 * A row holding a NaN or whose maximum is infinite gives NaN, as torch's (never a silent 0). */
AVX2 void qw_softmax_rows(float *x, int64_t rows, int n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t i = 0; i < rows; i++) {
        float *r = x + i * n;
        __m256 mx = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
        int j = 0;
        for (; j + 8 <= n; j += 8) {
            const __m256 v = _mm256_loadu_ps(r + j);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            mx = _mm256_max_ps(mx, v);
        }
        float m = hmax8(mx);
        int nan = _mm256_movemask_ps(bad) != 0;
        for (; j < n; j++) {
            if (isnan(r[j])) nan = 1;
            if (r[j] > m) m = r[j];
        }
        if (nan || isinf(m)) {
            for (j = 0; j < n; j++) r[j] = NAN;
            continue;
        }
        const __m256 vm = _mm256_set1_ps(m);
        __m256 sum = _mm256_setzero_ps();
        for (j = 0; j + 8 <= n; j += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(r + j), vm));
            _mm256_storeu_ps(r + j, e);
            sum = _mm256_add_ps(sum, e);
        }
        float s = hsum8(sum);
        for (; j < n; j++) {
            r[j] = expf(r[j] - m);
            s += r[j];
        }
        const float inv = 1.0f / s;
        const __m256 vi = _mm256_set1_ps(inv);
        for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(r + j, _mm256_mul_ps(_mm256_loadu_ps(r + j), vi));
        for (; j < n; j++) r[j] *= inv;
    }
}
