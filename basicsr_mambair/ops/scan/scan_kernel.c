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
#include "scan_common.h"

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

/* dt and x = dt * u for the tile's steps (u read from x); slope (if not NULL) = d dt / d delta. Returns
 * whether the unchecked exp may be used for the tile (exps_in_range). */
INLINE int prepare_tile(const scan_args *s, const block_info *k, int64_t l0, int64_t T, vf *dt, vf *x,
                        vf *slope) {
    load_steps(dt, s->delta + k->off, s->length, l0, T, k->lanes);
    load_steps(x, s->u + k->off, s->length, l0, T, k->lanes);
    vf dlo = splat(__builtin_inff()), dhi = -dlo;
    for (int64_t t = 0; t < T; t++) {
        const vf d = step_dt(dt[t], k->bias, s->softplus, k->in_block, slope ? &slope[t] : 0);
        dt[t] = d;
        x[t] = sel(k->in_block, d * x[t], splat(0.0f));
        dlo = sel(d < dlo, d, dlo);
        dhi = sel(d > dhi, d, dhi);
    }
    return exps_in_range(dlo, dhi, k->amin, k->amax);
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
