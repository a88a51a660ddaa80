/* Selective scan forward on the CPU, compiled on first use by compiled_scan.py (no Python headers, no
 * libraries: loaded with ctypes, so any C compiler that knows GCC vector extensions builds it).
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
 * like mamba_ssm's threshold. */
INLINE vf softplus(vf x) {
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
    return sel(x > splat(0.0f), x, splat(0.0f)) + (s + s) * p;
}

/* Inputs, all float32 and contiguous. u, delta, y: (batch, dim, L); A2 = A * log2(e): (dim, N);
 * B, C step-major (batch, G or 1, L, N) with the given batch and group strides (group stride 0 when
 * shared); D, bias: (dim,) or NULL; last: (batch, dim, N) or NULL. Keep in sync with compiled_scan.py. */
typedef struct {
    const float *u, *delta, *A2, *B, *C, *D, *bias;
    float *y, *last;
    int64_t batch, dim, groups, n, length;
    int64_t b_batch, b_group, c_batch, c_group;
    int64_t softplus;
} scan_args;

/* T steps of one tile; `safe` selects the range-checked exp (N and safe are constants after inlining) */
INLINE void scan_tile(const int64_t N, const int safe, vf *h, const vf *a, const vf *dt, const vf *x, vf *y,
                      const float *B, const float *C, int64_t T) {
    for (int64_t t = 0; t < T; t++) {
        vf d = dt[t], xv = x[t], acc = splat(0.0f);
        const float *bt = B + t * N, *ct = C + t * N;
        for (int64_t n = 0; n < N; n++) {
            vf p = d * a[n];
            h[n] = (safe ? exp2_any(p) : exp2_fast(p)) * h[n] + xv * bt[n];
            acc += h[n] * ct[n];
        }
        y[t] = acc;
    }
}

/* channels d0 .. d0+lanes-1 (lanes <= W) of group g of batch element b, over all L steps */
INLINE void scan_block(const int64_t N, const scan_args *s, int64_t b, int64_t g, int64_t d0, int64_t lanes) {
    const int64_t L = s->length;
    vf h[N], a[N];
    float amin = 0.0f, amax = 0.0f; /* range of A2 over the block (padding lanes hold 0) */
    for (int64_t n = 0; n < N; n++) {
        for (int64_t w = 0; w < W; w++) {
            float v = w < lanes ? s->A2[(d0 + w) * N + n] : 0.0f;
            a[n][w] = v;
            amin = v < amin ? v : amin;
            amax = v > amax ? v : amax;
        }
        h[n] = splat(0.0f);
    }
    vf bias = splat(0.0f);
    vi in_block;
    for (int64_t w = 0; w < W; w++) {
        in_block[w] = w < lanes ? -1 : 0;
        if (s->bias && w < lanes) bias[w] = s->bias[d0 + w];
    }
    const float *Bg = s->B + b * s->b_batch + g * s->b_group, *Cg = s->C + b * s->c_batch + g * s->c_group;
    const int64_t off = (b * s->dim + d0) * L;
    vf dt[TILE], x[TILE], y[TILE];
    memset(dt, 0, sizeof dt);
    memset(x, 0, sizeof x);
    for (int64_t l0 = 0; l0 < L; l0 += TILE) {
        const int64_t T = L - l0 < TILE ? L - l0 : TILE;
        for (int64_t w = 0; w < lanes; w++) {
            const float *dr = s->delta + off + w * L + l0, *ur = s->u + off + w * L + l0;
            for (int64_t t = 0; t < T; t++) {
                dt[t][w] = dr[t];
                x[t][w] = ur[t];
            }
        }
        vf dlo = splat(__builtin_inff()), dhi = -dlo;
        for (int64_t t = 0; t < T; t++) {
            vf d = dt[t] + bias;
            if (s->softplus) d = softplus(d);
            d = sel(in_block, d, splat(0.0f)); /* padding lanes stay exactly 0 */
            dt[t] = d;
            x[t] = d * x[t];
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
        const float c1 = lo * amin, c2 = lo * amax, c3 = hi * amin, c4 = hi * amax;
        const int fast = c1 >= -125.0f && c2 >= -125.0f && c3 >= -125.0f && c4 >= -125.0f &&
                         c1 <= 127.0f && c2 <= 127.0f && c3 <= 127.0f && c4 <= 127.0f;
        const float *Bt = Bg + l0 * N, *Ct = Cg + l0 * N;
        if (fast)
            scan_tile(N, 0, h, a, dt, x, y, Bt, Ct, T);
        else
            scan_tile(N, 1, h, a, dt, x, y, Bt, Ct, T);
        for (int64_t w = 0; w < lanes; w++) {
            float *yr = s->y + off + w * L + l0;
            const float *ur = s->u + off + w * L + l0;
            if (s->D) {
                const float dw = s->D[d0 + w];
                for (int64_t t = 0; t < T; t++) yr[t] = y[t][w] + dw * ur[t];
            } else {
                for (int64_t t = 0; t < T; t++) yr[t] = y[t][w];
            }
        }
    }
    if (s->last)
        for (int64_t w = 0; w < lanes; w++)
            for (int64_t n = 0; n < N; n++) s->last[(b * s->dim + d0 + w) * N + n] = h[n][w];
}

/* Number of work units: blocks of up to W channels of one group of one batch element. */
int64_t mambair_scan_units(const scan_args *s) {
    return s->batch * s->groups * ((s->dim / s->groups + W - 1) / W);
}

/* Runs work units [begin, end); disjoint ranges may run on different threads at once. */
void mambair_scan_forward(const scan_args *s, int64_t begin, int64_t end) {
    const int64_t H = s->dim / s->groups, per = (H + W - 1) / W;
    for (int64_t unit = begin; unit < end; unit++) {
        const int64_t blk = unit % per, g = (unit / per) % s->groups, b = unit / per / s->groups;
        const int64_t d0 = g * H + blk * W, lanes = H - blk * W < W ? H - blk * W : W;
        switch (s->n) { /* constant N: the states stay in registers (MambaIR: 16; light SR: 10) */
        case 16: scan_block(16, s, b, g, d0, lanes); break;
        case 10: scan_block(10, s, b, g, d0, lanes); break;
        default: scan_block(s->n, s, b, g, d0, lanes);
        }
    }
}
