/* Selective scans over position-major inputs walked in several orders, forward and backward, compiled
 * with scan_kernel.c into one library (see compiled.py).
 *
 * Why: MambaIR's SS2D scans one feature map in four orders (row-major, column-major, both reversed).
 * Fed to the flat kernel, every order is its own (batch, dim, L) copy of the input, of the 4x larger
 * dt projection and of the output, which is flipped and permuted back afterwards: more memory traffic
 * than the scan itself. Here the kernel reads the un-expanded (batch, P, dim) input and the per-position
 * projection (dt_low, B, C of every direction) in place, finds the position of step t of direction k by
 * index arithmetic (or from a permutation: MambaIRv2 scans its tokens once, in a semantically sorted
 * order), expands dt_low to the channels' delta in registers, and adds every direction's output into one
 * (batch, P, dim) result.
 *
 * Vectorised across channels as in scan_kernel.c: one vector holds channels d0 .. d0+W-1 of one
 * direction; position-major storage makes each step's W channels one contiguous load.
 */
#include "scan_common.h"

enum { ORDER_CROSS = 0, ORDER_PERM = 1 };

/* Float32 tensors. u: (batch, P, dim) at u[b * u_batch + p * u_pos + c], channels contiguous. proj: for
 * position p and direction k, dt_low (R values), B (N), C (N) from proj + b * x_batch + p * x_pos + k * x_dir.
 * cadd: NULL or (batch, L, N) added to C at step t (not position: MambaIRv2's prompt), n contiguous.
 * wdt: (K, dim, R); bias: (K, dim) or NULL; A, A2 = A * log2(e): (K * dim, N); D: (K * dim) or NULL.
 * order: ORDER_CROSS (K = 4 over a height x width grid, P = L = height * width, in the order of
 * MambaIR's cross_scan) or ORDER_PERM (K = 1, step t at position perm[b * L + t], a permutation).
 * y: (batch, P, dim) contiguous, the sum over the directions (with D u each).
 * Backward: dy as y; du: (batch, K, P, dim), each direction's part without D; dproj: (batch, P, K, R + 2N);
 * dwdt: (batch, K, dim, R); dbias: (batch, K, dim); dA: (batch, K * dim, N) (the caller sums the batch).
 * Keep in sync with compiled.py. */
typedef struct {
    const float *u, *proj, *cadd, *wdt, *bias, *A2, *A, *D;
    const int64_t *perm;
    float *y;
    int64_t batch, dim, n, r, dirs, length, height, width, order, softplus;
    int64_t u_batch, u_pos, x_batch, x_pos, x_dir, c_batch, c_step;
    const float *dy;
    float *du, *dproj, *dwdt, *dbias, *dA;
} fused_args;

/* One block of channels d0 .. d0+lanes-1 (lanes <= W) of direction k of batch element b. */
typedef struct {
    int64_t b, k, d0, lanes, row; /* row = k * dim + d0: the block's first row of A, D, bias and wdt */
    vi in_block;
    vf bias, D;
    float amin, amax;
    const float *proj, *u; /* the batch element's projection of direction k, and its input */
} fused_block;

INLINE fused_block fused_setup(const int64_t N, const fused_args *s, int64_t b, int64_t k, int64_t d0,
                               int64_t lanes, vf *a2, vf *wdt) {
    const int64_t R = s->r;
    fused_block f = {.b = b, .k = k, .d0 = d0, .lanes = lanes, .row = k * s->dim + d0};
    f.bias = f.D = splat(0.0f);
    f.amin = f.amax = 0.0f;
    for (int64_t w = 0; w < W; w++) {
        f.in_block[w] = w < lanes ? -1 : 0;
        if (w < lanes && s->bias) f.bias[w] = s->bias[f.row + w];
        if (w < lanes && s->D) f.D[w] = s->D[f.row + w];
    }
    for (int64_t n = 0; n < N; n++)
        for (int64_t w = 0; w < W; w++) {
            const float v = w < lanes ? s->A2[(f.row + w) * N + n] : 0.0f;
            a2[n][w] = v;
            f.amin = v < f.amin ? v : f.amin;
            f.amax = v > f.amax ? v : f.amax;
        }
    for (int64_t r = 0; r < R; r++)
        for (int64_t w = 0; w < W; w++) wdt[r][w] = w < lanes ? s->wdt[(f.row + w) * R + r] : 0.0f;
    f.proj = s->proj + b * s->x_batch + k * s->x_dir;
    f.u = s->u + b * s->u_batch + d0;
    return f;
}

/* Positions of steps l0 .. l0+T-1 of direction k. Cross order: the grid is walked by increments (no
 * division per step); a column-major step moves one row down and wraps to the top of the next column. */
INLINE void tile_positions(const fused_args *s, int64_t b, int64_t k, int64_t l0, int64_t T, int64_t *pos) {
    const int64_t L = s->length, H = s->height, Wd = s->width;
    if (s->order == ORDER_PERM) {
        memcpy(pos, s->perm + b * L + l0, T * sizeof *pos);
        return;
    }
    const int reversed = k >= 2, column = k & 1;
    const int64_t i = reversed ? L - 1 - l0 : l0; /* index of the tile's first step in the forward order */
    if (!column) {
        for (int64_t t = 0; t < T; t++) pos[t] = reversed ? i - t : i + t;
        return;
    }
    int64_t h = i % H, w = i / H;
    for (int64_t t = 0; t < T; t++) {
        pos[t] = h * Wd + w;
        if (reversed) {
            if (--h < 0) h = H - 1, w--;
        } else if (++h == H) {
            h = 0, w++;
        }
    }
}

/* W channels at src, of which `lanes` exist (the others read as 0 and are never written). */
INLINE vf load_lanes(const float *src, int64_t lanes) {
    vf v = splat(0.0f);
    if (lanes == W) memcpy(&v, src, sizeof v);
    else
        for (int64_t w = 0; w < lanes; w++) v[w] = src[w];
    return v;
}

INLINE void store_lanes(float *dst, vf v, int64_t lanes, int add) {
    if (lanes == W) {
        if (add) {
            vf o;
            memcpy(&o, dst, sizeof o);
            v += o;
        }
        memcpy(dst, &v, sizeof v);
    } else {
        for (int64_t w = 0; w < lanes; w++) dst[w] = add ? dst[w] + v[w] : v[w];
    }
}

/* Gathers the tile's steps from their positions: dt (delta = wdt . dt_low expanded here, then bias and
 * softplus), x = dt * u, and the B and C rows into Bt, Ct (T, N); if not NULL also u, the dt_low rows
 * (lows (T, R)) and d dt / d delta (slope). Returns whether the unchecked exp may be used. */
INLINE int gather_tile(const int64_t N, const fused_args *s, const fused_block *f, const vf *wdt, const int64_t *pos,
                       int64_t l0, int64_t T, vf *dt, vf *x, float *Bt, float *Ct, vf *us, float *lows, vf *slope) {
    const int64_t R = s->r;
    const float *cadd = s->cadd ? s->cadd + f->b * s->c_batch + l0 * s->c_step : 0;
    vf dlo = splat(__builtin_inff()), dhi = -dlo;
    for (int64_t t = 0; t < T; t++) {
        const float *pr = f->proj + pos[t] * s->x_pos;
        vf delta = splat(0.0f);
        for (int64_t r = 0; r < R; r++) delta += wdt[r] * pr[r];
        const vf d = step_dt(delta, f->bias, s->softplus, f->in_block, slope ? &slope[t] : 0);
        const vf u = load_lanes(f->u + pos[t] * s->u_pos, f->lanes);
        dt[t] = d;
        x[t] = d * u;
        if (us) us[t] = u;
        if (lows) memcpy(lows + t * R, pr, R * sizeof(float));
        memcpy(Bt + t * N, pr + R, N * sizeof(float));
        if (cadd)
            for (int64_t n = 0; n < N; n++) Ct[t * N + n] = pr[R + N + n] + cadd[t * s->c_step + n];
        else
            memcpy(Ct + t * N, pr + R + N, N * sizeof(float));
        dlo = sel(d < dlo, d, dlo);
        dhi = sel(d > dhi, d, dhi);
    }
    return exps_in_range(dlo, dhi, f->amin, f->amax);
}

/* Direction k of one block: its outputs plus D u are stored (first direction) or added into y. */
INLINE void fused_forward_block(const int64_t N, const fused_args *s, int64_t b, int64_t k, int64_t d0,
                                int64_t lanes) {
    const int64_t L = s->length, R = s->r;
    vf h[N], a2[N], wdt[R];
    const fused_block f = fused_setup(N, s, b, k, d0, lanes, a2, wdt);
    for (int64_t n = 0; n < N; n++) h[n] = splat(0.0f);
    vf dt[TILE], x[TILE], us[TILE], y[TILE];
    float Bt[TILE * N], Ct[TILE * N];
    int64_t pos[TILE];
    float *out = s->y + b * L * s->dim + d0;
    for (int64_t l0 = 0; l0 < L; l0 += TILE) {
        const int64_t T = L - l0 < TILE ? L - l0 : TILE;
        tile_positions(s, b, k, l0, T, pos);
        if (gather_tile(N, s, &f, wdt, pos, l0, T, dt, x, Bt, Ct, us, 0, 0))
            scan_tile(N, 0, h, a2, dt, x, Bt, Ct, T, y, 0, 0);
        else
            scan_tile(N, 1, h, a2, dt, x, Bt, Ct, T, y, 0, 0);
        for (int64_t t = 0; t < T; t++) store_lanes(out + pos[t] * s->dim, y[t] + f.D * us[t], lanes, k > 0);
    }
}

/* Backward of direction k of one block, as in scan_kernel.c's backward_block (states recomputed per
 * tile from the saved tile starts, adjoint g[t] = C[t] dy[t] + a[t+1] g[t+1]), and through the dt
 * expansion: d dt_low = wdt^T d delta (summed over the block's lanes into dproj), d wdt = d delta dt_low^T. */
INLINE void fused_backward_block(const int64_t N, const fused_args *s, int64_t b, int64_t k, int64_t d0,
                                 int64_t lanes, vf *starts, vf *as, vf *hs) {
    const int64_t L = s->length, R = s->r, K = s->dirs, tiles = (L + TILE - 1) / TILE, row = (R + 2 * N);
    vf h[N], a2[N], A[N], gs[N], dA[N], wdt[R], dw[R], dbias = splat(0.0f);
    const fused_block f = fused_setup(N, s, b, k, d0, lanes, a2, wdt);
    for (int64_t n = 0; n < N; n++) {
        h[n] = gs[n] = dA[n] = splat(0.0f);
        for (int64_t w = 0; w < W; w++) A[n][w] = w < lanes ? s->A[(f.row + w) * N + n] : 0.0f;
    }
    for (int64_t r = 0; r < R; r++) dw[r] = splat(0.0f);
    vf dt[TILE], x[TILE], us[TILE], slope[TILE], dy[TILE];
    float Bt[TILE * N], Ct[TILE * N], lows[TILE * R];
    int64_t pos[TILE];
    for (int64_t i = 0; i < tiles; i++) {
        const int64_t l0 = i * TILE, T = L - l0 < TILE ? L - l0 : TILE;
        memcpy(starts + i * N, h, N * sizeof(vf));
        tile_positions(s, b, k, l0, T, pos);
        if (gather_tile(N, s, &f, wdt, pos, l0, T, dt, x, Bt, Ct, 0, 0, 0))
            scan_tile(N, 0, h, a2, dt, x, Bt, Ct, T, 0, 0, 0);
        else
            scan_tile(N, 1, h, a2, dt, x, Bt, Ct, T, 0, 0, 0);
    }
    const float *dyb = s->dy + b * L * s->dim + d0;
    float *dub = s->du + (b * K + k) * L * s->dim + d0, *dpb = s->dproj + (b * L * K + k) * row;
    for (int64_t i = tiles - 1; i >= 0; i--) {
        const int64_t l0 = i * TILE, T = L - l0 < TILE ? L - l0 : TILE;
        tile_positions(s, b, k, l0, T, pos);
        memcpy(h, starts + i * N, N * sizeof(vf));
        if (gather_tile(N, s, &f, wdt, pos, l0, T, dt, x, Bt, Ct, us, lows, slope))
            scan_tile(N, 0, h, a2, dt, x, Bt, Ct, T, 0, as, hs);
        else
            scan_tile(N, 1, h, a2, dt, x, Bt, Ct, T, 0, as, hs);
        for (int64_t t = 0; t < T; t++) dy[t] = load_lanes(dyb + pos[t] * s->dim, lanes);
        for (int64_t t = T - 1; t >= 0; t--) {
            const vf d = dt[t], xv = x[t], dyv = dy[t];
            const float *bt = Bt + t * N, *ct = Ct + t * N;
            float *dp = dpb + pos[t] * K * row; /* this position's dt_low, B, C gradients of direction k */
            const vf *hprev = t > 0 ? hs + (t - 1) * N : starts + i * N;
            vf dx = splat(0.0f), ddt = splat(0.0f);
            for (int64_t n = 0; n < N; n++) {
                const vf gn = gs[n] + dyv * ct[n]; /* dL/dh[t] */
                dp[R + N + n] += lane_sum(dyv * hs[t * N + n]);
                dp[R + n] += lane_sum(gn * xv);
                dx += gn * bt[n];
                const vf da = gn * hprev[n] * as[t * N + n]; /* dL/d(dt A) */
                dA[n] += da * d;
                ddt += da * A[n];
                gs[n] = gn * as[t * N + n];
            }
            store_lanes(dub + pos[t] * s->dim, dx * d, lanes, 0);
            const vf dd = (ddt + dx * us[t]) * slope[t]; /* dL/d delta */
            dbias += dd;
            for (int64_t r = 0; r < R; r++) {
                dw[r] += dd * lows[t * R + r];
                dp[r] += lane_sum(dd * wdt[r]);
            }
        }
    }
    for (int64_t w = 0; w < lanes; w++) {
        const int64_t c = f.row + w; /* (direction, channel) row */
        for (int64_t n = 0; n < N; n++) s->dA[(b * K * s->dim + c) * N + n] = dA[n][w];
        for (int64_t r = 0; r < R; r++) s->dwdt[(b * K * s->dim + c) * R + r] = dw[r][w];
        s->dbias[b * K * s->dim + c] = dbias[w];
    }
}

/* Forward work units: blocks of up to W channels of one batch element; each runs every direction in
 * turn, so that the directions' outputs are summed into y in a fixed order without races. */
void mambair_fused_forward(const fused_args *s, int64_t *next, int64_t count) {
    const int64_t per = (s->dim + W - 1) / W;
    FOR_EACH_UNIT(unit, next, count) {
        const int64_t b = unit / per, d0 = unit % per * W, lanes = s->dim - d0 < W ? s->dim - d0 : W;
        for (int64_t k = 0; k < s->dirs; k++) {
            switch (s->n) { /* constant N: the states stay in registers (MambaIR: 16; light SR: 10) */
            case 16: fused_forward_block(16, s, b, k, d0, lanes); break;
            case 10: fused_forward_block(10, s, b, k, d0, lanes); break;
            default: fused_forward_block(s->n, s, b, k, d0, lanes);
            }
        }
    }
}

/* Backward work units: the batch * K (batch element, direction) pairs, so that the blocks adding into the
 * same positions of dproj run one after another (each direction's du has its own slice for the same
 * reason). Returns 0, or -1 when out of memory. */
int mambair_fused_backward(const fused_args *s, int64_t *next, int64_t count) {
    const int64_t N = s->n, L = s->length, K = s->dirs, row = s->r + 2 * N, tiles = (L + TILE - 1) / TILE;
    vf *starts = aligned_alloc(sizeof(vf), tiles * N * sizeof(vf));
    vf *as = aligned_alloc(sizeof(vf), TILE * N * sizeof(vf)), *hs = aligned_alloc(sizeof(vf), TILE * N * sizeof(vf));
    const int ok = starts && as && hs;
    if (ok) {
        FOR_EACH_UNIT(unit, next, count) {
            const int64_t b = unit / K, k = unit % K;
            for (int64_t p = 0; p < L; p++) memset(s->dproj + ((b * L + p) * K + k) * row, 0, row * sizeof(float));
            for (int64_t d0 = 0; d0 < s->dim; d0 += W) {
                const int64_t lanes = s->dim - d0 < W ? s->dim - d0 : W;
                switch (N) {
                case 16: fused_backward_block(16, s, b, k, d0, lanes, starts, as, hs); break;
                case 10: fused_backward_block(10, s, b, k, d0, lanes, starts, as, hs); break;
                default: fused_backward_block(N, s, b, k, d0, lanes, starts, as, hs);
                }
            }
        }
    }
    free(starts);
    free(as);
    free(hs);
    return ok ? 0 : -1;
}
