/* The part of a fused CPU step that the NTM and the DNC share: float math built from
 * arithmetic alone, row-tiled matrix products, the LSTM controller, and the driver that
 * runs a whole serving step (controller, memory, output layer) over a batch of slots.
 *
 * Compiled by kernels/cpu_step.py for one model shape: every size below is a -D constant,
 * so every loop has a fixed trip count. Batch invariance, bit for bit, holds by
 * construction: a row's bits depend on the shape and the compiled code, never on its
 * neighbours or on how many rows share its launch.
 * - The products run in tiles of up to TILE rows; every output element is one chain of
 *   fused multiply-adds over k in order (FMA below), so vectorising across its lanes or
 *   rows, or a tail tile of fewer rows, gives the same bits.
 * - Everything after the products (the LSTM cell, the memory step, the output activation)
 *   runs one row at a time through one function, the same code for every row.
 * - Nothing is contracted behind the source's back (-ffp-contract=off in cpu_step.FLAGS):
 *   a * b + c is two roundings unless written FMA.
 * The `omp simd reduction` loops may be reassociated by the compiler (-fopenmp-simd); that
 * order is fixed by the compiled code and the constant trip count, the same for every row.
 * On x86 a call flushes denormal results and inputs to zero (MXCSR's FTZ and DAZ, set on
 * entry and restored on return): values below 1.2e-38, which the softmaxes and the
 * sharpening make often and the CPU computes on slowly; what is lost is below any tolerance
 * the step is held to (-DKEEP_DENORMALS builds without, to compare).
 *
 * The including file defines STATE_READS, STATE_H, STATE_C (indices into `state`),
 * NSTATE and STATE_FLOATS (how many pool tensors, and each one's floats per slot),
 * MEMORY_STACK_FLOATS (what its memory_row keeps on the stack), then includes this header
 * and defines `memory_row`. Sizes: IN, OUT, HID, LAYERS, SIGMOID_OUT,
 * IFACE (interface width), READS (R times the read width).
 *
 * Reentrant: the only static is a read-only array of zeros; a call writes its own stack,
 * `outputs` and the pool rows of its slots. Two concurrent calls must not share a slot.
 */
#include <math.h>
#if (defined(__x86_64__) || defined(__i386__)) && !defined(KEEP_DENORMALS)
#include <xmmintrin.h>
#define DENORMALS_OFF() unsigned csr = _mm_getcsr(); _mm_setcsr(csr | 0x8040) /* FTZ, DAZ */
#define DENORMALS_BACK() _mm_setcsr(csr)
#else
#define DENORMALS_OFF()
#define DENORMALS_BACK()
#endif
#include <stdint.h>
#include <string.h>

#define TILE 8
#ifdef __FMA__
#define FMA(a, b, c) fmaf((a), (b), (c)) /* one instruction */
#else
#define FMA(a, b, c) ((a) * (b) + (c)) /* no FMA unit: two roundings, still the same per row */
#endif
#define LANES 16
#define PAD(x) (((x) + LANES - 1) / LANES * LANES)
#define GATES PAD(4 * HID)
#define IFACE_P PAD(IFACE)
#define OUT_P PAD(OUT)
#define K0 (IN + READS + HID) /* layer 0 reads [x, reads, h] */
#define KL (2 * HID)          /* a later layer reads [h below, h] */
#define KO (HID + READS)      /* the output layer reads [h top, reads] */

typedef union { float f; int32_t i; } bits32; /* GNU C: reading the other member reinterprets */
static inline float from_bits(int32_t i) { bits32 u; u.i = i; return u.f; }
static inline int32_t to_bits(float f) { bits32 u; u.f = f; return u.i; }

/* exp(x) to about 1 ulp (Cephes' expf), inputs clamped to [-87, 88]. */
static inline float fexp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = FMA(p, r, 1.3981999507e-3f);
    p = FMA(p, r, 8.3334519073e-3f);
    p = FMA(p, r, 4.1665795894e-2f);
    p = FMA(p, r, 1.6666665459e-1f);
    p = FMA(p, r, 5.0000001201e-1f);
    p = p * r * r + r + 1.0f;
    return p * from_bits(((int32_t)n + 127) << 23);
}

/* log(x) for normal x > 0 (Cephes' logf). */
static inline float flog(float x) {
    int32_t bits = to_bits(x);
    float e = (float)(((bits >> 23) & 0xff) - 126);
    float m = from_bits((bits & 0x007fffff) | 0x3f000000); /* x = m 2^e, m in [0.5, 1) */
    int low = m < 0.707106781186547524f;
    e = low ? e - 1.0f : e;
    m = low ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float y = 7.0376836292e-2f;
    y = FMA(y, m, -1.1514610310e-1f);
    y = FMA(y, m, 1.1676998740e-1f);
    y = FMA(y, m, -1.2420140846e-1f);
    y = FMA(y, m, 1.4249322787e-1f);
    y = FMA(y, m, -1.6668057665e-1f);
    y = FMA(y, m, 2.0000714765e-1f);
    y = FMA(y, m, -2.4999993993e-1f);
    y = FMA(y, m, 3.3333331174e-1f);
    y = y * m * z;
    y += e * -2.12194440e-4f;
    y += -0.5f * z;
    return (m + y) + e * 0.693359375f;
}

/* tanh(x) (Cephes' tanhf): a polynomial below 0.625, 1 - 2 / (exp(2|x|) + 1) above. */
static inline float ftanh(float x) {
    float a = fabsf(x);
    float z = x * x;
    float p = -5.70498872745e-3f;
    p = FMA(p, z, 2.06390887954e-2f);
    p = FMA(p, z, -5.37397155531e-2f);
    p = FMA(p, z, 1.33314422036e-1f);
    p = FMA(p, z, -3.33332819422e-1f);
    float t = a < 0.625f ? p * z * a + a : 1.0f - 2.0f / (fexp(2.0f * a) + 1.0f);
    return x < 0.0f ? -t : t;
}

/* As models/activations.py: from e = exp(-|x|) <= 1, so that nothing overflows. */
static inline float fsigmoid(float x) {
    float e = fexp(-fabsf(x));
    return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}

static inline float fsoftplus(float x) {
    float e = fexp(-fabsf(x));
    float u = 1.0f + e; /* log1p(e) by Goldberg's correction of log(1 + e) */
    float log1p_e = u == 1.0f ? e : flog(u) * (e / (u - 1.0f));
    return (x > 0.0f ? x : 0.0f) + log1p_e;
}

/* softmax over v[0..n) in place; sums in a fixed order, so a row's bits are its own. */
static inline void softmax(float *v, int n) {
    float peak = v[0];
#pragma omp simd reduction(max : peak)
    for (int i = 1; i < n; i++) peak = v[i] > peak ? v[i] : peak;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) {
        v[i] = fexp(v[i] - peak);
        sum += v[i];
    }
    for (int i = 0; i < n; i++) v[i] = v[i] / sum;
}

/* out[t][j] = bias[j] + sum_k x[t][k] w[k][j] for the first `rows` (<= TILE) rows of x; w is
 * the layer's weight transposed and padded to `cols`, a multiple of LANES, with zero
 * columns. Each output is one FMA chain over k in order: the same bits in every row, in a
 * full tile or a short one. */
static inline void tile_product(const float *restrict x, int depth, const float *restrict w,
                                const float *restrict bias, int cols, int rows,
                                float *restrict out) {
    for (int j0 = 0; j0 < cols; j0 += LANES) {
        float acc[TILE][LANES];
        for (int t = 0; t < TILE; t++)
            for (int j = 0; j < LANES; j++) acc[t][j] = 0.0f;
        if (rows == TILE) { /* the common case, with a constant trip count */
            for (int k = 0; k < depth; k++) {
                const float *row = w + (int64_t)k * cols + j0;
                for (int t = 0; t < TILE; t++) {
                    float xv = x[t * depth + k];
                    for (int j = 0; j < LANES; j++) acc[t][j] = FMA(xv, row[j], acc[t][j]);
                }
            }
        } else {
            for (int k = 0; k < depth; k++) {
                const float *row = w + (int64_t)k * cols + j0;
                for (int t = 0; t < rows; t++) {
                    float xv = x[t * depth + k];
                    for (int j = 0; j < LANES; j++) acc[t][j] = FMA(xv, row[j], acc[t][j]);
                }
            }
        }
        for (int t = 0; t < rows; t++)
            for (int j = 0; j < LANES; j++) out[t * cols + j0 + j] = acc[t][j] + bias[j0 + j];
    }
}

/* One LSTM cell on a row of gates (i, f, g, o as in nn.LSTMCell). */
static inline void lstm_row(const float *gates, const float *c_old, float *h, float *c) {
    for (int j = 0; j < HID; j++) {
        float cell = fsigmoid(gates[HID + j]) * c_old[j]
                   + fsigmoid(gates[j]) * ftanh(gates[2 * HID + j]);
        c[j] = cell;
        h[j] = fsigmoid(gates[3 * HID + j]) * ftanh(cell);
    }
}

static void memory_row(float *const *state, int64_t slot, const float *iface, float *reads);

/* One serving step of `batch` rows. params: per layer its packed weight and bias, then the
 * interface layer's and the output layer's. state: the pools (the including file's order),
 * each `capacity` slots. slots: int64 [batch], -1 = padding (reads and writes nothing,
 * outputs zeros). Returns 0, or 1 + the first row whose slot is neither -1 nor in
 * [0, capacity), having changed nothing: no slot can take the step outside its pools.
 * Repeats are the caller's to refuse (a repeated slot ends with a mix of its rows). */
int memserve_step(float *const *params, float *const *state, const int64_t *slots,
                  int64_t batch, int64_t capacity, const float *inputs, float *outputs) {
    for (int64_t b = 0; b < batch; b++)
        if (slots[b] < -1 || slots[b] >= capacity) return b < INT32_MAX ? (int)b + 1 : INT32_MAX;
    DENORMALS_OFF(); /* this thread's, until the return below */
    static const float zeros[HID > READS ? HID : READS];
    float x[TILE * (K0 > KL ? K0 : KL)], gates[TILE * GATES];
    float h[TILE][LAYERS][HID], c[TILE][LAYERS][HID], top[TILE * HID];
    float iface[TILE * IFACE_P], reads[TILE][READS > 0 ? READS : 1], features[TILE * KO];
    float out[TILE * OUT_P];
    float *reads_pool = state[STATE_READS], *h_pool = state[STATE_H], *c_pool = state[STATE_C];
    for (int64_t b0 = 0; b0 < batch; b0 += TILE) {
        int rows = batch - b0 < TILE ? (int)(batch - b0) : TILE;
        const int64_t *slot = slots + b0;
        for (int layer = 0; layer < LAYERS; layer++) {
            int depth = layer == 0 ? K0 : KL;
            for (int t = 0; t < rows; t++) {
                float *row = x + t * depth;
                const float *h_old = slot[t] < 0 ? zeros : h_pool + (slot[t] * LAYERS + layer) * HID;
                if (layer == 0) {
                    if (slot[t] < 0) memset(row, 0, sizeof(float) * (IN + READS));
                    else {
                        memcpy(row, inputs + (b0 + t) * IN, sizeof(float) * IN);
                        memcpy(row + IN, reads_pool + slot[t] * READS, sizeof(float) * READS);
                    }
                    memcpy(row + IN + READS, h_old, sizeof(float) * HID);
                } else {
                    memcpy(row, h[t][layer - 1], sizeof(float) * HID);
                    memcpy(row + HID, h_old, sizeof(float) * HID);
                }
            }
            tile_product(x, depth, params[2 * layer], params[2 * layer + 1], GATES, rows, gates);
            for (int t = 0; t < rows; t++) {
                const float *c_old = slot[t] < 0 ? zeros : c_pool + (slot[t] * LAYERS + layer) * HID;
                lstm_row(gates + t * GATES, c_old, h[t][layer], c[t][layer]);
            }
        }
        for (int t = 0; t < rows; t++) memcpy(top + t * HID, h[t][LAYERS - 1], sizeof(float) * HID);
        tile_product(top, HID, params[2 * LAYERS], params[2 * LAYERS + 1], IFACE_P, rows, iface);
        for (int t = 0; t < rows; t++) {
            if (slot[t] < 0) memset(reads[t], 0, sizeof(float) * READS);
            else memory_row(state, slot[t], iface + t * IFACE_P, reads[t]);
            memcpy(features + t * KO, top + t * HID, sizeof(float) * HID);
            memcpy(features + t * KO + HID, reads[t], sizeof(float) * READS);
        }
        tile_product(features, KO, params[2 * LAYERS + 2], params[2 * LAYERS + 3], OUT_P, rows, out);
        for (int t = 0; t < rows; t++) {
            float *row = outputs + (b0 + t) * OUT;
            if (slot[t] < 0) {
                memset(row, 0, sizeof(float) * OUT);
                continue;
            }
            for (int j = 0; j < OUT; j++) row[j] = SIGMOID_OUT ? fsigmoid(out[t * OUT_P + j]) : out[t * OUT_P + j];
            memcpy(reads_pool + slot[t] * READS, reads[t], sizeof(float) * READS);
            memcpy(h_pool + slot[t] * LAYERS * HID, h[t], sizeof(float) * LAYERS * HID);
            memcpy(c_pool + slot[t] * LAYERS * HID, c[t], sizeof(float) * LAYERS * HID);
        }
    }
    DENORMALS_BACK();
    return 0;
}

/* What kernels/cpu_step.py checks before it makes a first call, so that a packing or a pool
 * that does not fit this build is refused instead of read past: each pool tensor's floats
 * per slot, each parameter's floats, and the stack one call takes. */
int64_t memserve_state_floats(int i) {
    static const int64_t floats[NSTATE] = STATE_FLOATS;
    return i >= 0 && i < NSTATE ? floats[i] : -1;
}

int64_t memserve_param_floats(int i) {
    if (i < 0 || i >= 2 * LAYERS + 4) return -1;
    if (i < 2 * LAYERS) return i % 2 ? GATES : (int64_t)(i == 0 ? K0 : KL) * GATES;
    if (i < 2 * LAYERS + 2) return i % 2 ? IFACE_P : (int64_t)HID * IFACE_P;
    return i % 2 ? OUT_P : (int64_t)KO * OUT_P;
}

int64_t memserve_stack_bytes(void) {
    int64_t driver = TILE * ((K0 > KL ? K0 : KL) + GATES + 2 * LAYERS * HID + HID + IFACE_P
                             + (READS > 0 ? READS : 1) + KO + OUT_P + LANES);
    return (int64_t)sizeof(float) * (driver + MEMORY_STACK_FLOATS);
}
