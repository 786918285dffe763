/* Weight-only GEMV for a few rows of float32 activations (LLM decoding, batch 1-8): int8 or
 * int4 weight codes are read once, converted to float32 in registers and multiplied into
 * float32 accumulators; the scale is applied once per output (int8, one scale per row) or once
 * per block of 32 codes (int4, per-group scales). The weight traffic is 1 or 0.5 byte per
 * weight instead of 4. Plain C, no torch headers (builds in under a second at first use); the
 * AVX2 + FMA paths are compiled with a function target attribute and only called on CPUs whose
 * flags have avx2 and fma (kernels/gemv.py checks).
 *
 * y[m, n] = sum_k x[m, k] * w[n, k] * scale + bias[n], the N output columns split over
 * `threads` threads (below).
 *
 * Blocking: `rows` weight rows x `mr` activation rows per pass (rows * mr = 8 accumulators),
 * so each converted weight vector feeds mr FMAs and 8 independent FMA chains hide the FMA
 * latency (one activation row with 4 weight rows, i.e. 4 chains, was latency-bound: 8 rows ran
 * 256 x 256 in 4.2 us instead of 5.7; a single row at a time waited on its conversions and
 * horizontal sum; a row buffer written and re-read cost as much again). A (weight row, activation row) result is computed
 * by the same instructions whatever `rows` is, so a thread split never changes a result.
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
static inline __m256 cvt8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* int8 codes w [N, K] (K % 8 == 0): outputs r..r+rows-1 of activation rows 0..mr-1 of x */
__attribute__((target("avx2,fma")))
static inline void i8_block(const float *x, int k, const int8_t *w, const float *scale,
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

/* the 32 int4 codes of a block as 4 vectors of 8 floats. Layout (kernels/gemv.py
 * blocked_int4): byte b of a block holds code b in its low nibble and code b + 16 in its high
 * nibble, as (code + 8) in 0..15. Zero-extending 8 bytes to 8 int32 lanes leaves each high
 * nibble as lane >> 4 (no mask), and the -8 is exact in float: 6 integer ops per 32 codes
 * where widening after nibble extraction in bytes took 12 (1.15-1.2x faster at one row; the
 * values, hence the results, are the same). Subtracting 8 x the block's activation sum once
 * instead was faster still at one row but 1.2-1.3x slower at 4-8 rows, and doubled the error. */
__attribute__((target("avx2,fma")))
static inline void cvt32(const uint8_t *p, __m256 out[4]) {
    const __m256i mask = _mm256_set1_epi32(0x0F);
    const __m256 eight = _mm256_set1_ps(8.0f);
    __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    out[0] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, mask)), eight);
    out[1] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, mask)), eight);
    out[2] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), eight);
    out[3] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), eight);
}

/* int4 codes packed [N, K/2] in blocks of 32, scale [N, K / group] (group % 32 == 0) */
__attribute__((target("avx2,fma")))
static inline void i4_block(const float *x, int k, const uint8_t *w, const float *scale,
                            int group, const float *bias, float *y, int n, int r,
                            const int rows, const int mr) {
    const int groups = k / group;
    __m256 acc[8][4];
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) acc[t][i] = _mm256_setzero_ps();
    for (int j = 0; j < k; j += 32) {
        for (int t = 0; t < rows; t++) {
            const int64_t row = r + t;
            __m256 c[4];
            cvt32(w + row * (k / 2) + j / 2, c);
            const __m256 s = _mm256_set1_ps(scale[row * groups + j / group]);
            for (int i = 0; i < mr; i++) {
                const float *xi = x + (int64_t)i * k + j;
                __m256 p = _mm256_fmadd_ps(_mm256_loadu_ps(xi + 8), c[1],
                                           _mm256_mul_ps(_mm256_loadu_ps(xi), c[0]));
                __m256 q = _mm256_fmadd_ps(_mm256_loadu_ps(xi + 24), c[3],
                                           _mm256_mul_ps(_mm256_loadu_ps(xi + 16), c[2]));
                acc[t][i] = _mm256_fmadd_ps(_mm256_add_ps(p, q), s, acc[t][i]);
            }
        }
    }
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < mr; i++) {
            float v = hsum(acc[t][i]);
            y[(int64_t)i * n + r + t] = bias ? v + bias[r + t] : v;
        }
}

/* One block of MR activation rows (from row i): weight rows RB at a time, then the rest singly */
#define ROWS(BLOCK, MR, RB, ...)                                                              \
    do {                                                                                      \
        const float *xi = x + (int64_t)i * k;                                                 \
        float *yi = y + (int64_t)i * n;                                                       \
        int r = n0;                                                                           \
        for (; r + RB <= n1; r += RB) BLOCK(xi, k, __VA_ARGS__, yi, n, r, RB, MR);            \
        for (; r < n1; r++) BLOCK(xi, k, __VA_ARGS__, yi, n, r, 1, MR);                       \
    } while (0)

/* Activation rows in blocks of 4 (2 weight rows each), then 2 (4 weight rows), then 1 (8). */
#define SWEEP(BLOCK, ...)                                                                     \
    do {                                                                                      \
        int i = 0;                                                                            \
        for (; i + 4 <= m; i += 4) ROWS(BLOCK, 4, 2, __VA_ARGS__);                            \
        for (; i + 2 <= m; i += 2) ROWS(BLOCK, 2, 4, __VA_ARGS__);                            \
        for (; i < m; i++) ROWS(BLOCK, 1, 8, __VA_ARGS__);                                    \
    } while (0)

/* Output columns [0, n) split over `threads` OpenMP threads. Built with -fopenmp, the library
 * needs libgomp.so.1, which torch has already loaded: the GEMV runs on torch's own OpenMP
 * threads (still spinning after torch's last op), not on a second pool competing for the same
 * cores. Built without OpenMP, it runs on the calling thread. */
#define SPLIT(CALL)                                                                           \
    do {                                                                                      \
        _Pragma("omp parallel num_threads(threads) if (threads > 1)")                         \
        {                                                                                     \
            int t = 0, nt = 1;                                                                \
            OMP_IDS(t, nt);                                                                   \
            const int n0 = (int)((int64_t)n * t / nt), n1 = (int)((int64_t)n * (t + 1) / nt); \
            CALL;                                                                             \
        }                                                                                     \
    } while (0)

#ifdef _OPENMP
#include <omp.h>
#define OMP_IDS(t, nt) (t = omp_get_thread_num(), nt = omp_get_num_threads())
int qw_openmp(void) { return 1; }
/* which OpenMP runtime the loader bound (tests: it must be the one torch loaded) */
void *qw_omp_symbol(void) { return (void *)&omp_get_num_threads; }
#else
#define OMP_IDS(t, nt) ((void)0)
int qw_openmp(void) { return 0; }
void *qw_omp_symbol(void) { return 0; }
#endif

__attribute__((target("avx2,fma")))
void qw_gemv_i8(const float *x, int m, int k, const int8_t *w, const float *scale,
                const float *bias, float *y, int n, int threads) {
    SPLIT(SWEEP(i8_block, w, scale, bias));
}

__attribute__((target("avx2,fma")))
void qw_gemv_i4(const float *x, int m, int k, const uint8_t *w, const float *scale, int group,
                const float *bias, float *y, int n, int threads) {
    SPLIT(SWEEP(i4_block, w, scale, group, bias));
}
