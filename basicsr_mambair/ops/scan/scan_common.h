/* What both CPU scan kernels share (scan_kernel.c: (batch, dim, L) layout; scan_fused.c: position-major
 * inputs walked in several orders): the vector type, exp and softplus, one tile of the recurrence,
 * the lane sum and the work-unit loop. Everything is static inline: each kernel file gets its own copy. */
#ifndef MAMBAIR_SCAN_COMMON_H
#define MAMBAIR_SCAN_COMMON_H

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

/* 2^f for |f| <= 0.5 one degree lower, for the scan's decays exp(dt * A) only: relative error 9.5e-8 before
 * float32 rounding, 1.8e-7 (3 ulp) measured in float32, well inside what the float32 recurrence itself loses;
 * one FMA fewer in the innermost step (measured: the scan is bound by its vector arithmetic). */
INLINE vf exp2_decay(vf f) {
    vf p = splat(0.0013276708814920738f);
    p = p * f + 0.009671509024757366f;
    p = p * f + 0.05550692512404636f;
    p = p * f + 0.24022242172694183f;
    p = p * f + 0.6931470088685675f;
    return p * f + 1.0f;
}

/* Adding 1.5 * 2^23 rounds to an integer kept in the low mantissa bits; with the +127 bias, shifting
 * those bits into the exponent field gives 2^k. */
#define ROUNDER (12582912.0f + 127.0f)

/* 2^p for p in [-125, 127] (no range checks; the caller makes sure) */
#if defined(__AVX512F__) && W == 16
#include <immintrin.h>
/* The same values (k = p rounded to nearest, 2^f scaled exactly by 2^k) in two instructions fewer:
 * this is the innermost operation of every scan step, so on AVX-512 it is worth its own version. */
INLINE vf exp2_fast(vf p) {
    const __m512 k = _mm512_roundscale_ps((__m512)p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return (vf)_mm512_scalef_ps((__m512)exp2_decay(p - (vf)k), k);
}
#else
INLINE vf exp2_fast(vf p) {
    vf t = p + ROUNDER;
    vf k = t - ROUNDER;
    return exp2_decay(p - k) * (vf)((vi)t << 23);
}
#endif

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

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)), log1p(y) = y P(y) for y in [0, 1] with a fitted degree-9 P
 * (relative error 4.7e-9 before float32 rounding, 1.6e-7 measured in float32; no division: this runs once
 * per step and channel, and a division there cost as much as a fifth of a scan). Above 20 this rounds to x,
 * like mamba_ssm's threshold. Also returns its slope sigmoid(x) (for the backward pass). */
INLINE vf softplus(vf x, vf *slope) {
    vf y = exp_nonpositive((vf)((vi)x | INT32_MIN)); /* exp(-|x|) */
    vf p = splat(-0.0032479262445122004f);
    p = p * y + 0.01986919343471527f;
    p = p * y - 0.056993160396814346f;
    p = p * y + 0.10607100278139114f;
    p = p * y - 0.15307654440402985f;
    p = p * y + 0.196766659617424f;
    p = p * y - 0.24954278767108917f;
    p = p * y + 0.33329975605010986f;
    p = p * y - 0.4999990165233612f;
    p = p * y + 1.0f;
    const vi positive = x > splat(0.0f);
    if (slope) *slope = sel(positive, splat(1.0f), y) / (y + 1.0f);
    return sel(positive, x, splat(0.0f)) + y * p;
}

/* The step dt = softplus(delta + bias) (or delta + bias), exactly 0 in the lanes outside `in_block`
 * (padding lanes, never loaded, must not make NaN); slope (if not NULL) = d dt / d delta. */
INLINE vf step_dt(vf delta, vf bias, int use_softplus, vi in_block, vf *slope) {
    vf d = delta + bias;
    if (use_softplus) d = softplus(d, slope);
    else if (slope) *slope = splat(1.0f);
    return sel(in_block, d, splat(0.0f));
}

/* Whether every exponent dt * A2 of a tile is inside the range of normal floats, given the lane-wise
 * minimum and maximum of its dt and the range of A2: then the unchecked exp may be used. Every exponent
 * lies between the four corner products; when all are inside (the usual case: dt >= 0, A <= 0, moderate
 * decays) the exp needs no checks. NaN or inf anywhere fails the test and takes the checked path. */
INLINE int exps_in_range(vf dlo, vf dhi, float amin, float amax) {
    float lo = __builtin_inff(), hi = -lo;
    for (int64_t w = 0; w < W; w++) {
        lo = dlo[w] < lo ? dlo[w] : lo;
        hi = dhi[w] > hi ? dhi[w] : hi;
    }
    const float c1 = lo * amin, c2 = lo * amax, c3 = hi * amin, c4 = hi * amax;
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

/* Work is handed out in units taken from a shared counter (*next, atomically incremented) until
 * `count` are taken: every calling thread runs this same loop, so a thread slowed down (say, by
 * another library's idle threads still spinning on its core) simply takes fewer units. */
#define FOR_EACH_UNIT(unit, next, count) \
    for (int64_t unit; (unit = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED)) < (count);)

#endif
