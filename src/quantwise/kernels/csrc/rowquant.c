/* The row passes of the encoder fast path (kernels/rowquant.py), each while a row is in cache:
 * per-token quantization before a dynamic int8 GEMM (the row's max |x|, then its codes;
 * bit-identical to torch's amax / amin / div / round: IEEE division, round half to even), a BERT
 * FFN's rescale + bias + GELU + next quantization, the residual + LayerNorm (+ next
 * quantization) after a GEMM, and attention per head.
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

/* A row's running max |v| and NaN mask, 8 values at a time (the scale of its codes). */
AVX2 static inline void track8(__m256 v, __m256 *mx, __m256 *bad) {
    *bad = _mm256_or_ps(*bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    *mx = _mm256_max_ps(*mx, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v));
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
    __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= k; j += 8) track8(_mm256_loadu_ps(x + j), &mx, &bad);
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
        const __m256 vs = _mm256_set1_ps(s[i]);
        __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        int j = 0;
        /* two vectors per step: their Horner chains (~50 cycles of latency each) overlap */
        for (; j + 16 <= n; j += 16) {
            const __m256 a = gelu8(_mm256_loadu_ps(r + j), vs, bias ? bias + j : 0, smooth ? smooth + j : 0);
            const __m256 b = gelu8(_mm256_loadu_ps(r + j + 8), vs, bias ? bias + j + 8 : 0,
                                   smooth ? smooth + j + 8 : 0);
            _mm256_storeu_ps(r + j, a);
            _mm256_storeu_ps(r + j + 8, b);
            track8(a, &mx, &bad);
            track8(b, &mx, &bad);
        }
        for (; j + 8 <= n; j += 8) {
            const __m256 v = gelu8(_mm256_loadu_ps(r + j), vs, bias ? bias + j : 0, smooth ? smooth + j : 0);
            _mm256_storeu_ps(r + j, v);
            track8(v, &mx, &bad);
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

/* After a per-token dynamic GEMM, the residual and LayerNorm in one pass per row:
 * v = acc * s + bias (one rounding, as torch's addcmul), v += res (as add_), then h = (v -
 * mean) * rstd * gamma + beta (mean, then the variance of the centred values, both over the
 * row while it is in cache; not torch's summation order, so h differs from F.layer_norm by
 * float32 rounding), written over acc. Where `codes` is not NULL also the next per-token
 * GEMM's input: codes of h / smooth (smooth NULL: h) by x * (1 / scale), scales in `cscale`.
 * bias, smooth: NULL for none; gamma, beta: [n]. A row holding NaN / Inf is NaN after the
 * norm, as in torch, and its codes 0 with a NaN scale. */
AVX2 void qw_residual_layernorm(float *y, const float *s, const float *bias, const float *res,
                                const float *gamma, const float *beta, float eps, int m, int n,
                                const float *smooth, float *codes, float *cscale, float qmax,
                                float tiny, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int i = 0; i < m; i++) {
        float *r = y + (int64_t)i * n;
        const float *x = res + (int64_t)i * n;
        const __m256 vs = _mm256_set1_ps(s[i]);
        __m256 sum = _mm256_setzero_ps();
        int j = 0;
        for (; j + 8 <= n; j += 8) {
            const __m256 a = _mm256_loadu_ps(r + j);
            __m256 v = bias ? _mm256_fmadd_ps(a, vs, _mm256_loadu_ps(bias + j)) : _mm256_mul_ps(a, vs);
            v = _mm256_add_ps(v, _mm256_loadu_ps(x + j));
            _mm256_storeu_ps(r + j, v);
            sum = _mm256_add_ps(sum, v);
        }
        float total = hsum8(sum);
        for (; j < n; j++) {
            r[j] = (bias ? fmaf(r[j], s[i], bias[j]) : r[j] * s[i]) + x[j];
            total += r[j];
        }
        const float mean = total / n;
        const __m256 vm = _mm256_set1_ps(mean);
        __m256 sq = _mm256_setzero_ps();
        for (j = 0; j + 8 <= n; j += 8) {
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(r + j), vm);
            sq = _mm256_fmadd_ps(d, d, sq);
        }
        float var = hsum8(sq);
        for (; j < n; j++) var += (r[j] - mean) * (r[j] - mean);
        const float rstd = 1.0f / sqrtf(var / n + eps);
        const __m256 vr = _mm256_set1_ps(rstd);
        __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        float *c = codes ? codes + (int64_t)i * n : 0;
        for (j = 0; j + 8 <= n; j += 8) {
            const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(r + j), vm), vr);
            const __m256 h = _mm256_fmadd_ps(d, _mm256_loadu_ps(gamma + j), _mm256_loadu_ps(beta + j));
            _mm256_storeu_ps(r + j, h);
            if (c) {
                const __m256 t = smooth ? _mm256_div_ps(h, _mm256_loadu_ps(smooth + j)) : h;
                _mm256_storeu_ps(c + j, t);
                track8(t, &mx, &bad);
            }
        }
        float amax = hmax8(mx);
        int nan = _mm256_movemask_ps(bad) != 0;
        for (; j < n; j++) {
            r[j] = fmaf((r[j] - mean) * rstd, gamma[j], beta[j]);
            if (c) {
                c[j] = smooth ? r[j] / smooth[j] : r[j];
                if (isnan(c[j])) nan = 1;
                if (fabsf(c[j]) > amax) amax = fabsf(c[j]);
            }
        }
        if (c) {
            cscale[i] = row_scale(amax, nan, qmax, tiny);
            row_codes(c, c, n, cscale[i], 0);
        }
    }
}

/* softmax of one row of scores in place, unnormalised: returns 1 / sum (0 for a NaN row,
 * which is then all NaN: a NaN score or an infinite maximum, as torch's softmax gives) */
AVX2 static float exp_row(float *s, int n) {
    __m256 mx = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 v = _mm256_loadu_ps(s + j);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        mx = _mm256_max_ps(mx, v);
    }
    float m = hmax8(mx);
    int nan = _mm256_movemask_ps(bad) != 0;
    for (; j < n; j++) {
        if (isnan(s[j])) nan = 1;
        if (s[j] > m) m = s[j];
    }
    if (nan || isinf(m)) {
        for (j = 0; j < n; j++) s[j] = NAN;
        return 0.0f;
    }
    const __m256 vm = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum8(sum);
    for (; j < n; j++) {
        s[j] = expf(s[j] - m);
        total += s[j];
    }
    return 1.0f / total;
}

/* scores of query rows qa and qb (qb may equal qa) against the keys of kt [d, t] (K transposed),
 * plus the mask row, into sa and sb: 32 keys x 2 rows per step, each load of K used twice */
AVX2 static void scores2(const float *qa, const float *qb, const float *kt, const float *mrow,
                         float *sa, float *sb, int t, int d) {
    int j0 = 0;
    for (; j0 + 32 <= t; j0 += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int c = 0; c < d; c++) {
            const float *kr = kt + (int64_t)c * t + j0;
            const __m256 k0 = _mm256_loadu_ps(kr), k1 = _mm256_loadu_ps(kr + 8),
                         k2 = _mm256_loadu_ps(kr + 16), k3 = _mm256_loadu_ps(kr + 24);
            const __m256 x = _mm256_set1_ps(qa[c]), y = _mm256_set1_ps(qb[c]);
            a0 = _mm256_fmadd_ps(x, k0, a0); a1 = _mm256_fmadd_ps(x, k1, a1);
            a2 = _mm256_fmadd_ps(x, k2, a2); a3 = _mm256_fmadd_ps(x, k3, a3);
            b0 = _mm256_fmadd_ps(y, k0, b0); b1 = _mm256_fmadd_ps(y, k1, b1);
            b2 = _mm256_fmadd_ps(y, k2, b2); b3 = _mm256_fmadd_ps(y, k3, b3);
        }
        const __m256 ra[4] = {a0, a1, a2, a3}, rb[4] = {b0, b1, b2, b3};
        for (int u = 0; u < 4; u++) {
            const __m256 m = mrow ? _mm256_loadu_ps(mrow + j0 + 8 * u) : _mm256_setzero_ps();
            _mm256_storeu_ps(sa + j0 + 8 * u, _mm256_add_ps(ra[u], m));
            _mm256_storeu_ps(sb + j0 + 8 * u, _mm256_add_ps(rb[u], m));
        }
    }
    for (; j0 < t; j0++) {
        float x = 0.0f, y = 0.0f;
        for (int c = 0; c < d; c++) {
            x += qa[c] * kt[(int64_t)c * t + j0];
            y += qb[c] * kt[(int64_t)c * t + j0];
        }
        sa[j0] = mrow ? x + mrow[j0] : x;
        sb[j0] = mrow ? y + mrow[j0] : y;
    }
}

/* o = (sum_j s_j v_j) * inv for 8 columns at a time of v [t, ld] (from column 0 of vc) */
AVX2 static void pv(const float *s, const float *vc, int64_t ld, int t, int d, float inv, float *o) {
    const __m256 vi = _mm256_set1_ps(inv);
    int c0 = 0;
    for (; c0 + 32 <= d; c0 += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < t; j++) {
            const __m256 p = _mm256_set1_ps(s[j]);
            const float *vr = vc + (int64_t)j * ld + c0;
            a0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr), a0);
            a1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8), a1);
            a2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 16), a2);
            a3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 24), a3);
        }
        _mm256_storeu_ps(o + c0, _mm256_mul_ps(a0, vi));
        _mm256_storeu_ps(o + c0 + 8, _mm256_mul_ps(a1, vi));
        _mm256_storeu_ps(o + c0 + 16, _mm256_mul_ps(a2, vi));
        _mm256_storeu_ps(o + c0 + 24, _mm256_mul_ps(a3, vi));
    }
    for (; c0 < d; c0 += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int j = 0; j < t; j++)
            a = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), _mm256_loadu_ps(vc + (int64_t)j * ld + c0), a);
        _mm256_storeu_ps(o + c0, _mm256_mul_ps(a, vi));
    }
}

/* One BERT layer's attention after its Q/K/V GEMM: q, k, v [bh, t, d] head-major (bh = batch
 * x heads; q already scaled by 1/sqrt(d)), `mask` [bh, t] added to every query's scores (NULL:
 * none), softmax over keys, P V written token-major: out[b, i, h, :] for b = x / heads, h = x %
 * heads (the layout the output projection reads). Two query rows at a time: their scores stay
 * in L1 (K transposed once per head), no [t, t] matrix, no separate softmax or layout pass.
 * d % 8 == 0; `scratch`: threads x (d t + 2 t) floats. */
AVX2 void qw_attention(const float *q, const float *k, const float *v, const float *mask,
                       float *out, int64_t bh, int heads, int t, int d, float *scratch, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#ifdef _OPENMP
        const int me = omp_get_thread_num();
#else
        const int me = 0;
#endif
        /* scratch: per thread, K transposed [d, t] and two score rows */
        float *kt = scratch + (int64_t)me * ((int64_t)d * t + 2 * t), *s = kt + (int64_t)d * t;
#pragma omp for schedule(static)
        for (int64_t x = 0; x < bh; x++) {
            const float *qx = q + x * t * d, *kx = k + x * t * d, *vx = v + x * t * d;
            const float *mrow = mask ? mask + x * t : 0;
            const int64_t b = x / heads, h = x % heads;
            for (int j = 0; j < t; j++)
                for (int c = 0; c < d; c++) kt[(int64_t)c * t + j] = kx[(int64_t)j * d + c];
            for (int i = 0; i < t; i += 2) {
                const int two = i + 1 < t;
                scores2(qx + (int64_t)i * d, qx + (int64_t)(i + two) * d, kt, mrow, s, s + t, t, d);
                for (int r = 0; r <= two; r++) {
                    float *o = out + ((b * t + i + r) * heads + h) * d;
                    const float inv = exp_row(s + (int64_t)r * t, t);
                    if (inv == 0.0f) {
                        for (int c = 0; c < d; c++) o[c] = NAN;
                        continue;
                    }
                    pv(s + (int64_t)r * t, vx, d, t, d, inv, o);
                }
            }
        }
    }
}
