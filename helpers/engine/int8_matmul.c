/* Q8_0 weights times Q8_0 activations, in int8 with AVX512-VNNI.
 * helpers/engine/int8_linear.py compiles this file and calls it.
 *
 * Why: gguf_matmul.c converts every 8-bit quant to fp32 and multiplies in
 * fp32, 8 products per FMA. A prompt's prefill and a batch of decode rows are
 * bound by those multiplies, not by reading the weights. VNNI's VPDPBUSD
 * multiplies 64 pairs of bytes and adds them into 16 int32 sums in one
 * instruction. So the rows are quantized too, per block of 32 inputs, exactly
 * as llama.cpp quantizes activations for its Q8_0 dot product (d = amax / 127,
 * quants rounded to nearest): a block's product is d_w * d_x * (integer sum
 * of 32 quant products), exact in int32, and only the activations' rounding
 * is new error.
 *
 * y[M][N] = x[M][K] . W^T, W[n][k] = d[n][k / 32] * q[n][k], q in -127..127
 *
 * VPDPBUSD multiplies unsigned bytes by signed ones, so the weights are
 * stored offset by 128 (u = q + 128, 1..255) and the rows' quants stay
 * signed: sum(u * xq) = sum(q * xq) + 128 * sum(xq). Each block's integer sum
 * starts from -128 * sum(xq), which makes it exact.
 *
 * Layout (written by helpers/engine/int8_linear.py): the N outputs go in
 * groups of 16, one per int32 lane. For group g and block b, 512 bytes:
 * 8 runs of 4 inputs, each run 16 lanes of 4 offset quants, the 4 bytes
 * VPDPBUSD multiplies with 4 consecutive inputs of a row. The fp16 scales
 * come as 16 per group and block: d16[(g * blocks + b) * 16 + lane].
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { BLOCK = 32, LANES = 16, GROUP_BYTES = BLOCK * LANES, MAX_ROWS = 4, MAX_GROUPS = 4 };

struct operands {
    const int8_t *xq;     /* rows' quants, M x K */
    const float *xd;      /* rows' block scales, M x blocks */
    const int32_t *xbias; /* -128 * each block's sum of quants, M x blocks */
    int K, N;
    const uint8_t *cols;
    const uint16_t *d16;
    float *y;
};

/* Each row's blocks of 32 as quants, a scale and the offset's correction. */
static void quantize_rows(const float *x, long blocks, int8_t *xq, float *xd, int32_t *xbias)
{
    for (long i = 0; i < blocks; i++) {
        const __m512 lo = _mm512_loadu_ps(x + BLOCK * i), hi = _mm512_loadu_ps(x + BLOCK * i + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        const float d = amax / 127.0f, inverse = d != 0.0f ? 1.0f / d : 0.0f;
        const __m512 scale = _mm512_set1_ps(inverse);
        /* Rounded to nearest, ties to even: the default rounding mode. */
        const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, scale));
        const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, scale));
        _mm_storeu_si128((__m128i *)(xq + BLOCK * i), _mm512_cvtsepi32_epi8(qlo));
        _mm_storeu_si128((__m128i *)(xq + BLOCK * i + 16), _mm512_cvtsepi32_epi8(qhi));
        xd[i] = d;
        xbias[i] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    }
}

/* Rows [row, row + MR) by groups [group, group + NG): per block, MR x NG
 * integer sums in registers (each weight vector loaded once for all rows),
 * then scaled into y, which stays in the L1 cache. */
static inline __attribute__((always_inline)) void tile(
    const struct operands *o, int row, int group, int MR, int NG)
{
    const int K = o->K, blocks = K / BLOCK;
    for (int b = 0; b < blocks; b++) {
        __m512i acc[MAX_ROWS][MAX_GROUPS];
        for (int r = 0; r < MR; r++) {
            const __m512i start = _mm512_set1_epi32(o->xbias[(long)(row + r) * blocks + b]);
            for (int g = 0; g < NG; g++) acc[r][g] = start;
        }
        const uint8_t *block = o->cols + ((long)group * blocks + b) * GROUP_BYTES;
        for (int run = 0; run < BLOCK / 4; run++) {
            __m512i w[MAX_GROUPS];
            for (int g = 0; g < NG; g++)
                w[g] = _mm512_loadu_si512(block + (long)g * blocks * GROUP_BYTES + run * 64);
            for (int r = 0; r < MR; r++) {
                int32_t four;
                memcpy(&four, o->xq + (long)(row + r) * K + BLOCK * b + 4 * run, sizeof four);
                const __m512i xr = _mm512_set1_epi32(four);
                for (int g = 0; g < NG; g++) acc[r][g] = _mm512_dpbusd_epi32(acc[r][g], w[g], xr);
            }
        }
        for (int g = 0; g < NG; g++) {
            const long at = LANES * ((long)(group + g) * blocks + b);
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(o->d16 + at)));
            for (int r = 0; r < MR; r++) {
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(o->xd[(long)(row + r) * blocks + b]));
                const __m512 sum = _mm512_cvtepi32_ps(acc[r][g]);
                float *out = o->y + (long)(row + r) * o->N + LANES * (group + g);
                _mm512_storeu_ps(out, b == 0 ? _mm512_mul_ps(sum, scale)
                                             : _mm512_fmadd_ps(sum, scale, _mm512_loadu_ps(out)));
            }
        }
    }
}

/* Tiles of at most 4 rows covering all M, of near-equal sizes, against NG
 * groups: the groups' weights (NG * K bytes) stay in cache from one tile of
 * rows to the next. */
static inline __attribute__((always_inline)) void rows_by_groups(
    const struct operands *o, int M, int group, int NG)
{
    const int count = (M + MAX_ROWS - 1) / MAX_ROWS;
    for (int t = 0, row = 0; t < count; t++) {
        const int rows = M / count + (t < M % count);
        switch (rows) {
        case 4: tile(o, row, group, 4, NG); break;
        case 3: tile(o, row, group, 3, NG); break;
        case 2: tile(o, row, group, 2, NG); break;
        default: tile(o, row, group, 1, NG);
        }
        row += rows;
    }
}

static void four_groups(const struct operands *o, int M, int group) { rows_by_groups(o, M, group, 4); }

static void last_groups(const struct operands *o, int M, int group, int count)
{
    switch (count) {
    case 3: rows_by_groups(o, M, group, 3); break;
    case 2: rows_by_groups(o, M, group, 2); break;
    case 1: rows_by_groups(o, M, group, 1); break;
    }
}

/* The operands come by value so that their address never escapes into the
 * OpenMP region (the compiler would reload them in every loop). */
static void shared_quads(struct operands o, int M, int quads, int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int quad = 0; quad < quads; quad++) four_groups(&o, M, MAX_GROUPS * quad);
}

/* K must be a multiple of 32 and N of 16; `threads` share the groups of
 * outputs (where compiled with OpenMP). Returns -1 when out of memory. */
int q8_0_int8_matmul(const float *x, int M, int K, const uint8_t *cols, const uint16_t *d16,
                     int N, float *y, int threads)
{
    const long blocks = (long)M * (K / BLOCK);
    int8_t *xq = malloc((long)M * K + 1); /* + 1: never malloc(0) */
    float *xd = malloc(sizeof(float) * (blocks + 1));
    int32_t *xbias = malloc(sizeof(int32_t) * (blocks + 1));
    if (xq == NULL || xd == NULL || xbias == NULL) {
        free(xq), free(xd), free(xbias);
        return -1;
    }
    quantize_rows(x, blocks, xq, xd, xbias);
    struct operands o = {xq, xd, xbias, K, N, cols, d16, y};
    const int groups = N / LANES, quads = groups / MAX_GROUPS;
    if (threads > 1)
        shared_quads(o, M, quads, threads);
    else
        for (int quad = 0; quad < quads; quad++) four_groups(&o, M, MAX_GROUPS * quad);
    last_groups(&o, M, MAX_GROUPS * quads, groups % MAX_GROUPS);
    free(xq), free(xd), free(xbias);
    return 0;
}
