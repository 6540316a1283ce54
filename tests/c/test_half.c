/* The CPU kernels' branchless float16 conversions (half.h, *_vec) against the reference ones:
 * every float16 value to float32, and float32 values of every exponent (with the rounding
 * boundaries of each) to float16, bit for bit; NaNs need only stay NaNs. */
#include <math.h>
#include <stdio.h>

#include "half.h"
#include "harness.h"

static int is_nan16(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }

static int f16_to_f32_mismatches(void) {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; h++) {
    const float a = bn_f16_to_f32((uint16_t)h), b = bn_f16_to_f32_vec((uint16_t)h);
    if (is_nan16((uint16_t)h) ? !(isnan(a) && isnan(b)) : bn_f32_to_bits(a) != bn_f32_to_bits(b)) bad++;
  }
  return bad;
}

static uint32_t next_random(uint64_t *s) {
  *s = *s * 6364136223846793005ull + 1442695040888963407ull;
  return (uint32_t)(*s >> 32);
}

static int same16(float f) {
  const uint16_t a = bn_f32_to_f16(f), b = bn_f32_to_f16_vec(f);
  return isnan(f) ? is_nan16(a) && is_nan16(b) : a == b;
}

static int f32_to_f16_mismatches(void) {
  int bad = 0;
  uint64_t seed = 12345;
  for (uint32_t e = 0; e < 256; e++) { /* every exponent: random mantissas, and the halfway points */
    for (int k = 0; k < 4096; k++) {
      const uint32_t bits = (e << 23) | (next_random(&seed) & 0x807fffffu);
      bad += !same16(bn_bits_to_f32(bits));
    }
    for (uint32_t low = 0; low < 0x4000u; low += 0x400u) /* near the 13 dropped bits' half: 0x1000 */
      for (int d = -2; d <= 2; d++) {
        const uint32_t bits = (e << 23) | ((next_random(&seed) & 0x3ffu) << 13) | ((0x1000u + low + (uint32_t)d) & 0x1fffu);
        bad += !same16(bn_bits_to_f32(bits)) + !same16(-bn_bits_to_f32(bits));
      }
  }
  /* every float16 value converted back, and the midpoints between neighbours */
  for (uint32_t h = 0; h < 0x7c00u; h++) {
    const float v = bn_f16_to_f32((uint16_t)h), w = bn_f16_to_f32((uint16_t)(h + 1));
    bad += !same16(v) + !same16(-v) + !same16((v + w) / 2) + !same16(-(v + w) / 2);
  }
  const float edge[] = {0.0f, -0.0f, 65504.0f, 65519.996f, 65520.0f, 1e30f, INFINITY, -INFINITY, NAN,
                        5.9604645e-8f, 2.9802322e-8f, 2.9802326e-8f, 6.1035156e-5f, 6.1035153e-5f, 1e-45f};
  for (size_t i = 0; i < sizeof edge / sizeof edge[0]; i++) bad += !same16(edge[i]) + !same16(-edge[i]);
  return bad;
}

SUITE(half) {
  TEST(f16_to_f32_every_value) { CHECK(f16_to_f32_mismatches() == 0); }
  TEST(f32_to_f16_every_exponent_and_midpoint) { CHECK(f32_to_f16_mismatches() == 0); }
}
