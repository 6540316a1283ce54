/*
 * The row kernels, instantiated once per element type from kernels.inc, and once per x86-64 level:
 * this file alone is the baseline (SSE2); kernels_v3.c and kernels_v4.c include it again, compiled
 * with -march=x86-64-v3 (AVX2) and -march=x86-64-v4 (AVX-512), with BN_LEVEL set. Each level has its
 * own tables; bn_cpu_kernels picks one at load time. A level per file, not GCC's target_clones, so
 * that each level's vectors are as wide as its registers (kernels.inc: BN_VBYTES) and so that a test
 * can force each level (BNCORE_CPU_LEVEL) and compare their bits.
 */
#include <math.h>
#include <stdio.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

#ifndef BN_LEVEL
#define BN_LEVEL _base
#define BN_LEVEL_BASE 1
#endif
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define LEVEL_(a, b) a##b /* a second pasting macro: SUFFIX expands inside kernels.inc's CAT */
#define LEVEL(a, b) LEVEL_(a, b)

#include "cpu.h"
#include "../half.h"

/* The kernels' vector-typed helpers are always inlined, so no vector crosses a call: the warning
 * that the baseline level would pass them differently does not apply. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

BN_INLINE float load_f16(const uint16_t *p) { return bn_f16_to_f32_vec(*p); }
BN_INLINE float load_bf16(const uint16_t *p) { return bn_bf16_to_f32(*p); }
BN_INLINE void store_f16(uint16_t *p, float v) { *p = bn_f32_to_f16_vec(v); }
BN_INLINE void store_bf16(uint16_t *p, float v) { *p = bn_f32_to_bf16(v); }

#define T float
#define CT float
#define LOAD(p) (*(p))
#define STORE(p, v) (*(p) = (v))
#define CT_BYTES 4
#define SUFFIX LEVEL(_f32, BN_LEVEL)
#include "kernels.inc"
#undef T
#undef CT
#undef LOAD
#undef STORE
#undef SUFFIX
#undef CT_BYTES

#define T double
#define CT double
#define LOAD(p) (*(p))
#define STORE(p, v) (*(p) = (v))
#define CT_BYTES 8
#define SUFFIX LEVEL(_f64, BN_LEVEL)
#include "kernels.inc"
#undef T
#undef CT
#undef LOAD
#undef STORE
#undef SUFFIX
#undef CT_BYTES

#define T uint16_t
#define CT float
#define LOAD(p) load_f16(p)
#define STORE(p, v) store_f16((p), (v))
#define CT_BYTES 4
#define SUFFIX LEVEL(_f16, BN_LEVEL)
#if defined(__F16C__)
#define BN_LOAD_F16C 1
#endif
#include "kernels.inc"
#undef BN_LOAD_F16C
#undef LOAD
#undef STORE
#undef SUFFIX
#undef CT_BYTES

#define LOAD(p) load_bf16(p)
#define STORE(p, v) store_bf16((p), (v))
#define CT_BYTES 4
#define SUFFIX LEVEL(_bf16, BN_LEVEL)
#include "kernels.inc"
#undef T
#undef CT
#undef LOAD
#undef STORE
#undef SUFFIX
#undef CT_BYTES

const bn_kernels_t *CAT(bn_cpu_kernels, BN_LEVEL)(bn_dtype_t dt);
const bn_kernels_t *CAT(bn_cpu_kernels, BN_LEVEL)(bn_dtype_t dt) {
  switch (dt) {
    case BN_F16: return &CAT(kernels__f16, BN_LEVEL);
    case BN_BF16: return &CAT(kernels__bf16, BN_LEVEL);
    case BN_F32: return &CAT(kernels__f32, BN_LEVEL);
    default: return &CAT(kernels__f64, BN_LEVEL);
  }
}

#ifdef BN_LEVEL_BASE
/* The level, chosen once before any thread can call in (a constructor): BNCORE_CPU_LEVEL
 * ("baseline", "x86-64-v3" or "x86-64-v4") for every dtype when that is set, else x86-64-v3 for
 * float32 and float64 and x86-64-v4 for float16 and bfloat16; in each case the highest level at or
 * below that which the CPU runs. Measured on an AMD EPYC (Zen 4, which runs 512-bit vectors as two
 * halves): for float32 the v3 kernels were faster (layer norm 8192x64 forward 1.68x over the
 * previous build against 1.35x for v4, 768 wide 1.16-1.39x against 0.95-1.05x) and never slower;
 * for the half types v4 was (layer norm 8192x1024 forward 10.7 ms against 58 ms; bfloat16 4.6
 * against 6.2 ms), measured before float16's selects were bit masks and its vectors converted by
 * F16C (which made v3's float16 12-15x faster; not measured again on AVX-512). docs/numerics.md. */
static const bn_kernels_t *(*full_kernels)(bn_dtype_t) = bn_cpu_kernels_base; /* float32, float64 */
static const bn_kernels_t *(*half_kernels)(bn_dtype_t) = bn_cpu_kernels_base; /* float16, bfloat16 */
static const char *level_name = "baseline";
#if defined(BNCORE_KERNEL_LEVELS)
const bn_kernels_t *bn_cpu_kernels_v3(bn_dtype_t dt);
const bn_kernels_t *bn_cpu_kernels_v4(bn_dtype_t dt);
static const bn_kernels_t *(*level_at_most(int most, const char **name))(bn_dtype_t) {
  if (most >= 4 && __builtin_cpu_supports("x86-64-v4")) return *name = "x86-64-v4", bn_cpu_kernels_v4;
  if (most >= 3 && __builtin_cpu_supports("x86-64-v3")) return *name = "x86-64-v3", bn_cpu_kernels_v3;
  return *name = "baseline", bn_cpu_kernels_base;
}
__attribute__((constructor)) static void pick_level(void) {
  static char both[64];
  const char *want = getenv("BNCORE_CPU_LEVEL"), *full_name, *half_name;
  int full_most = 3, half_most = 4; /* the defaults; a known BNCORE_CPU_LEVEL sets both */
  if (want && !strcmp(want, "baseline")) full_most = half_most = 1;
  if (want && !strcmp(want, "x86-64-v3")) full_most = half_most = 3;
  if (want && !strcmp(want, "x86-64-v4")) full_most = half_most = 4;
  __builtin_cpu_init();
  full_kernels = level_at_most(full_most, &full_name);
  half_kernels = level_at_most(half_most, &half_name);
  if (!strcmp(full_name, half_name)) {
    level_name = full_name;
  } else {
    snprintf(both, sizeof both, "%s (float16, bfloat16: %s)", full_name, half_name);
    level_name = both;
  }
}
#endif

const bn_kernels_t *bn_cpu_kernels(bn_dtype_t dt) {
  return dt == BN_F16 || dt == BN_BF16 ? half_kernels(dt) : full_kernels(dt);
}

BN_API const char *bn_cpu_kernel_level(void) { return level_name; }
#endif
