/* The DNC's fused CPU serving step: the controller and output layer of cell.h around the
 * memory step of kernels/dnc_reference.py (its specification, in the paper's order), one
 * session at a time, in place on the pools. Sizes (-D): N, WS (word size), NREAD, LINKS
 * (0 or 1), and cell.h's.
 */
#define READS (NREAD * WS)
/* read keys and strengths, write key and strength, erase, write vector, free gates,
 * allocation and write gates, with links the read modes */
#define IFACE (NREAD * WS + NREAD + WS + 1 + WS + WS + NREAD + 1 + 1 + (LINKS ? 3 * NREAD : 0))
/* state: memory, usage, precedence, link, write_weights, read_weights, reads, h, c */
#define STATE_READS 6
#define STATE_H 7
#define STATE_C 8
#define NSTATE 9
#define STATE_FLOATS {N * WS, N, N, N * N, N, NREAD * N, READS, LAYERS * HID, LAYERS * HID}
#define MEMORY_STACK_FLOATS (5 * N + 3 * NREAD * N + NREAD + WS)

#include "cell.h"

static inline float oneplus(float x) { return 1.0f + fsoftplus(x); }

/* weights[n] = softmax_n(strength * cos(key, memory[n])) */
static void content_weights(const float *memory, const float *key, float strength,
                            float *weights) {
    float key_squares = 0.0f;
#pragma omp simd reduction(+ : key_squares)
    for (int m = 0; m < WS; m++) key_squares += key[m] * key[m];
    float key_norm = sqrtf(key_squares);
    for (int n = 0; n < N; n++) {
        const float *row = memory + n * WS;
        float dot = 0.0f, squares = 0.0f;
#pragma omp simd reduction(+ : dot, squares)
        for (int m = 0; m < WS; m++) {
            dot += key[m] * row[m];
            squares += row[m] * row[m];
        }
        weights[n] = strength * (dot / (key_norm * sqrtf(squares) + 1e-8f));
    }
    softmax(weights, N);
}

/* a[phi_j] = (1 - u[phi_j]) prod_{i<j} u[phi_i], phi the stable ascending order of usage:
 * each row's place is how many rows come before it (smaller usage, or equal and a lower
 * index), counted without branches. (A NaN usage, which no finite state gives, leaves the
 * order incomplete: it starts as the identity so that every index stays in bounds.) */
static void allocation(const float *usage, float *out) {
    int order[N];
    for (int j = 0; j < N; j++) order[j] = j, out[j] = 0.0f;
    for (int j = 0; j < N; j++) {
        int place = 0;
        float u = usage[j];
#pragma omp simd reduction(+ : place)
        for (int i = 0; i < N; i++) place += usage[i] < u || (usage[i] == u && i < j);
        order[place] = j;
    }
    float product = 1.0f;
    for (int j = 0; j < N; j++) {
        float u = usage[order[j]];
        out[order[j]] = (1.0f - u) * product;
        product *= u;
    }
}

static void memory_row(float *const *state, int64_t slot, const float *iface, float *reads) {
    float *memory = state[0] + slot * N * WS;
    float *usage = state[1] + slot * N;
    float *write_weights = state[4] + slot * N;
    float *read_weights = state[5] + slot * NREAD * N;
    const float *read_keys = iface, *read_strengths = iface + NREAD * WS;
    const float *write_key = read_strengths + NREAD, *erase = write_key + WS + 1;
    const float *write_vector = erase + WS, *free_gates = write_vector + WS;
    float allocation_gate = fsigmoid(free_gates[NREAD]), write_gate = fsigmoid(free_gates[NREAD + 1]);
    float free[NREAD], weights[N], alloc[N];
    for (int i = 0; i < NREAD; i++) free[i] = fsigmoid(free_gates[i]);
    for (int n = 0; n < N; n++) { /* usage from the previous weightings */
        float psi = 1.0f;
        for (int i = 0; i < NREAD; i++) psi *= 1.0f - free[i] * read_weights[i * N + n];
        float u = usage[n], w = write_weights[n];
        usage[n] = (u + w - u * w) * psi;
    }
    allocation(usage, alloc);
    content_weights(memory, write_key, oneplus(write_key[WS]), weights);
    float total = 0.0f;
    for (int n = 0; n < N; n++) {
        float w = write_gate * (allocation_gate * alloc[n] + (1.0f - allocation_gate) * weights[n]);
        write_weights[n] = w;
        total += w;
    }
    float erasing[WS];
    for (int m = 0; m < WS; m++) erasing[m] = fsigmoid(erase[m]);
    for (int n = 0; n < N; n++) {
        float w = write_weights[n], *row = memory + n * WS;
        for (int m = 0; m < WS; m++) row[m] = row[m] * (1.0f - w * erasing[m]) + w * write_vector[m];
    }
    float content[NREAD][N], forward[NREAD][N], backward[NREAD][N];
    for (int i = 0; i < NREAD; i++)
        content_weights(memory, read_keys + i * WS, oneplus(read_strengths[i]), content[i]);
    if (LINKS) {
        float *precedence = state[2] + slot * N, *link = state[3] + slot * N * N;
        memset(backward, 0, sizeof backward);
        for (int r = 0; r < N; r++) { /* the new link row r, used at once */
            float wr = write_weights[r], *row = link + r * N;
            for (int j = 0; j < N; j++)
                row[j] = j == r ? 0.0f : (1.0f - wr - write_weights[j]) * row[j] + wr * precedence[j];
            for (int i = 0; i < NREAD; i++) {
                const float *previous = read_weights + i * N;
                float f = 0.0f;
#pragma omp simd reduction(+ : f)
                for (int j = 0; j < N; j++) f += row[j] * previous[j];
                forward[i][r] = f;
                for (int j = 0; j < N; j++) backward[i][j] += row[j] * previous[r];
            }
        }
        for (int n = 0; n < N; n++) precedence[n] = (1.0f - total) * precedence[n] + write_weights[n];
        const float *modes_in = free_gates + NREAD + 2;
        for (int i = 0; i < NREAD; i++) {
            float modes[3] = {modes_in[3 * i], modes_in[3 * i + 1], modes_in[3 * i + 2]};
            softmax(modes, 3);
            for (int n = 0; n < N; n++)
                read_weights[i * N + n] = modes[0] * backward[i][n] + modes[1] * content[i][n]
                                        + modes[2] * forward[i][n];
        }
    } else {
        memcpy(read_weights, content, sizeof content);
    }
    for (int i = 0; i < READS; i++) reads[i] = 0.0f;
    for (int n = 0; n < N; n++) {
        const float *row = memory + n * WS;
        for (int i = 0; i < NREAD; i++) {
            float w = read_weights[i * N + n];
            for (int m = 0; m < WS; m++) reads[i * WS + m] += w * row[m];
        }
    }
}
