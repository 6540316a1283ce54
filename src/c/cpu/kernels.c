/* The row kernels, instantiated once per element type from kernels.inc. */
#include <math.h>
#include <string.h>

#include "cpu.h"
#include "../half.h"

/* The kernels' vector-typed helpers are always inlined into each clone, so no vector crosses a call:
 * the warning that the baseline clone would pass them differently does not apply. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

static inline float load_f16(const uint16_t *p) { return bn_f16_to_f32_vec(*p); }
static inline float load_bf16(const uint16_t *p) { return bn_bf16_to_f32(*p); }
static inline void store_f16(uint16_t *p, float v) { *p = bn_f32_to_f16_vec(v); }
static inline void store_bf16(uint16_t *p, float v) { *p = bn_f32_to_bf16(v); }

#define T float
#define CT float
#define LOAD(p) (*(p))
#define STORE(p, v) (*(p) = (v))
#define SUFFIX _f32
#include "kernels.inc"
#undef T
#undef CT
#undef LOAD
#undef STORE
#undef SUFFIX

#define T double
#define CT double
#define LOAD(p) (*(p))
#define STORE(p, v) (*(p) = (v))
#define SUFFIX _f64
#include "kernels.inc"
#undef T
#undef CT
#undef LOAD
#undef STORE
#undef SUFFIX

#define T uint16_t
#define CT float
#define LOAD(p) load_f16(p)
#define STORE(p, v) store_f16((p), (v))
#define SUFFIX _f16
#include "kernels.inc"
#undef LOAD
#undef STORE
#undef SUFFIX

#define LOAD(p) load_bf16(p)
#define STORE(p, v) store_bf16((p), (v))
#define SUFFIX _bf16
#include "kernels.inc"
#undef T
#undef CT
#undef LOAD
#undef STORE
#undef SUFFIX

const bn_kernels_t *bn_cpu_kernels(bn_dtype_t dt) {
  switch (dt) {
    case BN_F16: return &kernels__f16;
    case BN_BF16: return &kernels__bf16;
    case BN_F32: return &kernels__f32;
    default: return &kernels__f64;
  }
}
