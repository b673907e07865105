/* Matrix products straight from GGUF's 4-bit and 8-bit blocks, on one core
 * with AVX2 and FMA. helpers/engine/gguf_linear.py compiles this file and calls it.
 *
 * Why: on CPU a decode step spends its time streaming the linear layers'
 * weights from memory, and fp32 weights take 6.4 times the bytes of the Q4_1
 * blocks the embedded model ships as (32 weights in 20 bytes). These kernels read the blocks and
 * compute in fp32, so the products are those of the fp32 weights transformers
 * de-quantises, up to rounding: a block's quants times x are summed first
 * and its scale applied once to the sum.
 *
 * y[M][N] = x[M][K] . W^T, where W[n][k] for k in block b = k / 32 is
 *   Q4_1: d[n][b] * q[n][k] + m[n][b], q in 0..15
 *   Q8_0: d[n][b] * q[n][k],           q in -128..127
 *
 * Layout (written by helpers/engine/gguf_linear.py): the N outputs go in groups of
 * 8 columns. For group g and position k, `cols` holds the group's 8 quants
 * side by side: Q4_1 as one 32-bit word whose nibble j is column 8g + j,
 * Q8_0 as 8 signed bytes. The fp16 scales d (and offsets m) come as 8 values
 * per group and block: d16[(g * blocks + b) * 8 + j].
 *
 * Each tile of the product keeps rows x column-groups x k-phases
 * accumulators in registers, at least 8 of them, so the FMA units never wait
 * on a previous FMA's result. It sums a block's raw quants first and applies
 * d (and m times the block's sum of x) once per block.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum kind { Q4_1, Q8_0 };

/* From this many rows on, unpacking the quants once into a panel of floats
 * pays for itself (measured in bench/RESULTS.md, "The GGUF kernels after
 * review"). */
enum { PANEL_ROWS = 16 };

/* The quants of one column group at position k, as 8 floats.
 *
 * Q4_1 where AVX512VL is compiled in (the CPU has it): column j's nibble is
 * masked where it lies, not shifted down, and read as an unsigned integer, so
 * lane j holds q * 16^j; one instruction fewer per position, where the
 * products are bound by these instructions. Every sum of such products is
 * then exactly 16^j times the plain one (a power of two commutes with
 * rounding), and Q4_1_LANE_SCALE takes it out again with the block's scale:
 * the result is the same to the bit. Two cases part, neither met by a model's
 * activations: a block's partial sum past 1e30 (16^7 times it overflows), and
 * subnormal partial sums where the thread flushes them to zero. */
#ifdef __AVX512VL__
#define Q4_1_LANE_SCALE _mm256_setr_ps(1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 0x1p-28f)
#endif
static inline __attribute__((always_inline)) __m256 quants(enum kind kind, const uint8_t *col, int k)
{
    if (kind == Q4_1) {
        int32_t packed;
        memcpy(&packed, col + 4 * (long)k, sizeof packed); /* a plain load, alignment aside */
        __m256i word = _mm256_set1_epi32(packed);
#ifdef __AVX512VL__
        const __m256i nibbles = _mm256_setr_epi32(
            0xF, 0xF0, 0xF00, 0xF000, 0xF0000, 0xF00000, 0xF000000, (int)0xF0000000u);
        return _mm256_cvtepu32_ps(_mm256_and_si256(word, nibbles));
#else
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        __m256i q = _mm256_and_si256(_mm256_srlv_epi32(word, shifts), _mm256_set1_epi32(0xF));
        return _mm256_cvtepi32_ps(q);
#endif
    }
    __m128i bytes = _mm_loadl_epi64((const __m128i *)(col + 8 * (long)k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

struct operands {
    const float *x;      /* rows of K inputs */
    const float *x_sums; /* each row's sum of x over each block (Q4_1 only) */
    int K, N;
    const uint8_t *cols;
    long col_bytes; /* one column group's quants */
    const uint16_t *d16, *m16;
    float *y;
};

/* Rows [row, row + MR) by column groups [group, group + NG). The quants come
 * from `panel` where given (already unpacked, NG groups side by side for
 * each k), else from the blocks. */
static inline __attribute__((always_inline)) void tile(
    enum kind kind, const struct operands *o, const float *panel, int row, int group, int MR,
    int NG, int KS)
{
    const int K = o->K, blocks = K / 32;
    const float *x = o->x + (long)row * K;
    const uint8_t *cols = o->cols + group * o->col_bytes;
    const long col_bytes = o->col_bytes;
    for (int b = 0; b < blocks; b++) {
        __m256 acc[4][2][5];
        for (int s = 0; s < KS; s++)
            for (int g = 0; g < NG; g++)
                for (int r = 0; r < MR; r++) acc[s][g][r] = _mm256_setzero_ps();
        for (int kk = 0; kk < 32; kk += KS)
            for (int s = 0; s < KS; s++) {
                const int k = 32 * b + kk + s;
                __m256 q[2];
                for (int g = 0; g < NG; g++)
                    q[g] = panel ? _mm256_load_ps(panel + 8 * ((long)k * NG + g))
                                 : quants(kind, cols + g * col_bytes, k);
                for (int r = 0; r < MR; r++) {
                    __m256 xr = _mm256_broadcast_ss(x + (long)r * K + k);
                    for (int g = 0; g < NG; g++)
                        acc[s][g][r] = _mm256_fmadd_ps(q[g], xr, acc[s][g][r]);
                }
            }
        for (int g = 0; g < NG; g++) {
            const long at = 8 * ((long)(group + g) * blocks + b);
            __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(o->d16 + at)));
#ifdef Q4_1_LANE_SCALE
            if (kind == Q4_1) d = _mm256_mul_ps(d, Q4_1_LANE_SCALE);
#endif
            for (int r = 0; r < MR; r++) {
                __m256 sum = acc[0][g][r];
                for (int s = 1; s < KS; s++) sum = _mm256_add_ps(sum, acc[s][g][r]);
                __m256 part = _mm256_mul_ps(sum, d);
                if (kind == Q4_1) {
                    __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(o->m16 + at)));
                    __m256 x_sum = _mm256_broadcast_ss(o->x_sums + (long)(row + r) * blocks + b);
                    part = _mm256_fmadd_ps(m, x_sum, part);
                }
                float *out = o->y + (long)(row + r) * o->N + 8 * (group + g);
                _mm256_storeu_ps(out, b == 0 ? part : _mm256_add_ps(_mm256_loadu_ps(out), part));
            }
        }
    }
}

/* Tiles of at most 5 rows covering all M, as few as possible, of near-equal
 * sizes, since every tile reads the quants again. */
static inline __attribute__((always_inline)) void tiles(
    enum kind kind, const struct operands *o, const float *panel, int M, int group, int NG)
{
    const int count = (M + 4) / 5;
    for (int t = 0, row = 0; t < count; t++) {
        const int rows = M / count + (t < M % count);
        switch (rows) {
        case 5: tile(kind, o, panel, row, group, 5, NG, 1); break;
        case 4: tile(kind, o, panel, row, group, 4, NG, 1); break;
        case 3: tile(kind, o, panel, row, group, 3, NG, 1); break;
        case 2: tile(kind, o, panel, row, group, 2, NG, 2); break;
        default: tile(kind, o, panel, row, group, 1, NG, 4);
        }
        row += rows;
    }
}

/* All rows against NG column groups. Past a few tiles (a prompt's prefill)
 * the quants are unpacked once into a panel of floats that stays in cache,
 * so the tiles spend their time on FMAs rather than on unpacking. */
static inline __attribute__((always_inline)) void all_rows(
    enum kind kind, const struct operands *o, int M, int group, int NG)
{
    float *panel = M >= PANEL_ROWS ? aligned_alloc(32, sizeof(float) * 8 * NG * o->K) : NULL;
    if (panel == NULL) {
        tiles(kind, o, NULL, M, group, NG);
        return;
    }
    const uint8_t *cols = o->cols + group * o->col_bytes;
    for (int k = 0; k < o->K; k++)
        for (int g = 0; g < NG; g++)
            _mm256_store_ps(panel + 8 * ((long)k * NG + g), quants(kind, cols + g * o->col_bytes, k));
    tiles(kind, o, panel, M, group, NG);
    free(panel);
}

/* all_rows for one kind, so that the kind is a constant inside it. */
typedef void (*rows_of_kind)(const struct operands *o, int M, int group);

static void q4_1_rows(const struct operands *o, int M, int group) { all_rows(Q4_1, o, M, group, 2); }
static void q8_0_rows(const struct operands *o, int M, int group) { all_rows(Q8_0, o, M, group, 2); }

/* The column pairs shared between threads. The operands come by value: had
 * their address escaped into the OpenMP region, the compiler would reload
 * them throughout product()'s one-thread loops, slowing the one-thread path
 * (bench/RESULTS.md, "The GGUF kernels after review"). */
static void shared_pairs(struct operands o, int M, int pairs, int threads, rows_of_kind rows)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int pair = 0; pair < pairs; pair++) rows(&o, M, 2 * pair);
}

/* Inlined into each entry point, so that `kind` is a constant in the loops. */
static inline __attribute__((always_inline)) int product(
    enum kind kind, struct operands *o, int M, int threads)
{
    const int blocks = o->K / 32;
    float *x_sums = NULL;
    if (kind == Q4_1) {
        x_sums = malloc(sizeof(float) * ((long)M * blocks + 1)); /* + 1: never malloc(0) */
        if (x_sums == NULL) return -1;
        for (long i = 0; i < (long)M * blocks; i++) {
            float sum = 0;
            for (int j = 0; j < 32; j++) sum += o->x[32 * i + j];
            x_sums[i] = sum;
        }
        o->x_sums = x_sums;
    }
    const int groups = o->N / 8, pairs = groups / 2;
    if (threads > 1)
        shared_pairs(*o, M, pairs, threads, kind == Q4_1 ? q4_1_rows : q8_0_rows);
    else
        for (int pair = 0; pair < pairs; pair++) all_rows(kind, o, M, 2 * pair, 2);
    if (groups % 2) all_rows(kind, o, M, groups - 1, 1);
    free(x_sums);
    return 0;
}

/* K must be a multiple of 32 and N of 8; `threads` share the column groups
 * (where compiled with OpenMP). Returns -1 when out of memory. */
int q4_1_matmul(const float *x, int M, int K, const uint8_t *cols, const uint16_t *d16,
                const uint16_t *m16, int N, float *y, int threads)
{
    struct operands o = {x, NULL, K, N, cols, 4L * K, d16, m16, y};
    return product(Q4_1, &o, M, threads);
}

int q8_0_matmul(const float *x, int M, int K, const uint8_t *cols, const uint16_t *d16,
                int N, float *y, int threads)
{
    struct operands o = {x, NULL, K, N, cols, 8L * K, d16, NULL, y};
    return product(Q8_0, &o, M, threads);
}
