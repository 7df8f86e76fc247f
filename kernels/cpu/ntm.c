/* The NTM's fused CPU serving step: the controller and output layer of cell.h around the
 * memory step of kernels/reference.py (its specification), one session at a time, in place
 * on the pools. Sizes (-D): N, M, NREAD, NWRITE, SHIFT (K), and cell.h's.
 *
 * Per session, two passes over its memory: one for the rows' norms and every head's dot
 * products, one that reads each row (memory before the write) and then writes it.
 */
#define HEADS (NREAD + NWRITE)
#define HEAD_WIDTH (M + 4 + 2 * SHIFT) /* key, beta, gate, 2K+1 shifts, gamma */
#define READS (NREAD * M)
#define IFACE (HEADS * HEAD_WIDTH + NWRITE * 2 * M)
#define STATE_READS 2 /* state: memory, weights, reads, h, c */
#define STATE_H 3
#define STATE_C 4
#define NSTATE 5
#define STATE_FLOATS {N * M, HEADS * N, READS, LAYERS * HID, LAYERS * HID}
#define MEMORY_STACK_FLOATS (HEADS * (5 + 2 * SHIFT + N) + 2 * N + (NWRITE + 1) * M)

#include "cell.h"

/* Circular shift, then sharpening: the addressing chain after the interpolation. Written
 * so that every loop over the rows vectorises: the shift as 2K+1 passes over two
 * contiguous ranges each (out[n] still sums its terms in the order j = -K..K), the
 * sharpening without branches. */
static void shift_and_sharpen(const float *gated, const float *shift, float gamma, float *out) {
    float peak = 0.0f, total = 0.0f;
    for (int n = 0; n < N; n++) out[n] = 0.0f;
    for (int j = -SHIFT; j <= SHIFT; j++) { /* out[n] += s_j gated[(n - j) mod N] */
        float s = shift[j + SHIFT];
        int r = ((j % N) + N) % N;
        for (int n = 0; n < r; n++) out[n] = FMA(s, gated[n - r + N], out[n]);
        for (int n = r; n < N; n++) out[n] = FMA(s, gated[n - r], out[n]);
    }
#pragma omp simd reduction(max : peak)
    for (int n = 0; n < N; n++) peak = out[n] > peak ? out[n] : peak;
    float inverse_peak = peak > 0.0f ? 1.0f / peak : 0.0f;
#pragma omp simd
    for (int n = 0; n < N; n++) { /* (w / peak)^gamma: the same after normalising, no overflow */
        float scaled = out[n] * inverse_peak;
        float powered = fexp(gamma * flog(scaled > 0.0f ? scaled : 1.0f));
        out[n] = scaled > 0.0f ? powered : 0.0f;
    }
#pragma omp simd reduction(+ : total)
    for (int n = 0; n < N; n++) total += out[n];
    float inverse_total = 1.0f / (total + 1e-16f);
    for (int n = 0; n < N; n++) out[n] = out[n] * inverse_total;
}

static void memory_row(float *const *state, int64_t slot, const float *iface, float *reads) {
    float *memory = state[0] + slot * N * M;
    float *weights = state[1] + slot * HEADS * N;
    float key_norm[HEADS], beta[HEADS], gate[HEADS], gamma[HEADS], shift[HEADS][2 * SHIFT + 1];
    float logits[HEADS][N], gated[N];
    for (int h = 0; h < HEADS; h++) {
        const float *p = iface + h * HEAD_WIDTH;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int m = 0; m < M; m++) squares += p[m] * p[m];
        key_norm[h] = sqrtf(squares);
        beta[h] = fsoftplus(p[M]);
        gate[h] = fsigmoid(p[M + 1]);
        for (int j = 0; j < 2 * SHIFT + 1; j++) shift[h][j] = p[M + 2 + j];
        softmax(shift[h], 2 * SHIFT + 1);
        gamma[h] = 1.0f + fsoftplus(p[M + 3 + 2 * SHIFT]);
    }
    /* pass 1: cosine similarity of every head's key with every row, in blocks of ROWS
     * rows: each row's squares and dots summed over m in order, lanes across the rows */
    enum { ROWS = 8 };
    for (int n0 = 0; n0 < N; n0 += ROWS) {
        float squares[ROWS] = {0}, dots[HEADS][ROWS] = {{0}};
        int count = N - n0 < ROWS ? N - n0 : ROWS;
        for (int m = 0; m < M; m++) {
            float column[ROWS] = {0};
            for (int i = 0; i < count; i++) column[i] = memory[(n0 + i) * M + m];
            for (int i = 0; i < ROWS; i++) squares[i] = FMA(column[i], column[i], squares[i]);
            for (int h = 0; h < HEADS; h++) {
                float key = iface[h * HEAD_WIDTH + m];
                for (int i = 0; i < ROWS; i++) dots[h][i] = FMA(key, column[i], dots[h][i]);
            }
        }
        for (int i = 0; i < count; i++) {
            float norm = sqrtf(squares[i]);
            for (int h = 0; h < HEADS; h++)
                logits[h][n0 + i] = beta[h] * (dots[h][i] / (key_norm[h] * norm + 1e-8f));
        }
    }
    for (int h = 0; h < HEADS; h++) {
        float *previous = weights + h * N;
        softmax(logits[h], N);
        for (int n = 0; n < N; n++) gated[n] = gate[h] * logits[h][n] + (1.0f - gate[h]) * previous[n];
        shift_and_sharpen(gated, shift[h], gamma[h], previous); /* the new weighting, in place */
    }
    /* pass 2: read each row as it was, then erase and add */
    float erase[NWRITE > 0 ? NWRITE : 1][M];
    const float *add[NWRITE > 0 ? NWRITE : 1];
    for (int w = 0; w < NWRITE; w++) {
        const float *p = iface + HEADS * HEAD_WIDTH + w * 2 * M;
        for (int m = 0; m < M; m++) erase[w][m] = fsigmoid(p[m]);
        add[w] = p + M;
    }
    for (int i = 0; i < READS; i++) reads[i] = 0.0f;
    for (int n = 0; n < N; n++) {
        float *row = memory + n * M;
        for (int r = 0; r < NREAD; r++) {
            float wr = weights[r * N + n];
            for (int m = 0; m < M; m++) reads[r * M + m] += wr * row[m];
        }
        if (NWRITE == 1) { /* memory - w (erase * memory - add), as the reference */
            float ww = weights[NREAD * N + n];
            for (int m = 0; m < M; m++) row[m] = row[m] - ww * (erase[0][m] * row[m] - add[0][m]);
        } else if (NWRITE > 1) {
            for (int m = 0; m < M; m++) {
                float keep = 1.0f, added = 0.0f;
                for (int w = 0; w < NWRITE; w++) {
                    float ww = weights[(NREAD + w) * N + n];
                    keep *= 1.0f - ww * erase[w][m];
                    added += ww * add[w][m];
                }
                row[m] = row[m] * keep + added;
            }
        }
    }
}
