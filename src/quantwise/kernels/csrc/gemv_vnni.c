/* The integer paths of gemv.c on AVX-512 VNNI CPUs (AMD Zen 4+, Intel Cascade Lake+): the same
 * int16 activation codes and byte planes, the same exact integer sums, with fewer instructions.
 * Why: at decode shapes gemv.c's AVX2 int4 path read 10-14 GB/s on two Zen 4 cores where
 * float32 F.linear read 17-20 and llama.cpp's Q4_0 ~29: it was bound by instructions (per 64
 * codes and weight row: a load, two masks, a shift, four vpmaddubsw, four int16 adds, and a
 * widening every 8 blocks), not by memory. Here:
 * - int4: 32 stored bytes broadcast to a 512-bit register, the high half shifted by 4, one
 *   mask: 64 codes (code + 8, 0..15) in byte order; vpdpbusd multiplies them by the high and
 *   the low byte planes of the activations (x = 256 h + l + 128, gemv.c split_rows) and adds
 *   four products per int32 lane: 2 instructions per 64 codes, no int16 stage, no widening.
 *   Per group: (h sum << 8) + l sum, the activation-sum term -8 X (gemv.c i4q_block) preloaded
 *   into lane 0 of the l accumulator, converted to float once, times the group's scale.
 *   Exact: |u h| <= 15 x 128, so a lane of a group of G <= 4096 codes stays under 2^31 with
 *   the << 8 and the -8 X term (G x 2^18) included (gemv.c sends larger groups to AVX2).
 * - int8: 32 codes sign-extended to int16, vpdpwssd against 32 int16 activation codes (two
 *   products per lane, |product| <= 2^22): runs of KC = 4096 codes stay under 2^31.
 * A (weight row, activation row) result is computed by the same instructions whatever the
 * block shape, so a thread split never changes a result. */
#include <stdint.h>
#include <stdlib.h>
#include <immintrin.h>

#include "gemv.h"

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma")))
#define INLINE static inline __attribute__((always_inline))
#define KC 4096

/* int8 codes [N, K] (K % 32 == 0) x int16 activation codes: outputs r..r+rows-1 of rows 0..mr-1 */
VNNI INLINE void i8v_block(const int16_t *x, const float *sx, int k, const int8_t *w,
                           const float *scale, const float *bias, float *y, int n, int r,
                           const int rows, const int mr) {
    __m512 accf[8][2];
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) accf[t][i] = _mm512_setzero_ps();
    const int8_t *w0 = w + (int64_t)r * k;
    for (int j0 = 0; j0 < k; j0 += KC) {
        const int j1 = j0 + KC < k ? j0 + KC : k;
        __m512i acc[8][2];
        for (int t = 0; t < rows; t++)
            for (int i = 0; i < mr; i++) acc[t][i] = _mm512_setzero_si512();
        for (int j = j0; j < j1; j += 32) {
            __m512i xv[2];
            for (int i = 0; i < mr; i++)
                xv[i] = _mm512_loadu_si512((const void *)(x + (int64_t)i * k + j));
            for (int t = 0; t < rows; t++) {
                const __m512i c = _mm512_cvtepi8_epi16(
                    _mm256_loadu_si256((const __m256i *)(w0 + (int64_t)t * k + j)));
                for (int i = 0; i < mr; i++) acc[t][i] = _mm512_dpwssd_epi32(acc[t][i], c, xv[i]);
            }
        }
        for (int t = 0; t < rows; t++)
            for (int i = 0; i < mr; i++)
                accf[t][i] = _mm512_add_ps(accf[t][i], _mm512_cvtepi32_ps(acc[t][i]));
    }
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) {
            const float v = _mm512_reduce_add_ps(accf[t][i]) * (sx[i] * scale[r + t]);
            y[(int64_t)i * n + r + t] = bias ? v + bias[r + t] : v;
        }
}

/* int4 codes blocked [N, K/2] (kernels/gemv.py blocked_int4), group % 64 == 0; fix[i x groups
 * + g]: -8 X_g of activation row i */
VNNI INLINE void i4v_block(const int8_t *xh, const int8_t *xl, const int32_t *fix,
                           const float *sx, int k, const uint8_t *w, const float *scale,
                           const float *urow, int group, const float *bias, float *y, int n,
                           int r, const int rows, const int mr) {
    const int groups = k / group;
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const __m512i shift = _mm512_setr_epi64(0, 0, 0, 0, 0x0004000400040004LL, 0x0004000400040004LL,
                                            0x0004000400040004LL, 0x0004000400040004LL);
    __m512 accf[8][2];
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) accf[t][i] = _mm512_setzero_ps();
    const uint8_t *wr[8];
    int64_t step[8];
    for (int t = 0; t < rows; t++) wr[t] = I4ROW(w, r + t, k, n), step[t] = I4STEP(r + t, n);
    for (int g = 0; g < groups; g++) {
        __m512i ah[8][2], al[8][2];
        for (int t = 0; t < rows; t++)
            for (int i = 0; i < mr; i++) {
                ah[t][i] = _mm512_setzero_si512();
                al[t][i] = _mm512_zextsi128_si512(_mm_cvtsi32_si128(fix[i * groups + g]));
            }
        for (int j = g * group; j < (g + 1) * group; j += 64) {
            __m512i hv[2], lv[2];
            for (int i = 0; i < mr; i++) {
                hv[i] = _mm512_loadu_si512((const void *)(xh + (int64_t)i * k + j));
                lv[i] = _mm512_loadu_si512((const void *)(xl + (int64_t)i * k + j));
            }
            for (int t = 0; t < rows; t++) {
                const __m512i v = _mm512_broadcast_i64x4(
                    _mm256_loadu_si256((const __m256i *)(wr[t] + (j / 64) * step[t])));
                const __m512i u = _mm512_and_si512(_mm512_srlv_epi16(v, shift), mask);
                for (int i = 0; i < mr; i++) {
                    ah[t][i] = _mm512_dpbusd_epi32(ah[t][i], u, hv[i]);
                    al[t][i] = _mm512_dpbusd_epi32(al[t][i], u, lv[i]);
                }
            }
        }
        for (int t = 0; t < rows; t++) {
            const __m512 s = _mm512_set1_ps(scale[(int64_t)(r + t) * groups + g]);
            for (int i = 0; i < mr; i++)
                accf[t][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(
                    _mm512_slli_epi32(ah[t][i], 8), al[t][i])), s, accf[t][i]);
        }
    }
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) {
            const float v = (_mm512_reduce_add_ps(accf[t][i]) + urow[r + t]) * sx[i];
            y[(int64_t)i * n + r + t] = bias ? v + bias[r + t] : v;
        }
}

VNNI void qw_i8_vnni(const qw_layer *L, const int16_t *q, const float *sx, float *y, int m,
                     int threads) {
    const int n = L->n, k = L->k;
    const int8_t *w = (const int8_t *)L->w;
    const float *scale = L->scale, *bias = L->bias;
#define ROW_ARGS q + (int64_t)i * k, sx + i
    SPLIT(SWEEP(i8v_block, 0, 4, 8, w, scale, bias));
#undef ROW_ARGS
}

VNNI void qw_i4_vnni(const qw_layer *L, const int8_t *xh, const int8_t *xl, const int32_t *xsum,
                     int32_t *fix, const float *sx, float *y, int m, int threads) {
    const int n = L->n, k = L->k, group = L->group, groups = k / group;
    const uint8_t *w = (const uint8_t *)L->w;
    const float *scale = L->scale, *urow = L->urow, *bias = L->bias;
    for (int i = 0; i < m * groups; i++) fix[i] = -8 * xsum[i];  /* lane 0 of each group's l sum */
#define ROW_ARGS xh + (int64_t)i * k, xl + (int64_t)i * k, fix + i * groups, sx + i
    SPLIT(SWEEP(i4v_block, 0, 4, 4, w, scale, urow, group, bias));
#undef ROW_ARGS
}
