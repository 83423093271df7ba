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

/* Channels go in blocks of two 32-byte vectors (GCC/Clang vector extensions, so the compiler
 * need not discover the vector loop itself): each block's sums stay in registers across every
 * tap. The typedefs allow unaligned access. */
typedef float vec_f32 __attribute__((vector_size(32), aligned(4)));
typedef double vec_f64 __attribute__((vector_size(32), aligned(8)));
#define LD(V, p) (*(const V *)(p))
#define ST(V, p, v) (*(V *)(p) = (v))

#define KERNELS(T, S)                                                                              \
    typedef vec_##S V_##S;                                                                         \
    enum { L_##S = 32 / sizeof(T), CB_##S = 2 * L_##S };                                          \
    static void fwd_rows_##S(const job_t *J) {                                                     \
        const T *x = J->x, *w = J->w, *bias = J->bias;                                             \
        const uint8_t *m = J->m;                                                                   \
        T *z = J->z;                                                                               \
        const int64_t R = J->R, N = J->N, C = J->C;                                                \
        const T *xs[9], *ws[9];                                                                    \
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
                    const int64_t d = J->dil[r];                                                   \
                    int nv = 0; /* the taps that read a cell inside the grid and unmasked */      \
                    for (int ki = 0; ki < 3; ++ki) {                                               \
                        const int64_t ii = i + (ki - 1) * d;                                       \
                        if (ii < 0 || ii >= N) continue;                                           \
                        for (int kj = 0; kj < 3; ++kj) {                                           \
                            const int64_t jj = j + (kj - 1) * d;                                   \
                            const int64_t q = (b * N + ii) * N + jj;                               \
                            if (jj < 0 || jj >= N || !m[q]) continue;                              \
                            xs[nv] = x + q * C;                                                    \
                            ws[nv++] = w + (r * 9 + ki * 3 + kj) * C;                              \
                        }                                                                          \
                    }                                                                              \
                    T *out = zp + r * C;                                                           \
                    const T *bb = bias + r * C;                                                    \
                    int64_t c0 = 0;                                                                \
                    for (; c0 + CB_##S <= C; c0 += CB_##S) {                                       \
                        V_##S a0 = LD(V_##S, bb + c0), a1 = LD(V_##S, bb + c0 + L_##S);            \
                        V_##S b0 = {0}, b1 = {0}; /* a second chain: FMA latency, not throughput */ \
                        int t = 0;                                                                 \
                        for (; t + 1 < nv; t += 2) {                                               \
                            a0 += LD(V_##S, ws[t] + c0) * LD(V_##S, xs[t] + c0);                   \
                            a1 += LD(V_##S, ws[t] + c0 + L_##S) * LD(V_##S, xs[t] + c0 + L_##S);   \
                            b0 += LD(V_##S, ws[t + 1] + c0) * LD(V_##S, xs[t + 1] + c0);           \
                            b1 += LD(V_##S, ws[t + 1] + c0 + L_##S) * LD(V_##S, xs[t + 1] + c0 + L_##S); \
                        }                                                                          \
                        if (t < nv) {                                                              \
                            a0 += LD(V_##S, ws[t] + c0) * LD(V_##S, xs[t] + c0);                   \
                            a1 += LD(V_##S, ws[t] + c0 + L_##S) * LD(V_##S, xs[t] + c0 + L_##S);   \
                        }                                                                          \
                        ST(V_##S, out + c0, a0 + b0);                                              \
                        ST(V_##S, out + c0 + L_##S, a1 + b1);                                      \
                    }                                                                              \
                    for (; c0 < C; ++c0) {                                                         \
                        T acc = bb[c0];                                                            \
                        for (int t = 0; t < nv; ++t) acc += ws[t][c0] * xs[t][c0];                 \
                        out[c0] = acc;                                                             \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    /* The input's gradient: each cell gathers the cells whose taps read it, one rate at a time  \
       (a rate's slices of three rows fit in cache; all rates' would not). */                     \
    static void bwd_input_rows_##S(const job_t *J) {                                               \
        const T *w = J->w, *gz = J->gz;                                                            \
        const uint8_t *m = J->m;                                                                   \
        T *gx = J->gx;                                                                             \
        const int64_t R = J->R, N = J->N, C = J->C;                                                \
        const T *gs[9], *ws[9];                                                                    \
        for (int64_t row = J->row0; row < J->row1; ++row) {                                        \
            const int64_t b = row / N, i = row % N;                                                \
            memset(gx + row * N * C, 0, (size_t)(N * C) * sizeof(T));                              \
            for (int64_t r = 0; r < R; ++r) {                                                      \
                const int64_t d = J->dil[r];                                                       \
                for (int64_t j = 0; j < N; ++j) {                                                  \
                    const int64_t p = row * N + j;                                                 \
                    if (!m[p]) continue; /* x reads as zero here: no gradient */                   \
                    T *gxp = gx + p * C;                                                           \
                    int nv = 0; /* gz is zero at masked cells: only the grid's edge matters */    \
                    for (int ki = 0; ki < 3; ++ki) {                                               \
                        const int64_t si = i - (ki - 1) * d;                                       \
                        if (si < 0 || si >= N) continue;                                           \
                        for (int kj = 0; kj < 3; ++kj) {                                           \
                            const int64_t sj = j - (kj - 1) * d;                                   \
                            if (sj < 0 || sj >= N) continue;                                       \
                            gs[nv] = gz + ((b * N + si) * N + sj) * R * C + r * C;                 \
                            ws[nv++] = w + (r * 9 + ki * 3 + kj) * C;                              \
                        }                                                                          \
                    }                                                                              \
                    int64_t c0 = 0;                                                                \
                    for (; c0 + CB_##S <= C; c0 += CB_##S) {                                       \
                        V_##S a0 = LD(V_##S, gxp + c0), a1 = LD(V_##S, gxp + c0 + L_##S);          \
                        V_##S b0 = {0}, b1 = {0};                                                  \
                        int t = 0;                                                                 \
                        for (; t + 1 < nv; t += 2) {                                               \
                            a0 += LD(V_##S, ws[t] + c0) * LD(V_##S, gs[t] + c0);                   \
                            a1 += LD(V_##S, ws[t] + c0 + L_##S) * LD(V_##S, gs[t] + c0 + L_##S);   \
                            b0 += LD(V_##S, ws[t + 1] + c0) * LD(V_##S, gs[t + 1] + c0);           \
                            b1 += LD(V_##S, ws[t + 1] + c0 + L_##S) * LD(V_##S, gs[t + 1] + c0 + L_##S); \
                        }                                                                          \
                        if (t < nv) {                                                              \
                            a0 += LD(V_##S, ws[t] + c0) * LD(V_##S, gs[t] + c0);                   \
                            a1 += LD(V_##S, ws[t] + c0 + L_##S) * LD(V_##S, gs[t] + c0 + L_##S);   \
                        }                                                                          \
                        ST(V_##S, gxp + c0, a0 + b0);                                              \
                        ST(V_##S, gxp + c0 + L_##S, a1 + b1);                                      \
                    }                                                                              \
                    for (; c0 < C; ++c0)                                                           \
                        for (int t = 0; t < nv; ++t) gxp[c0] += ws[t][c0] * gs[t][c0];             \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    /* Weight and bias gradients: for each rate, tap and channel block, one sum along each row.  \
       A term counts where both its cell and the cell its tap reads are unmasked. */              \
    static void bwd_weight_rows_##S(const job_t *J) {                                              \
        const T *x = J->x, *gz = J->gz;                                                            \
        const uint8_t *m = J->m;                                                                   \
        T *gw = J->gw, *gb = J->gb;                                                                \
        const int64_t R = J->R, N = J->N, C = J->C, RC = R * C;                                    \
        const int64_t tail = C - C % CB_##S; /* channels past the last whole block */             \
        for (int64_t row = J->row0; row < J->row1; ++row) {                                        \
            const int64_t b = row / N, i = row % N;                                                \
            const uint8_t *mrow = m + row * N;                                                     \
            for (int64_t r = 0; r < R; ++r) {                                                      \
                const int64_t d = J->dil[r];                                                       \
                const T *g = gz + row * N * RC + r * C; /* cell j's rate-r gradient: g + j * RC */ \
                for (int64_t c0 = 0; c0 < tail; c0 += CB_##S) {                                    \
                    V_##S a0 = {0}, a1 = {0};                                                      \
                    for (int64_t j = 0; j < N; ++j) {                                              \
                        a0 += LD(V_##S, g + j * RC + c0);                                          \
                        a1 += LD(V_##S, g + j * RC + c0 + L_##S);                                  \
                    }                                                                              \
                    ST(V_##S, gb + r * C + c0, LD(V_##S, gb + r * C + c0) + a0);                   \
                    ST(V_##S, gb + r * C + c0 + L_##S, LD(V_##S, gb + r * C + c0 + L_##S) + a1);   \
                }                                                                                  \
                for (int64_t c = tail; c < C; ++c)                                                 \
                    for (int64_t j = 0; j < N; ++j) gb[r * C + c] += g[j * RC + c];                \
                for (int ki = 0; ki < 3; ++ki) {                                                   \
                    const int64_t ii = i + (ki - 1) * d;                                           \
                    if (ii < 0 || ii >= N) continue;                                               \
                    const uint8_t *mq = m + (b * N + ii) * N;                                      \
                    const T *xrow = x + (b * N + ii) * N * C;                                      \
                    for (int kj = 0; kj < 3; ++kj) {                                               \
                        const int64_t off = (kj - 1) * d;                                          \
                        const int64_t jlo = off < 0 ? -off : 0, jhi = off > 0 ? N - off : N;       \
                        T *gwk = gw + (r * 9 + ki * 3 + kj) * C;                                   \
                        for (int64_t c0 = 0; c0 < tail; c0 += CB_##S) {                            \
                            V_##S a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0}; /* even, odd j */        \
                            int64_t j = jlo;                                                       \
                            for (; j + 1 < jhi; j += 2) {                                          \
                                const T *gj = g + j * RC + c0, *xq = xrow + (j + off) * C + c0;    \
                                if (mrow[j] && mq[j + off]) {                                      \
                                    a0 += LD(V_##S, gj) * LD(V_##S, xq);                           \
                                    a1 += LD(V_##S, gj + L_##S) * LD(V_##S, xq + L_##S);           \
                                }                                                                  \
                                if (mrow[j + 1] && mq[j + 1 + off]) {                              \
                                    b0 += LD(V_##S, gj + RC) * LD(V_##S, xq + C);                  \
                                    b1 += LD(V_##S, gj + RC + L_##S) * LD(V_##S, xq + C + L_##S);  \
                                }                                                                  \
                            }                                                                      \
                            if (j < jhi && mrow[j] && mq[j + off]) {                               \
                                const T *gj = g + j * RC + c0, *xq = xrow + (j + off) * C + c0;    \
                                a0 += LD(V_##S, gj) * LD(V_##S, xq);                               \
                                a1 += LD(V_##S, gj + L_##S) * LD(V_##S, xq + L_##S);               \
                            }                                                                      \
                            ST(V_##S, gwk + c0, LD(V_##S, gwk + c0) + a0 + b0);                    \
                            ST(V_##S, gwk + c0 + L_##S, LD(V_##S, gwk + c0 + L_##S) + a1 + b1);    \
                        }                                                                          \
                        for (int64_t c = tail; c < C; ++c)                                         \
                            for (int64_t j = jlo; j < jhi; ++j)                                    \
                                if (mrow[j] && mq[j + off])                                        \
                                    gwk[c] += g[j * RC + c] * xrow[(j + off) * C + c];             \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    static void bwd_rows_##S(const job_t *J) {                                                     \
        bwd_input_rows_##S(J);                                                                     \
        bwd_weight_rows_##S(J);                                                                    \
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

/* gw_parts (threads, R, 9, C) and gb_parts (threads, R, C) must be zeroed. */
int dconv_backward(int dtype, const void *x, const uint8_t *m, const void *w, const int64_t *dil,
                   const void *gz, void *gx, void *gw_parts, void *gb_parts, int64_t R, int64_t B,
                   int64_t N, int64_t C, int threads) {
    const int64_t size = dtype ? (int64_t)sizeof(double) : (int64_t)sizeof(float);
    job_t J = {x, w, 0, gz, m, dil, 0, gx, gw_parts, gb_parts, R, N, C, 0, 0};
    run_split(dtype ? bwd_rows_f64 : bwd_rows_f32, &J, B * N, threads, R * 9 * C * size,
              R * C * size);
    return 0;
}
