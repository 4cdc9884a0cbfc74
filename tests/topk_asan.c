/* The C top-k (pipeline/stage_one/topk.c) against qsort on random shapes and rows: V 1 .. 70,000, k 1 .. V,
   all-equal rows, few distinct values (ties across the k-th), +-inf, NaN rows (k distinct ids in range).
   Built by tests/test_losses.py with AddressSanitizer and UBSan, so an out-of-bounds read or write fails it;
   rows without NaN and with 2k groups or more must not fall back to the whole-row path. */
#include GOOSE_TOPK_SOURCE
#include <stdio.h>
#define TRIALS 1000
static unsigned st = 12345;
static unsigned rnd(void) { st = st * 1664525u + 1013904223u; return st >> 8; }
static int cmp_desc(const void *a, const void *b) { const entry *x = a, *y = b; return by_value_then_id(x, y); }
int main(void) {
  for (int trial = 0; trial < TRIALS; trial++) {
    int64_t V = 1 + rnd() % (trial < TRIALS * 3 / 4 ? 3000 : 70000);
    int64_t k = 1 + rnd() % (V < 200 ? V : 200);
    if (trial % 7 == 0) k = V;
    int64_t rows = 1 + rnd() % 3;
    int mode = rnd() % 7;
    float *z = malloc(sizeof(float) * rows * V);
    for (int64_t i = 0; i < rows * V; i++) {
      float u = (rnd() % 100000) / 1000.0f;
      z[i] = mode == 0 ? -80.0f : mode == 1 ? (float)(rnd() % 5) : mode == 2 ? -u : mode == 3 ? (rnd() % 3 == 0 ? -INFINITY : -u) : -u * 0.001f;
      if (mode == 5 && rnd() % 50 == 0) z[i] = INFINITY;
      if (mode == 6) z[i] = rnd() % 3 == 0 ? NAN : -u;
    }
    float *vals = malloc(sizeof(float) * rows * k); int64_t *ids = malloc(8 * rows * k);
    const int whole = goose_topk_rows(z, rows, V, V, k, vals, ids);
    const int64_t groups = V / GROUP + V % GROUP;
    /* rows without NaN and with at least 2k groups must take the grouped path (the whole-row path would
       hide a grouped path that loses candidates) */
    if (whole < 0 || (mode != 6 && V >= GROUP && groups >= 2 * k && whole != 0)) {
      fprintf(stderr, "trial %d V %ld k %ld mode %d: %d whole-row rows\n", trial, (long)V, (long)k, mode, whole); return 1;
    }
    if (mode == 6) {
      char *seen = calloc(V, 1);
      for (int64_t r = 0; r < rows; r++) { memset(seen, 0, V); for (int64_t i = 0; i < k; i++) { int64_t d = ids[r * k + i]; if (d < 0 || d >= V || seen[d]) { printf("nan row bad ids\n"); return 1; } seen[d] = 1; } }
      free(seen); free(z); free(vals); free(ids); continue;
    }
    entry *e = malloc(sizeof(entry) * V);
    for (int64_t r = 0; r < rows; r++) {
      for (int64_t i = 0; i < V; i++) { e[i].v = z[r * V + i]; e[i].id = i; }
      qsort(e, V, sizeof(entry), cmp_desc);
      for (int64_t i = 0; i < k; i++)
        if (e[i].id != ids[r * k + i] || e[i].v != vals[r * k + i]) { printf("mismatch trial %d V %ld k %ld mode %d i %ld\n", trial, V, k, mode, i); return 1; }
    }
    free(z); free(vals); free(ids); free(e);
  }
  printf("%d trials equal to qsort\n", TRIALS);
  return 0;
}
