/* The ternary path's matmuls: out[m] = sum over the inputs i with x[m, i] != 0 of x[m, i] * W[i, :].
 *
 * W is stored input-major (row i holds input i's weight to every output), so an input that did not fire
 * (a spike code of 0) costs nothing: its row is never read. The work per fired input is one row of
 * additions of +-x (ternary weights) or of x * w (fp weights): the column additions the spikes exist for.
 *
 *   goose_ternary_rows: 2-bit codes, 4 to a byte: 00 = 0, 01 = +1, 10 = -1 (11 unused). A row of R = row_bytes
 *                       bytes covers 4R outputs (zero-padded): bits 2k and 2k+1 of byte q hold output
 *                       k * R + q, so unpacking is four contiguous passes of shifts and masks, vectorised.
 *   goose_int8_rows:    int8 codes in {-1, 0, +1}, a row of n_out bytes.
 *   goose_fp32_rows:    fp32 weights, a row of n_out floats (the fp head of a spiked, tied embedding).
 *
 * out has M rows of out_stride floats; the first n_out (4 * row_bytes for 2-bit codes) are written. Each
 * returns the number of fired inputs over the M rows (the rows of W read), or -1 on bad arguments.
 */
#include <stdint.h>
#include <string.h>

int64_t goose_ternary_rows(const float *x, int64_t M, int64_t n_in, int64_t x_stride, const uint8_t *packed,
                           int64_t row_bytes, float *out, int64_t out_stride) {
    if (M < 0 || n_in < 0 || row_bytes < 0 || out_stride < 4 * row_bytes) return -1;
    const int64_t R = row_bytes;
    int64_t fired = 0;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * x_stride;
        float *restrict o = out + m * out_stride;
        memset(o, 0, sizeof(float) * 4 * R);
        for (int64_t i = 0; i < n_in; i++) {
            const float v = xm[i];
            if (v == 0.0f) continue;
            fired++;
            const uint8_t *restrict p = packed + i * R;
            /* bits 2k, 2k+1 of byte q are output k * R + q: each pass is contiguous, so it vectorises */
            for (int k = 0; k < 4; k++) {
                float *restrict ok = o + k * R;
                for (int64_t q = 0; q < R; q++) {
                    const int b = p[q] >> (2 * k);
                    ok[q] += v * (float)((b & 1) - ((b >> 1) & 1));
                }
            }
        }
    }
    return fired;
}

int64_t goose_int8_rows(const float *x, int64_t M, int64_t n_in, int64_t x_stride, const int8_t *codes,
                        int64_t n_out, float *out, int64_t out_stride) {
    if (M < 0 || n_in < 0 || n_out < 0 || out_stride < n_out) return -1;
    int64_t fired = 0;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * x_stride;
        float *restrict o = out + m * out_stride;
        memset(o, 0, sizeof(float) * n_out);
        for (int64_t i = 0; i < n_in; i++) {
            const float v = xm[i];
            if (v == 0.0f) continue;
            fired++;
            const int8_t *restrict c = codes + i * n_out;
            for (int64_t j = 0; j < n_out; j++) o[j] += v * (float)c[j];
        }
    }
    return fired;
}

int64_t goose_fp32_rows(const float *x, int64_t M, int64_t n_in, int64_t x_stride, const float *w,
                        int64_t n_out, float *out, int64_t out_stride) {
    if (M < 0 || n_in < 0 || n_out < 0 || out_stride < n_out) return -1;
    int64_t fired = 0;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * x_stride;
        float *restrict o = out + m * out_stride;
        memset(o, 0, sizeof(float) * n_out);
        for (int64_t i = 0; i < n_in; i++) {
            const float v = xm[i];
            if (v == 0.0f) continue;
            fired++;
            const float *restrict r = w + i * n_out;
            for (int64_t j = 0; j < n_out; j++) o[j] += v * r[j];
        }
    }
    return fired;
}
