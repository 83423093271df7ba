/* Multi-rate depthwise 3x3 dilated convolutions over a masked channels-last grid (crener.dconv).
 *
 * Built by crener/dconv.py with the machine's C compiler on first use and called through ctypes;
 * there is no torch header here, so it builds in about a second. Every tensor is contiguous:
 *   x    (B, N, N, C)    the grid, channels last
 *   m    (B, N, N)       the cell mask, bytes 0 or 1; a masked cell reads as zero and is written as zero
 *   w    (R, 9, C)       rate r's kernel, tap k = 3 * ki + kj, channels last
 *   bias (R, C)
 *   dil  (R)             rate r's dilation d: tap (ki, kj) of cell (i, j) reads cell (i + (ki-1)d, j + (kj-1)d)
 *   z    (B, N, N, R*C)  the convolutions' outputs, rate r in channels r*C .. (r+1)*C
 * The forward pass writes z; the backward pass takes gz, the gradient at z (zero at masked cells),
 * and writes gx, and each thread's partial sums of the weight and bias gradients.
 *
 * Why a kernel of our own: the library's depthwise convolution reads and writes the whole grid
 * once per rate and pass, and its dilated backward pass is several times its undilated one on
 * some CPUs. Here each cell's neighbourhood is read once from cache for every rate and tap, the
 * output lands straight in its slice of the concatenation, and both gradients come from one pass.
 * The rows (b, i) are split into one contiguous block per thread, so results do not depend on
 * scheduling, only on the thread count.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_THREADS 256

typedef struct {
    const void *x, *w, *bias, *gz;
    const uint8_t *m;
    const int64_t *dil;
    void *z, *gx, *gw, *gb;
    int64_t R, N, C, row0, row1;
} job_t;

#define KERNELS(T, S)                                                                              \
    static inline void axpy_##S(T *restrict acc, const T *restrict a, const T *restrict b,         \
                                int64_t n) {                                                       \
        for (int64_t c = 0; c < n; ++c) acc[c] += a[c] * b[c];                                     \
    }                                                                                              \
                                                                                                   \
    static void fwd_rows_##S(const job_t *J) {                                                     \
        const T *x = J->x, *w = J->w, *bias = J->bias;                                             \
        const uint8_t *m = J->m;                                                                   \
        T *z = J->z;                                                                               \
        const int64_t R = J->R, N = J->N, C = J->C;                                                \
        for (int64_t row = J->row0; row < J->row1; ++row) {                                        \
            const int64_t b = row / N, i = row % N;                                                \
            for (int64_t j = 0; j < N; ++j) {                                                      \
                const int64_t p = row * N + j;                                                     \
                T *zp = z + p * R * C;                                                             \
                if (!m[p]) {                                                                       \
                    memset(zp, 0, (size_t)(R * C) * sizeof(T));                                    \
                    continue;                                                                      \
                }                                                                                  \
                for (int64_t r = 0; r < R; ++r) {                                                  \
                    T *acc = zp + r * C;                                                           \
                    const int64_t d = J->dil[r];                                                   \
                    memcpy(acc, bias + r * C, (size_t)C * sizeof(T));                              \
                    for (int ki = 0; ki < 3; ++ki) {                                               \
                        const int64_t ii = i + (ki - 1) * d;                                       \
                        if (ii < 0 || ii >= N) continue;                                           \
                        for (int kj = 0; kj < 3; ++kj) {                                           \
                            const int64_t jj = j + (kj - 1) * d;                                   \
                            const int64_t q = (b * N + ii) * N + jj;                               \
                            if (jj < 0 || jj >= N || !m[q]) continue;                              \
                            axpy_##S(acc, w + (r * 9 + ki * 3 + kj) * C, x + q * C, C);            \
                        }                                                                          \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    /* gw/gb of this job are its own partial sums (zeroed by the caller); gx rows are its own. */  \
    static void bwd_rows_##S(const job_t *J) {                                                     \
        const T *x = J->x, *w = J->w, *gz = J->gz;                                                 \
        const uint8_t *m = J->m;                                                                   \
        T *gx = J->gx, *gw = J->gw, *gb = J->gb;                                                   \
        const int64_t R = J->R, N = J->N, C = J->C;                                                \
        for (int64_t row = J->row0; row < J->row1; ++row) {                                        \
            const int64_t b = row / N, i = row % N;                                                \
            for (int64_t j = 0; j < N; ++j) {                                                      \
                const int64_t p = row * N + j;                                                     \
                T *gxp = gx ? gx + p * C : 0;                                                      \
                if (gxp) memset(gxp, 0, (size_t)C * sizeof(T));                                   \
                if (!m[p]) continue; /* gz is zero here and x reads as zero */                     \
                for (int64_t r = 0; r < R; ++r) {                                                  \
                    const int64_t d = J->dil[r];                                                   \
                    const T *gzp = gz + p * R * C + r * C;                                         \
                    if (gb) {                                                                      \
                        T *gbr = gb + r * C;                                                       \
                        for (int64_t c = 0; c < C; ++c) gbr[c] += gzp[c];                          \
                    }                                                                              \
                    for (int ki = 0; ki < 3; ++ki) {                                               \
                        for (int kj = 0; kj < 3; ++kj) {                                           \
                            const int64_t k = r * 9 + ki * 3 + kj;                                 \
                            /* weight: this cell's gradient times the cell the tap reads */        \
                            const int64_t ii = i + (ki - 1) * d, jj = j + (kj - 1) * d;            \
                            if (gw && ii >= 0 && ii < N && jj >= 0 && jj < N) {                    \
                                const int64_t q = (b * N + ii) * N + jj;                           \
                                if (m[q]) axpy_##S(gw + k * C, gzp, x + q * C, C);                 \
                            }                                                                      \
                            /* input: the cells whose tap k reads this one */                      \
                            const int64_t si = i - (ki - 1) * d, sj = j - (kj - 1) * d;            \
                            if (gxp && si >= 0 && si < N && sj >= 0 && sj < N) {                   \
                                const int64_t s = (b * N + si) * N + sj;                           \
                                axpy_##S(gxp, w + k * C, gz + s * R * C + r * C, C);               \
                            }                                                                      \
                        }                                                                          \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }

KERNELS(float, f32)
KERNELS(double, f64)

typedef void (*rows_fn)(const job_t *);

/* Split rows 0 .. rows-1 into `threads` contiguous blocks and run fn on each, the last here. */
typedef struct {
    rows_fn fn;
    job_t job;
} task_t;

static void *run_task(void *arg) {
    task_t *t = arg;
    t->fn(&t->job);
    return 0;
}

static int run_split(rows_fn fn, const job_t *proto, int64_t rows, int threads, int64_t part_w,
                     int64_t part_b) {
    task_t tasks[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows) threads = (int)(rows > 0 ? rows : 1);
    int started = 0, rc = 0;
    for (int t = 0; t < threads; ++t) {
        tasks[t].fn = fn;
        tasks[t].job = *proto;
        tasks[t].job.row0 = rows * t / threads;
        tasks[t].job.row1 = rows * (t + 1) / threads;
        if (proto->gw) tasks[t].job.gw = (char *)proto->gw + (size_t)(t * part_w);
        if (proto->gb) tasks[t].job.gb = (char *)proto->gb + (size_t)(t * part_b);
    }
    for (int t = 0; t + 1 < threads; ++t) {
        if (pthread_create(&tids[t], 0, run_task, &tasks[t])) {
            rc = 1; /* run what could not start here, in order */
            break;
        }
        ++started;
    }
    for (int t = started; t < threads; ++t) run_task(&tasks[t]);
    for (int t = 0; t < started; ++t) pthread_join(tids[t], 0);
    return rc;
}

/* dtype: 0 float32, 1 float64. Returns 0 (a failed thread start only runs its rows here). */
int dconv_forward(int dtype, const void *x, const uint8_t *m, const void *w, const void *bias,
                  const int64_t *dil, void *z, int64_t R, int64_t B, int64_t N, int64_t C,
                  int threads) {
    job_t J = {x, w, bias, 0, m, dil, z, 0, 0, 0, R, N, C, 0, 0};
    run_split(dtype ? fwd_rows_f64 : fwd_rows_f32, &J, B * N, threads, 0, 0);
    return 0;
}

/* gw_parts (threads, R, 9, C) and gb_parts (threads, R, C) must be zeroed; gx, gw_parts or
 * gb_parts may be null when that gradient is not needed. */
int dconv_backward(int dtype, const void *x, const uint8_t *m, const void *w, const int64_t *dil,
                   const void *gz, void *gx, void *gw_parts, void *gb_parts, int64_t R, int64_t B,
                   int64_t N, int64_t C, int threads) {
    const int64_t size = dtype ? (int64_t)sizeof(double) : (int64_t)sizeof(float);
    job_t J = {x, w, 0, gz, m, dil, 0, gx, gw_parts, gb_parts, R, N, C, 0, 0};
    run_split(dtype ? bwd_rows_f64 : bwd_rows_f32, &J, B * N, threads, R * 9 * C * size,
              R * C * size);
    return 0;
}
