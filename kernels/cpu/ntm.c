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

#include "cell.h"

/* Circular shift, then sharpening: the addressing chain after the interpolation. */
static void shift_and_sharpen(const float *gated, const float *shift, float gamma, float *out) {
    float peak = 0.0f, total = 0.0f;
    for (int n = 0; n < N; n++) {
        float s = 0.0f;
        for (int j = -SHIFT; j <= SHIFT; j++) s += shift[j + SHIFT] * gated[((n - j) % N + N) % N];
        out[n] = s;
        peak = s > peak ? s : peak;
    }
    for (int n = 0; n < N; n++) {
        float scaled = peak > 0.0f ? out[n] / peak : 0.0f;
        out[n] = scaled > 0.0f ? fexp(gamma * flog(scaled)) : 0.0f;
    }
#pragma omp simd reduction(+ : total)
    for (int n = 0; n < N; n++) total += out[n];
    for (int n = 0; n < N; n++) out[n] = out[n] / (total + 1e-16f);
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
    /* pass 1: cosine similarity of every head's key with every row */
    for (int n = 0; n < N; n++) {
        const float *row = memory + n * M;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int m = 0; m < M; m++) squares += row[m] * row[m];
        float norm = sqrtf(squares);
        for (int h = 0; h < HEADS; h++) {
            const float *key = iface + h * HEAD_WIDTH;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int m = 0; m < M; m++) dot += key[m] * row[m];
            logits[h][n] = beta[h] * (dot / (key_norm[h] * norm + 1e-8f));
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
