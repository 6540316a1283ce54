/*
 * Half types (float16, bfloat16) to and from float32, for every backend: by bit
 * manipulation, so that the library builds with any C11 compiler (and a CUDA file
 * can include it); rounding is to nearest, ties to even.
 */
#ifndef BNCORE_HALF_H
#define BNCORE_HALF_H

#include <stdint.h>
#include <string.h>

static inline float bn_bits_to_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint32_t bn_f32_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static inline float bn_bf16_to_f32(uint16_t h) { return bn_bits_to_f32((uint32_t)h << 16); }

static inline uint16_t bn_f32_to_bf16(float f) {
  uint32_t u = bn_f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float bn_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bn_bits_to_f32(sign | 0x7f800000u | (man << 13)); /* inf / NaN */
  if (exp == 0) {
    /* zero or subnormal: man * 2^-24 is exact in float */
    float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bn_bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t bn_f32_to_f16(float f) {
  uint32_t u = bn_f32_to_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN */
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to inf (>= 65520) */
  if (a < 0x38800000u) {
    /* result is subnormal or zero: round a * 2^24 to an integer, ties to even */
    float v = bn_bits_to_f32(a) * 16777216.0f;
    uint32_t m = (uint32_t)v;
    float rem = v - (float)m;
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) m++;
    return (uint16_t)(sign | m);
  }
  /* normal: rebias the exponent and round the 13 dropped mantissa bits */
  uint32_t r = a - 0x38000000u;
  r += 0xfffu + ((r >> 13) & 1u);
  return (uint16_t)(sign | (r >> 13));
}

/*
 * The same two float16 conversions without branches, for the CPU row kernels: every case is
 * computed and the right one selected by a bit mask, so that the compiler vectorizes a loop of
 * them at every x86-64 level (the branchy ones above ran a float16 batch norm 10x slower than float32; with `?:`
 * selects GCC 12 if-converted the loop only with AVX-512 masks and left it scalar, "control flow
 * in loop", for SSE2 and AVX2). Bit for bit the functions above for every input but NaNs, which
 * stay NaNs (tests/c/test_half.c checks all 65536 float16 values and float32 values of every
 * exponent). Assumes the default rounding mode.
 */

/* Always inlined where the compiler allows: a call left in a loop (GCC did so in the largest kernel
 * functions, past its inlining budget) stops that loop from vectorizing. */
#if defined(__GNUC__)
#define BN_HALF_INLINE static inline __attribute__((always_inline))
#else
#define BN_HALF_INLINE static inline
#endif

/* c ? a : b for c in {0, 1}, as arithmetic rather than a branch */
BN_HALF_INLINE uint32_t bn_select_u32(uint32_t c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - c;
  return (a & m) | (b & ~m);
}
BN_HALF_INLINE float bn_f16_to_f32_vec(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t em = (uint32_t)(h & 0x7fffu) << 13; /* exponent and mantissa, float32 positions */
  const uint32_t e = em & 0x0f800000u;
  const uint32_t normal = em + (112u << 23);           /* rebias 15 -> 127 */
  const uint32_t special = em + (224u << 23);          /* exponent 31 -> 255: inf, NaN */
  /* subnormal or zero: 2^-14 * (1 + man/1024) - 2^-14 = man * 2^-24, exact */
  const uint32_t sub = bn_f32_to_bits(bn_bits_to_f32(em + (113u << 23)) - bn_bits_to_f32(113u << 23));
  const uint32_t mag = bn_select_u32(e == 0x0f800000u, special, bn_select_u32(e == 0, sub, normal));
  return bn_bits_to_f32(sign | mag);
}

BN_HALF_INLINE uint16_t bn_f32_to_f16_vec(float f) {
  const uint32_t u = bn_f32_to_bits(f), a = u & 0x7fffffffu;
  const uint32_t sign = (u >> 16) & 0x8000u;
  /* normal: rebias the exponent and round the 13 dropped mantissa bits, ties to even */
  const uint32_t r = a - 0x38000000u;
  const uint32_t normal = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
  /* subnormal or zero: 0.5 + |f| rounds |f| to a multiple of 2^-24 (the ulp of [0.5, 1)), ties
   * to even; the bits above 0.5's are that multiple */
  const uint32_t sub = bn_f32_to_bits(bn_bits_to_f32(a) + 0.5f) - 0x3f000000u;
  const uint32_t mag = bn_select_u32(a > 0x7f800000u, 0x7e00u,
                                     bn_select_u32(a >= 0x477ff000u, 0x7c00u,
                                                   bn_select_u32(a < 0x38800000u, sub, normal)));
  return (uint16_t)(sign | mag);
}

#endif /* BNCORE_HALF_H */
