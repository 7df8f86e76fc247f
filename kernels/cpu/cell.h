/* The part of a fused CPU step that the NTM and the DNC share: float math built from
 * arithmetic alone, row-tiled matrix products, the LSTM controller, and the driver that
 * runs a whole serving step (controller, memory, output layer) over a batch of slots.
 *
 * Compiled by kernels/cpu_step.py for one model shape: every size below is a -D constant,
 * so every loop has a fixed trip count. Batch invariance, bit for bit, holds by
 * construction: rows are processed in tiles of TILE, each tile by the same code whatever
 * the batch, and no loop whose length depends on the batch does arithmetic across rows; a
 * row's bits depend on the shape and the compiled code, never on its neighbours.
 *
 * The including file defines STATE_READS, STATE_H, STATE_C (indices into `state`) and
 * `memory_row`, then includes this header. Sizes: IN, OUT, HID, LAYERS, SIGMOID_OUT,
 * IFACE (interface width), READS (R times the read width).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TILE 8
#define LANES 16
#define PAD(x) (((x) + LANES - 1) / LANES * LANES)
#define GATES PAD(4 * HID)
#define IFACE_P PAD(IFACE)
#define OUT_P PAD(OUT)
#define K0 (IN + READS + HID) /* layer 0 reads [x, reads, h] */
#define KL (2 * HID)          /* a later layer reads [h below, h] */
#define KO (HID + READS)      /* the output layer reads [h top, reads] */

static inline float from_bits(int32_t i) { float f; memcpy(&f, &i, sizeof f); return f; }
static inline int32_t to_bits(float f) { int32_t i; memcpy(&i, &f, sizeof i); return i; }

/* exp(x) to about 1 ulp (Cephes' expf), inputs clamped to [-87, 88]. */
static inline float fexp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
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
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
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
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
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
    for (int i = 1; i < n; i++) peak = v[i] > peak ? v[i] : peak;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) {
        v[i] = fexp(v[i] - peak);
        sum += v[i];
    }
    for (int i = 0; i < n; i++) v[i] = v[i] / sum;
}

/* out[t][j] = bias[j] + sum_k x[t][k] w[k][j] for the TILE rows of x; w is the layer's
 * weight transposed and padded to `cols`, a multiple of LANES, with zero columns. Each
 * output sums its k in order in its own lane: the same bits in every row of every tile. */
static inline void tile_product(const float *restrict x, int depth, const float *restrict w,
                                const float *restrict bias, int cols, float *restrict out) {
    for (int j0 = 0; j0 < cols; j0 += LANES) {
        float acc[TILE][LANES];
        for (int t = 0; t < TILE; t++)
            for (int j = 0; j < LANES; j++) acc[t][j] = 0.0f;
        for (int k = 0; k < depth; k++) {
            const float *row = w + (int64_t)k * cols + j0;
            for (int t = 0; t < TILE; t++) {
                float xv = x[t * depth + k];
                for (int j = 0; j < LANES; j++) acc[t][j] += xv * row[j];
            }
        }
        for (int t = 0; t < TILE; t++)
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
 * slots: int64 [batch], -1 = padding (reads and writes nothing, outputs zeros). */
int memserve_step(float *const *params, float *const *state, const int64_t *slots,
                  int64_t batch, const float *inputs, float *outputs) {
    static const float zeros[HID > READS ? HID : READS];
    float x[TILE * (K0 > KL ? K0 : KL)], gates[TILE * GATES];
    float h[TILE][LAYERS][HID], c[TILE][LAYERS][HID], top[TILE * HID];
    float iface[TILE * IFACE_P], reads[TILE][READS], features[TILE * KO], out[TILE * OUT_P];
    float *reads_pool = state[STATE_READS], *h_pool = state[STATE_H], *c_pool = state[STATE_C];
    for (int64_t b0 = 0; b0 < batch; b0 += TILE) {
        int64_t slot[TILE];
        for (int t = 0; t < TILE; t++) slot[t] = b0 + t < batch ? slots[b0 + t] : -1;
        for (int layer = 0; layer < LAYERS; layer++) {
            int depth = layer == 0 ? K0 : KL;
            for (int t = 0; t < TILE; t++) {
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
            tile_product(x, depth, params[2 * layer], params[2 * layer + 1], GATES, gates);
            for (int t = 0; t < TILE; t++) {
                const float *c_old = slot[t] < 0 ? zeros : c_pool + (slot[t] * LAYERS + layer) * HID;
                lstm_row(gates + t * GATES, c_old, h[t][layer], c[t][layer]);
            }
        }
        for (int t = 0; t < TILE; t++) memcpy(top + t * HID, h[t][LAYERS - 1], sizeof(float) * HID);
        tile_product(top, HID, params[2 * LAYERS], params[2 * LAYERS + 1], IFACE_P, iface);
        for (int t = 0; t < TILE; t++) {
            if (slot[t] < 0) memset(reads[t], 0, sizeof(float) * READS);
            else memory_row(state, slot[t], iface + t * IFACE_P, reads[t]);
            memcpy(features + t * KO, top + t * HID, sizeof(float) * HID);
            memcpy(features + t * KO + HID, reads[t], sizeof(float) * READS);
        }
        tile_product(features, KO, params[2 * LAYERS + 2], params[2 * LAYERS + 3], OUT_P, out);
        for (int i = 0; i < TILE * OUT_P; i++) out[i] = SIGMOID_OUT ? fsigmoid(out[i]) : out[i];
        for (int t = 0; t < TILE && b0 + t < batch; t++) {
            float *row = outputs + (b0 + t) * OUT;
            if (slot[t] < 0) {
                memset(row, 0, sizeof(float) * OUT);
                continue;
            }
            memcpy(row, out + t * OUT_P, sizeof(float) * OUT);
            memcpy(reads_pool + slot[t] * READS, reads[t], sizeof(float) * READS);
            memcpy(h_pool + slot[t] * LAYERS * HID, h[t], sizeof(float) * LAYERS * HID);
            memcpy(c_pool + slot[t] * LAYERS * HID, c[t], sizeof(float) * LAYERS * HID);
        }
    }
    return 0;
}
