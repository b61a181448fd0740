/* The integer half of qzo's noise contract, compiled for the CPU (see qzo/noise.py).
 *
 * For element i of a stream with 64-bit key `key`: Philox4x32-10 on the counter
 * (lo32(i), hi32(i), 0, 0), its first two words mapped to uniforms exactly as Triton's
 * uint_to_uniform_float does, u1 clamped to 1e-7 and u2 scaled by 2 pi in float32.
 * Every operation here is exact integer arithmetic or one correctly rounded float32
 * operation, so the output is bit-identical to the pure-torch reference; the transcendental
 * half of Box-Muller (log, sqrt, cos) stays in torch so that it, too, is the reference's.
 *
 * Built by qzo/noise_native.py with -O3 -march=native -ffp-contract=off and no fast-math:
 * the element loop has no dependence between iterations, so the compiler vectorizes the
 * 32x32->64-bit products (vpmuludq) across lanes.
 */
#include <stdint.h>

#define PHILOX_ROUND_A 0xD2511F53u
#define PHILOX_ROUND_B 0xCD9E8D57u
#define PHILOX_KEY_A 0x9E3779B9u
#define PHILOX_KEY_B 0xBB67AE85u

static inline float uniform_of(uint32_t bits) {
    int32_t s = (int32_t)bits;
    if (s < 0) s = -s - 1;  /* never overflows: -INT32_MIN - 1 == INT32_MAX */
    return (float)s * 4.6566127342e-10f;
}

/* u1[j] = max(uniform(w0), 1e-7), theta[j] = uniform(w1) * 2 pi for elements offset + j. */
void qzo_philox_uniforms(uint64_t key, uint64_t offset, int64_t count, float *restrict u1,
                         float *restrict theta) {
    const uint32_t key0 = (uint32_t)key, key1 = (uint32_t)(key >> 32);
    const float two_pi = 6.283185307179586f;
    for (int64_t j = 0; j < count; ++j) {
        uint64_t index = offset + (uint64_t)j;
        uint32_t c0 = (uint32_t)index, c1 = (uint32_t)(index >> 32), c2 = 0, c3 = 0;
        uint32_t k0 = key0, k1 = key1;
        for (int round = 0; round < 10; ++round) {
            uint64_t prod_b = (uint64_t)PHILOX_ROUND_B * c2;
            uint64_t prod_a = (uint64_t)PHILOX_ROUND_A * c0;
            uint32_t n0 = (uint32_t)(prod_b >> 32) ^ c1 ^ k0;
            uint32_t n2 = (uint32_t)(prod_a >> 32) ^ c3 ^ k1;
            c1 = (uint32_t)prod_b;
            c3 = (uint32_t)prod_a;
            c0 = n0;
            c2 = n2;
            k0 += PHILOX_KEY_A;
            k1 += PHILOX_KEY_B;
        }
        float a = uniform_of(c0);
        u1[j] = a < 1.0e-7f ? 1.0e-7f : a;
        theta[j] = uniform_of(c1) * two_pi;
    }
}
