/* Greedy descent kernel for index/route.py (loaded with ctypes; built by `pip install -e .`).
 *
 * Score of child j of node p for a point x:  off[p][j] + sum_d x[d] * C[p][d][j],
 * accumulated with fmaf in d order from 0.0f. fmaf rounds exactly once on every
 * machine, so a point's path is the same bits whatever the batch, its order, the
 * tile it falls in, or the instruction set (AVX-512, AVX2 or scalar) picked at run
 * time: the Spark job and the router cannot disagree on a near-tie.
 *
 * Speed (bench/router_throughput.py): rows are bucketed by their node (counting
 * sort) so one node's children ([dim, kp] floats, 24 KB at k=16, d=384) stay in L1
 * while TILE rows stream past; TILE independent accumulators hide the FMA latency.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define LANES 16 /* kp, the padded child count, is a multiple of LANES */
#define TILE 8   /* rows per call; a short tile repeats its last row */

/* dots[r][j] = sum_d rows[r][d] * C[d][b + j] for r < TILE, j < LANES, one lane block b.
 * Rows are read in node order, not memory order, so the DRAM latency is hidden by hand:
 * while a tile computes, the rows of the next tile (next[]) are prefetched a cache line
 * per row every 16 dims, spread out so the prefetches never stall the FMAs. */
typedef void (*dots_fn)(const float *const *rows, const float *const *next, int64_t dim, const float *C,
                        int64_t kp, int64_t b, float dots[TILE][LANES]);

#define LINE (64 / (int64_t)sizeof(float))
static inline void prefetch_lines(const float *const *next, int64_t d) {
    for (int r = 0; r < TILE; r++) __builtin_prefetch(next[r] + d);
}

static void dots_scalar(const float *const *rows, const float *const *next, int64_t dim, const float *C,
                        int64_t kp, int64_t b, float dots[TILE][LANES]) {
    (void)next;
    memset(dots, 0, sizeof(float) * TILE * LANES);
    for (int r = 0; r < TILE; r++)
        for (int64_t d = 0; d < dim; d++)
            for (int j = 0; j < LANES; j++) dots[r][j] = fmaf(rows[r][d], C[d * kp + b + j], dots[r][j]);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) static void dots_avx512(const float *const *rows, const float *const *next,
                                                           int64_t dim, const float *C, int64_t kp, int64_t b,
                                                           float dots[TILE][LANES]) {
    __m512 acc[TILE];
    for (int r = 0; r < TILE; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d++) {
        if (d % LINE == 0) prefetch_lines(next, d);
        const __m512 c = _mm512_loadu_ps(C + d * kp + b);
        for (int r = 0; r < TILE; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(rows[r][d]), c, acc[r]);
    }
    for (int r = 0; r < TILE; r++) _mm512_storeu_ps(dots[r], acc[r]);
}

/* 16 ymm registers: 4 rows x 2 halves of accumulators at a time */
__attribute__((target("avx2,fma"))) static void dots_avx2(const float *const *rows, const float *const *next,
                                                          int64_t dim, const float *C, int64_t kp, int64_t b,
                                                          float dots[TILE][LANES]) {
    for (int h = 0; h < TILE; h += 4) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        const float *r0 = rows[h], *r1 = rows[h + 1], *r2 = rows[h + 2], *r3 = rows[h + 3];
        for (int64_t d = 0; d < dim; d++) {
            if (h == 0 && d % LINE == 0) prefetch_lines(next, d);
            const __m256 lo = _mm256_loadu_ps(C + d * kp + b), hi = _mm256_loadu_ps(C + d * kp + b + 8);
            __m256 v = _mm256_set1_ps(r0[d]);
            a0 = _mm256_fmadd_ps(v, lo, a0); a1 = _mm256_fmadd_ps(v, hi, a1);
            v = _mm256_set1_ps(r1[d]);
            a2 = _mm256_fmadd_ps(v, lo, a2); a3 = _mm256_fmadd_ps(v, hi, a3);
            v = _mm256_set1_ps(r2[d]);
            a4 = _mm256_fmadd_ps(v, lo, a4); a5 = _mm256_fmadd_ps(v, hi, a5);
            v = _mm256_set1_ps(r3[d]);
            a6 = _mm256_fmadd_ps(v, lo, a6); a7 = _mm256_fmadd_ps(v, hi, a7);
        }
        _mm256_storeu_ps(dots[h], a0); _mm256_storeu_ps(dots[h] + 8, a1);
        _mm256_storeu_ps(dots[h + 1], a2); _mm256_storeu_ps(dots[h + 1] + 8, a3);
        _mm256_storeu_ps(dots[h + 2], a4); _mm256_storeu_ps(dots[h + 2] + 8, a5);
        _mm256_storeu_ps(dots[h + 3], a6); _mm256_storeu_ps(dots[h + 3] + 8, a7);
    }
}
#endif

/* the instruction sets this CPU can run, best first */
static const struct {
    const char *name;
    dots_fn fn;
} ISAS[] = {
#if defined(__x86_64__) && defined(__GNUC__)
    {"avx512f", dots_avx512},
    {"avx2+fma", dots_avx2},
#endif
    {"scalar", dots_scalar},
};
#define N_ISAS ((int)(sizeof(ISAS) / sizeof(ISAS[0])))

static int supported(int i) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (ISAS[i].fn == dots_avx512) return __builtin_cpu_supports("avx512f");
    if (ISAS[i].fn == dots_avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return ISAS[i].fn == dots_scalar;
}

static int chosen = -1; /* index into ISAS; -1: the best supported one */

static int pick(void) {
    if (chosen < 0)
        for (chosen = 0; !supported(chosen); chosen++) {}
    return chosen;
}

/* the instruction set in use */
const char *hm_isa(void) { return ISAS[pick()].name; }

/* name of compiled-in instruction set i (best first), NULL past the last: route.py lists them from here */
const char *hm_isa_name(int i) { return i >= 0 && i < N_ISAS ? ISAS[i].name : NULL; }

/* use `name` from now on (tests run every path this CPU supports); 0, or -1 when unknown or unsupported */
int hm_set_isa(const char *name) {
    for (int i = 0; i < N_ISAS; i++)
        if (!strcmp(ISAS[i].name, name) && supported(i)) {
            chosen = i;
            return 0;
        }
    return -1;
}

/* out[i] = -0.5f * (sum_d c[i][d]^2 + b[i]) for centroids c [n, dim]: the sum is a chain of fmaf in d
 * order from 0.0f, so the offsets are the same bits on every machine (numpy's reductions pick their
 * own order). */
void hm_offsets(const float *c, const float *b, int64_t n, int64_t dim, float *out) {
    for (int64_t i = 0; i < n; i++) {
        float acc = 0.0f;
        for (int64_t d = 0; d < dim; d++) acc = fmaf(c[i * dim + d], c[i * dim + d], acc);
        out[i] = -0.5f * (acc + b[i]);
    }
}

/* best child (first maximum, as numpy.argmax) of each of the m rows ids[] under one node */
static void best_children(dots_fn dots, const float *x, int64_t dim, const int64_t *ids, int64_t m,
                          const float *C, const float *off, int64_t kp, int32_t *best) {
    float buf[TILE][LANES];
    for (int64_t t = 0; t < m; t += TILE) {
        const int64_t mt = m - t < TILE ? m - t : TILE;
        const float *rows[TILE], *next[TILE];
        for (int r = 0; r < TILE; r++) {
            rows[r] = x + ids[t + (r < mt ? r : mt - 1)] * dim;  /* a short tile repeats its last row */
            next[r] = t + TILE + r < m ? x + ids[t + TILE + r] * dim : rows[r];
        }
        float bestv[TILE];
        for (int64_t b = 0; b < kp; b += LANES) {
            dots(rows, next, dim, C, kp, b, buf);
            for (int r = 0; r < mt; r++)
                for (int j = 0; j < LANES; j++) {
                    const float v = buf[r][j] + off[b + j];
                    if ((b == 0 && j == 0) || v > bestv[r]) {
                        bestv[r] = v;
                        best[t + r] = (int32_t)(b + j);
                    }
                }
        }
    }
}

/* Each level reads every row (1.5 KB at d=384); with one DRAM pass per level, waiting on
 * memory cost more than the FMAs. So levels go in pairs. Rows are bucketed by their node at
 * the pair's first level; a bucket is routed BLOCK rows at a time through both levels while
 * those rows sit in L2, next to the node's k + k^2 children (408 KB at k=16, d=384). Each row
 * then leaves DRAM every other level. */
#define BLOCK 512

/* Route rows x [n, dim] (row-major) from level `first` to level `last` (0 = root).
 * node[n]: in, each row's node at level `first`; out, its node at level `last`.
 * blocks[l] [k^l, dim, kp]: the children of node p of level l at [p]; offs[l] [k^l, kp], padding
 * lanes at -inf. Writes the child index (0..k-1) taken at level l to paths[i * (last - first) + l - first].
 * Returns 0, or -1 when scratch memory cannot be allocated. */
int hm_descend(const float *x, int64_t n, int64_t dim, int64_t k, int64_t kp, int64_t first, int64_t last,
               const float *const *blocks, const float *const *offs, int64_t *node, int32_t *paths) {
    const int64_t levels = last - first;
    int64_t nodes = 1;
    for (int64_t l = 1; l < last; l++) nodes *= k;  /* nodes at the deepest parent level */
    int64_t *order = malloc((size_t)n * sizeof(int64_t));
    int64_t *start = malloc((size_t)(nodes + 1) * sizeof(int64_t));
    int64_t *sub = malloc((size_t)(BLOCK + k + 1) * sizeof(int64_t)), *sub_start = sub + BLOCK;
    int32_t *child = malloc((size_t)BLOCK * 2 * sizeof(int32_t)), *grandchild = child + BLOCK;
    if (!order || !start || !sub || !child) {
        free(order); free(start); free(sub); free(child);
        return -1;
    }
    const dots_fn dots = ISAS[pick()].fn;
    int64_t parents = 1;
    for (int64_t l = 0; l < first; l++) parents *= k;
    for (int64_t l = first; l < last; l += 2, parents *= k * k) {
        /* stable counting sort of rows by their node at level l */
        memset(start, 0, (size_t)(parents + 1) * sizeof(int64_t));
        for (int64_t i = 0; i < n; i++) start[node[i] + 1]++;
        for (int64_t p = 0; p < parents; p++) start[p + 1] += start[p];
        for (int64_t i = 0; i < n; i++) order[start[node[i]]++] = i;
        for (int64_t g = 0; g < n;) {
            const int64_t p = node[order[g]];
            int64_t ge = g;
            while (ge < n && node[order[ge]] == p) ge++;
            for (int64_t bs = g; bs < ge; bs += BLOCK) {
                const int64_t *ids = order + bs;
                const int64_t m = ge - bs < BLOCK ? ge - bs : BLOCK;
                best_children(dots, x, dim, ids, m, blocks[l] + p * dim * kp, offs[l] + p * kp, kp, child);
                for (int64_t r = 0; r < m; r++) {
                    paths[ids[r] * levels + l - first] = child[r];
                    node[ids[r]] = p * k + child[r];
                }
                if (l + 1 == last) continue;
                /* level l+1: the block's rows bucketed by child, each bucket under one node */
                memset(sub_start, 0, (size_t)(k + 1) * sizeof(int64_t));
                for (int64_t r = 0; r < m; r++) sub_start[child[r] + 1]++;
                for (int64_t c = 0; c < k; c++) sub_start[c + 1] += sub_start[c];
                for (int64_t r = 0; r < m; r++) sub[sub_start[child[r]]++] = ids[r];
                for (int64_t c = 0, s0 = 0; c < k; s0 = sub_start[c++]) {
                    const int64_t q = p * k + c, mc = sub_start[c] - s0;
                    if (!mc) continue;
                    best_children(dots, x, dim, sub + s0, mc, blocks[l + 1] + q * dim * kp, offs[l + 1] + q * kp,
                                  kp, grandchild);
                    for (int64_t r = 0; r < mc; r++) {
                        paths[sub[s0 + r] * levels + l + 1 - first] = grandchild[r];
                        node[sub[s0 + r]] = q * k + grandchild[r];
                    }
                }
            }
            g = ge;
        }
    }
    free(order); free(start); free(sub); free(child);
    return 0;
}
