/* Status strings and the thread-local detail message. */
#include <stdarg.h>
#include <stdio.h>

#include "backend.h"

static const char *const status_strings[BN_STATUS_COUNT] = {
    [BN_STATUS_SUCCESS] = "success",
    [BN_STATUS_INVALID_ARGUMENT] = "invalid argument",
    [BN_STATUS_SHAPE_MISMATCH] = "shape mismatch",
    [BN_STATUS_UNSUPPORTED_DTYPE] = "unsupported dtype",
    [BN_STATUS_UNSUPPORTED_DEVICE] = "unsupported device",
    [BN_STATUS_OVERLAP] = "overlapping output",
    [BN_STATUS_OUT_OF_MEMORY] = "out of memory",
    [BN_STATUS_INTERNAL] = "internal error",
};

static _Thread_local char last_error[512];

const char *bn_status_string(bn_status_t status) {
  if ((int)status < 0 || status >= BN_STATUS_COUNT) return "unknown status";
  return status_strings[status];
}

const char *bn_last_error(void) { return last_error; }

void bn_clear_error(void) { last_error[0] = '\0'; }

bn_status_t bn_fail(bn_status_t status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, ap);
  va_end(ap);
  return status;
}

uint32_t bn_version(void) { return BN_VERSION; }

const char *bn_version_string(void) { return BN_VERSION_STRING; }

#include "build_config.h" /* BNCORE_CUDA_ARCHITECTURES, written by CMake */

bn_status_t bn_build_features(uint32_t *features, const char **cuda_architectures) {
  bn_clear_error();
  uint32_t f = 0;
#ifdef BNCORE_WITH_CUDA
  f |= BN_BUILD_CUDA;
#endif
#ifdef _OPENMP
  f |= BN_BUILD_OPENMP;
#endif
  if (features) *features = f;
  if (cuda_architectures) *cuda_architectures = BNCORE_CUDA_ARCHITECTURES;
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_cuda_device_count(int32_t *count) {
  bn_clear_error();
  if (!count) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "count: expected a place to write to, got NULL");
#ifdef BNCORE_WITH_CUDA
  *count = bn_cuda_device_count_raw();
#else
  *count = 0;
#endif
  return BN_STATUS_SUCCESS;
}
