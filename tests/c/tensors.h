/* Small DLTensor helpers shared by the C tests: views over malloc'ed buffers,
 * element access by logical index, a deterministic random generator. */
#ifndef BNCORE_TESTS_TENSORS_H
#define BNCORE_TESTS_TENSORS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bncore/bncore.h"

static const DLDataType TT_F32 = {kDLFloat, 32, 1};
static const DLDataType TT_F64 = {kDLFloat, 64, 1};
static const DLDataType TT_I32 = {kDLInt, 32, 1};

/* A DLTensor with its own shape and stride storage. Use through a pointer only:
 * t.shape / t.strides point into the struct itself. */
typedef struct tt_t {
  DLTensor t;
  int64_t shape[BN_MAX_NDIM];
  int64_t strides[BN_MAX_NDIM];
} tt_t;

/* A CPU view of `data`; strides NULL gives t.strides == NULL (compact row-major). */
static inline DLTensor *tt_init(tt_t *tt, void *data, DLDataType dt, int ndim, const int64_t *shape,
                                const int64_t *strides) {
  memset(tt, 0, sizeof *tt);
  tt->t.data = data;
  tt->t.device.device_type = kDLCPU;
  tt->t.device.device_id = 0;
  tt->t.ndim = ndim;
  tt->t.dtype = dt;
  for (int d = 0; d < ndim; d++) tt->shape[d] = shape[d];
  tt->t.shape = tt->shape;
  if (strides) {
    for (int d = 0; d < ndim; d++) tt->strides[d] = strides[d];
    tt->t.strides = tt->strides;
  }
  tt->t.byte_offset = 0;
  return &tt->t;
}

/* A 1-d view of n values. */
static inline DLTensor *tt_vec(tt_t *tt, void *data, DLDataType dt, int64_t n) {
  return tt_init(tt, data, dt, 1, &n, NULL);
}

static inline int64_t tt_numel(const DLTensor *t) {
  int64_t n = 1;
  for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
  return n;
}

static inline int64_t tt_stride(const DLTensor *t, int d) {
  if (t->strides) return t->strides[d];
  int64_t s = 1;
  for (int k = t->ndim - 1; k > d; k--) s *= t->shape[k];
  return s;
}

/* Element offset (in elements, from element 0) of a logical index. */
static inline int64_t tt_offset(const DLTensor *t, const int64_t *idx) {
  int64_t off = 0;
  for (int d = 0; d < t->ndim; d++) off += idx[d] * tt_stride(t, d);
  return off;
}

static inline double tt_get(const DLTensor *t, const int64_t *idx) {
  const char *base = (const char *)t->data + t->byte_offset;
  const int64_t off = tt_offset(t, idx);
  if (t->dtype.bits == 32) {
    float f;
    memcpy(&f, base + off * 4, 4);
    return f;
  }
  double v;
  memcpy(&v, base + off * 8, 8);
  return v;
}

static inline void tt_set(DLTensor *t, const int64_t *idx, double v) {
  char *base = (char *)t->data + t->byte_offset;
  const int64_t off = tt_offset(t, idx);
  if (t->dtype.bits == 32) {
    float f = (float)v;
    memcpy(base + off * 4, &f, 4);
  } else {
    memcpy(base + off * 8, &v, 8);
  }
}

/* Advances a row-major index over `shape`; returns 0 after the last one. */
static inline int tt_next(int ndim, const int64_t *shape, int64_t *idx) {
  for (int d = ndim - 1; d >= 0; d--) {
    if (++idx[d] < shape[d]) return 1;
    idx[d] = 0;
  }
  return 0;
}

/* Deterministic uniform values in [-1, 1) (xorshift64*). */
static inline double tt_rand(uint64_t *state) {
  uint64_t x = *state;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *state = x;
  return (double)((x * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

/* Fills every element of t (by logical index) with scale * uniform + shift. */
static inline void tt_fill(DLTensor *t, uint64_t *state, double scale, double shift) {
  int64_t idx[BN_MAX_NDIM] = {0};
  if (tt_numel(t) == 0) return;
  do tt_set(t, idx, scale * tt_rand(state) + shift);
  while (tt_next(t->ndim, t->shape, idx));
}

#endif /* BNCORE_TESTS_TENSORS_H */
