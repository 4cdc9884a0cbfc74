/* Row-wise top-k of float32 logits for stage one's CPU reductions (pipeline/stage_one/native_topk.py).

   The k largest values of each row, sorted descending, ties in ascending id order; the same values as
   torch.topk. Per row:
     1. the maxima of W = V / 16 strided groups (group j = {j, j + W, ..., j + 15 W}; the V - 16 W ids past
        them are groups of one): one vectorised pass over the row;
     2. a lower bound t on the k-th largest group maximum: cut the maxima into k runs; the smallest run
        maximum is reached by k distinct logits (each run's maximum);
     3. the k-th largest group maximum g_k, by quickselect among the maxima >= t (a few hundred at V = 8192 or
        50257): k groups reach it, so k distinct logits do, and a logit below g_k (in particular every logit
        of a group whose maximum is below it) has k logits above it and is not in the top k;
     4. the candidates: the logits >= g_k of the groups that reach it (about k of them);
     5. the k-th largest candidate by the same quickselect, then the candidates >= it ranked by
        (value desc, id asc).
   Rows too small for the groups (fewer than 2k of them), and NaN rows, take step 5 over the whole row; the
   return value counts those rows, so tests can hold ordinary rows to the grouped path.
   torch.topk sorts (value, id) pairs with a NaN-aware comparator over the whole row (or its group maxima and
   candidates, in `topk_rows`); its branches mispredict on every new row, and it was two thirds of the
   reductions' time at V = 8192.

   NaN logits: the caller rejects such rows afterwards (NonFiniteLogits); here they only have to leave the
   loops bounded and the ids in range, so NaN is taken as -inf wherever a value is compared. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define GROUP 16

static inline float finite_or_low(float x) { return x != x ? -INFINITY : x; }

/* The k-th largest of a[0..n) (1 <= k <= n, no NaN); a and the two scratch arrays (n floats each) are
   overwritten. Quickselect with branch-free three-way partitions (every element is written to both sides and
   counted into one), so the cost does not depend on the branch predictor guessing a new row's values. */
static float kth_largest(float *a, int64_t n, int64_t k, float *b, float *c) {
    float *cur = a, *gt = b, *lt = c;
    while (n > 16) {
        float x0 = cur[0], x1 = cur[n / 2], x2 = cur[n - 1];  /* median of three */
        float lo = x0 < x1 ? x0 : x1, hi = x0 < x1 ? x1 : x0;
        const float pivot = x2 < lo ? lo : (x2 > hi ? hi : x2);
        int64_t ng = 0, nl = 0;
        for (int64_t i = 0; i < n; i++) {
            const float x = cur[i];
            gt[ng] = x; ng += x > pivot;
            lt[nl] = x; nl += x < pivot;
        }
        float *free_buf = cur;
        if (k <= ng) { cur = gt; n = ng; gt = free_buf; }
        else if (k <= n - nl) return pivot;
        else { k -= n - nl; cur = lt; n = nl; lt = free_buf; }
    }
    for (int64_t i = 0; i < n; i++) {  /* few left: the one whose rank brackets k */
        int64_t above = 0, equal = 0;
        for (int64_t j = 0; j < n; j++) { above += cur[j] > cur[i]; equal += cur[j] == cur[i]; }
        if (above < k && k <= above + equal) return cur[i];
    }
    return cur[0];  /* not reached */
}

/* The first k of m (value, id) pairs in (value desc, id asc) order, written to vals/ids. Few pairs (the usual
   m = k) are placed by their rank, a branch-free count; many (ties at the k-th value) by qsort. */
typedef struct { float v; int64_t id; } entry;

static int by_value_then_id(const void *pa, const void *pb) {
    const entry *a = pa, *b = pb;
    if (a->v != b->v) return a->v > b->v ? -1 : 1;
    return (a->id > b->id) - (a->id < b->id);
}

static void emit_sorted(const float *tv, const int64_t *tid, int64_t m, int64_t k, float *vals, int64_t *ids,
                        entry *spill) {
    if (m <= 256) {
        for (int64_t i = 0; i < m; i++) {
            int64_t rank = 0;
            const float vi = tv[i];
            const int64_t ii = tid[i];
            for (int64_t j = 0; j < m; j++)
                rank += (tv[j] > vi) | ((tv[j] == vi) & (tid[j] < ii));
            if (rank < k) { vals[rank] = vi; ids[rank] = ii; }
        }
        return;
    }
    for (int64_t i = 0; i < m; i++) { spill[i].v = tv[i]; spill[i].id = tid[i]; }
    qsort(spill, (size_t)m, sizeof(entry), by_value_then_id);
    for (int64_t i = 0; i < k; i++) { vals[i] = spill[i].v; ids[i] = spill[i].id; }
}

typedef struct {
    float *maxima, *sel, *cand_v, *top_v, *work;
    int64_t *cand_id, *top_id;
    entry *spill;
} scratch;

static int topk_row(const float *restrict z, int64_t V, int64_t k, float *vals, int64_t *ids, const scratch *s) {
    const int64_t W = V / GROUP, rest = V - W * GROUP, groups = W + rest;
    /* restrict: the scratch arrays never overlap each other or z (else the vector loops are not vectorised) */
    float *restrict maxima = s->maxima, *restrict sel = s->sel, *restrict cand_v = s->cand_v;
    int64_t *restrict cand_id = s->cand_id;
    int64_t c = 0;
    if (groups >= 2 * k && W > 0) {
        /* NaN never enters a maximum (NaN > m is false), so the maxima and the bounds below are numbers */
        for (int64_t j = 0; j < W; j++) maxima[j] = -INFINITY;
        for (int64_t i = 0; i < GROUP; i++) {
            const float *zi = z + i * W;
            for (int64_t j = 0; j < W; j++) maxima[j] = zi[j] > maxima[j] ? zi[j] : maxima[j];
        }
        for (int64_t r = 0; r < rest; r++) maxima[W + r] = finite_or_low(z[W * GROUP + r]);
        /* k strided runs of the maxima (run r = maxima r, r + k, r + 2k, ...; one vector maximum per k of them):
           the smallest run maximum bounds the k-th largest maximum from below */
        float *restrict run_max = s->top_v;
        for (int64_t r = 0; r < k; r++) run_max[r] = maxima[r];
        for (int64_t a = k; a + k <= groups; a += k)
            for (int64_t r = 0; r < k; r++) run_max[r] = maxima[a + r] > run_max[r] ? maxima[a + r] : run_max[r];
        for (int64_t a = groups - groups % k, r = 0; a < groups; a++, r++)
            run_max[r] = maxima[a] > run_max[r] ? maxima[a] : run_max[r];
        float bound = INFINITY;
        for (int64_t r = 0; r < k; r++) bound = run_max[r] < bound ? run_max[r] : bound;
        /* the k-th largest group maximum, among the (few hundred) maxima >= the bound: k groups reach it, so
           k distinct logits do, and only the groups that reach it can hold a top-k logit */
        int64_t *restrict group_id = s->top_id, n = 0;
#ifdef __AVX512F__
        const __m512 vbound = _mm512_set1_ps(bound);
        const __m512i step = _mm512_set1_epi32(16);
        __m512i j16 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        int64_t j = 0;
        for (; j + 16 <= groups; j += 16, j16 = _mm512_add_epi32(j16, step)) {
            const __m512 x = _mm512_loadu_ps(maxima + j);
            const __mmask16 keep = _mm512_cmp_ps_mask(x, vbound, _CMP_GE_OQ);
            if (keep) {
                /* compress in registers and store whole vectors (the scratch has 16 spare slots): a masked
                   compress-store to memory is microcoded on AMD Zen 4, ~10x slower */
                _mm512_storeu_ps(sel + n, _mm512_maskz_compress_ps(keep, x));
                const __m512i packed = _mm512_maskz_compress_epi32(keep, j16);
                _mm512_storeu_si512(group_id + n, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(packed)));
                _mm512_storeu_si512(group_id + n + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(packed, 1)));
                n += __builtin_popcount(keep);
            }
        }
#else
        int64_t j = 0;
#endif
        for (; j < groups; j++) {
            sel[n] = maxima[j]; group_id[n] = j;
            n += maxima[j] >= bound;
        }
        float kth_group = kth_largest(sel, n, k, s->work, s->work + V);  /* n >= k: the k run maxima */
        for (int64_t q = 0; q < n; q++) {
            const int64_t g = group_id[q];
            if (!(maxima[g] >= kth_group)) continue;
            if (g >= W) {  /* a remainder id: a group of one */
                cand_v[c] = maxima[g]; cand_id[c] = W * GROUP + (g - W); c++;
                continue;
            }
            for (int64_t i = 0; i < GROUP; i++) {
                const float x = z[g + i * W];
                cand_v[c] = x; cand_id[c] = g + i * W;
                c += x >= kth_group;
            }
        }
    }
    const int whole_row = c < k;
    if (whole_row) { /* small rows, or NaN logits: every id is a candidate */
        for (int64_t i = 0; i < V; i++) { cand_v[i] = finite_or_low(z[i]); cand_id[i] = i; }
        c = V;
    }
    for (int64_t i = 0; i < c; i++) sel[i] = cand_v[i];
    const float kth = kth_largest(sel, c, k, s->work, s->work + V);
    int64_t m = 0;
    for (int64_t i = 0; i < c; i++) {
        const float x = cand_v[i];
        s->top_v[m] = x; s->top_id[m] = cand_id[i];
        m += x >= kth;
    }
    emit_sorted(s->top_v, s->top_id, m, k, vals, ids, s->spill);
    return whole_row;
}

/* rows x V logits (row stride `stride` floats) -> rows x k values and ids. Returns the number of rows that
   took the whole-row path (>= 0), -1 if out of memory (nothing written then), -2 for a k outside 1..V. */
int goose_topk_rows(const float *z, int64_t rows, int64_t V, int64_t stride, int64_t k,
                    float *vals, int64_t *ids) {
    if (k < 1 || k > V) return -2;
    const int64_t n = V + 16;  /* 16 spare slots: whole-vector stores past the last kept element */
    float *f = malloc(sizeof(float) * (size_t)(6 * n));
    int64_t *i64 = malloc(sizeof(int64_t) * (size_t)(2 * n));
    entry *spill = malloc(sizeof(entry) * (size_t)V);
    if (!f || !i64 || !spill) { free(f); free(i64); free(spill); return -1; }
    const scratch s = {f, f + n, f + 2 * n, f + 3 * n, f + 4 * n, i64, i64 + n, spill};
    int whole_rows = 0;
    for (int64_t r = 0; r < rows; r++)
        whole_rows += topk_row(z + r * stride, V, k, vals + r * k, ids + r * k, &s);
    free(f); free(i64); free(spill);
    return whole_rows;
}
