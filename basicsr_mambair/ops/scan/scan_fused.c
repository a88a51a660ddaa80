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
 * direction; position-major storage makes each step's W channels one contiguous load. Loop order: for
 * each direction, tiles of TILE steps outside and the channel blocks inside (each block's state is kept
 * between tiles), so that a tile's rows of u, y and the projection come from memory once for all blocks
 * and stay in cache while they are used. (One block at a time over all steps, as scan_kernel.c does,
 * reads them from memory once per block and spends about half of its time waiting for them.)
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
 * starts: NULL, or (batch, K, blocks, tiles, N, W) 64-byte aligned: the state of every block at every tile
 * start, written by a forward for its backward, which then needs no pass to recompute them.
 * Backward: dy as y; du: (batch, K, P, dim), each direction's part without D; dproj: (batch, P, K, R + 2N);
 * dwdt: (batch, K, dim, R); dbias: (batch, K, dim); dA: (batch, K * dim, N) (the caller sums the batch).
 * Keep in sync with compiled.py. */
typedef struct {
    const float *u, *proj, *cadd, *wdt, *bias, *A2, *A, *D;
    const int64_t *perm;
    float *y;
    int64_t batch, dim, n, r, dirs, length, height, width, order, softplus;
    int64_t u_batch, u_pos, x_batch, x_pos, x_dir, c_batch, c_step;
    int64_t unit_blocks; /* channel blocks per forward work unit */
    float *starts;
    const float *dy;
    float *du, *dproj, *dwdt, *dbias, *dA;
} fused_args;

/* Constants of one block of channels d0 .. d0+lanes-1 (lanes <= W) of one direction; its vectors (A2,
 * wdt and for the backward A, by n and r) are kept beside it in block_vectors. */
typedef struct {
    int64_t d0, lanes;
    vi in_block; /* lanes that hold channels (the others stay exactly 0) */
    vf bias, D;
    float amin, amax; /* range of A2 over the block */
} chan_block;

INLINE chan_block block_setup(const int64_t N, const fused_args *s, int64_t k, int64_t d0, vf *a2, vf *wdt, vf *A) {
    const int64_t R = s->r, row = k * s->dim + d0, lanes = s->dim - d0 < W ? s->dim - d0 : W;
    chan_block c = {.d0 = d0, .lanes = lanes};
    c.bias = c.D = splat(0.0f);
    c.amin = c.amax = 0.0f;
    for (int64_t w = 0; w < W; w++) {
        c.in_block[w] = w < lanes ? -1 : 0;
        if (w < lanes && s->bias) c.bias[w] = s->bias[row + w];
        if (w < lanes && s->D) c.D[w] = s->D[row + w];
    }
    for (int64_t n = 0; n < N; n++)
        for (int64_t w = 0; w < W; w++) {
            const float v = w < lanes ? s->A2[(row + w) * N + n] : 0.0f;
            a2[n][w] = v;
            c.amin = v < c.amin ? v : c.amin;
            c.amax = v > c.amax ? v : c.amax;
            if (A) A[n][w] = w < lanes ? s->A[(row + w) * N + n] : 0.0f;
        }
    for (int64_t r = 0; r < R; r++)
        for (int64_t w = 0; w < W; w++) wdt[r][w] = w < lanes ? s->wdt[(row + w) * R + r] : 0.0f;
    return c;
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

/* W channels at src, of which `lanes` exist (the others read as 0 and are never written). A full block
 * is one unaligned vector load or store straight from or to a register; building the vector lane by
 * lane (only for a partial block) goes through memory, and a 64-byte reload right after such a store
 * stalls on CPUs that cannot forward it. */
typedef float vf_unaligned __attribute__((vector_size(W * 4), aligned(4), may_alias));

INLINE vf load_lanes(const float *src, int64_t lanes) {
    if (lanes == W) return *(const vf_unaligned *)src;
    float v[W] = {0};
    memcpy(v, src, lanes * sizeof(float));
    return *(const vf_unaligned *)v;
}

INLINE void store_lanes(float *dst, vf v, int64_t lanes, int add) {
    if (lanes == W) {
        if (add) v += *(const vf_unaligned *)dst;
        *(vf_unaligned *)dst = v;
        return;
    }
    for (int64_t w = 0; w < lanes; w++) dst[w] = add ? dst[w] + v[w] : v[w];
}

/* Where the next block pass works: its positions (NULL: there is none), their count and first channel.
 * Each pass prefetches the next one's lines step by step, so that they arrive while it computes: a
 * column-major walk lands on another page every step, which the hardware prefetchers do not follow,
 * and one tile's rows for all blocks at once are more lines than can be in flight. */
typedef struct {
    const int64_t *pos;
    int64_t T, d0;
} pass_ref;

INLINE pass_ref next_pass(int64_t j, int64_t nb, int64_t d0_first, const int64_t *pos, int64_t T,
                          const int64_t *next_pos, int64_t next_T) {
    if (j + 1 < nb) return (pass_ref){pos, T, d0_first + (j + 1) * W};
    return (pass_ref){next_pos, next_T, d0_first};
}

/* Prefetch step t's W channels of the next pass in a position-major array (rows `stride` apart); a
 * block that straddles two lines gets both. */
INLINE void prefetch_step(const pass_ref *p, int64_t t, const float *base, int64_t stride, int write) {
    if (!p->pos || t >= p->T) return;
    const float *at = base + p->pos[t] * stride + p->d0;
    __builtin_prefetch(at, write, 3);
    __builtin_prefetch(at + W - 1, write, 3);
}

/* The tile's projection rows (of one direction; the same for all its blocks): B and C into Bt, Ct
 * (T, N), C plus cadd at the tile's steps, and dt_low into lows (T, R). Prefetches the next tile's rows
 * (positions next_pos, NULL: none) of proj and, if not NULL, of rmw (its gradient, rows rmw_stride apart). */
INLINE void gather_rows(const int64_t N, const fused_args *s, const float *proj, const float *cadd, const int64_t *pos,
                        int64_t T, float *Bt, float *Ct, float *lows, const int64_t *next_pos, int64_t next_T,
                        float *rmw, int64_t rmw_stride) {
    const int64_t R = s->r, bytes = (R + 2 * N) * (int64_t)sizeof(float);
    for (int64_t t = 0; t < T; t++) {
        const float *pr = proj + pos[t] * s->x_pos;
        memcpy(lows + t * R, pr, R * sizeof(float));
        memcpy(Bt + t * N, pr + R, N * sizeof(float));
        if (cadd)
            for (int64_t n = 0; n < N; n++) Ct[t * N + n] = pr[R + N + n] + cadd[t * s->c_step + n];
        else
            memcpy(Ct + t * N, pr + R + N, N * sizeof(float));
        if (next_pos && t < next_T)
            for (int64_t o = 0; o < bytes + 63; o += 64) {
                const int64_t at = o < bytes ? o : bytes - 1;
                __builtin_prefetch((const char *)(proj + next_pos[t] * s->x_pos) + at, 0, 3);
                if (rmw) __builtin_prefetch((const char *)(rmw + next_pos[t] * rmw_stride) + at, 1, 3);
            }
    }
}

/* One block's steps of the tile: delta = wdt . dt_low (expanded here), dt (bias, softplus), x = dt * u;
 * if not NULL also u and slope = d dt / d delta. Prefetches the next pass's u. Returns whether the
 * unchecked exp may be used. */
INLINE int block_tile(const fused_args *s, const chan_block *c, const vf *wdt, const float *u, const int64_t *pos,
                      const float *lows, int64_t T, vf *dt, vf *x, vf *us, vf *slope, const pass_ref *pf) {
    const int64_t R = s->r;
    vf dlo = splat(__builtin_inff()), dhi = -dlo;
    for (int64_t t = 0; t < T; t++) {
        prefetch_step(pf, t, u, s->u_pos, 0);
        vf delta = splat(0.0f);
        for (int64_t r = 0; r < R; r++) delta += wdt[r] * lows[t * R + r];
        const vf d = step_dt(delta, c->bias, s->softplus, c->in_block, slope ? &slope[t] : 0);
        const vf uv = load_lanes(u + pos[t] * s->u_pos + c->d0, c->lanes);
        dt[t] = d;
        x[t] = d * uv;
        if (us) us[t] = uv;
        dlo = sel(d < dlo, d, dlo);
        dhi = sel(d > dhi, d, dhi);
    }
    return exps_in_range(dlo, dhi, c->amin, c->amax);
}

#define TILE_LEN(l0) (L - (l0) < TILE ? L - (l0) : TILE)

/* Forward of blocks j0 .. j1-1 of batch element b, every direction in turn; each direction's output plus
 * D u is stored (first direction) or added into y, so the sum has a fixed order and no races. Per block
 * `per` vectors of scratch in vecs: A2 (N), wdt (R), state (N). */
INLINE void forward_unit(const int64_t N, const fused_args *s, int64_t b, int64_t j0, int64_t j1, chan_block *cb,
                         vf *vecs) {
    const int64_t L = s->length, R = s->r, per = 2 * N + R, nb = j1 - j0;
    const float *u = s->u + b * s->u_batch, *cadd = s->cadd ? s->cadd + b * s->c_batch : 0;
    float *y = s->y + b * L * s->dim;
    vf dt[TILE], x[TILE], us[TILE], yt[TILE];
    float Bt[TILE * N], Ct[TILE * N], lows[TILE * R];
    int64_t pos[TILE], next[TILE];
    const int64_t tiles = (L + TILE - 1) / TILE, blocks = (s->dim + W - 1) / W;
    for (int64_t k = 0; k < s->dirs; k++) {
        const float *proj = s->proj + b * s->x_batch + k * s->x_dir;
        /* this direction's tile starts of block j0: (blocks, tiles, N) vectors from here */
        vf *starts = s->starts ? (vf *)s->starts + ((b * s->dirs + k) * blocks + j0) * tiles * N : 0;
        for (int64_t j = 0; j < nb; j++) {
            vf *v = vecs + j * per;
            cb[j] = block_setup(N, s, k, (j0 + j) * W, v, v + N, 0);
            for (int64_t n = 0; n < N; n++) v[N + R + n] = splat(0.0f);
        }
        tile_positions(s, b, k, 0, TILE_LEN(0), next);
        for (int64_t l0 = 0; l0 < L; l0 += TILE) {
            const int64_t T = TILE_LEN(l0), next_T = l0 + T < L ? TILE_LEN(l0 + T) : 0;
            memcpy(pos, next, T * sizeof *pos);
            if (next_T) tile_positions(s, b, k, l0 + T, next_T, next);
            gather_rows(N, s, proj, cadd ? cadd + l0 * s->c_step : 0, pos, T, Bt, Ct, lows, next_T ? next : 0, next_T,
                        0, 0);
            for (int64_t j = 0; j < nb; j++) {
                vf *a2 = vecs + j * per, *wdt = a2 + N, *h = wdt + R;
                const chan_block *c = &cb[j];
                const pass_ref pf = next_pass(j, nb, j0 * W, pos, T, next_T ? next : 0, next_T);
                if (starts) memcpy(starts + (j * tiles + l0 / TILE) * N, h, N * sizeof(vf));
                if (block_tile(s, c, wdt, u, pos, lows, T, dt, x, us, 0, &pf))
                    scan_tile(N, 0, h, a2, dt, x, Bt, Ct, T, yt, 0, 0);
                else
                    scan_tile(N, 1, h, a2, dt, x, Bt, Ct, T, yt, 0, 0);
                for (int64_t t = 0; t < T; t++) {
                    prefetch_step(&pf, t, y, s->dim, 1);
                    store_lanes(y + pos[t] * s->dim + c->d0, yt[t] + c->D * us[t], c->lanes, k > 0);
                }
            }
        }
    }
}

/* Backward of direction k of batch element b, all channel blocks, as scan_kernel.c's backward_block
 * (states recomputed per tile from the tile starts the forward saved, adjoint g[t] = C[t] dy[t] +
 * a[t+1] g[t+1]) and through the dt expansion: d dt_low = wdt^T d delta (summed over the lanes into dproj),
 * d wdt = d delta dt_low^T. Per block `per` vectors in vecs: A2, A, state, adjoint, dA (N each), wdt,
 * dwdt (R each), dbias. */
INLINE void backward_unit(const int64_t N, const fused_args *s, int64_t b, int64_t k, chan_block *cb, vf *vecs,
                          vf *as, vf *hs) {
    const int64_t L = s->length, R = s->r, K = s->dirs, tiles = (L + TILE - 1) / TILE, row = R + 2 * N;
    const int64_t nb = (s->dim + W - 1) / W, per = 5 * N + 2 * R + 1;
    const float *u = s->u + b * s->u_batch, *cadd = s->cadd ? s->cadd + b * s->c_batch : 0;
    const float *proj = s->proj + b * s->x_batch + k * s->x_dir, *dyb = s->dy + b * L * s->dim;
    const vf *starts = (const vf *)s->starts + (b * K + k) * nb * tiles * N; /* (blocks, tiles, N) */
    float *dub = s->du + (b * K + k) * L * s->dim, *dpb = s->dproj + (b * L * K + k) * row;
    vf dt[TILE], x[TILE], us[TILE], slope[TILE], dy[TILE];
    float Bt[TILE * N], Ct[TILE * N], lows[TILE * R];
    int64_t pos[TILE], next[TILE];
    for (int64_t j = 0; j < nb; j++) {
        vf *v = vecs + j * per;
        cb[j] = block_setup(N, s, k, j * W, v, v + 5 * N, v + N);
        for (int64_t i = 2 * N; i < 5 * N; i++) v[i] = splat(0.0f); /* state, adjoint, dA */
        for (int64_t i = 5 * N + R; i < per; i++) v[i] = splat(0.0f); /* dwdt, dbias */
    }
    for (int64_t p = 0; p < L; p++) memset(dpb + p * K * row, 0, row * sizeof(float));
    /* backward, tiles last to first */
    tile_positions(s, b, k, (tiles - 1) * TILE, TILE_LEN((tiles - 1) * TILE), next);
    for (int64_t i = tiles - 1; i >= 0; i--) {
        const int64_t l0 = i * TILE, T = TILE_LEN(l0), next_T = i > 0 ? TILE : 0; /* the previous tile is full */
        memcpy(pos, next, T * sizeof *pos);
        if (next_T) tile_positions(s, b, k, l0 - TILE, TILE, next);
        gather_rows(N, s, proj, cadd ? cadd + l0 * s->c_step : 0, pos, T, Bt, Ct, lows, next_T ? next : 0, next_T,
                    dpb, K * row);
        for (int64_t j = 0; j < nb; j++) {
            vf *a2 = vecs + j * per, *A = a2 + N, *h = a2 + 2 * N, *gs = a2 + 3 * N, *dA = a2 + 4 * N;
            vf *wdt = a2 + 5 * N, *dw = wdt + R, *dbias = dw + R;
            const chan_block *c = &cb[j];
            const vf *start = starts + (j * tiles + i) * N;
            const pass_ref pf = next_pass(j, nb, 0, pos, T, next_T ? next : 0, next_T);
            memcpy(h, start, N * sizeof(vf));
            if (block_tile(s, c, wdt, u, pos, lows, T, dt, x, us, slope, &pf))
                scan_tile(N, 0, h, a2, dt, x, Bt, Ct, T, 0, as, hs);
            else
                scan_tile(N, 1, h, a2, dt, x, Bt, Ct, T, 0, as, hs);
            for (int64_t t = 0; t < T; t++) {
                prefetch_step(&pf, t, dyb, s->dim, 0);
                prefetch_step(&pf, t, dub, s->dim, 1);
                dy[t] = load_lanes(dyb + pos[t] * s->dim + c->d0, c->lanes);
            }
            for (int64_t t = T - 1; t >= 0; t--) {
                const vf d = dt[t], xv = x[t], dyv = dy[t];
                const float *bt = Bt + t * N, *ct = Ct + t * N;
                float *dp = dpb + pos[t] * K * row; /* this position's dt_low, B, C gradients of direction k */
                const vf *hprev = t > 0 ? hs + (t - 1) * N : start;
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
                store_lanes(dub + pos[t] * s->dim + c->d0, dx * d, c->lanes, 0);
                const vf dd = (ddt + dx * us[t]) * slope[t]; /* dL/d delta */
                *dbias += dd;
                for (int64_t r = 0; r < R; r++) {
                    dw[r] += dd * lows[t * R + r];
                    dp[r] += lane_sum(dd * wdt[r]);
                }
            }
        }
    }
    for (int64_t j = 0; j < nb; j++) {
        const vf *dA = vecs + j * per + 4 * N, *dw = vecs + j * per + 5 * N + R, *dbias = dw + R;
        for (int64_t w = 0; w < cb[j].lanes; w++) {
            const int64_t ch = (b * K + k) * s->dim + cb[j].d0 + w; /* (batch, direction, channel) row */
            for (int64_t n = 0; n < N; n++) s->dA[ch * N + n] = dA[n][w];
            for (int64_t r = 0; r < R; r++) s->dwdt[ch * R + r] = dw[r][w];
            s->dbias[ch] = (*dbias)[w];
        }
    }
}

/* Floats of the tile starts a forward saves for its backward. */
int64_t mambair_fused_starts_size(const fused_args *s) {
    return s->batch * s->dirs * ((s->dim + W - 1) / W) * ((s->length + TILE - 1) / TILE) * s->n * W;
}

/* Forward work units: `unit_blocks` channel blocks of one batch element (a thread's share; the result
 * does not depend on the split). Returns 0, or -1 when out of memory. */
int mambair_fused_forward(const fused_args *s, int64_t *next, int64_t count) {
    const int64_t N = s->n, nb = (s->dim + W - 1) / W, per_batch = (nb + s->unit_blocks - 1) / s->unit_blocks;
    chan_block *cb = aligned_alloc(sizeof(vf), s->unit_blocks * sizeof(chan_block));
    vf *vecs = aligned_alloc(sizeof(vf), s->unit_blocks * (2 * N + s->r) * sizeof(vf));
    const int ok = cb && vecs;
    if (ok) {
        FOR_EACH_UNIT(unit, next, count) {
            const int64_t b = unit / per_batch, j0 = unit % per_batch * s->unit_blocks;
            const int64_t j1 = j0 + s->unit_blocks < nb ? j0 + s->unit_blocks : nb;
            switch (N) { /* constant N: the states stay in registers (MambaIR: 16; light SR: 10) */
            case 16: forward_unit(16, s, b, j0, j1, cb, vecs); break;
            case 10: forward_unit(10, s, b, j0, j1, cb, vecs); break;
            default: forward_unit(N, s, b, j0, j1, cb, vecs);
            }
        }
    }
    free(cb);
    free(vecs);
    return ok ? 0 : -1;
}

/* Backward work units: the batch * K (batch element, direction) pairs, so that the blocks adding into the
 * same positions of dproj run one after another (each direction's du has its own slice for the same
 * reason). Needs the tile starts of a forward with the same inputs. Returns 0, or -1 when out of memory. */
int mambair_fused_backward(const fused_args *s, int64_t *next, int64_t count) {
    const int64_t N = s->n, R = s->r, nb = (s->dim + W - 1) / W;
    chan_block *cb = aligned_alloc(sizeof(vf), nb * sizeof(chan_block));
    vf *vecs = aligned_alloc(sizeof(vf), nb * (5 * N + 2 * R + 1) * sizeof(vf));
    vf *as = aligned_alloc(sizeof(vf), TILE * N * sizeof(vf)), *hs = aligned_alloc(sizeof(vf), TILE * N * sizeof(vf));
    const int ok = cb && vecs && as && hs;
    if (ok) {
        FOR_EACH_UNIT(unit, next, count) {
            const int64_t b = unit / s->dirs, k = unit % s->dirs;
            switch (N) {
            case 16: backward_unit(16, s, b, k, cb, vecs, as, hs); break;
            case 10: backward_unit(10, s, b, k, cb, vecs, as, hs); break;
            default: backward_unit(N, s, b, k, cb, vecs, as, hs);
            }
        }
    }
    free(cb);
    free(vecs);
    free(as);
    free(hs);
    return ok ? 0 : -1;
}
