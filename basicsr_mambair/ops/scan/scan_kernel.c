/* Selective scan on the CPU, forward and backward, compiled on first use by compiled.py (no Python
 * headers, no libraries: loaded with ctypes, so any C compiler that knows GCC vector extensions builds it).
 *
 * Why C: a scan made of PyTorch ops pays one pass over memory per op on (batch, dim, L, N) values; here
 * the state of W channels x N stays in registers and exp is evaluated in-line, so the whole scan costs
 * about what one PyTorch element-wise pass over the (batch, dim, L, N) values costs.
 *
 * Vectorised across channels: one vector holds channels d0 .. d0+W-1 of one group (same B and C), so a
 * step is, for each n, h[n] = 2^(dt * A2[n]) * h[n] + (dt * u) * B[n]; y += h[n] * C[n] with B and C
 * broadcast. Time is cut into tiles of TILE steps whose dt, dt*u and y are transposed into
 * (step, channel) order in a small buffer.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define W 16    /* channels per vector (one AVX-512 register; two AVX2 or four SSE/NEON registers) */
#define TILE 64 /* steps per tile: the tile's dt, x and y buffers (3 x 4 KB) stay in L1 */

typedef float vf __attribute__((vector_size(W * 4), aligned(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4), aligned(W * 4)));

#define INLINE static inline __attribute__((always_inline))

INLINE vf splat(float x) { return (vf){} + x; } /* (-0.0 becomes +0.0: not used for signs) */
INLINE vf sel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* 2^f for |f| <= 0.5: fitted polynomial, relative error 1.9e-9 before float32 rounding (under 1e-7
 * measured in float32) */
INLINE vf exp2_reduced(vf f) {
    vf p = splat(0.00015347296721301973f);
    p = p * f + 0.0013399943709373474f;
    p = p * f + 0.009618483483791351f;
    p = p * f + 0.05550328642129898f;
    p = p * f + 0.24022646248340607f;
    p = p * f + 0.6931471824645996f;
    return p * f + 1.0f;
}

/* Adding 1.5 * 2^23 rounds to an integer kept in the low mantissa bits; with the +127 bias, shifting
 * those bits into the exponent field gives 2^k. */
#define ROUNDER (12582912.0f + 127.0f)

/* 2^p for p in [-125, 127] (no range checks; the caller makes sure) */
INLINE vf exp2_fast(vf p) {
    vf t = p + ROUNDER;
    vf k = t - ROUNDER;
    return exp2_reduced(p - k) * (vf)((vi)t << 23);
}

/* 2^p for any p: 0 below -126 (where float32 would be subnormal), inf from 128 on, NaN stays NaN.
 * 2^k must stay <= 2^127 for the exponent-field trick, so p in (127, 128] is done as 2^(p-1) * 2. */
INLINE vf exp2_any(vf p) {
    const vf lo = splat(-126.0f), hi = splat(127.0f);
    vf q = sel(p < lo, lo, sel(p > splat(128.0f), splat(128.0f), p));
    const vi big = q > hi;
    vf y = exp2_fast(sel(big, q - 1.0f, q)) * sel(big, splat(2.0f), splat(1.0f));
    return sel(p < lo, splat(0.0f), y);
}

/* e^x for x <= 0 (NaN stays NaN; 0 where float32 would be subnormal). Unlike 2^(x * log2(e)), whose
 * rounded exponent costs |x| * 6e-8 of relative accuracy, the reduction x = k ln2 + r is done with ln2
 * in two parts (k * LN2_HI is exact), so the result is good to about an ulp over the whole range. */
INLINE vf exp_nonpositive(vf x) {
    const vf lo = splat(-87.33654f); /* ln(2^-126) */
    vf xc = sel(x < lo, lo, x);
    vf t = xc * 1.4426950408889634f + ROUNDER;
    vf k = t - ROUNDER;
    vf r = (xc - k * 0.693145751953125f) - k * 1.4286068203094173e-06f;
    vf y = exp2_reduced(r * 1.4426950408889634f) * (vf)((vi)t << 23);
    return sel(x < lo, splat(0.0f), y);
}

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)), log1p(y) = 2 atanh(s) with s = y / (2 + y) in [0, 1/3]:
 * the odd series to s^15 is within 1e-9, and there is no 1 + y rounding. Above 20 this rounds to x,
 * like mamba_ssm's threshold. Also returns its slope sigmoid(x) (for the backward pass). */
INLINE vf softplus(vf x, vf *slope) {
    vf y = exp_nonpositive((vf)((vi)x | INT32_MIN)); /* exp(-|x|) */
    vf s = y / (y + 2.0f);
    vf z = s * s;
    vf p = splat(1.0f / 15.0f);
    p = p * z + 1.0f / 13.0f;
    p = p * z + 1.0f / 11.0f;
    p = p * z + 1.0f / 9.0f;
    p = p * z + 1.0f / 7.0f;
    p = p * z + 1.0f / 5.0f;
    p = p * z + 1.0f / 3.0f;
    p = p * z + 1.0f;
    const vi positive = x > splat(0.0f);
    if (slope) *slope = sel(positive, splat(1.0f), y) / (y + 1.0f);
    return sel(positive, x, splat(0.0f)) + (s + s) * p;
}

/* Float32 tensors, contiguous. u, delta, y, dy, du, ddelta: (batch, dim, L); A, A2 = A * log2(e): (dim, N);
 * dA: (batch, dim, N), summed over the batch by the caller; B, C step-major (batch, G or 1, L, N) with the
 * given batch and group strides (group stride 0 when shared); dB, dC: (batch, G, L, N) step-major, for every
 * channel group also where B or C is shared; D, bias: (dim,) or NULL; last, dlast: (batch, dim, N) or NULL.
 * The forward uses the first block of fields, the backward all but D, y and last. Keep in sync with
 * compiled.py. */
typedef struct {
    const float *u, *delta, *A2, *B, *C, *D, *bias;
    float *y, *last;
    int64_t batch, dim, groups, n, length;
    int64_t b_batch, b_group, c_batch, c_group;
    int64_t softplus;
    const float *A, *dy, *dlast;
    float *du, *ddelta, *dA, *dB, *dC;
} scan_args;

/* One block of channels: d0 .. d0+lanes-1 (lanes <= W) of group g of batch element b. */
typedef struct {
    int64_t b, g, d0, lanes, off; /* off: offset of the block's first row in (batch, dim, L) */
    vi in_block;                  /* lanes that hold channels (the others stay exactly 0) */
    vf bias;
    float amin, amax;             /* range of A2 over the block */
    const float *B, *C;           /* the group's B and C */
} block_info;

INLINE block_info block_setup(const int64_t N, const scan_args *s, int64_t b, int64_t g, int64_t d0,
                              int64_t lanes, vf *a2) {
    block_info k = {.b = b, .g = g, .d0 = d0, .lanes = lanes, .off = (b * s->dim + d0) * s->length};
    k.bias = splat(0.0f);
    k.amin = k.amax = 0.0f;
    for (int64_t w = 0; w < W; w++) {
        k.in_block[w] = w < lanes ? -1 : 0;
        if (s->bias && w < lanes) k.bias[w] = s->bias[d0 + w];
    }
    for (int64_t n = 0; n < N; n++)
        for (int64_t w = 0; w < W; w++) {
            const float v = w < lanes ? s->A2[(d0 + w) * N + n] : 0.0f;
            a2[n][w] = v;
            k.amin = v < k.amin ? v : k.amin;
            k.amax = v > k.amax ? v : k.amax;
        }
    k.B = s->B + b * s->b_batch + g * s->b_group;
    k.C = s->C + b * s->c_batch + g * s->c_group;
    return k;
}

/* Copy rows [l0, l0+T) of a (rows, L) block into (step, channel) order. */
INLINE void load_steps(vf *dst, const float *src, int64_t L, int64_t l0, int64_t T, int64_t lanes) {
    for (int64_t w = 0; w < lanes; w++)
        for (int64_t t = 0; t < T; t++) dst[t][w] = src[w * L + l0 + t];
}

INLINE void store_steps(float *dst, const vf *src, int64_t L, int64_t l0, int64_t T, int64_t lanes) {
    for (int64_t w = 0; w < lanes; w++)
        for (int64_t t = 0; t < T; t++) dst[w * L + l0 + t] = src[t][w];
}

/* dt = softplus(delta + bias) (or delta + bias) and x = dt * u for the tile's steps (u read from x);
 * slope (if not NULL) = d dt / d delta. Returns whether every exponent dt * A2 of the tile is inside the
 * range of normal floats, so that the unchecked exp may be used. */
INLINE int prepare_tile(const scan_args *s, const block_info *k, int64_t l0, int64_t T, vf *dt, vf *x,
                        vf *slope) {
    load_steps(dt, s->delta + k->off, s->length, l0, T, k->lanes);
    load_steps(x, s->u + k->off, s->length, l0, T, k->lanes);
    vf dlo = splat(__builtin_inff()), dhi = -dlo;
    for (int64_t t = 0; t < T; t++) {
        vf d = dt[t] + k->bias;
        if (s->softplus) d = softplus(d, slope ? &slope[t] : 0);
        else if (slope) slope[t] = splat(1.0f);
        d = sel(k->in_block, d, splat(0.0f)); /* padding lanes (never loaded) become exactly 0 */
        dt[t] = d;
        x[t] = sel(k->in_block, d * x[t], splat(0.0f));
        dlo = sel(d < dlo, d, dlo);
        dhi = sel(d > dhi, d, dhi);
    }
    float lo = __builtin_inff(), hi = -lo;
    for (int64_t w = 0; w < W; w++) {
        lo = dlo[w] < lo ? dlo[w] : lo;
        hi = dhi[w] > hi ? dhi[w] : hi;
    }
    /* Every exponent dt * A2 lies between these corner products; when all are inside the range of
     * normal floats the exp needs no checks (the usual case: dt >= 0, A <= 0, moderate decays).
     * NaN or inf anywhere fails the test and takes the checked path. */
    const float c1 = lo * k->amin, c2 = lo * k->amax, c3 = hi * k->amin, c4 = hi * k->amax;
    return c1 >= -125.0f && c2 >= -125.0f && c3 >= -125.0f && c4 >= -125.0f &&
           c1 <= 127.0f && c2 <= 127.0f && c3 <= 127.0f && c4 <= 127.0f;
}

/* T steps of one tile from state h; y[t] = C . h (if y), all decays and states kept (if as, hs).
 * N, safe and the NULL-ness of the outputs are constants after inlining. */
INLINE void scan_tile(const int64_t N, const int safe, vf *h, const vf *a2, const vf *dt, const vf *x,
                      const float *B, const float *C, int64_t T, vf *y, vf *as, vf *hs) {
    for (int64_t t = 0; t < T; t++) {
        vf d = dt[t], xv = x[t], acc = splat(0.0f);
        const float *bt = B + t * N, *ct = C + t * N;
        for (int64_t n = 0; n < N; n++) {
            vf p = d * a2[n];
            vf a = safe ? exp2_any(p) : exp2_fast(p);
            h[n] = a * h[n] + xv * bt[n];
            if (y) acc += h[n] * ct[n];
            if (as) as[t * N + n] = a;
            if (hs) hs[t * N + n] = h[n];
        }
        if (y) y[t] = acc;
    }
}

INLINE void forward_block(const int64_t N, const scan_args *s, int64_t b, int64_t g, int64_t d0, int64_t lanes) {
    const int64_t L = s->length;
    vf h[N], a2[N];
    const block_info k = block_setup(N, s, b, g, d0, lanes, a2);
    for (int64_t n = 0; n < N; n++) h[n] = splat(0.0f);
    vf dt[TILE], x[TILE], y[TILE];
    for (int64_t l0 = 0; l0 < L; l0 += TILE) {
        const int64_t T = L - l0 < TILE ? L - l0 : TILE;
        const float *Bt = k.B + l0 * N, *Ct = k.C + l0 * N;
        if (prepare_tile(s, &k, l0, T, dt, x, 0))
            scan_tile(N, 0, h, a2, dt, x, Bt, Ct, T, y, 0, 0);
        else
            scan_tile(N, 1, h, a2, dt, x, Bt, Ct, T, y, 0, 0);
        if (s->D) { /* y + D u, u read again from the input (x holds dt * u) */
            for (int64_t w = 0; w < lanes; w++) {
                const float dw = s->D[d0 + w], *ur = s->u + k.off + w * L + l0;
                for (int64_t t = 0; t < T; t++) y[t][w] += dw * ur[t];
            }
        }
        store_steps(s->y + k.off, y, L, l0, T, lanes);
    }
    if (s->last)
        for (int64_t w = 0; w < lanes; w++)
            for (int64_t n = 0; n < N; n++) s->last[(b * s->dim + d0 + w) * N + n] = h[n][w];
}

/* Sum of the W = 16 lanes, as a tree of half-width additions. */
_Static_assert(W == 16, "lane_sum assumes 16 lanes");
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
INLINE float lane_sum(vf v) {
    vf8 h8[2];
    memcpy(h8, &v, sizeof v);
    vf8 s8 = h8[0] + h8[1];
    vf4 h4[2];
    memcpy(h4, &s8, sizeof s8);
    vf4 s4 = h4[0] + h4[1];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* Backward of one block. The states are recomputed: one forward pass keeps the state at every tile
 * start, then tiles are revisited last to first, each recomputing its decays and states and running
 * the adjoint recurrence g[t] = C[t] dy[t] + a[t+1] g[t+1] (+ dlast at the end) through it. */
INLINE void backward_block(const int64_t N, const scan_args *s, int64_t b, int64_t g, int64_t d0, int64_t lanes,
                           vf *starts, vf *as, vf *hs) {
    const int64_t L = s->length, tiles = (L + TILE - 1) / TILE;
    vf h[N], a2[N], A[N], gs[N], dA[N];
    const block_info k = block_setup(N, s, b, g, d0, lanes, a2);
    for (int64_t n = 0; n < N; n++) {
        h[n] = gs[n] = dA[n] = splat(0.0f);
        for (int64_t w = 0; w < W; w++) A[n][w] = w < lanes ? s->A[(d0 + w) * N + n] : 0.0f;
        if (s->dlast)
            for (int64_t w = 0; w < lanes; w++) gs[n][w] = s->dlast[(b * s->dim + d0 + w) * N + n];
    }
    vf dt[TILE], x[TILE], slope[TILE], dy[TILE], u[TILE], du[TILE], dd[TILE];
    for (int64_t i = 0; i < tiles; i++) {
        const int64_t l0 = i * TILE, T = L - l0 < TILE ? L - l0 : TILE;
        memcpy(starts + i * N, h, N * sizeof(vf));
        if (prepare_tile(s, &k, l0, T, dt, x, 0))
            scan_tile(N, 0, h, a2, dt, x, k.B + l0 * N, k.C + l0 * N, T, 0, 0, 0);
        else
            scan_tile(N, 1, h, a2, dt, x, k.B + l0 * N, k.C + l0 * N, T, 0, 0, 0);
    }
    float *dBg = s->dB + (b * s->groups + g) * L * N, *dCg = s->dC + (b * s->groups + g) * L * N;
    memset(dy, 0, sizeof dy);
    memset(u, 0, sizeof u);
    for (int64_t i = tiles - 1; i >= 0; i--) {
        const int64_t l0 = i * TILE, T = L - l0 < TILE ? L - l0 : TILE;
        const float *Bt = k.B + l0 * N, *Ct = k.C + l0 * N;
        memcpy(h, starts + i * N, N * sizeof(vf));
        if (prepare_tile(s, &k, l0, T, dt, x, slope))
            scan_tile(N, 0, h, a2, dt, x, Bt, Ct, T, 0, as, hs);
        else
            scan_tile(N, 1, h, a2, dt, x, Bt, Ct, T, 0, as, hs);
        load_steps(dy, s->dy + k.off, L, l0, T, lanes);
        load_steps(u, s->u + k.off, L, l0, T, lanes);
        for (int64_t t = T - 1; t >= 0; t--) {
            const vf d = dt[t], xv = x[t], dyv = dy[t];
            const float *bt = Bt + t * N, *ct = Ct + t * N;
            float *dbt = dBg + (l0 + t) * N, *dct = dCg + (l0 + t) * N;
            const vf *hprev = t > 0 ? hs + (t - 1) * N : starts + i * N;
            vf dx = splat(0.0f), ddt = splat(0.0f);
            for (int64_t n = 0; n < N; n++) {
                const vf gn = gs[n] + dyv * ct[n]; /* dL/dh[t] */
                dct[n] += lane_sum(dyv * hs[t * N + n]);
                dbt[n] += lane_sum(gn * xv);
                dx += gn * bt[n];
                const vf da = gn * hprev[n] * as[t * N + n]; /* dL/d(dt A) */
                dA[n] += da * d;
                ddt += da * A[n];
                gs[n] = gn * as[t * N + n];
            }
            du[t] = dx * d;
            dd[t] = (ddt + dx * u[t]) * slope[t];
        }
        store_steps(s->du + k.off, du, L, l0, T, lanes);
        store_steps(s->ddelta + k.off, dd, L, l0, T, lanes);
    }
    for (int64_t w = 0; w < lanes; w++)
        for (int64_t n = 0; n < N; n++) s->dA[(b * s->dim + d0 + w) * N + n] = dA[n][w];
}

/* Work is handed out in units taken from a shared counter (*next, atomically incremented) until
 * `count` are taken: every calling thread runs this same loop, so a thread slowed down (say, by
 * another library's idle threads still spinning on its core) simply takes fewer units. */
#define FOR_EACH_UNIT(unit, next, count) \
    for (int64_t unit; (unit = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED)) < (count);)

/* Number of forward work units: blocks of up to W channels of one group of one batch element. */
int64_t mambair_scan_units(const scan_args *s) {
    return s->batch * s->groups * ((s->dim / s->groups + W - 1) / W);
}

void mambair_scan_forward(const scan_args *s, int64_t *next, int64_t count) {
    const int64_t H = s->dim / s->groups, per = (H + W - 1) / W;
    FOR_EACH_UNIT(unit, next, count) {
        const int64_t blk = unit % per, g = (unit / per) % s->groups, b = unit / per / s->groups;
        const int64_t d0 = g * H + blk * W, lanes = H - blk * W < W ? H - blk * W : W;
        switch (s->n) { /* constant N: the states stay in registers (MambaIR: 16; light SR: 10) */
        case 16: forward_block(16, s, b, g, d0, lanes); break;
        case 10: forward_block(10, s, b, g, d0, lanes); break;
        default: forward_block(s->n, s, b, g, d0, lanes);
        }
    }
}

/* Backward work units: the batch * groups (batch element, group) pairs, so that the blocks adding into
 * the same dB and dC rows run one after another. Returns 0, or -1 when out of memory. */
int mambair_scan_backward(const scan_args *s, int64_t *next, int64_t count) {
    const int64_t H = s->dim / s->groups, N = s->n, tiles = (s->length + TILE - 1) / TILE;
    vf *starts = aligned_alloc(sizeof(vf), tiles * N * sizeof(vf));
    vf *as = aligned_alloc(sizeof(vf), TILE * N * sizeof(vf)), *hs = aligned_alloc(sizeof(vf), TILE * N * sizeof(vf));
    const int ok = starts && as && hs;
    if (ok) {
        FOR_EACH_UNIT(unit, next, count) {
            const int64_t g = unit % s->groups, b = unit / s->groups;
            memset(s->dB + unit * s->length * N, 0, s->length * N * sizeof(float));
            memset(s->dC + unit * s->length * N, 0, s->length * N * sizeof(float));
            for (int64_t d0 = g * H; d0 < (g + 1) * H; d0 += W) {
                const int64_t lanes = (g + 1) * H - d0 < W ? (g + 1) * H - d0 : W;
                switch (N) {
                case 16: backward_block(16, s, b, g, d0, lanes, starts, as, hs); break;
                case 10: backward_block(10, s, b, g, d0, lanes, starts, as, hs); break;
                default: backward_block(N, s, b, g, d0, lanes, starts, as, hs);
                }
            }
        }
    }
    free(starts);
    free(as);
    free(hs);
    return ok ? 0 : -1;
}

/* (rows, N, L) -> (rows, L, N), one row per work unit: B and C in the step-major order the scan reads.
 * The source is read through its element strides (MambaIR's B and C are slices of one projection), and
 * the reordering is done here rather than with PyTorch, whose parallel copy would leave its idle threads
 * spinning on the cores this kernel's threads are about to use. */
void mambair_step_major(const float *src, float *dst, int64_t N, int64_t L, int64_t row_stride, int64_t n_stride,
                        int64_t l_stride, int64_t *next, int64_t count) {
    FOR_EACH_UNIT(row, next, count) {
        const float *in = src + row * row_stride;
        float *out = dst + row * L * N;
        for (int64_t l0 = 0; l0 < L; l0 += TILE)
            for (int64_t n = 0; n < N; n++)
                for (int64_t l = l0; l < l0 + TILE && l < L; l++) out[l * N + n] = in[n * n_stride + l * l_stride];
    }
}
