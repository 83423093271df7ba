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
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_THREADS 256

typedef struct {
    const void *x, *w, *bias, *gz, *g;
    const uint8_t *m;
    const int64_t *dil;
    void *z, *gx, *gw, *gb;
    int64_t R, N, C, row0, row1;
    int grad; /* conv_rows: 0 writes gelu(z); 1 writes g * gelu'(z), g the gradient at the output */
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

#define KERNELS(T, S)                                                                              \
    typedef vec_##S V_##S;                                                                         \
    enum { L_##S = 32 / sizeof(T), CB_##S = 2 * L_##S };                                          \
    /* Each rate's conv of every cell: then gelu(z), or (J->grad) the gradient at z. */             \
    static void conv_rows_##S(const job_t *J) {                                                    \
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
                    act_##S(out, J->grad ? (const T *)J->g + p * R * C + r * C : 0, C);            \
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

/* out (B, N, N, R*C) = gelu(z). dtype: 0 float32, 1 float64. Returns 0 (a thread that failed to
 * start only has its rows run here). */
int dconv_forward(int dtype, const void *x, const uint8_t *m, const void *w, const void *bias,
                  const int64_t *dil, void *out, int64_t R, int64_t B, int64_t N, int64_t C,
                  int threads) {
    job_t J = {.x = x, .w = w, .bias = bias, .m = m, .dil = dil, .z = out, .R = R, .N = N, .C = C};
    run_split(dtype ? conv_rows_f64 : conv_rows_f32, &J, B * N, threads, 0, 0);
    return 0;
}

/* From g, the gradient at the output: gz (B, N, N, R*C, scratch) = g * gelu'(z), z recomputed
 * rather than kept from the forward pass (a grid-sized tensor less per block, for one more pass
 * of 27 multiply-adds a channel), then gx and each thread's partial weight and bias gradients:
 * gw_parts (threads, R, 9, C) and gb_parts (threads, R, C), which must be zeroed. */
int dconv_backward(int dtype, const void *x, const uint8_t *m, const void *w, const void *bias,
                   const int64_t *dil, const void *g, void *gz, void *gx, void *gw_parts,
                   void *gb_parts, int64_t R, int64_t B, int64_t N, int64_t C, int threads) {
    const int64_t size = dtype ? (int64_t)sizeof(double) : (int64_t)sizeof(float);
    job_t J = {.x = x, .w = w, .bias = bias, .g = g, .m = m, .dil = dil, .z = gz, .R = R, .N = N,
               .C = C, .grad = 1};
    run_split(dtype ? conv_rows_f64 : conv_rows_f32, &J, B * N, threads, 0, 0);
    /* The input gradient reads gz of neighbouring rows: only now is all of it written. */
    job_t K = {.x = x, .w = w, .gz = gz, .m = m, .dil = dil, .gx = gx, .gw = gw_parts,
               .gb = gb_parts, .R = R, .N = N, .C = C};
    run_split(dtype ? bwd_rows_f64 : bwd_rows_f32, &K, B * N, threads, R * 9 * C * size,
              R * C * size);
    return 0;
}
