/* Shared by gemv.c (AVX2 + FMA) and gemv_vnni.c (AVX-512 VNNI): the layer struct kernels/gemv.py
 * builds, and the macros that sweep activation rows and split output columns over threads. */
#ifndef QW_GEMV_H
#define QW_GEMV_H
#include <stdint.h>

/* int4 codes (kernels/gemv.py blocked_int4): each row's codes in blocks of 64, 32 bytes per
 * block (byte b: code b + 8 in the low nibble, code b + 32 + 8 in the high one), and the rows in
 * tiles of QW_TILE: a tile holds block 0 of its rows one after another, then block 1, ... so a
 * pass over a tile's rows reads one sequential stream (rows read side by side 1 KB apart were
 * served at 11-15 GB/s by the prefetchers of 2 Zen 4 cores, one stream at 22-25). The last
 * n % QW_TILE rows are stored row after row. A tile starts where its first row would in a plain
 * [n, k/2] array. I4ROW: the address of row rho's first block; I4STEP: bytes between blocks. */
#define QW_TILE 4
#define I4FULL(rho, n) ((rho) < ((n) & ~(QW_TILE - 1)))
#define I4ROW(w, rho, k, n)                                                                   \
    ((w) + (I4FULL(rho, n) ? (int64_t)((rho) & ~(QW_TILE - 1)) * ((k) / 2) + ((rho) & (QW_TILE - 1)) * 32 \
                           : (int64_t)(rho) * ((k) / 2)))
#define I4STEP(rho, n) (I4FULL(rho, n) ? 32 * QW_TILE : 32)

/* One block of MR activation rows (from row i): weight rows RB at a time, then the rest singly.
 * X is the activation array (float32 or int16 codes) and XS its per-row extra argument. */
#define ROWS(BLOCK, MR, RB, ...)                                                              \
    do {                                                                                      \
        float *yi = y + (int64_t)i * n;                                                       \
        int r = n0;                                                                           \
        for (; r + RB <= n1; r += RB) BLOCK(ROW_ARGS, k, __VA_ARGS__, yi, n, r, RB, MR);      \
        for (; r < n1; r++) BLOCK(ROW_ARGS, k, __VA_ARGS__, yi, n, r, 1, MR);                 \
    } while (0)

/* Activation rows in blocks of 4 (R4 weight rows each; R4 = 0: none, as the int4 integer
 * path, whose 16 activation vectors per block of 4 rows spilled), then 2 (R2), then 1 (R1). */
#define SWEEP(BLOCK, R4, R2, R1, ...)                                                         \
    do {                                                                                      \
        int i = 0;                                                                            \
        for (; R4 && i + 4 <= m; i += 4) ROWS(BLOCK, 4, R4, __VA_ARGS__);                     \
        for (; i + 2 <= m; i += 2) ROWS(BLOCK, 2, R2, __VA_ARGS__);                           \
        for (; i < m; i++) ROWS(BLOCK, 1, R1, __VA_ARGS__);                                   \
    } while (0)

/* Output columns [0, n) split over `threads` OpenMP threads. Built with -fopenmp, the library
 * needs libgomp.so.1, which torch has already loaded: the GEMV runs on torch's own OpenMP
 * threads (still spinning after torch's last op), not on a second pool competing for the same
 * cores. Built without OpenMP, it runs on the calling thread. */
#define SPLIT(CALL)                                                                           \
    do {                                                                                      \
        if (threads <= 1) {  /* no parallel region: entering one costs a few hundred ns */    \
            const int n0 = 0, n1 = n;                                                         \
            CALL;                                                                             \
            break;                                                                            \
        }                                                                                     \
        _Pragma("omp parallel num_threads(threads)")                                          \
        {                                                                                     \
            int t = 0, nt = 1;                                                                \
            OMP_IDS(t, nt);                                                                   \
            /* splits at multiples of 8 rows: whole int4 tiles per thread */                    \
            const int n0 = t ? (int)((int64_t)n * t / nt) & ~7 : 0;                           \
            const int n1 = t + 1 < nt ? (int)((int64_t)n * (t + 1) / nt) & ~7 : n;             \
            CALL;                                                                             \
        }                                                                                     \
    } while (0)

#ifdef _OPENMP
#include <omp.h>
#define OMP_IDS(t, nt) (t = omp_get_thread_num(), nt = omp_get_num_threads())
#else
#define OMP_IDS(t, nt) ((void)0)
#endif

/* A layer's weights, as kernels/gemv.py builds them once (a ctypes call costs ~0.15 us per
 * argument: a small layer's call is a few microseconds). */
typedef struct {
    const void *w;        /* int8 [n, k], or int4 blocked [n, k / 2] */
    const float *scale;   /* [n] (int8) or [n, k / group] (int4) */
    const float *urow;    /* int4: [n], 128 sum_g scale_g U_g (i4q_block) */
    const float *bias;    /* [n] or NULL */
    int n, k, bits, group;
    int vnni;             /* 1: AVX-512 VNNI kernels (gemv_vnni.c) where they apply */
} qw_layer;


/* gemv_vnni.c: the integer paths on AVX-512 VNNI (activations already rounded by gemv.c) */
void qw_i8_vnni(const qw_layer *L, const int16_t *q, const float *sx, float *y, int m, int threads);
void qw_i4_vnni(const qw_layer *L, const int8_t *xh, const int8_t *xl, const int32_t *xsum,
                int32_t *fix, const float *sx, float *y, int m, int threads);
#endif
