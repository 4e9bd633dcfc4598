/* Fused fp32 CPU kernels for mamba-slm: one pass over memory where PyTorch needs several.
 *
 * Built and loaded by kernels.py (gcc -O3 -march=native -fopenmp). The OpenMP runtime is the one
 * PyTorch already loaded (same soname), so these loops share its thread pool.
 *
 * Tensors are row-major fp32, except what decode steps read in bulk: weight matrices and KV
 * caches may be bf16 (see F32/BF16 below). A "row" is the last dimension; inputs that come from a
 * split of a wider projection are read with their row stride (`*_ld`), outputs are contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

/* Clamping the exponent keeps every value finite (fast-math assumes no infinities). */
static inline float sigmoid(float v) { return 1.0f / (1.0f + expf(fminf(-v, 80.0f))); }

/* silu'(v) = s (1 + v (1 - s)), s = sigmoid(v) */
static inline float silu_grad(float v, float s) { return s * (1.0f + v * (1.0f - s)); }

/* Element types of what decode steps read in bulk, a bf16 model's weight matrices and the KV
 * caches: fp32, or bf16 for half the bytes. A bf16 is the upper half of an fp32 (rounded to
 * nearest even, as PyTorch rounds), so converting it back vectorizes as a widening shift; the
 * arithmetic stays fp32. gcc 12 leaves fp16 conversions scalar, hence no fp16 here. */
enum { F32 = 0, BF16 = 1 };
static inline float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint16_t f32_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
#define LOAD_F32(p) (p)
#define LOAD_BF16(p) bf16_f32(p)

/* ------------------------------------------------------------------ causal depthwise conv + SiLU */

/* out[b,t,c] = silu(bias[c] + sum_i wt[i,c] x[b, t-(K-1)+i, c]); times before 0 read `prev`
 * (b, K-1, c: the cached window) or zeros. */
void conv_silu_fwd(const float *x, long x_ld, const float *prev, const float *wt, const float *bias,
                   float *out, long B, long L, long C, long K, int nt) {
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static)
    for (long b = 0; b < B; b++) {
        for (long t = 0; t < L; t++) {
            float *o = out + (b * L + t) * C;
            for (long c = 0; c < C; c++) o[c] = bias ? bias[c] : 0.0f;
            for (long i = 0; i < K; i++) {
                long s = t - (K - 1) + i;
                const float *src;
                if (s >= 0)
                    src = x + (b * L + s) * x_ld;
                else if (prev)
                    src = prev + (b * (K - 1) + (K - 1 + s)) * C;
                else
                    continue;
                const float *wi = wt + i * C;
                for (long c = 0; c < C; c++) o[c] += wi[c] * src[c];
            }
            for (long c = 0; c < C; c++) o[c] *= sigmoid(o[c]);
        }
    }
}

/* Gradients of conv_silu_fwd without `prev`. Each thread owns a block of channels, so the
 * weight and bias gradients need no reduction across threads (deterministic). dx first holds
 * the pre-activation gradient, then is turned into the input gradient in place (ascending t
 * only overwrites values no later t reads). */
void conv_silu_bwd(const float *x, long x_ld, const float *wt, const float *bias, const float *dout,
                   float *dx, float *dwt, float *dbias, long B, long L, long C, long K, int nt) {
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), n = omp_get_num_threads();
        long c0 = C * tid / n, c1 = C * (tid + 1) / n, w = c1 - c0;
        for (long i = 0; i < K; i++) memset(dwt + i * C + c0, 0, w * sizeof(float));
        if (dbias) memset(dbias + c0, 0, w * sizeof(float));
        float *restrict pre = malloc(w * sizeof(float)), *restrict acc = malloc(w * sizeof(float));
        for (long b = 0; b < B; b++) {
            for (long t = 0; t < L; t++) {
                for (long c = 0; c < w; c++) pre[c] = bias ? bias[c0 + c] : 0.0f;
                for (long i = 0; i < K; i++) {
                    long s = t - (K - 1) + i;
                    if (s < 0) continue;
                    const float *src = x + (b * L + s) * x_ld + c0, *wi = wt + i * C + c0;
                    for (long c = 0; c < w; c++) pre[c] += wi[c] * src[c];
                }
                const float *restrict g = dout + (b * L + t) * C + c0;
                float *restrict d = dx + (b * L + t) * C + c0;
                for (long c = 0; c < w; c++) d[c] = g[c] * silu_grad(pre[c], sigmoid(pre[c]));
                if (dbias)
                    for (long c = 0; c < w; c++) dbias[c0 + c] += d[c];
                for (long i = 0; i < K; i++) {
                    long s = t - (K - 1) + i;
                    if (s < 0) continue;
                    const float *src = x + (b * L + s) * x_ld + c0;
                    float *dwi = dwt + i * C + c0;
                    for (long c = 0; c < w; c++) dwi[c] += d[c] * src[c];
                }
            }
            /* dx[t] = sum_i wt[i] dpre[t + (K-1) - i] */
            for (long t = 0; t < L; t++) {
                memset(acc, 0, w * sizeof(float));
                for (long i = 0; i < K; i++) {
                    long s = t + (K - 1) - i;
                    if (s >= L) continue;
                    const float *restrict src = dx + (b * L + s) * C + c0, *restrict wi = wt + i * C + c0;
                    for (long c = 0; c < w; c++) acc[c] += wi[c] * src[c];
                }
                memcpy(dx + (b * L + t) * C + c0, acc, w * sizeof(float));
            }
        }
        free(pre);
        free(acc);
    }
}

/* ------------------------------------------------------------------ gated RMSNorm */

/* out = RMSNorm(y * silu(z)) * w, normalised over groups of `gs` columns of each row. */
void gated_norm_fwd(const float *y, long y_ld, const float *z, long z_ld, const float *w, float *out,
                    long rows, long D, long gs, float eps, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long r = 0; r < rows; r++) {
        for (long g0 = 0; g0 < D; g0 += gs) {
            const float *restrict yr = y + r * y_ld + g0, *restrict zr = z + r * z_ld + g0;
            float *restrict o = out + r * D + g0;
            float ss = 0.0f;
            for (long c = 0; c < gs; c++) {
                float u = yr[c] * zr[c] * sigmoid(zr[c]);
                o[c] = u;
                ss += u * u;
            }
            float rs = 1.0f / sqrtf(ss / gs + eps);
            for (long c = 0; c < gs; c++) o[c] *= rs * w[g0 + c];
        }
    }
}

/* One group of one row of gated_norm_bwd (a function of its own so that gcc vectorizes it). */
static void gated_norm_bwd_group(const float *restrict y, const float *restrict z, const float *restrict w,
                                 const float *restrict g, float *restrict dy, float *restrict dz,
                                 float *restrict acc, long gs, float eps) {
    float ss = 0.0f, dot = 0.0f;
    for (long c = 0; c < gs; c++) {
        float u = y[c] * z[c] * sigmoid(z[c]);
        ss += u * u;
        dot += g[c] * w[c] * u;
    }
    float rs = 1.0f / sqrtf(ss / gs + eps);
    float k = rs * rs * rs * dot / gs;
    for (long c = 0; c < gs; c++) {
        float s = sigmoid(z[c]), u = y[c] * z[c] * s;
        float du = rs * g[c] * w[c] - u * k;
        dy[c] = du * z[c] * s;
        dz[c] = du * y[c] * silu_grad(z[c], s);
        acc[c] += g[c] * u * rs;
    }
}

/* Gradients of gated_norm_fwd. Weight gradients are summed per thread into `partial`
 * (nt x D scratch) and reduced in thread order, so results do not depend on timing. */
void gated_norm_bwd(const float *y, long y_ld, const float *z, long z_ld, const float *w,
                    const float *dout, float *dy, float *dz, float *dw, float *partial, long rows,
                    long D, long gs, float eps, int nt) {
    memset(partial, 0, nt * D * sizeof(float));
#pragma omp parallel num_threads(nt)
    {
        float *acc = partial + omp_get_thread_num() * D;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            for (long g0 = 0; g0 < D; g0 += gs)
                gated_norm_bwd_group(y + r * y_ld + g0, z + r * z_ld + g0, w + g0, dout + r * D + g0,
                                     dy + r * D + g0, dz + r * D + g0, acc + g0, gs, eps);
        }
    }
    memset(dw, 0, D * sizeof(float));
    for (int i = 0; i < nt; i++)
        for (long c = 0; c < D; c++) dw[c] += partial[i * D + c];
}

/* ------------------------------------------------------------------ SwiGLU */

void swiglu_fwd(const float *gate, const float *up, float *out, long n, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < n; i++) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

void swiglu_bwd(const float *gate, const float *up, const float *dout, float *dgate, float *dup, long n,
                int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < n; i++) {
        float s = sigmoid(gate[i]);
        dup[i] = dout[i] * gate[i] * s;
        dgate[i] = dout[i] * up[i] * silu_grad(gate[i], s);
    }
}

/* ------------------------------------------------------------------ row dot products */

/* out[r] = sum_c a[r, c] b[r, c] (the SSD backward's per-token, per-head reductions). */
void rowdot(const float *a, long a_ld, const float *b, long b_ld, float *out, long rows, long D, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *restrict x = a + r * a_ld, *restrict y = b + r * b_ld;
        float acc = 0.0f;
        for (long c = 0; c < D; c++) acc += x[c] * y[c];
        out[r] = acc;
    }
}

/* ------------------------------------------------------------------ RMSNorm */

void rms_norm_fwd(const float *x, long x_ld, const float *w, float *out, long rows, long D, float eps, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *restrict xr = x + r * x_ld;
        float *restrict o = out + r * D;
        float ss = 0.0f;
        for (long c = 0; c < D; c++) ss += xr[c] * xr[c];
        float rs = 1.0f / sqrtf(ss / D + eps);
        for (long c = 0; c < D; c++) o[c] = xr[c] * rs * w[c];
    }
}

static void rms_norm_bwd_row(const float *restrict x, const float *restrict w, const float *restrict g,
                             float *restrict dx, float *restrict acc, long D, float eps) {
    float ss = 0.0f, dot = 0.0f;
    for (long c = 0; c < D; c++) {
        ss += x[c] * x[c];
        dot += g[c] * w[c] * x[c];
    }
    float rs = 1.0f / sqrtf(ss / D + eps);
    float k = rs * rs * rs * dot / D;
    for (long c = 0; c < D; c++) {
        dx[c] = rs * g[c] * w[c] - x[c] * k;
        acc[c] += g[c] * x[c] * rs;
    }
}

/* Gradients of rms_norm_fwd; weight gradients reduced in thread order as in gated_norm_bwd. */
void rms_norm_bwd(const float *x, long x_ld, const float *w, const float *dout, float *dx, float *dw,
                  float *partial, long rows, long D, float eps, int nt) {
    memset(partial, 0, nt * D * sizeof(float));
#pragma omp parallel num_threads(nt)
    {
        float *acc = partial + omp_get_thread_num() * D;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) rms_norm_bwd_row(x + r * x_ld, w, dout + r * D, dx + r * D, acc, D, eps);
    }
    memset(dw, 0, D * sizeof(float));
    for (int i = 0; i < nt; i++)
        for (long c = 0; c < D; c++) dw[c] += partial[i * D + c];
}

/* ------------------------------------------------------------------ softmax cross-entropy */

/* For each row of logits (rows x V): loss[r] = logsumexp - logit[target] (0 where target < 0),
 * and the row is overwritten with scale[r] * (softmax - onehot(target)), the gradient of
 * sum_r scale[r] * loss[r]. Two passes over the logits instead of PyTorch's five. */
void softmax_xent(float *logits, long rows, long V, const long *targets, const float *scale, float *loss,
                  int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long r = 0; r < rows; r++) {
        float *restrict x = logits + r * V;
        float m = x[0];
        for (long c = 1; c < V; c++) m = fmaxf(m, x[c]);
        float s = 0.0f;
        for (long c = 0; c < V; c++) s += expf(x[c] - m);
        float lse = m + logf(s), sc = scale[r];
        long t = targets[r];
        loss[r] = t >= 0 ? lse - x[t] : 0.0f;
        for (long c = 0; c < V; c++) x[c] = expf(x[c] - lse) * sc;
        if (t >= 0) x[t] -= sc;
    }
}

/* ------------------------------------------------------------------ few-row linear (decode) */

/* The weights W (N x K) of these products are fp32 or bf16 (`wt`); x, y and the sums are fp32.
 * Each loop is written once per type (the *_LOOP macros) so that both vectorize. */
static inline const void *w_at(const void *W, int wt, long i) {
    return (const char *)W + i * (wt == BF16 ? sizeof(uint16_t) : sizeof(float));
}

#define DOT4_LOOP(T, LOAD)                                                                           \
    {                                                                                                \
        const T *restrict w0 = w, *restrict w1 = w0 + K, *restrict w2 = w0 + 2 * K, *restrict w3 = w0 + 3 * K; \
        for (long k = 0; k < K; k++) {                                                               \
            float v = x[k];                                                                          \
            a0 += LOAD(w0[k]) * v;                                                                   \
            a1 += LOAD(w1[k]) * v;                                                                   \
            a2 += LOAD(w2[k]) * v;                                                                   \
            a3 += LOAD(w3[k]) * v;                                                                   \
        }                                                                                            \
    }

static void dot4(const void *w, int wt, long K, const float *restrict x, float *restrict out) {
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    if (wt == BF16)
        DOT4_LOOP(uint16_t, LOAD_BF16)
    else
        DOT4_LOOP(float, LOAD_F32)
    out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

/* 64 partial sums: four vector accumulators, so the loop waits on memory, not on the latency of
 * one chain of dependent FMAs (which capped a bf16 row at ~70% of its bandwidth bound). */
#define DOT1_LOOP(T, LOAD)                                                                           \
    {                                                                                                \
        const T *restrict wk = w;                                                                    \
        float part[64] = {0};                                                                        \
        long k = 0;                                                                                  \
        for (; k + 64 <= K; k += 64)                                                                 \
            for (int j = 0; j < 64; j++) part[j] += LOAD(wk[k + j]) * x[k + j];                      \
        for (; k < K; k++) acc += LOAD(wk[k]) * x[k];                                                \
        if (K >= 64)                                                                                 \
            for (int j = 0; j < 64; j++) acc += part[j];                                             \
    }

static float dot1(const void *w, int wt, const float *restrict x, long K) {
    float acc = 0.0f;
    if (wt == BF16)
        DOT1_LOOP(uint16_t, LOAD_BF16)
    else
        DOT1_LOOP(float, LOAD_F32)
    return acc;
}

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
#define NB 8 /* weight rows per block: 8 accumulators hide the FMA latency; 16 streams were slower */

/* linear_lanes##L: y (R x N) = x (R x K) W^T + bias for R <= L rows, which, transposed and
 * zero-padded to L, fill one vector's lanes (L = 8 or 16; with 8 lanes, up to 4 more rows go
 * through tiles of each block while it is in L1). A block of NB weight rows: each step is
 * one vector load of xT (K x L) and NB broadcast FMAs, with no horizontal sums; while a block runs,
 * the next block's rows are prefetched, one cache line per row per 16 steps. bf16 rows are widened
 * 16 columns at a time into `wide`, so the FMAs read fp32 either way: the conversion is shared by
 * the L lanes instead of repeated in each broadcast. Each thread transposes its own copy of x:
 * reading one thread's copy from the other core cost more than the transposition (~5 us per call).
 * Returns 0 (nothing written) when the copies cannot be allocated. Written once as a macro and
 * expanded per width: one function for both widths ran the 16-lane products 6% slower. */
static void tile_const(const void *w, int wt, long K, const float *x, long x_ld, int M, int G, const void *ahead,
                       int burst, float *out);

#define LANES(V, L)                                                                                  \
    static void block##L(const float *restrict xT, const void *W, int wt, long K, const void *next,    \
                         float *restrict out) {                                                      \
        V acc[NB];                                                                                   \
        float wide[NB * 16] __attribute__((aligned(64)));                                            \
        for (int i = 0; i < NB; i++) acc[i] = (V){0};                                                \
        for (long k0 = 0; k0 < K; k0 += 16) {                                                        \
            if (next)                                                                                \
                for (int i = 0; i < NB; i++) __builtin_prefetch(w_at(next, wt, i * K + k0), 0, 3);    \
            long k1 = k0 + 16 < K ? k0 + 16 : K;                                                     \
            const float *restrict wr = (const float *)W + k0; /* row i, column k0 + j: wr[i * ws + j] */ \
            long ws = K;                                                                             \
            if (wt == BF16) {                                                                        \
                const uint16_t *restrict wb = (const uint16_t *)W + k0;                              \
                if (k1 - k0 == 16) /* a fixed length: one vector per row */                          \
                    for (int i = 0; i < NB; i++)                                                     \
                        for (int j = 0; j < 16; j++) wide[i * 16 + j] = bf16_f32(wb[i * K + j]);     \
                else                                                                                 \
                    for (int i = 0; i < NB; i++)                                                     \
                        for (long j = 0; j < k1 - k0; j++) wide[i * 16 + j] = bf16_f32(wb[i * K + j]); \
                wr = wide, ws = 16;                                                                  \
            }                                                                                        \
            for (long j = 0; j < k1 - k0; j++) {                                                     \
                V xv = *(const V *)(xT + (k0 + j) * L);                                              \
                _Pragma("GCC unroll 16") for (int i = 0; i < NB; i++) acc[i] += wr[i * ws + j] * xv; \
            }                                                                                        \
        }                                                                                            \
        for (int i = 0; i < NB; i++) memcpy(out + i * L, &acc[i], sizeof(V));                        \
    }                                                                                                \
                                                                                                     \
    static int linear_lanes##L(const float *x, long x_ld, const void *W, int wt, const float *bias, float *y, \
                               long R, long N, long K, int nt) {                                     \
        float *copies = aligned_alloc(64, (size_t)nt * K * L * sizeof(float));                       \
        if (!copies) return 0;                                                                       \
        long blocks = N / NB;                                                                        \
        _Pragma("omp parallel num_threads(nt)") {                                                    \
            float *restrict xT = copies + (size_t)omp_get_thread_num() * K * L;                      \
            for (long k = 0; k < K; k++)                                                             \
                for (long r = 0; r < L; r++) xT[k * L + r] = r < R ? x[r * x_ld + k] : 0.0f;         \
            _Pragma("omp for schedule(static)") for (long b = 0; b < blocks; b++) {                  \
                float out[NB * L] __attribute__((aligned(64)));                                      \
                long n = b * NB;                                                                     \
                block##L(xT, w_at(W, wt, n * K), wt, K, b + 1 < blocks ? w_at(W, wt, (n + NB) * K) : NULL, out); \
                for (long r = 0; r < (R < L ? R : L); r++)                                           \
                    for (int i = 0; i < NB; i++) y[r * N + n + i] = out[i * L + r] + (bias ? bias[n + i] : 0.0f); \
                for (int i = 0; L < 16 && R > L && i < NB; i += 4) { /* rows past 8 lanes: the block again */ \
                    float t[16];                                                                     \
                    tile_const(w_at(W, wt, (n + i) * K), wt, K, x + L * x_ld, x_ld, 4, (int)(R - L), NULL, 0, t); \
                    for (long r = 0; r < R - L; r++)                                                 \
                        for (int q = 0; q < 4; q++)                                                  \
                            y[(L + r) * N + n + i + q] = t[r * 4 + q] + (bias ? bias[n + i + q] : 0.0f); \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        for (long n = blocks * NB; n < N; n++)                                                       \
            for (long r = 0; r < R; r++)                                                             \
                y[r * N + n] = dot1(w_at(W, wt, n * K), wt, x + r * x_ld, K) + (bias ? bias[n] : 0.0f); \
        free(copies);                                                                                \
        return 1;                                                                                    \
    }
LANES(v16, 16)
LANES(v8, 8)
#undef LANES

typedef float v16u __attribute__((vector_size(64), aligned(4)));   /* any float address */
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

/* 16 weights from element i of W, as fp32 (a bf16 is the top half of its fp32). */
static inline v16 load16(const void *W, int wt, long i) {
    if (wt == BF16) return (v16)(__builtin_convertvector(*(const u16x16 *)((const uint16_t *)W + i), u32x16) << 16);
    return *(const v16u *)((const float *)W + i);
}

/* out[0..3] = the sums of a, b, c and d's lanes: halves, then quarters, side by side. */
static inline void hsum4(v16 a, v16 b, v16 c, v16 d, float *out) {
    v16 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
             __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    v16 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
             __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    v16 s = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    s += __builtin_shufflevector(s, s, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    s += __builtin_shufflevector(s, s, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    out[0] = s[0], out[1] = s[4], out[2] = s[8], out[3] = s[12];
}

/* out[r * M + i] = W_i . x_r for M weight rows (row stride K) and G input rows, M * G <= 16 vector
 * accumulators: each weight vector is loaded (and a bf16 one widened) once for all G rows, so the
 * rows share one pass over the weights. `ahead` (or NULL) is M rows to prefetch: all at once when
 * `burst`, else one line per row per 16 columns. */
static inline __attribute__((always_inline)) void tile(const void *w, int wt, long K, const float *x, long x_ld,
                                                       int M, int G, const void *ahead, int burst, float *out) {
    v16 acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) acc[j] = (v16){0};
    if (ahead && burst)
        for (long l = 0; l < M * K * (wt == BF16 ? 2 : 4) / 64; l++) __builtin_prefetch((const char *)ahead + l * 64, 0, 3);
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        if (ahead && !burst)
#pragma GCC unroll 4
            for (int i = 0; i < M; i++) __builtin_prefetch(w_at(ahead, wt, i * K + k), 0, 3);
        v16 wv[4];
#pragma GCC unroll 4
        for (int i = 0; i < M; i++) wv[i] = load16(w, wt, i * K + k);
#pragma GCC unroll 16
        for (int r = 0; r < G; r++) {
            v16 xv = *(const v16u *)(x + r * x_ld + k);
            if (G >= 5) /* in a register: gcc folds it into each of the M FMAs, which then load */
                __asm__("" : "+v"(xv)); /* it M times (5 fp32 rows: 18 loads to 15 FMAs) */
#pragma GCC unroll 4
            for (int i = 0; i < M; i++) acc[r * M + i] += wv[i] * xv;
        }
    }
    v16 zero = {0};
#pragma GCC unroll 4
    for (int j = 0; j < M * G; j += 4) {
        float s[4];
        hsum4(acc[j], j + 1 < M * G ? acc[j + 1] : zero, j + 2 < M * G ? acc[j + 2] : zero,
              j + 3 < M * G ? acc[j + 3] : zero, s);
        for (int q = 0; q < 4 && j + q < M * G; q++) out[j + q] = s[q];
    }
    for (long c = k; c < K; c++) /* K not a multiple of 16 */
        for (int r = 0; r < G; r++)
            for (int i = 0; i < M; i++)
                out[r * M + i] += (wt == BF16 ? bf16_f32(((const uint16_t *)w)[i * K + c]) : ((const float *)w)[i * K + c]) *
                                  x[r * x_ld + c];
}

/* tile() with M, G and wt as constants, so that its loops unroll and the accumulators stay in
 * registers: the cases linear_rows dispatches (fp32: one row; 4-5 rows; a 9th beside 8 lanes).
 * Any other case runs the same code with runtime counts. */
static void tile_const(const void *w, int wt, long K, const float *x, long x_ld, int M, int G, const void *ahead,
                       int burst, float *out) {
#define TILE_CASE(WT_, M_, G_)                                                                       \
    if (wt == WT_ && M == M_ && G == G_) {                                                          \
        tile(w, WT_, K, x, x_ld, M_, G_, ahead, burst, out);                                        \
        return;                                                                                     \
    }
    TILE_CASE(F32, 4, 1) TILE_CASE(F32, 4, 2) TILE_CASE(F32, 4, 3) TILE_CASE(F32, 4, 4)
    TILE_CASE(F32, 3, 4) TILE_CASE(F32, 3, 5)
    TILE_CASE(BF16, 4, 1) TILE_CASE(BF16, 4, 2) TILE_CASE(BF16, 4, 3) TILE_CASE(BF16, 4, 4)
    TILE_CASE(BF16, 2, 1) TILE_CASE(BF16, 2, 2) TILE_CASE(BF16, 2, 3) TILE_CASE(BF16, 2, 4)
    TILE_CASE(BF16, 2, 5) TILE_CASE(BF16, 2, 6) TILE_CASE(BF16, 2, 7) TILE_CASE(BF16, 2, 8)
#undef TILE_CASE
    tile(w, wt, K, x, x_ld, M, G, ahead, burst, out);
}

/* linear_rows by tiles of M weight rows against up to 8 input rows at a time (past 8, the block's
 * weights are read again, from L1; M x rows <= 16 accumulators). Prefetching `ahead_rows` ahead. */
static void linear_tiles(const float *x, long x_ld, const void *W, int wt, const float *bias, float *y, long R,
                         long N, long K, int M, long ahead_rows, int burst, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long n = 0; n < N - (M - 1); n += M) {
        const void *ahead = n + ahead_rows + M <= N ? w_at(W, wt, (n + ahead_rows) * K) : NULL;
        for (long r0 = 0; r0 < R; r0 += 8) {
            float t[16];
            int G = R - r0 < 8 ? (int)(R - r0) : 8;
            tile_const(w_at(W, wt, n * K), wt, K, x + r0 * x_ld, x_ld, M, G, r0 ? NULL : ahead, burst, t);
            for (int r = 0; r < G; r++)
                for (int i = 0; i < M; i++) y[(r0 + r) * N + n + i] = t[r * M + i] + (bias ? bias[n + i] : 0.0f);
        }
    }
    for (long n = N / M * M; n < N; n++)
        for (long r = 0; r < R; r++)
            y[r * N + n] = dot1(w_at(W, wt, n * K), wt, x + r * x_ld, K) + (bias ? bias[n] : 0.0f);
}

/* y (R x N) = x (R x K) W^T + bias, W (N x K) of type wt, for the few rows of a decode step. Each
 * thread streams its own block of weight rows once, prefetching ahead by hand: the hardware
 * prefetcher alone left the stream stalled behind the arithmetic. Which loop serves which rows was
 * measured on this 2-core AMD EPYC, alternating the candidates, in both of its memory moods (its
 * bandwidth swings between ~45 and ~100 GB/s from minute to minute):
 *   - one fp32 row: tiles with a burst prefetch one block ahead. 0.89 ms for 100 MB at K = 512 and
 *     0.92 at K = 1024, against 1.16 and 1.40 for one dot product per row; equal when memory is slow.
 *   - bf16, 1 to 12 rows: tiles, widening each weight once for all the rows. A model step of the
 *     benchmark configuration: 1 row 1.44 -> 1.27 ms, 8 rows 4.32 -> 3.46 ms, 12 rows 5.48 -> 4.74.
 *   - fp32, 2 or 3 rows: four weight rows sit in L1 while every input row passes over them, the
 *     next blocks' lines prefetched in bursts spread over the input rows.
 *   - fp32, 4 or 5 rows: tiles of 3 weight rows, each weight line prefetched one block ahead as the
 *     tile reaches its column. Against the 4-row blocks: a whole pass of 5 tokens 8% faster with
 *     slow memory (same-process A/B), 4 tokens equal; with the weights in L2, where the arithmetic
 *     decides, 17% / 14% faster. (Bursts, or 2 or 4 weight rows, were slower.) With the input
 *     vectors of 5 rows held in registers rather than loaded by each FMA, from L2 a further 22%
 *     faster (4 rows: 5% slower, so they keep gcc's choice); equal with slow memory. (bf16 tiles
 *     of 5-12 rows likewise: whole steps 3-4% faster.)
 *   - fp32, 6 to 9 rows: the rows become the lanes of an 8-wide vector (linear_lanes8), whose FMAs
 *     issue two per cycle: a whole pass of 6 / 8 tokens 15% / 21% faster than by 4-row blocks
 *     (slow memory; with the weights in L3, 0% / 19%). For 5 rows the 8 lanes do 8/5 of the work:
 *     14% faster with slow memory, but 24% slower from L2. A 9th row takes each block again from
 *     L1 in tiles: 27% faster than 16 lanes from L2, 2% slower with slow memory (10 rows: 14%
 *     faster, 9% slower; 12 rows: slower either way).
 *   - 10 to 16 rows (bf16 from 13): the arithmetic dominates and the rows become the lanes of one
 *     16-wide vector (linear_lanes16). The 16-row products of a step: 6.4 ms with four weight rows
 *     per block and no prefetch, 4.2 with prefetch, ~3.3 as lanes. */
void linear_rows(const float *x, long x_ld, const void *W, int wt, const float *bias, float *y, long R,
                 long N, long K, int nt) {
    if (R <= 0) return; /* an empty batch */
    if (R == 1 || (wt == BF16 && R <= 12)) {
        linear_tiles(x, x_ld, W, wt, bias, y, R, N, K, R <= 4 ? 4 : 2, wt == BF16 ? 8 : 4, wt != BF16, nt);
        return;
    }
    if (R == 4 || R == 5) {
        linear_tiles(x, x_ld, W, wt, bias, y, R, N, K, 3, 3, 0, nt);
        return;
    }
    if (R > 9 ? linear_lanes16(x, x_ld, W, wt, bias, y, R, N, K, nt)
              : R > 5 && linear_lanes8(x, x_ld, W, wt, bias, y, R, N, K, nt))
        return;
    long block_bytes = (long)((const char *)w_at(W, wt, 4 * K) - (const char *)W);
    long lines = block_bytes / 64, per_row = (lines + R - 1) / R; /* cache lines of a 4-row block */
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long n = 0; n < N - 3; n += 4) {
        float t[4];
        const char *ahead = w_at(W, wt, (n + 8) * K); /* two blocks ahead */
        int pf = n + 12 <= N;
        for (long r = 0; r < R; r++) {
            if (pf) /* spread over the input rows */
                for (long l = r * per_row; l < (r + 1) * per_row && l < lines; l++)
                    __builtin_prefetch(ahead + l * 64, 0, 3);
            dot4(w_at(W, wt, n * K), wt, K, x + r * x_ld, t);
            for (int i = 0; i < 4; i++) y[r * N + n + i] = t[i] + (bias ? bias[n + i] : 0.0f);
        }
    }
    for (long n = N / 4 * 4; n < N; n++)
        for (long r = 0; r < R; r++)
            y[r * N + n] = dot1(w_at(W, wt, n * K), wt, x + r * x_ld, K) + (bias ? bias[n] : 0.0f);
}

/* ------------------------------------------------------------------ Mamba-2 decode step */

static inline float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

/* One row (p) of a head's SSD state advanced by a token: st = st * decay + xdt * B; returns C . st. */
static inline float ssd_row(float *restrict st, float decay, float xdt, const float *restrict B,
                            const float *restrict C, long N) {
    float acc = 0.0f;
    for (long n = 0; n < N; n++) {
        st[n] = st[n] * decay + xdt * B[n];
        acc += st[n] * C[n];
    }
    return acc;
}

/* y = RMSNorm(y * silu(z)) * w per group of gs channels, in place, for one token. */
static inline void gated_norm_row(float *restrict y, const float *restrict z, const float *restrict w, long d,
                                  long gs, float eps) {
    for (long g0 = 0; g0 < d; g0 += gs) {
        float ss = 0.0f;
        for (long c = g0; c < g0 + gs; c++) {
            float u = y[c] * z[c] * sigmoid(z[c]);
            y[c] = u;
            ss += u * u;
        }
        float rs = 1.0f / sqrtf(ss / gs + eps);
        for (long c = g0; c < g0 + gs; c++) y[c] *= rs * w[c];
    }
}

/* One token through a Mamba-2 mixer, between in_proj and out_proj, for each of R rows:
 * zxbcdt (R x (d_inner + conv_dim + H)) -> out (R x d_inner), advancing the conv window
 * (R x (K-1) x conv_dim) and the SSM state (R x H x P x N) in place. The same math as
 * Mamba2Mixer.step's PyTorch ops (conv, SiLU, softplus, SSD recurrence, D skip, gated RMSNorm),
 * as one call instead of about thirty small ones. wT holds the conv taps tap-major (K x conv_dim),
 * so that every per-row loop has unit stride; act (R x conv_dim) is scratch. The recurrence, most
 * of the work, runs in parallel over (row, head) pairs, so a single row uses every thread too. */
static void mamba2_step_taps(const float *zxbcdt, long zx_ld, float *conv_state, const float *wT,
                             const float *conv_b, const float *dt_bias, const float *A_log, const float *D,
                             float *ssm, const float *norm_w, float *out, float *act_all, long R, long d_inner,
                             long H, long P, long G, long N, long K, long norm_groups, float eps, int nt) {
    long conv_dim = d_inner + 2 * G * N, gs = d_inner / norm_groups;
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (long r = 0; r < R; r++) { /* conv + SiLU: x, B, C of each row */
            const float *xbc = zxbcdt + r * zx_ld + d_inner;
            float *restrict win = conv_state + r * (K - 1) * conv_dim;
            float *restrict act = act_all + r * conv_dim;
            const float *restrict last = wT + (K - 1) * conv_dim;
            for (long c = 0; c < conv_dim; c++) act[c] = last[c] * xbc[c] + (conv_b ? conv_b[c] : 0.0f);
            for (long i = 0; i < K - 1; i++) {
                const float *restrict wi = wT + i * conv_dim, *restrict wv = win + i * conv_dim;
                for (long c = 0; c < conv_dim; c++) act[c] += wi[c] * wv[c];
            }
            for (long c = 0; c < conv_dim; c++) act[c] = act[c] * sigmoid(act[c]);
            for (long i = 0; i < K - 2; i++)
                memcpy(win + i * conv_dim, win + (i + 1) * conv_dim, conv_dim * sizeof(float));
            if (K > 1) memcpy(win + (K - 2) * conv_dim, xbc, conv_dim * sizeof(float));
        }
#pragma omp for schedule(static)
        for (long rh = 0; rh < R * H; rh++) {
            long r = rh / H, h = rh % H;
            const float *act = act_all + r * conv_dim, *dtr = zxbcdt + r * zx_ld + d_inner + conv_dim;
            const float *x = act, *B = act + d_inner, *C = B + G * N;
            float dt = softplus(dtr[h] + dt_bias[h]);
            float decay = expf(-expf(A_log[h]) * dt);
            const float *restrict Bg = B + (h / (H / G)) * N, *restrict Cg = C + (h / (H / G)) * N;
            float *restrict y = out + r * d_inner;
            for (long p = 0; p < P; p++) {
                float *restrict st = ssm + ((r * H + h) * P + p) * N;
                y[h * P + p] = ssd_row(st, decay, x[h * P + p] * dt, Bg, Cg, N) + D[h] * x[h * P + p];
            }
        }
#pragma omp for schedule(static)
        for (long r = 0; r < R; r++) gated_norm_row(out + r * d_inner, zxbcdt + r * zx_ld, norm_w, d_inner, gs, eps);
    }
}

/* One head's SSD recurrence over R tokens of one sequence (ssd_row for each row p, token after
 * token), four rows at a time: their state (4 x N, N = 16 * NV) stays in registers over the tokens,
 * each token's B and C are loaded once for the four, and one hsum4 gives their four outputs. Row
 * by row, the state went through L1 for every token and each output was a horizontal sum of its
 * own: 2-3x the time. The state is read from `from` and written to `st` (the same place, or a
 * rewind's replay from the trail); `trail` (or NULL) receives a copy of it as read, which is what a
 * later rewind starts from: a copy made in passing, not a pass of its own over 256 KB per layer.
 * act: the tokens' conv outputs (act_ld apart: x at x_off, B at b_off, C at c_off); y (y_ld apart)
 * receives C . state + Dh x, unless `outputs` is 0 (a replay needs the states only). */
static inline __attribute__((always_inline)) void ssd_head_seq(const float *from, float *st, float *trail, long P,
                                                               const int NV, const int outputs, long R,
                                                               const float *dt, const float *decay,
                                                               const float *act, long act_ld, long x_off, long b_off,
                                                               long c_off, float *y, long y_ld, float Dh) {
    for (long p0 = 0; p0 < P; p0 += 4) {
        v16 s[4][4], b[4], c[4], acc[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) {
                s[i][j] = *(const v16u *)(from + (p0 + i) * NV * 16 + j * 16);
                if (trail) memcpy(trail + (p0 + i) * NV * 16 + j * 16, &s[i][j], sizeof(v16));
            }
        for (long t = 0; t < R; t++) {
            const float *a = act + t * act_ld, *x = a + x_off + p0;
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) b[j] = *(const v16u *)(a + b_off + j * 16), c[j] = *(const v16u *)(a + c_off + j * 16);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                float xdt = x[i] * dt[t];
                acc[i] = (v16){0};
#pragma GCC unroll 4
                for (int j = 0; j < NV; j++) {
                    s[i][j] = s[i][j] * decay[t] + xdt * b[j];
                    if (outputs) acc[i] += s[i][j] * c[j];
                }
            }
            if (!outputs) continue;
            float sums[4];
            hsum4(acc[0], acc[1], acc[2], acc[3], sums);
            for (int i = 0; i < 4; i++) y[t * y_ld + p0 + i] = sums[i] + Dh * x[i];
        }
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) memcpy(st + (p0 + i) * NV * 16 + j * 16, &s[i][j], sizeof(v16));
    }
}

/* `mamba2_step_taps` for R consecutive tokens of one sequence (zxbcdt: R x zx_ld, out: R x
 * d_inner) in one parallel region instead of R: the conv of every token at once (each sees the
 * window and the tokens before it), the recurrence per head over the tokens in turn (the head's
 * state, P x N, stays in L1 from token to token), the gated RMSNorm of every token at once. act
 * holds R x conv_dim floats. */
static void mamba2_seq_taps(const float *zxbcdt, long zx_ld, float *conv_state, const float *wT,
                            const float *conv_b, const float *dt_bias, const float *A_log, const float *D,
                            float *ssm, const float *norm_w, float *out, float *act_all, long R, long d_inner,
                            long H, long P, long G, long N, long K, long norm_groups, float eps, int nt,
                            const float *ssm_from, float *ssm_trail, int outputs) {
    long conv_dim = d_inner + 2 * G * N, gs = d_inner / norm_groups;
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (long t = 0; t < R; t++) { /* tap i of token t reads sequence position t + i - (K - 1) */
            float *restrict act = act_all + t * conv_dim;
            for (long c = 0; c < conv_dim; c++) act[c] = conv_b ? conv_b[c] : 0.0f;
            for (long i = 0; i < K; i++) {
                long at = t + i - (K - 1);
                const float *restrict wi = wT + i * conv_dim;
                const float *restrict src = at < 0 ? conv_state + (K - 1 + at) * conv_dim
                                                   : zxbcdt + at * zx_ld + d_inner;
                for (long c = 0; c < conv_dim; c++) act[c] += wi[c] * src[c];
            }
            for (long c = 0; c < conv_dim; c++) act[c] = act[c] * sigmoid(act[c]);
        }
#pragma omp for schedule(static)
        for (long h = 0; h < H; h++) {
            float A = -expf(A_log[h]), dt[R > 0 ? R : 1], decay[R > 0 ? R : 1];
            long g = h / (H / G), x_off = h * P, b_off = d_inner + g * N, c_off = d_inner + (G + g) * N;
            for (long t = 0; t < R; t++) {
                dt[t] = softplus(zxbcdt[t * zx_ld + d_inner + conv_dim + h] + dt_bias[h]);
                decay[t] = expf(A * dt[t]);
            }
            float *st = ssm + h * P * N, *y = out + h * P, *trail = ssm_trail ? ssm_trail + h * P * N : NULL;
            const float *from = (ssm_from ? ssm_from : ssm) + h * P * N;
#define SSD_HEAD(NV_, OUT_)                                                                                      \
    ssd_head_seq(from, st, trail, P, NV_, OUT_, R, dt, decay, act_all, conv_dim, x_off, b_off, c_off, y, d_inner, \
                 D[h])
            if (P % 4 == 0 && (N == 64 || N == 16)) { /* unrolled, so the state sits in registers */
                if (N == 64 && outputs) SSD_HEAD(4, 1);
                else if (N == 64) SSD_HEAD(4, 0);
                else if (outputs) SSD_HEAD(1, 1);
                else SSD_HEAD(1, 0);
                continue;
            }
#undef SSD_HEAD
            if (trail) memcpy(trail, from, P * N * sizeof(float));
            if (from != st) memcpy(st, from, P * N * sizeof(float));
            for (long t = 0; t < R; t++) {
                const float *act = act_all + t * conv_dim, *x = act + x_off;
                for (long p = 0; p < P; p++)
                    y[t * d_inner + p] =
                        ssd_row(st + p * N, decay[t], x[p] * dt[t], act + b_off, act + c_off, N) + D[h] * x[p];
            }
        }
        if (outputs) {
#pragma omp for schedule(static)
            for (long t = 0; t < R; t++)
                gated_norm_row(out + t * d_inner, zxbcdt + t * zx_ld, norm_w, d_inner, gs, eps);
        }
    }
    /* the window now ends with the last K - 1 positions of (old window, tokens) */
    long kept = K - 1 > R ? K - 1 - R : 0; /* old window rows that stay, moved to the front */
    if (kept) memmove(conv_state, conv_state + R * conv_dim, kept * conv_dim * sizeof(float));
    for (long j = kept; j < K - 1; j++)
        memcpy(conv_state + j * conv_dim, zxbcdt + (R - (K - 1) + j) * zx_ld + d_inner, conv_dim * sizeof(float));
}

/* `mamba2_step_taps` with the taps as the Conv1d stores them (conv_dim x K); scratch holds
 * (R + K) x conv_dim floats. */
void mamba2_step(const float *zxbcdt, long zx_ld, float *conv_state, const float *conv_w,
                 const float *conv_b, const float *dt_bias, const float *A_log, const float *D,
                 float *ssm, const float *norm_w, float *out, float *scratch, long R, long d_inner,
                 long H, long P, long G, long N, long K, long norm_groups, float eps, int nt) {
    long conv_dim = d_inner + 2 * G * N;
    float *wT = scratch + R * conv_dim;
    for (long c = 0; c < conv_dim; c++)
        for (long i = 0; i < K; i++) wT[i * conv_dim + c] = conv_w[c * K + i];
    mamba2_step_taps(zxbcdt, zx_ld, conv_state, wT, conv_b, dt_bias, A_log, D, ssm, norm_w, out, scratch, R,
                     d_inner, H, P, G, N, K, norm_groups, eps, nt);
}

/* ------------------------------------------------------------------ one-query attention (decode) */

#define KEYS 64 /* keys per block of the online softmax */
#define MASKED -1e30f /* the score of a padding slot: its expf is 0, and -ffast-math has no infinity */


/* One block of an online softmax: its n scores s (MASKED: padding; bm, their max, is not) become
 * their exps under the running max *m, which rises to bm first if need be. Returns the factor that
 * rescales what was summed under the old max (1: none), *sum already rescaled and grown. */
static inline float softmax_block(float *restrict s, long n, float bm, float *m, float *sum, int *started) {
    float c = 1.0f;
    if (!*started || bm > *m) {
        c = *started ? expf(*m - bm) : 1.0f;
        *sum *= c;
        *m = bm;
        *started = 1;
    }
    float mm = *m, total = 0.0f;
    for (long t = 0; t < n; t++) { /* branch-free, so that expf is a vector call */
        s[t] = expf(s[t] - mm);
        total += s[t];
    }
    *sum += total;
    return c;
}

/* One (row, head): softmax(scale * K q) V over T keys in one pass over blocks of keys with an
 * online softmax (the running max and sum rescale what is accumulated so far), so each block's
 * keys and values are read together: two memory streams per thread, not one at a time. Slots
 * that `ok` marks 0 (padding) are skipped; at least one must be real. s: KEYS floats. */
#define ATTEND_HEAD(NAME, T, LOAD)                                                                     \
    static void NAME(const float *restrict qv, const T *kb, long k_ts, const T *vb, long v_ts,       \
                     const unsigned char *ok, float *restrict s, float *restrict o, long Tn, long D,  \
                     float scale) {                                                                  \
        float m = 0.0f, sum = 0.0f; /* no infinity under -ffast-math: m is set by a first key */      \
        int started = 0;                                                                             \
        memset(o, 0, D * sizeof(float));                                                             \
        for (long t0 = 0; t0 < Tn; t0 += KEYS) {                                                     \
            long n = Tn - t0 < KEYS ? Tn - t0 : KEYS;                                                \
            float bm = MASKED;                                                                       \
            for (long t = 0; t < n; t++) {                                                           \
                s[t] = MASKED;                                                                       \
                if (ok && !ok[t0 + t]) continue;                                                     \
                const T *restrict kr = kb + (t0 + t) * k_ts;                                         \
                float acc = 0.0f;                                                                    \
                for (long d = 0; d < D; d++) acc += LOAD(kr[d]) * qv[d];                             \
                s[t] = acc * scale;                                                                  \
                bm = fmaxf(bm, s[t]);                                                                \
            }                                                                                        \
            if (bm == MASKED) continue; /* every slot of the block is padding */                     \
            float c = softmax_block(s, n, bm, &m, &sum, &started);                                   \
            if (c != 1.0f)                                                                           \
                for (long d = 0; d < D; d++) o[d] *= c;                                              \
            for (long t = 0; t < n; t++) {                                                           \
                if (ok && !ok[t0 + t]) continue; /* a padding slot's value may hold anything */      \
                const T *restrict vt = vb + (t0 + t) * v_ts;                                         \
                float w = s[t];                                                                      \
                for (long d = 0; d < D; d++) o[d] += w * LOAD(vt[d]);                                \
            }                                                                                        \
        }                                                                                            \
        for (long d = 0; d < D; d++) o[d] /= sum;                                                    \
    }
ATTEND_HEAD(attend_head_f32, float, LOAD_F32)
ATTEND_HEAD(attend_head_bf16, uint16_t, LOAD_BF16)

/* ATTEND_HEAD for a head size of NV * 16, known when compiled: the query and the weighted sum of
 * the values stay in 2 * NV vector registers for the whole pass. In ATTEND_HEAD (any D) the sum
 * lives in memory, so each key's update waits on the previous key's store. 8 heads of 64, 2
 * threads, one layer's 4k keys: 194 -> 69 us from a bf16 cache, the same ~370 from an fp32 one (its
 * reads set the pace); 16 rows of 53 keys: 40 -> 30 us. The whole step, same-process A/B: 4k -2%,
 * batch 16 -1.4%. */
#define ATTEND_HEAD_V(NAME, T, WT, NV)                                                                 \
    static void NAME(const float *restrict qv, const T *kb, long k_ts, const T *vb, long v_ts,       \
                     const unsigned char *ok, float *restrict s, float *restrict out, long Tn,       \
                     float scale) {                                                                  \
        v16 q[NV], o[NV];                                                                            \
        _Pragma("GCC unroll 8") for (int j = 0; j < NV; j++) q[j] = load16(qv, F32, 16 * j),         \
                                                              o[j] = (v16){0};                       \
        float m = 0.0f, sum = 0.0f;                                                                  \
        int started = 0;                                                                             \
        for (long t0 = 0; t0 < Tn; t0 += KEYS) {                                                     \
            long n = Tn - t0 < KEYS ? Tn - t0 : KEYS;                                                \
            float bm = MASKED;                                                                       \
            for (long t = 0; t < n; t++) {                                                           \
                s[t] = MASKED;                                                                       \
                if (ok && !ok[t0 + t]) continue;                                                     \
                const T *kr = kb + (t0 + t) * k_ts;                                                  \
                v16 a = load16(kr, WT, 0) * q[0];                                                    \
                _Pragma("GCC unroll 8") for (int j = 1; j < NV; j++) a += load16(kr, WT, 16 * j) * q[j]; \
                float acc = 0.0f;                                                                    \
                _Pragma("GCC unroll 16") for (int j = 0; j < 16; j++) acc += a[j];                   \
                s[t] = acc * scale;                                                                  \
                bm = fmaxf(bm, s[t]);                                                                \
            }                                                                                        \
            if (bm == MASKED) continue;                                                              \
            float c = softmax_block(s, n, bm, &m, &sum, &started);                                   \
            _Pragma("GCC unroll 8") for (int j = 0; j < NV; j++) o[j] *= c;                          \
            for (long t = 0; t < n; t++) {                                                           \
                if (ok && !ok[t0 + t]) continue;                                                     \
                const T *vt = vb + (t0 + t) * v_ts;                                                  \
                _Pragma("GCC unroll 8") for (int j = 0; j < NV; j++) o[j] += s[t] * load16(vt, WT, 16 * j); \
            }                                                                                        \
        }                                                                                            \
        _Pragma("GCC unroll 8") for (int j = 0; j < NV; j++) o[j] /= sum;                            \
        memcpy(out, o, sizeof o);                                                                    \
    }
ATTEND_HEAD_V(attend_head_f32_64, float, F32, 4)
ATTEND_HEAD_V(attend_head_bf16_64, uint16_t, BF16, 4)
ATTEND_HEAD_V(attend_head_f32_32, float, F32, 2)
ATTEND_HEAD_V(attend_head_bf16_32, uint16_t, BF16, 2)
ATTEND_HEAD_V(attend_head_f32_16, float, F32, 1)
ATTEND_HEAD_V(attend_head_bf16_16, uint16_t, BF16, 1)

/* out[b, h] = softmax(scale * K[b, kv] q[b, h]) V[b, kv] over T cached keys, kv = h / (H / Hkv),
 * for every (row, head) in parallel. k and v hold kv_type elements; their strides are in
 * elements (batch, head, token), the last dimension D is contiguous. valid (B x valid_ld bytes,
 * or NULL: all) marks the slots that hold real tokens, so a left-padded row never attends to its
 * padding. scratch holds KEYS floats per (row, head). Row b sees T + b * T_step keys: with T_step 1
 * and k_bs = v_bs = valid_ld = 0, the rows are consecutive tokens of one sequence, each attending
 * up to its own slot. */
static void attend_rows(const float *q, long q_bs, long q_hs, const void *k, long k_bs, long k_hs, long k_ts,
                        const void *v, long v_bs, long v_hs, long v_ts, int kv_type, const unsigned char *valid,
                        long valid_ld, float *out, float *scratch, long B, long H, long Hkv, long T, long T_step,
                        long D, float scale, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long bh = 0; bh < B * H; bh++) {
        long b = bh / H, h = bh % H, kv = h / (H / Hkv), Tb = T + b * T_step;
        long ko = b * k_bs + kv * k_hs, vo = b * v_bs + kv * v_hs;
        const float *qv = q + b * q_bs + h * q_hs;
        const unsigned char *ok = valid ? valid + b * valid_ld : NULL;
        float *s = scratch + bh * KEYS, *o = out + bh * D;
        if (kv_type == BF16) {
            const uint16_t *kh = (const uint16_t *)k + ko, *vh = (const uint16_t *)v + vo;
            if (D == 64) attend_head_bf16_64(qv, kh, k_ts, vh, v_ts, ok, s, o, Tb, scale);
            else if (D == 32) attend_head_bf16_32(qv, kh, k_ts, vh, v_ts, ok, s, o, Tb, scale);
            else if (D == 16) attend_head_bf16_16(qv, kh, k_ts, vh, v_ts, ok, s, o, Tb, scale);
            else attend_head_bf16(qv, kh, k_ts, vh, v_ts, ok, s, o, Tb, D, scale);
        } else {
            const float *kf = (const float *)k + ko, *vf = (const float *)v + vo;
            if (D == 64) attend_head_f32_64(qv, kf, k_ts, vf, v_ts, ok, s, o, Tb, scale);
            else if (D == 32) attend_head_f32_32(qv, kf, k_ts, vf, v_ts, ok, s, o, Tb, scale);
            else if (D == 16) attend_head_f32_16(qv, kf, k_ts, vf, v_ts, ok, s, o, Tb, scale);
            else attend_head_f32(qv, kf, k_ts, vf, v_ts, ok, s, o, Tb, D, scale);
        }
    }
}

void attend_one(const float *q, long q_bs, long q_hs, const void *k, long k_bs, long k_hs, long k_ts,
                const void *v, long v_bs, long v_hs, long v_ts, int kv_type, const unsigned char *valid,
                long valid_ld, float *out, float *scratch, long B, long H, long Hkv, long T, long D,
                float scale, int nt) {
    attend_rows(q, q_bs, q_hs, k, k_bs, k_hs, k_ts, v, v_bs, v_hs, v_ts, kv_type, valid, valid_ld, out, scratch, B,
                H, Hkv, T, 0, D, scale, nt);
}

/* The attention of one head for R consecutive tokens of one sequence, token r seeing the first T + r
 * slots: the R queries share each key and value read. Scores for 16 keys at a time are one vector,
 * the keys as lanes (the block transposed once into kt, D x 16, for all R queries); then each row's
 * softmax over its scores (s: R x ld); then the values weighted for 4 rows at a time, in registers.
 * attend_rows, one (row, head) at a time, sums each key's products horizontally and reads the keys
 * and values R times. 8 heads of 64, 2 threads, 16 tokens: 61 -> 34 us at 140 keys, 331 -> 160 at
 * 740; 4 tokens: 18 -> 16 and 96 -> 83; 2 tokens: 11 -> 21 (hence 4 and more only). Slots that `ok`
 * marks 0 are skipped; at least one must be real. */
#define ATTEND_SEQ_HEAD(NAME, T_, LOAD)                                                                  \
    static void NAME(const float *q, long q_ld, const T_ *kb, long k_ts, const T_ *vb, long v_ts,        \
                     const unsigned char *ok, float *restrict s, long ld, float *restrict kt,            \
                     float *out, long o_ld, long R, long T, long D, float scale) {                        \
        long Tmax = T + R - 1;                                                                           \
        for (long t0 = 0; t0 < Tmax; t0 += 16) {                                                         \
            long n = Tmax - t0 < 16 ? Tmax - t0 : 16;                                                    \
            for (long j = 0; j < 16; j++)                                                                \
                for (long d = 0; d < D; d++) kt[d * 16 + j] = j < n ? LOAD(kb[(t0 + j) * k_ts + d]) : 0.0f; \
            for (long r = 0; r < R; r++) {                                                               \
                if (t0 >= T + r) continue; /* a block past this row's own slot */                        \
                const float *restrict qr = q + r * q_ld;                                                 \
                v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                              \
                long d = 0;                                                                              \
                for (; d + 4 <= D; d += 4) {                                                             \
                    a0 += *(const v16 *)(kt + d * 16) * qr[d];                                           \
                    a1 += *(const v16 *)(kt + (d + 1) * 16) * qr[d + 1];                                 \
                    a2 += *(const v16 *)(kt + (d + 2) * 16) * qr[d + 2];                                 \
                    a3 += *(const v16 *)(kt + (d + 3) * 16) * qr[d + 3];                                 \
                }                                                                                        \
                for (; d < D; d++) a0 += *(const v16 *)(kt + d * 16) * qr[d];                            \
                v16 acc = ((a0 + a1) + (a2 + a3)) * scale;                                               \
                memcpy(s + r * ld + t0, &acc, sizeof acc);                                               \
            }                                                                                            \
        }                                                                                                \
        for (long r = 0; r < R; r++) { /* branch-free loops, so that expf is a vector call */            \
            float *restrict sr = s + r * ld, m, sum = 0.0f;                                             \
            long Tr = T + r;                                                                             \
            if (ok)                                                                                      \
                for (long t = 0; t < Tr; t++) sr[t] = ok[t] ? sr[t] : MASKED;                            \
            m = sr[0];                                                                                   \
            for (long t = 1; t < Tr; t++) m = fmaxf(m, sr[t]);                                           \
            for (long t = 0; t < Tr; t++) {                                                              \
                sr[t] = expf(sr[t] - m);                                                                 \
                sum += sr[t];                                                                            \
            }                                                                                            \
            float inv = 1.0f / sum;                                                                      \
            for (long t = 0; t < Tr; t++) sr[t] *= inv;                                                  \
            for (long t = Tr; t < Tmax; t++) sr[t] = 0.0f; /* the slots of later tokens */               \
        }                                                                                                \
        for (long r0 = 0; r0 < R; r0 += 4) {                                                             \
            long G = R - r0 < 4 ? R - r0 : 4, Tg = T + r0 + G - 1;                                       \
            const float *s0 = s + r0 * ld, *s1 = s0 + (G > 1) * ld, *s2 = s0 + (G > 2) * 2 * ld,         \
                        *s3 = s0 + (G > 3) * 3 * ld;                                                     \
            long d0 = 0;                                                                                 \
            for (; d0 + 16 <= D; d0 += 16) {                                                             \
                v16 o0 = {0}, o1 = {0}, o2 = {0}, o3 = {0};                                              \
                for (long t = 0; t < Tg; t++) {                                                          \
                    if (ok && !ok[t]) continue; /* a padding slot's value may hold anything */           \
                    v16 vt;                                                                              \
                    for (int j = 0; j < 16; j++) vt[j] = LOAD(vb[t * v_ts + d0 + j]);                    \
                    o0 += s0[t] * vt, o1 += s1[t] * vt, o2 += s2[t] * vt, o3 += s3[t] * vt;             \
                }                                                                                        \
                v16 o[4] = {o0, o1, o2, o3};                                                             \
                for (long g = 0; g < G; g++) memcpy(out + (r0 + g) * o_ld + d0, &o[g], sizeof(v16));     \
            }                                                                                            \
            for (long g = 0; g < G; g++) /* D not a multiple of 16 */                                   \
                for (long d = d0; d < D; d++) {                                                          \
                    float acc = 0.0f;                                                                    \
                    for (long t = 0; t < Tg; t++)                                                        \
                        if (!ok || ok[t]) acc += s[(r0 + g) * ld + t] * LOAD(vb[t * v_ts + d]);          \
                    out[(r0 + g) * o_ld + d] = acc;                                                      \
                }                                                                                        \
        }                                                                                                \
    }
ATTEND_SEQ_HEAD(attend_seq_head_f32, float, LOAD_F32)
ATTEND_SEQ_HEAD(attend_seq_head_bf16, uint16_t, LOAD_BF16)

/* attend_rows for R consecutive tokens of one sequence (k_hs, v_hs: a kv head's stride;
 * valid: one row or NULL), a head per thread at a time: H work items (measured on 2 cores; with
 * more threads than heads, some would idle). Returns 0 (nothing written) when scratch
 * cannot be allocated. */
static int attend_seq(const float *q, long q_ld, long q_hs, const void *k, long k_hs, long k_ts, const void *v,
                      long v_hs, long v_ts, int kv_type, const unsigned char *valid, float *out, long R, long H,
                      long Hkv, long T, long D, float scale, int nt) {
    long ld = (T + R - 1 + 15) / 16 * 16, per = R * ld + D * 16;
    float *scratch = aligned_alloc(64, ((size_t)nt * per * sizeof(float) + 63) / 64 * 64);
    if (!scratch) return 0;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long h = 0; h < H; h++) {
        float *s = scratch + (size_t)omp_get_thread_num() * per, *kt = s + R * ld;
        long kv = h / (H / Hkv);
        if (kv_type == BF16)
            attend_seq_head_bf16(q + h * q_hs, q_ld, (const uint16_t *)k + kv * k_hs, k_ts,
                                 (const uint16_t *)v + kv * v_hs, v_ts, valid, s, ld, kt, out + h * D, H * D, R, T, D,
                                 scale);
        else
            attend_seq_head_f32(q + h * q_hs, q_ld, (const float *)k + kv * k_hs, k_ts, (const float *)v + kv * v_hs,
                                v_ts, valid, s, ld, kt, out + h * D, H * D, R, T, D, scale);
    }
    free(scratch);
    return 1;
}

/* Writes n floats into a KV cache slot of kv_type elements. */
static void store_kv(void *dst, const float *src, long n, int kv_type) {
    if (kv_type == BF16)
        for (long i = 0; i < n; i++) ((uint16_t *)dst)[i] = f32_bf16(src[i]);
    else
        memcpy(dst, src, n * sizeof(float));
}

/* ------------------------------------------------------------------ MLP block (decode) */

/* out = x + down(silu(gate(n)) * up(n)), n = RMSNorm(x) * norm_w, for R rows of a decode step:
 * the block's norm, three products and SwiGLU as one call. normed (R x D), g and u (R x I) are
 * scratch. */
void mlp_rows(const float *x, const float *norm_w, float eps, const void *Wg, const void *Wu, const void *Wd,
              int wt, float *out, float *normed, float *g, float *u, long R, long D, long I, int nt) {
    rms_norm_fwd(x, D, norm_w, normed, R, D, eps, 1);
    linear_rows(normed, D, Wg, wt, NULL, g, R, I, D, nt);
    linear_rows(normed, D, Wu, wt, NULL, u, R, I, D, nt);
#pragma omp parallel for num_threads(nt) schedule(static) if (R > 1) /* one row: a fork costs more */
    for (long i = 0; i < R * I; i++) g[i] = g[i] * sigmoid(g[i]) * u[i];
    linear_rows(g, I, Wd, wt, NULL, out, R, D, I, nt);
    for (long i = 0; i < R * D; i++) out[i] += x[i];
}

/* ------------------------------------------------------------------ a whole decode step */

/* One layer of a hybrid model for `hybrid_step`; mirrored by `StepLayer` in fused_step.py.
 * Unused pointers are NULL (a bias-free projection, a block without MLP). The weight matrices
 * (w_*) hold w_type elements; every other parameter is fp32. */
typedef struct {
    long kind; /* 0: Mamba-2 mixer, 1: attention */
    long w_type;
    const float *norm_w;
    float norm_eps;
    const void *w_in;
    const float *b_in; /* Mamba: in_proj (n_in x D); attention: q_proj */
    long n_in;         /* Mamba: in_proj's outputs; attention: q, k and v's together */
    const void *w_out;
    const float *b_out; /* out_proj / o_proj (D x n_mix) */
    long n_mix;                 /* d_inner, or heads x head_dim */
    /* Mamba-2 */
    float *conv_state, *ssm;
    const float *conv_wT, *conv_b, *dt_bias, *A_log, *D, *gnorm_w; /* conv taps tap-major (K x conv_dim) */
    long H, P, G, N, K, gnorm_groups;
    float gnorm_eps;
    /* attention: RoPE'd keys and values are written at slot `slot` of the caches (R x Hkv x cap x hd;
     * with seq, at slots slot .. slot + R - 1 of row 0) */
    const void *w_k;
    const float *b_k;
    const void *w_v;
    const float *b_v;
    void *k_cache, *v_cache; /* kv_type elements */
    long heads, kv_heads, head_dim, capacity, kv_type;
    /* MLP (w_gate NULL: none) */
    const float *mlp_norm_w;
    float mlp_eps;
    const void *w_gate, *w_up, *w_down;
    long inter;
} StepLayer;

static long mamba_conv_n(const StepLayer *L) { return (L->K - 1) * (L->n_mix + 2 * L->G * L->N); }

static void rope_rows(float *t, long R, long ld, long heads, long hd, const float *cos, const float *sin) {
    long half = hd / 2;
    for (long r = 0; r < R; r++)
        for (long h = 0; h < heads; h++) {
            float *v = t + r * ld + h * hd;
            const float *c = cos + r * hd, *s = sin + r * hd;
            for (long d = 0; d < half; d++) {
                float a = v[d], b = v[d + half];
                v[d] = a * c[d] - b * s[d];
                v[d + half] = b * c[d + half] + a * s[d + half];
            }
        }
}

/* x (R x D), one token per row, through every layer: the same math as the blocks' module path
 * (pre-norm mixer, residual, pre-norm SwiGLU MLP, residual), in place. One call instead of ~70
 * Python-level calls per step, and no gaps in which the weight stream goes cold. cos/sin (R x hd)
 * rotate the attention layers' queries and keys; `slot` is the cache slot of this token, so the
 * attention reads slot + 1 keys, those that `valid` (R x valid_ld bytes, or NULL) marks real.
 *
 * seq = 1: the R rows are instead R consecutive tokens of the cache's one sequence (a short
 * prefill, or a draft to verify), at slots slot .. slot + R - 1; `valid` then has one row. The products still read each
 * weight once for all R tokens; the Mamba recurrences run token after token, and token r attends
 * to slot + r + 1 keys. trails (n_layers pointers, NULL for attention layers, or NULL) receive
 * what `hybrid_rewind` needs to take tokens back: a Mamba layer's states before the pass (conv
 * window, then SSM state) and its in_proj outputs for the R tokens. One copy of the states per
 * pass: a copy after every token wrote R times as much, ~10% of a pass. Returns 0 (x untouched) when scratch cannot be allocated. */
int hybrid_step(const StepLayer *layers, long n_layers, float *x, long R, long D, const float *cos,
                const float *sin, const unsigned char *valid, long valid_ld, long slot, long seq,
                float *const *trails, int nt) {
    long wide = D, conv = 0, inter = 0, heads = 0, mix = 0;
    for (long i = 0; i < n_layers; i++) {
        const StepLayer *L = &layers[i];
        wide = L->n_in > wide ? L->n_in : wide;
        mix = L->n_mix > mix ? L->n_mix : mix;
        inter = L->inter > inter ? L->inter : inter;
        heads = L->heads > heads ? L->heads : heads;
        long c = L->kind == 0 ? R * (L->n_mix + 2 * L->G * L->N) : 0;
        conv = c > conv ? c : conv;
    }
    long T = slot + 1;
    size_t floats = R * (3 * D + wide + mix + 2 * inter + heads * KEYS) + conv + 64;
    float *buf = aligned_alloc(64, ((floats * sizeof(float) + 63) / 64) * 64);
    if (!buf) return 0;
    float *normed = buf, *delta = normed + R * D, *tmp = delta + R * D, *in = tmp + R * D;
    float *y = in + R * wide, *g = y + R * mix, *u = g + R * inter, *scores = u + R * inter;
    float *scratch = scores + R * heads * KEYS;
    for (long i = 0; i < n_layers; i++) {
        const StepLayer *L = &layers[i];
        rms_norm_fwd(x, D, L->norm_w, normed, R, D, L->norm_eps, 1);
        if (L->kind == 0) {
            linear_rows(normed, D, L->w_in, L->w_type, L->b_in, in, R, L->n_in, D, nt);
            float *ssm_trail = NULL; /* the SSM state is copied there by the recurrence, as it reads it */
            if (seq && trails && trails[i]) {
                long conv_n = mamba_conv_n(L), ssm_n = L->H * L->P * L->N;
                memcpy(trails[i], L->conv_state, conv_n * sizeof(float));
                ssm_trail = trails[i] + conv_n;
                memcpy(trails[i] + conv_n + ssm_n, in, R * L->n_in * sizeof(float));
            }
            if (seq)
                mamba2_seq_taps(in, L->n_in, L->conv_state, L->conv_wT, L->conv_b, L->dt_bias, L->A_log, L->D, L->ssm,
                                L->gnorm_w, y, scratch, R, L->n_mix, L->H, L->P, L->G, L->N, L->K, L->gnorm_groups,
                                L->gnorm_eps, nt, NULL, ssm_trail, 1);
            else
                mamba2_step_taps(in, L->n_in, L->conv_state, L->conv_wT, L->conv_b, L->dt_bias, L->A_log, L->D, L->ssm,
                                 L->gnorm_w, y, scratch, R, L->n_mix, L->H, L->P, L->G, L->N, L->K, L->gnorm_groups,
                                 L->gnorm_eps, nt);
        } else {
            long hd = L->head_dim, q_w = L->heads * hd, kv_w = L->kv_heads * hd, cap = L->capacity;
            float *q = in, *k = q + R * q_w, *v = k + R * kv_w;
            linear_rows(normed, D, L->w_in, L->w_type, L->b_in, q, R, q_w, D, nt);
            linear_rows(normed, D, L->w_k, L->w_type, L->b_k, k, R, kv_w, D, nt);
            linear_rows(normed, D, L->w_v, L->w_type, L->b_v, v, R, kv_w, D, nt);
            if (cos) { /* NULL: no position encoding */
                rope_rows(q, R, q_w, L->heads, hd, cos, sin);
                rope_rows(k, R, kv_w, L->kv_heads, hd, cos, sin);
            }
            size_t elem = L->kv_type == F32 ? sizeof(float) : sizeof(uint16_t);
            for (long r = 0; r < R; r++)
                for (long h = 0; h < L->kv_heads; h++) {
                    long row = seq ? 0 : r, at_slot = seq ? slot + r : slot;
                    size_t at = (((size_t)(row * L->kv_heads + h) * cap + at_slot) * hd) * elem;
                    store_kv((char *)L->k_cache + at, k + r * kv_w + h * hd, hd, L->kv_type);
                    store_kv((char *)L->v_cache + at, v + r * kv_w + h * hd, hd, L->kv_type);
                }
            long kv_bs = L->kv_heads * cap * hd;
            float scale = 1.0f / sqrtf((float)hd);
            /* a pass of 4 tokens or more shares each key among its queries (0: scratch not allocated) */
            int shared = seq && R >= 4 &&
                         attend_seq(q, q_w, hd, L->k_cache, cap * hd, hd, L->v_cache, cap * hd, hd, L->kv_type, valid,
                                    y, R, L->heads, L->kv_heads, slot + 1, hd, scale, nt);
            if (seq && !shared) /* token r: the sequence's keys up to its own slot */
                attend_rows(q, q_w, hd, L->k_cache, 0, cap * hd, hd, L->v_cache, 0, cap * hd, hd, L->kv_type, valid,
                            0, y, scores, R, L->heads, L->kv_heads, slot + 1, 1, hd, scale, nt);
            else if (!seq)
                attend_one(q, q_w, hd, L->k_cache, kv_bs, cap * hd, hd, L->v_cache, kv_bs, cap * hd, hd,
                           L->kv_type, valid, valid_ld, y, scores, R, L->heads, L->kv_heads, T, hd, scale,
                           R * L->heads > 1 ? nt : 1);
        }
        linear_rows(y, L->n_mix, L->w_out, L->w_type, L->b_out, delta, R, D, L->n_mix, nt);
        for (long j = 0; j < R * D; j++) x[j] += delta[j];
        if (L->w_gate) {
            mlp_rows(x, L->mlp_norm_w, L->mlp_eps, L->w_gate, L->w_up, L->w_down, L->w_type, tmp, normed, g, u, R, D,
                     L->inter, nt);
            memcpy(x, tmp, R * D * sizeof(float));
        }
    }
    free(buf);
    return 1;
}

/* x rounded to bf16 precision in place, as a bf16 tensor holds it */
static void round_bf16(float *x, long n) {
    for (long i = 0; i < n; i++) x[i] = bf16_f32(f32_bf16(x[i]));
}

/* `steps` greedy decode steps of R rows (one token each) in one call: each row's token is
 * embedded (a row of `embed`, V x D), goes through every layer (`hybrid_step`), the final RMSNorm
 * and the LM head (`head`, V x D), and the logits' argmax (the first of equal maxima, as torch's)
 * is the row's next token, fed to the next step. The same kernels in the same order as a step at
 * a time from Python, so the same tokens; what is gone is the Python around each step (cache
 * bookkeeping, the rotary inputs, the norm's and the head's calls, the argmax): ~0.5 ms a step
 * here, a quarter of a fast batch-1 step, and the weight stream never waits on it. A bf16 model
 * (wt: embed's and head's element type; norm_w is fp32 either way) rounds to bf16 where its
 * module path holds bf16 tensors: the hidden state after the layers, the normed state, the
 * logits.
 *
 * tokens (R) holds the rows' current tokens; out (steps x R) receives the next ones. cos/sin
 * (steps x R x hd, or NULL) are the rotary inputs of each step's positions; step t writes slot
 * slot + t, whose `valid` entries the caller has set. A row's token in `stop` (n_stop ids) sets
 * its `finished` flag; the call returns early, after the step that finishes the last unfinished
 * row. Returns the steps done: fewer when scratch cannot be allocated after some, -1 when it
 * cannot be before the first (nothing done). */
long hybrid_greedy(const StepLayer *layers, long n_layers, const void *embed, int wt, const float *norm_w,
                   float norm_eps, const void *head, long V, long D, const long *tokens, long R, long steps,
                   const float *cos, const float *sin, long hd, const unsigned char *valid, long valid_ld, long slot,
                   const long *stop, long n_stop, unsigned char *finished, long *out, int nt) {
    float *x = aligned_alloc(64, ((R * (2 * D + V) * sizeof(float) + 63) / 64) * 64);
    if (!x) return -1;
    float *normed = x + R * D, *logits = normed + R * D;
    const long *current = tokens;
    for (long t = 0; t < steps; t++) {
        for (long r = 0; r < R; r++)
            for (long d = 0; d < D; d++)
                x[r * D + d] = wt == F32 ? ((const float *)embed)[current[r] * D + d]
                                         : bf16_f32(((const uint16_t *)embed)[current[r] * D + d]);
        const float *c = cos ? cos + t * R * hd : NULL, *s = sin ? sin + t * R * hd : NULL;
        if (!hybrid_step(layers, n_layers, x, R, D, c, s, valid, valid_ld, slot + t, 0, NULL, nt)) {
            free(x);
            return t ? t : -1;
        }
        if (wt == BF16) round_bf16(x, R * D);
        rms_norm_fwd(x, D, norm_w, normed, R, D, norm_eps, 1);
        if (wt == BF16) round_bf16(normed, R * D);
        linear_rows(normed, D, head, wt, NULL, logits, R, V, D, nt);
        if (wt == BF16) round_bf16(logits, R * V);
        int all_finished = 1;
        for (long r = 0; r < R; r++) {
            const float *l = logits + r * V;
            long best = 0;
            for (long v = 1; v < V; v++) /* NaN counts as the largest, as in torch.argmax */
                if (l[v] > l[best] || (l[v] != l[v] && l[best] == l[best])) best = v;
            out[t * R + r] = best;
            for (long i = 0; i < n_stop; i++)
                if (best == stop[i]) finished[r] = 1;
            all_finished &= finished[r];
        }
        current = out + t * R;
        if (all_finished) {
            free(x);
            return t + 1;
        }
    }
    free(x);
    return steps;
}

/* Takes a `hybrid_step` pass of one sequence (seq = 1) back to its first `keep` tokens: each Mamba
 * layer's states go back to those before the pass and its recurrence runs again over the kept
 * tokens' in_proj outputs, all from its trail (no weight matrix is read). The attention layers'
 * keys and values need nothing: the caller stops counting the dropped slots. Returns 0 (states
 * untouched) when scratch cannot be allocated. */
int hybrid_rewind(const StepLayer *layers, long n_layers, float *const *trails, long keep, int nt) {
    long most = 0;
    for (long i = 0; i < n_layers; i++)
        if (trails[i]) {
            long need = keep * (layers[i].n_mix + (layers[i].n_mix + 2 * layers[i].G * layers[i].N));
            most = need > most ? need : most;
        }
    float *scratch = aligned_alloc(64, ((most * sizeof(float) + 63) / 64 + 1) * 64);
    if (!scratch) return 0;
    for (long i = 0; i < n_layers; i++) {
        const StepLayer *L = &layers[i];
        if (!trails[i]) continue;
        long conv_n = mamba_conv_n(L), ssm_n = L->H * L->P * L->N;
        memcpy(L->conv_state, trails[i], conv_n * sizeof(float));
        const float *in = trails[i] + conv_n + ssm_n;
        /* the states only: from the trail's, no outputs (scratch takes those the row-by-row loop writes) */
        mamba2_seq_taps(in, L->n_in, L->conv_state, L->conv_wT, L->conv_b, L->dt_bias, L->A_log, L->D, L->ssm,
                        L->gnorm_w, scratch, scratch + keep * L->n_mix, keep, L->n_mix, L->H, L->P, L->G, L->N, L->K,
                        L->gnorm_groups, L->gnorm_eps, nt, trails[i] + conv_n, NULL, 0);
    }
    free(scratch);
    return 1;
}
