/* Weight-only GEMV for a few rows of float32 activations (LLM decoding, batch 1-8): int8 or
 * int4 weight codes are read once (1 or 0.5 byte per weight instead of 4). Two paths:
 * - integer (the default, qw_gemv with exact = 0): each activation row rounded to int16 codes
 *   with one scale; integer products (vpmaddwd for int8, vpmaddubsw for int4), exact int32
 *   sums, converted to float once per run / group and scaled;
 * - float (exact = 1, or a row the integer path cannot hold: NaN, Inf, subnormal maximum):
 *   codes converted to float32 in registers, float32 FMAs.
 * Plain C, no torch headers (builds in under a second at first use); the AVX2 + FMA paths are
 * compiled with a function target attribute and only called on CPUs whose flags have avx2 and
 * fma (kernels/gemv.py checks).
 *
 * y[m, n] = sum_k x[m, k] * w[n, k] * scale + bias[n], the N output columns split over
 * `threads` threads (below).
 *
 * Blocking: `rows` weight rows x `mr` activation rows per pass, so each loaded weight vector
 * feeds mr activation rows and independent accumulator chains hide the latencies (one
 * activation row with 4 weight rows was latency-bound on the float path: 8 rows ran 256 x 256 in
 * 4.2 us instead of 5.7). A (weight row, activation row) result is computed by the same
 * instructions whatever `rows` is, so a thread split never changes a result.
 */
#include <stdint.h>
#include <stdlib.h>
#include <immintrin.h>

#include "gemv.h"

__attribute__((target("avx2,fma")))
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma")))
static inline __m256 cvt8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* int8 codes w [N, K] (K % 8 == 0): outputs r..r+rows-1 of activation rows 0..mr-1 of x */
__attribute__((target("avx2,fma")))
static inline __attribute__((always_inline)) void i8_block(const float *x, int k, const int8_t *w, const float *scale,
                            const float *bias, float *y, int n, int r, const int rows,
                            const int mr) {
    __m256 acc[8][4];
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) acc[t][i] = _mm256_setzero_ps();
    const int8_t *w0 = w + (int64_t)r * k;
    for (int j = 0; j < k; j += 8) {
        __m256 xv[4];
        for (int i = 0; i < mr; i++) xv[i] = _mm256_loadu_ps(x + (int64_t)i * k + j);
        for (int t = 0; t < rows; t++) {
            __m256 c = cvt8(w0 + (int64_t)t * k + j);
            for (int i = 0; i < mr; i++) acc[t][i] = _mm256_fmadd_ps(xv[i], c, acc[t][i]);
        }
    }
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) {
            float v = hsum(acc[t][i]) * scale[r + t];
            y[(int64_t)i * n + r + t] = bias ? v + bias[r + t] : v;
        }
}

/* int4 layout (gemv.h, kernels/gemv.py blocked_int4): per block of 64 codes, 32 bytes; byte b
 * holds (code b + 8) in its low nibble and (code b + 32 + 8) in its high nibble, so one 32-byte
 * load and one mask (or shift) give 32 consecutive codes (the integer path below: 3 integer ops
 * per 64 codes where 16-byte blocks of 32 codes took 6); rows in tiles of QW_TILE. K % 64 == 0,
 * group % 32 == 0.
 * The float path: 8 bytes zero-extended to 8 int32 lanes, the high nibble as lane >> 4 (no
 * mask), the -8 exact in float. */
__attribute__((target("avx2,fma")))
static inline void cvt64(const uint8_t *p, __m256 lo[4], __m256 hi[4]) {
    const __m256i mask = _mm256_set1_epi32(0x0F);
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int q = 0; q < 4; q++) {
        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * q)));
        lo[q] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), eight);
        hi[q] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), eight);
    }
}

__attribute__((target("avx2,fma")))
static inline __m256 dot32(const float *x, const __m256 c[4]) {
    __m256 p = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), c[1], _mm256_mul_ps(_mm256_loadu_ps(x), c[0]));
    __m256 q = _mm256_fmadd_ps(_mm256_loadu_ps(x + 24), c[3],
                               _mm256_mul_ps(_mm256_loadu_ps(x + 16), c[2]));
    return _mm256_add_ps(p, q);
}

/* int4 codes packed [N, K/2] in blocks of 64, scale [N, K / group] */
__attribute__((target("avx2,fma")))
static inline __attribute__((always_inline)) void i4_block(const float *x, int k, const uint8_t *w,
        const float *scale, const float *urow, int group, const float *bias, float *y, int n,
        int r, const int rows, const int mr) {
    (void)urow;
    const int groups = k / group;
    __m256 acc[8][4];
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) acc[t][i] = _mm256_setzero_ps();
    for (int j = 0; j < k; j += 64) {
        for (int t = 0; t < rows; t++) {
            const int64_t row = r + t;
            __m256 lo[4], hi[4];
            cvt64(I4ROW(w, row, k, n) + (int64_t)(j / 64) * I4STEP(row, n), lo, hi);
            const __m256 s0 = _mm256_set1_ps(scale[row * groups + j / group]);
            const __m256 s1 = _mm256_set1_ps(scale[row * groups + (j + 32) / group]);
            for (int i = 0; i < mr; i++) {
                const float *xi = x + (int64_t)i * k + j;
                acc[t][i] = _mm256_fmadd_ps(dot32(xi, lo), s0, acc[t][i]);
                acc[t][i] = _mm256_fmadd_ps(dot32(xi + 32, hi), s1, acc[t][i]);
            }
        }
    }
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) {
            float v = hsum(acc[t][i]);
            y[(int64_t)i * n + r + t] = bias ? v + bias[r + t] : v;
        }
}

/* ---- int16 activations: the integer path (the default; the float blocks above are its exact
 * fallback for rows it cannot represent). Each activation row is rounded to 16-bit codes with
 * one scale, sx = amax / 32767 (|error| <= sx / 2 per element, i.e. <= amax / 65534), and the
 * products run in integer arithmetic: vpmaddwd multiplies 16 int16 pairs and adds them in pairs
 * into int32 -- 16 multiply-adds per instruction against 8 for the float FMA, and no int -> float
 * conversion per weight (the conversions, not the FMAs, bounded the float path). The integer
 * sums are exact: an int8 product is at most 32767 x 128 = 2^22, a lane adds two per 16 codes,
 * so a run of KC = 4096 codes stays under 2^31 before it is converted to float. */
#define KC 4096

__attribute__((target("avx2,fma")))
static inline __attribute__((always_inline)) void i8q_block(const int16_t *x, const float *sx, int k, const int8_t *w,
                             const float *scale, const float *bias, float *y, int n, int r,
                             const int rows, const int mr) {
    __m256 accf[8][4];
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) accf[t][i] = _mm256_setzero_ps();
    const int8_t *w0 = w + (int64_t)r * k;
    for (int j0 = 0; j0 < k; j0 += KC) {
        const int j1 = j0 + KC < k ? j0 + KC : k;
        __m256i acc[8][4];
        for (int t = 0; t < rows; t++)
            for (int i = 0; i < mr; i++) acc[t][i] = _mm256_setzero_si256();
        for (int j = j0; j < j1; j += 16) {
            __m256i xv[4];
            for (int i = 0; i < mr; i++)
                xv[i] = _mm256_loadu_si256((const __m256i *)(x + (int64_t)i * k + j));
            for (int t = 0; t < rows; t++) {
                __m256i c = _mm256_cvtepi8_epi16(
                    _mm_loadu_si128((const __m128i *)(w0 + (int64_t)t * k + j)));
                for (int i = 0; i < mr; i++)
                    acc[t][i] = _mm256_add_epi32(acc[t][i], _mm256_madd_epi16(c, xv[i]));
            }
        }
        for (int t = 0; t < rows; t++)
            for (int i = 0; i < mr; i++)
                accf[t][i] = _mm256_add_ps(accf[t][i], _mm256_cvtepi32_ps(acc[t][i]));
    }
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) {
            float v = hsum(accf[t][i]) * (sx[i] * scale[r + t]);
            y[(int64_t)i * n + r + t] = bias ? v + bias[r + t] : v;
        }
}

/* int4 codes x int16 activations, with vpmaddubsw (unsigned bytes x signed bytes, adjacent
 * pairs summed into int16): each activation code is split as x = 256 h + l + 128 with h, l
 * signed bytes (split_rows), the weight operand is u = code + 8 in 0..15 as stored, so
 *   sum_group code * x = 256 sum u h + sum u l - 8 X + 128 U,
 * X = sum of x over the group (per activation row, per call), U = sum of u over the group: its
 * term is the same for every call, so 128 sum_g scale_g U_g is one float per weight row,
 * precomputed (`urow`: 4 bytes per row where U per group would add 1/4 to group-32 weights). |pair sum| <= 2 x 15 x 128 = 3840: eight of them fit in int16, so
 * int16 sums are widened (vpmaddwd) every 8 blocks of 32 codes and at each group's end; a
 * group's int32 sum is exact (< 2^27) and converted to float once, times its scale. */
__attribute__((target("avx2,fma")))
static inline __attribute__((always_inline)) void i4q_block(const int8_t *xh, const int8_t *xl,
        const int32_t *xsum, const float *sx, int k, const uint8_t *w, const float *scale,
        const float *urow, int group, const int step, const float *bias, float *y, int n,
        int r, const int rows, const int mr) {
    const int groups = k / group;
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i k256 = _mm256_set1_epi16(256), one = _mm256_set1_epi16(1);
    __m256 accf[8][4];
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) accf[t][i] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i acc[8][4];
        for (int t = 0; t < rows; t++)
            for (int i = 0; i < mr; i++) acc[t][i] = _mm256_setzero_si256();
        for (int j0 = g * group; j0 < (g + 1) * group; j0 += 256) {
            const int j1 = j0 + 256 < (g + 1) * group ? j0 + 256 : (g + 1) * group;
            __m256i ah[8][4], al[8][4];
            for (int t = 0; t < rows; t++)
                for (int i = 0; i < mr; i++) ah[t][i] = al[t][i] = _mm256_setzero_si256();
            for (int j = j0; j < j1; j += step) {
                const uint8_t *wj[8];
                for (int t = 0; t < rows; t++)
                    wj[t] = I4ROW(w, r + t, k, n) + (int64_t)(j / 64) * I4STEP(r + t, n);
                if (step == 64) {  /* group % 64 == 0: both nibbles of a load in this group */
                    __m256i h0[4], h1[4], l0[4], l1[4];
                    for (int i = 0; i < mr; i++) {
                        const int8_t *hi_ = xh + (int64_t)i * k + j, *li = xl + (int64_t)i * k + j;
                        h0[i] = _mm256_loadu_si256((const __m256i *)hi_);
                        h1[i] = _mm256_loadu_si256((const __m256i *)(hi_ + 32));
                        l0[i] = _mm256_loadu_si256((const __m256i *)li);
                        l1[i] = _mm256_loadu_si256((const __m256i *)(li + 32));
                    }
                    for (int t = 0; t < rows; t++) {
                        const __m256i v = _mm256_loadu_si256((const __m256i *)wj[t]);
                        const __m256i u0 = _mm256_and_si256(v, mask);
                        const __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                        for (int i = 0; i < mr; i++) {
                            ah[t][i] = _mm256_add_epi16(ah[t][i], _mm256_add_epi16(
                                _mm256_maddubs_epi16(u0, h0[i]), _mm256_maddubs_epi16(u1, h1[i])));
                            al[t][i] = _mm256_add_epi16(al[t][i], _mm256_add_epi16(
                                _mm256_maddubs_epi16(u0, l0[i]), _mm256_maddubs_epi16(u1, l1[i])));
                        }
                    }
                    continue;
                }
                __m256i hv[4], lv[4];  /* group 32: the low and high nibbles are two groups */
                for (int i = 0; i < mr; i++) {
                    hv[i] = _mm256_loadu_si256((const __m256i *)(xh + (int64_t)i * k + j));
                    lv[i] = _mm256_loadu_si256((const __m256i *)(xl + (int64_t)i * k + j));
                }
                const int high = (j / 32) & 1;  /* codes j.. in the high nibbles of block j/64 */
                for (int t = 0; t < rows; t++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)wj[t]);
                    const __m256i u = _mm256_and_si256(high ? _mm256_srli_epi16(v, 4) : v, mask);
                    for (int i = 0; i < mr; i++) {
                        ah[t][i] = _mm256_add_epi16(ah[t][i], _mm256_maddubs_epi16(u, hv[i]));
                        al[t][i] = _mm256_add_epi16(al[t][i], _mm256_maddubs_epi16(u, lv[i]));
                    }
                }
            }
            for (int t = 0; t < rows; t++)
                for (int i = 0; i < mr; i++)
                    acc[t][i] = _mm256_add_epi32(acc[t][i], _mm256_add_epi32(
                        _mm256_madd_epi16(ah[t][i], k256), _mm256_madd_epi16(al[t][i], one)));
        }
        for (int t = 0; t < rows; t++) {
            const int64_t row = r + t;
            const __m256 s = _mm256_set1_ps(scale[row * groups + g]);
            for (int i = 0; i < mr; i++) {
                const __m256i fix = _mm256_setr_epi32(-8 * xsum[i * groups + g], 0, 0, 0, 0, 0, 0, 0);
                accf[t][i] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_add_epi32(acc[t][i], fix)), s, accf[t][i]);
            }
        }
    }
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) {
            float v = (hsum(accf[t][i]) + urow[r + t]) * sx[i];
            y[(int64_t)i * n + r + t] = bias ? v + bias[r + t] : v;
        }
}

/* The int16 codes of the m rows as two byte planes, x = 256 h + l + 128, and per-group sums */
static void split_rows(const int16_t *q, int m, int k, int group, int8_t *h, int8_t *l,
                       int32_t *xsum) {
    const int groups = k / group;
    for (int i = 0; i < m; i++)
        for (int g = 0; g < groups; g++) {
            int32_t sum = 0;
            for (int j = g * group; j < (g + 1) * group; j++) {
                const int v = q[(int64_t)i * k + j];
                sum += v;
                h[(int64_t)i * k + j] = (int8_t)(v >> 8);  /* arithmetic shift: floor(v / 256) */
                l[(int64_t)i * k + j] = (int8_t)((v & 0xFF) - 128);
            }
            xsum[i * groups + g] = sum;
        }
}

/* Rounds rows 0..m-1 of x to int16 codes q with one scale each; 0 where a row cannot be: a
 * non-finite value (the float path then gives F.linear's NaN / Inf), or a maximum so small that
 * 32767 / amax overflows. An all-zero row gets scale 0 (its outputs: the bias). */
__attribute__((target("avx2,fma")))
static int quantize_rows(const float *x, int m, int k, int16_t *q, float *sx) {
    for (int i = 0; i < m; i++) {
        const float *xi = x + (int64_t)i * k;
        int16_t *qi = q + (int64_t)i * k;
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (int j = 0; j < k; j += 8) {  /* one pass: the maximum, and NaN / Inf (x - x is NaN) */
            const __m256 v = _mm256_loadu_ps(xi + j);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), v, _CMP_UNORD_Q));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        const float amax = _mm_cvtss_f32(h);
        if (_mm256_movemask_ps(bad)) return 0;
        if (amax == 0.0f) {
            for (int j = 0; j < k; j++) qi[j] = 0;
            sx[i] = 0.0f;
            continue;
        }
        const float inv = 32767.0f / amax;
        if (!(inv < 3.0e38f)) return 0;
        const __m256 vi = _mm256_set1_ps(inv);
        for (int j = 0; j < k; j += 16) {  /* round to nearest even, |code| <= 32767 */
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xi + j), vi));
            __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xi + j + 8), vi));
            _mm256_storeu_si256((__m256i *)(qi + j),
                                _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
        }
        sx[i] = amax / 32767.0f;
    }
    return 1;
}

#ifdef _OPENMP
int qw_openmp(void) { return 1; }
/* which OpenMP runtime the loader bound (tests: it must be the one torch loaded) */
void *qw_omp_symbol(void) { return (void *)&omp_get_num_threads; }
#else
int qw_openmp(void) { return 0; }
void *qw_omp_symbol(void) { return 0; }
#endif

/* y[m, n] = x[m, k] @ W^T (+ bias), m <= 8, with int16 activations where every row can be
 * rounded (quantize_rows) and `exact` is 0, else with float32 activations (the float blocks). */
__attribute__((target("avx2,fma")))
void qw_gemv(const qw_layer *L, const float *x, float *y, int m, int threads, int exact) {
    const int n = L->n, k = L->k, group = L->group, groups = L->k / L->group;
    const float *scale = L->scale, *bias = L->bias;
    const float *urow = L->urow;
    float sx[8];
    /* int4 at 3+ rows: the float path (its blocks of 4 activation rows share each converted
     * weight vector; the integer path with 2-row blocks measured 1.1-1.4x slower at 4-8 rows) */
    const int vnni = L->vnni && (L->bits == 8 ? k % 32 == 0 : group % 64 == 0 && group <= 4096);
    const int integer = !exact && m <= (L->bits == 8 || vnni ? 8 : 2) &&
                        k % (L->bits == 8 ? 16 : 64) == 0;
    /* int16 codes; int4: two byte planes, the group sums (and VNNI: -8 x the sums) */
    char *buf = !integer ? NULL : malloc((size_t)m * k * 4 + (size_t)m * groups * 4 * (vnni ? 2 : 1));
    int16_t *q = (int16_t *)buf;
    if (buf && quantize_rows(x, m, k, q, sx)) {
        if (L->bits == 8 && vnni) {
            qw_i8_vnni(L, q, sx, y, m, threads);
        } else if (L->bits == 8) {
            const int8_t *w = (const int8_t *)L->w;
#define ROW_ARGS q + (int64_t)i * k, sx + i
            SPLIT(SWEEP(i8q_block, 2, 4, 8, w, scale, bias));
#undef ROW_ARGS
        } else {
            const uint8_t *w = (const uint8_t *)L->w;
            int8_t *xh = (int8_t *)(buf + (size_t)m * k * 2), *xl = xh + (size_t)m * k;
            int32_t *xsum = (int32_t *)(xl + (size_t)m * k);
            split_rows(q, m, k, group, xh, xl, xsum);
#define ROW_ARGS xh + (int64_t)i * k, xl + (int64_t)i * k, xsum + i * groups, sx + i
            if (vnni)
                qw_i4_vnni(L, xh, xl, xsum, xsum + m * groups, sx, y, m, threads);
            else if (group % 64 == 0)
                SPLIT(SWEEP(i4q_block, 0, 2, 4, w, scale, urow, group, 64, bias));
            else
                SPLIT(SWEEP(i4q_block, 0, 2, 4, w, scale, urow, group, 32, bias));
#undef ROW_ARGS
        }
        free(buf);
        return;
    }
    free(buf);
#define ROW_ARGS x + (int64_t)i * k
    if (L->bits == 8) {
        const int8_t *w = (const int8_t *)L->w;
        SPLIT(SWEEP(i8_block, 2, 4, 8, w, scale, bias));
    } else {
        const uint8_t *w = (const uint8_t *)L->w;
        SPLIT(SWEEP(i4_block, 2, 4, 8, w, scale, urow, group, bias));
    }
#undef ROW_ARGS
}
