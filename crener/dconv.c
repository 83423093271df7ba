#ifndef DCONV_TYPE
/* Multi-rate depthwise 3x3 dilated convolutions over a masked channels-last grid, with GELU
 * (crener.dconv).
 *
 * Built by crener/dconv.py with the machine's C compiler on first use and called through ctypes;
 * there is no torch header here, so it builds in about a second. Every tensor is contiguous:
 *   x    (B, N, N, C)    the grid, channels last
 *   m    (B, N, N)       the cell mask, bytes 0 or 1; a masked cell reads as zero and is written as zero
 *   w    (R, 9, C)       rate r's kernel, tap k = 3 * ki + kj, channels last
 *   bias (R, C)
 *   dil  (R)             rate r's dilation d: tap (ki, kj) of cell (i, j) reads cell (i + (ki-1)d, j + (kj-1)d)
 *   out  (B, N, N, R*C)  gelu(z), z the convolutions' outputs, rate r in channels r*C .. (r+1)*C
 * The backward pass takes g, the gradient at out, and writes gx and each thread's partial sums of
 * the weight and bias gradients.
 *
 * Why a kernel of our own: the library's depthwise convolution reads and writes the whole grid
 * once per rate and pass, and its dilated backward pass is several times its undilated one on
 * some CPUs. Here each cell's neighbourhood is read once from cache for every rate and tap, GELU
 * is applied in registers, and the output lands straight in its slice of the concatenation. The
 * backward pass keeps nothing grid-sized: it recomputes z a few rows ahead of where it is into a
 * small ring of rows (only rows within the largest dilation are ever read), so the gradient at z
 * never exists as a whole tensor. The rows (b, i) are split into one contiguous block per thread,
 * so results do not depend on scheduling, only on the thread count.
 *
 * The kernels are written once below (the part after #else) and this file includes itself once
 * per element type.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 256

typedef struct {
    const void *x, *w, *bias, *g;
    const uint8_t *m;
    const int64_t *dil;
    void *out, *gx, *gw, *gb;
    int64_t R, N, C, row0, row1;
    int failed; /* set by a job that could not allocate its scratch */
} job_t;

/* Channels go in blocks of two 32-byte vectors (GCC/Clang vector extensions, so the compiler
 * need not discover the vector loop itself): each block's sums stay in registers across every
 * tap. The typedefs allow unaligned access. */
typedef float vec_f32 __attribute__((vector_size(32), aligned(4)));
typedef double vec_f64 __attribute__((vector_size(32), aligned(8)));
#define LD(V, p) (*(const V *)(p))
#define ST(V, p, v) (*(V *)(p) = (v))

/* GELU, exact form 0.5 z (1 + erf(z / sqrt 2)), and its derivative, applied to C channels in
 * place. In float32, erf is Abramowitz and Stegun 7.1.26 (absolute error under 1.5e-7, the form
 * the library's own vectorised GELU uses) over a Cephes-style exp, all in vector arithmetic; in
 * float64 (the gradient checks) libm's erf and exp, lane by lane. */
typedef int32_t vec_i32 __attribute__((vector_size(32), aligned(4)));

static inline vec_f32 select_f32(vec_i32 mask, vec_f32 a, vec_f32 b) {
    return (vec_f32)((mask & (vec_i32)a) | (~mask & (vec_i32)b));
}

static inline vec_f32 vexp_f32(vec_f32 x) {
    const vec_f32 zero = {0}, lo = zero - 87.0f, hi = zero + 88.0f;
    x = select_f32(x < lo, lo, x);
    x = select_f32(x > hi, hi, x);
    /* x = n ln2 + r, n rounded to nearest (the add-and-subtract of 1.5 * 2^23), |r| <= ln2 / 2 */
    const vec_f32 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    vec_f32 r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vec_f32 p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
                  + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vec_i32 scale = (__builtin_convertvector(n, vec_i32) + 127) << 23; /* 2^n */
    return p * (vec_f32)scale;
}

/* erf(x) given e = exp(-x^2), which GELU's derivative needs too. */
static inline vec_f32 verf_f32(vec_f32 x, vec_f32 e) {
    const vec_i32 sign = (vec_i32)x & INT32_MIN;
    const vec_f32 ax = (vec_f32)((vec_i32)x ^ sign);
    const vec_f32 t = 1.0f / (0.3275911f * ax + 1.0f);
    const vec_f32 poly =
        (((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f;
    const vec_f32 y = 1.0f - poly * t * e;
    return (vec_f32)((vec_i32)y ^ sign);
}

static void act_f32(float *z, const float *g, int64_t C) {
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
        const vec_f32 v = LD(vec_f32, z + c), e = vexp_f32(-0.5f * v * v); /* exp(-(v / sqrt 2)^2) */
        const vec_f32 cdf = 0.5f * (1.0f + verf_f32(v * 0.70710678118654752f, e));
        if (g)
            ST(vec_f32, z + c, LD(vec_f32, g + c) * (cdf + v * e * 0.39894228040143268f));
        else
            ST(vec_f32, z + c, v * cdf);
    }
    for (; c < C; ++c) {
        const float v = z[c], cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
        z[c] = g ? g[c] * (cdf + v * expf(-0.5f * v * v) * 0.39894228040143268f) : v * cdf;
    }
}

static void act_f64(double *z, const double *g, int64_t C) {
    for (int64_t c = 0; c < C; ++c) {
        const double v = z[c], cdf = 0.5 * (1.0 + erf(v * 0.70710678118654752));
        z[c] = g ? g[c] * (cdf + v * exp(-0.5 * v * v) * 0.39894228040143268) : v * cdf;
    }
}


/* One instantiation of the kernels per element type: T, its 32-byte vector V, lanes L. */
#define DCONV_TYPE
#define T float
#define V vec_f32
#define FN(name) name##_f32
#define ACT act_f32
#include __FILE__
#undef T
#undef V
#undef FN
#undef ACT
#define T double
#define V vec_f64
#define FN(name) name##_f64
#define ACT act_f64
#include __FILE__
#undef T
#undef V
#undef FN
#undef ACT

typedef void (*rows_fn)(job_t *);

typedef struct {
    rows_fn fn;
    job_t job;
} task_t;

static void *run_task(void *arg) {
    task_t *t = arg;
    t->fn(&t->job);
    return 0;
}

/* Split rows 0 .. rows-1 into `threads` contiguous blocks and run fn on each, the last here; a
 * thread that cannot start has its block run here. Returns -1 if a job could not allocate. */
static int run_split(rows_fn fn, const job_t *proto, int64_t rows, int threads, int64_t part_w,
                     int64_t part_b) {
    task_t tasks[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows) threads = (int)(rows > 0 ? rows : 1);
    int started = 0, failed = 0;
    for (int t = 0; t < threads; ++t) {
        tasks[t].fn = fn;
        tasks[t].job = *proto;
        tasks[t].job.row0 = rows * t / threads;
        tasks[t].job.row1 = rows * (t + 1) / threads;
        if (proto->gw) tasks[t].job.gw = (char *)proto->gw + (size_t)(t * part_w);
        if (proto->gb) tasks[t].job.gb = (char *)proto->gb + (size_t)(t * part_b);
    }
    for (int t = 0; t + 1 < threads; ++t) {
        if (pthread_create(&tids[t], 0, run_task, &tasks[t])) break;
        ++started;
    }
    for (int t = started; t < threads; ++t) run_task(&tasks[t]);
    for (int t = 0; t < started; ++t) pthread_join(tids[t], 0);
    for (int t = 0; t < threads; ++t) failed |= tasks[t].job.failed;
    return failed ? -1 : 0;
}

/* out (B, N, N, R*C) = gelu(z). dtype: 0 float32, 1 float64. Returns 0. */
int dconv_forward(int dtype, const void *x, const uint8_t *m, const void *w, const void *bias,
                  const int64_t *dil, void *out, int64_t R, int64_t B, int64_t N, int64_t C,
                  int threads) {
    job_t J = {.x = x, .w = w, .bias = bias, .m = m, .dil = dil, .out = out, .R = R, .N = N, .C = C};
    return run_split(dtype ? forward_rows_f64 : forward_rows_f32, &J, B * N, threads, 0, 0);
}

/* From g, the gradient at out: gx, and each thread's partial weight and bias gradients,
 * gw_parts (threads, R, 9, C) and gb_parts (threads, R, C), which must be zeroed. Returns 0, or
 * -1 where a thread's ring of rows could not be allocated. */
int dconv_backward(int dtype, const void *x, const uint8_t *m, const void *w, const void *bias,
                   const int64_t *dil, const void *g, void *gx, void *gw_parts, void *gb_parts,
                   int64_t R, int64_t B, int64_t N, int64_t C, int threads) {
    const int64_t size = dtype ? (int64_t)sizeof(double) : (int64_t)sizeof(float);
    job_t J = {.x = x, .w = w, .bias = bias, .g = g, .m = m, .dil = dil, .gx = gx, .gw = gw_parts,
               .gb = gb_parts, .R = R, .N = N, .C = C};
    return run_split(dtype ? backward_rows_f64 : backward_rows_f32, &J, B * N, threads,
                     R * 9 * C * size, R * C * size);
}

#else /* the kernels for one element type */

enum { FN(L) = 32 / sizeof(T), FN(CB) = 2 * FN(L) };
#define L FN(L)
#define CB FN(CB)

/* out[c] = init[c] + sum over t < nv of ws[t][c] * srcs[t][c], for C channels (out may be init).
 * Two chains of vector accumulators: FMA latency, not throughput, was the limit. */
static inline void FN(taps)(T *out, const T *init, const T *const *ws, const T *const *srcs, int nv, int64_t C) {
    int64_t c0 = 0;
    for (; c0 + CB <= C; c0 += CB) {
        V a0 = LD(V, init + c0), a1 = LD(V, init + c0 + L), b0 = {0}, b1 = {0};
        int t = 0;
        for (; t + 1 < nv; t += 2) {
            a0 += LD(V, ws[t] + c0) * LD(V, srcs[t] + c0);
            a1 += LD(V, ws[t] + c0 + L) * LD(V, srcs[t] + c0 + L);
            b0 += LD(V, ws[t + 1] + c0) * LD(V, srcs[t + 1] + c0);
            b1 += LD(V, ws[t + 1] + c0 + L) * LD(V, srcs[t + 1] + c0 + L);
        }
        if (t < nv) {
            a0 += LD(V, ws[t] + c0) * LD(V, srcs[t] + c0);
            a1 += LD(V, ws[t] + c0 + L) * LD(V, srcs[t] + c0 + L);
        }
        ST(V, out + c0, a0 + b0);
        ST(V, out + c0 + L, a1 + b1);
    }
    for (; c0 < C; ++c0) {
        T acc = init[c0];
        for (int t = 0; t < nv; ++t) acc += ws[t][c0] * srcs[t][c0];
        out[c0] = acc;
    }
}

/* z at cell (b, i, j) for every rate into dst (R*C), zero where the cell is masked; then
 * dst = gelu(z), or with g (the gradient at this cell's output) dst = g * gelu'(z). */
static void FN(conv_cell)(const job_t *J, int64_t b, int64_t i, int64_t j, T *dst, const T *g) {
    const T *x = J->x, *w = J->w, *bias = J->bias;
    const uint8_t *m = J->m;
    const int64_t R = J->R, N = J->N, C = J->C;
    if (!m[(b * N + i) * N + j]) {
        memset(dst, 0, (size_t)(R * C) * sizeof(T));
        return;
    }
    const T *xs[9], *ws[9];
    for (int64_t r = 0; r < R; ++r) {
        const int64_t d = J->dil[r];
        int nv = 0; /* the taps that read a cell inside the grid and unmasked */
        for (int ki = 0; ki < 3; ++ki) {
            const int64_t ii = i + (ki - 1) * d;
            if (ii < 0 || ii >= N) continue;
            for (int kj = 0; kj < 3; ++kj) {
                const int64_t jj = j + (kj - 1) * d, q = (b * N + ii) * N + jj;
                if (jj < 0 || jj >= N || !m[q]) continue;
                xs[nv] = x + q * C;
                ws[nv++] = w + (r * 9 + ki * 3 + kj) * C;
            }
        }
        T *out = dst + r * C;
        FN(taps)(out, bias + r * C, ws, xs, nv, C);
        ACT(out, g ? g + r * C : 0, C);
    }
}

static void FN(forward_rows)(job_t *J) {
    const int64_t N = J->N, RC = J->R * J->C;
    for (int64_t row = J->row0; row < J->row1; ++row)
        for (int64_t j = 0; j < N; ++j)
            FN(conv_cell)(J, row / N, row % N, j, (T *)J->out + (row * N + j) * RC, 0);
}

/* Row (b, i) of the input's gradient: each cell gathers the cells whose taps read it, one rate
 * at a time. gz[k] is row i - dmax + k of the gradient at z (null outside the grid). */
static void FN(input_row)(const job_t *J, int64_t b, int64_t i, const T *const *gz, int64_t dmax) {
    const T *w = J->w;
    const uint8_t *m = J->m;
    const int64_t R = J->R, N = J->N, C = J->C, RC = R * C;
    T *gx = (T *)J->gx + (b * N + i) * N * C;
    memset(gx, 0, (size_t)(N * C) * sizeof(T));
    const T *gs[9], *ws[9];
    for (int64_t r = 0; r < R; ++r) {
        const int64_t d = J->dil[r];
        for (int64_t j = 0; j < N; ++j) {
            if (!m[(b * N + i) * N + j]) continue; /* x reads as zero here: no gradient */
            T *gxp = gx + j * C;
            int nv = 0; /* gz is zero at masked cells: only the grid's edge matters */
            for (int ki = 0; ki < 3; ++ki) {
                const int64_t si = i - (ki - 1) * d;
                if (si < 0 || si >= N) continue;
                for (int kj = 0; kj < 3; ++kj) {
                    const int64_t sj = j - (kj - 1) * d;
                    if (sj < 0 || sj >= N) continue;
                    gs[nv] = gz[si - i + dmax] + sj * RC + r * C;
                    ws[nv++] = w + (r * 9 + ki * 3 + kj) * C;
                }
            }
            FN(taps)(gxp, gxp, ws, gs, nv, C);
        }
    }
}

/* Row (b, i)'s terms of the weight and bias gradients, from g, the row's gradient at z: for each
 * rate, tap and channel block one sum along the row. A term counts where both its cell and the
 * cell its tap reads are unmasked. */
static void FN(weight_row)(const job_t *J, int64_t b, int64_t i, const T *g) {
    const T *x = J->x;
    const uint8_t *m = J->m, *mrow = m + (b * J->N + i) * J->N;
    T *gw = J->gw, *gb = J->gb;
    const int64_t R = J->R, N = J->N, C = J->C, RC = R * C;
    const int64_t tail = C - C % CB; /* channels past the last whole block */
    for (int64_t r = 0; r < R; ++r, g += C) { /* g + j * RC: cell j's rate-r gradient */
        const int64_t d = J->dil[r];
        for (int64_t c0 = 0; c0 < tail; c0 += CB) {
            V a0 = {0}, a1 = {0};
            for (int64_t j = 0; j < N; ++j) {
                a0 += LD(V, g + j * RC + c0);
                a1 += LD(V, g + j * RC + c0 + L);
            }
            ST(V, gb + r * C + c0, LD(V, gb + r * C + c0) + a0);
            ST(V, gb + r * C + c0 + L, LD(V, gb + r * C + c0 + L) + a1);
        }
        for (int64_t c = tail; c < C; ++c)
            for (int64_t j = 0; j < N; ++j) gb[r * C + c] += g[j * RC + c];
        for (int ki = 0; ki < 3; ++ki) {
            const int64_t ii = i + (ki - 1) * d;
            if (ii < 0 || ii >= N) continue;
            const uint8_t *mq = m + (b * N + ii) * N;
            const T *xrow = x + (b * N + ii) * N * C;
            for (int kj = 0; kj < 3; ++kj) {
                const int64_t off = (kj - 1) * d;
                const int64_t jlo = off < 0 ? -off : 0, jhi = off > 0 ? N - off : N;
                T *gwk = gw + (r * 9 + ki * 3 + kj) * C;
                for (int64_t c0 = 0; c0 < tail; c0 += CB) {
                    V a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0}; /* even and odd j */
                    int64_t j = jlo;
                    for (; j + 1 < jhi; j += 2) {
                        const T *gj = g + j * RC + c0, *xq = xrow + (j + off) * C + c0;
                        if (mrow[j] && mq[j + off]) {
                            a0 += LD(V, gj) * LD(V, xq);
                            a1 += LD(V, gj + L) * LD(V, xq + L);
                        }
                        if (mrow[j + 1] && mq[j + 1 + off]) {
                            b0 += LD(V, gj + RC) * LD(V, xq + C);
                            b1 += LD(V, gj + RC + L) * LD(V, xq + C + L);
                        }
                    }
                    if (j < jhi && mrow[j] && mq[j + off]) {
                        const T *gj = g + j * RC + c0, *xq = xrow + (j + off) * C + c0;
                        a0 += LD(V, gj) * LD(V, xq);
                        a1 += LD(V, gj + L) * LD(V, xq + L);
                    }
                    ST(V, gwk + c0, LD(V, gwk + c0) + a0 + b0);
                    ST(V, gwk + c0 + L, LD(V, gwk + c0 + L) + a1 + b1);
                }
                for (int64_t c = tail; c < C; ++c)
                    for (int64_t j = jlo; j < jhi; ++j)
                        if (mrow[j] && mq[j + off]) gwk[c] += g[j * RC + c] * xrow[(j + off) * C + c];
            }
        }
    }
}

/* The backward pass over this job's rows. The gradient at z of rows i - dmax .. i + dmax (all
 * that row i's input gradient reads) lives in a ring of 2 dmax + 1 rows, each computed once per
 * job as the window moves down (a job's first rows of an example recompute up to dmax rows that
 * the job above also computes). */
static void FN(backward_rows)(job_t *J) {
    const int64_t N = J->N, RC = J->R * J->C;
    int64_t dmax = 1;
    for (int64_t r = 0; r < J->R; ++r)
        if (J->dil[r] > dmax) dmax = J->dil[r];
    const int64_t W = 2 * dmax + 1;
    T *ring = malloc((size_t)(W * N * RC) * sizeof(T));
    if (!ring) {
        J->failed = 1;
        return;
    }
    const T *g = J->g;
    int64_t cur_b = -1, next = 0; /* rows of example cur_b below `next` are in the ring */
    for (int64_t row = J->row0; row < J->row1; ++row) {
        const int64_t b = row / N, i = row % N;
        if (b != cur_b) {
            cur_b = b;
            next = i - dmax > 0 ? i - dmax : 0;
        }
        for (; next < N && next <= i + dmax; ++next) {
            T *dst = ring + (next % W) * N * RC;
            for (int64_t j = 0; j < N; ++j)
                FN(conv_cell)(J, b, next, j, dst + j * RC, g + ((b * N + next) * N + j) * RC);
        }
        const T *rows[2 * 64 + 1]; /* dilations are capped at 64 (crener/dconv.py) */
        for (int64_t k = 0; k < W; ++k) {
            const int64_t si = i - dmax + k;
            rows[k] = si >= 0 && si < N ? ring + (si % W) * N * RC : 0;
        }
        FN(input_row)(J, b, i, rows, dmax);
        FN(weight_row)(J, b, i, rows[dmax]);
    }
    free(ring);
}

#undef L
#undef CB
#endif
