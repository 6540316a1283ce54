/* DLTensor checks: dtype, device, shape, strides, overlap; small-tensor gathers. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "half.h"
#include "internal.h"

static const char *const dtype_names[BN_DTYPE_COUNT] = {"float16", "bfloat16", "float32", "float64"};
static const size_t dtype_sizes[BN_DTYPE_COUNT] = {2, 2, 4, 8};

const char *bn_dtype_name(bn_dtype_t dt) { return dtype_names[dt]; }
size_t bn_dtype_size(bn_dtype_t dt) { return dtype_sizes[dt]; }

bn_status_t bn_dtype_of(const DLTensor *t, const char *what, bn_dtype_t *out) {
  DLDataType d = t->dtype;
  if (d.lanes == 1) {
    if (d.code == kDLFloat && d.bits == 16) return *out = BN_F16, BN_STATUS_SUCCESS;
    if (d.code == kDLFloat && d.bits == 32) return *out = BN_F32, BN_STATUS_SUCCESS;
    if (d.code == kDLFloat && d.bits == 64) return *out = BN_F64, BN_STATUS_SUCCESS;
    if (d.code == kDLBfloat && d.bits == 16) return *out = BN_BF16, BN_STATUS_SUCCESS;
  }
  static const char *const codes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  const char *code = d.code < sizeof codes / sizeof codes[0] ? codes[d.code] : "unknown";
  return bn_fail(BN_STATUS_UNSUPPORTED_DTYPE,
                 "%s: expected a floating dtype (float16, bfloat16, float32 or float64), got %s%u (lanes %u)",
                 what, code, (unsigned)d.bits, (unsigned)d.lanes);
}

int64_t bn_numel(const DLTensor *t) {
  int64_t n = 1;
  for (int32_t d = 0; d < t->ndim; d++) n *= t->shape[d];
  return n;
}

int64_t bn_stride(const DLTensor *t, int32_t d) {
  if (t->strides) return t->strides[d];
  int64_t s = 1;
  for (int32_t k = t->ndim - 1; k > d; k--) s *= t->shape[k];
  return s;
}

char *bn_base(const DLTensor *t) { return (char *)t->data + t->byte_offset; }

bn_status_t bn_check_tensor(const DLTensor *t, const char *what, bn_dtype_t *dt) {
  if (!t) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: expected a tensor, got NULL", what);
  if (t->ndim < 0 || t->ndim > BN_MAX_NDIM)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: expected 0 to %d dimensions, got %d", what, BN_MAX_NDIM,
                   (int)t->ndim);
  if (t->ndim > 0 && !t->shape)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: shape is NULL for a %d-dimensional tensor", what, (int)t->ndim);
  /* elements must be countable, and their byte extent addressable, without overflow: the product
   * of the non-zero sizes stays within BN_MAX_NUMEL even when another size is 0 (the plan
   * multiplies them), and so does the reach of the strides */
  int64_t count = 1;
  for (int32_t d = 0; d < t->ndim; d++) {
    const int64_t n = t->shape[d];
    if (n < 0)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: size of axis %d is negative (%" PRId64 ")", what, (int)d, n);
    if (n > 0 && count > BN_MAX_NUMEL / n)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: more than %" PRId64 " elements (size %" PRId64 " at axis %d)",
                     what, (int64_t)BN_MAX_NUMEL, n, (int)d);
    if (n > 0) count *= n;
  }
  if (t->strides) {
    int64_t reach = 0;
    for (int32_t d = 0; d < t->ndim; d++) {
      const int64_t n = t->shape[d], s = t->strides[d];
      const int64_t a = s == INT64_MIN ? INT64_MAX : (s < 0 ? -s : s);
      if (a > BN_MAX_NUMEL) /* also on axes of 0 or 1 elements: the plan still flips and multiplies them */
        return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: stride %" PRId64 " at axis %d is beyond %" PRId64 " elements",
                       what, s, (int)d, (int64_t)BN_MAX_NUMEL);
      if (n <= 1) continue;
      if (a > (BN_MAX_NUMEL - reach) / (n - 1))
        return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                       "%s: stride %" PRId64 " at axis %d (size %" PRId64 ") reaches beyond %" PRId64 " elements",
                       what, s, (int)d, n, (int64_t)BN_MAX_NUMEL);
      reach += a * (n - 1);
    }
  }
  bn_status_t st = bn_dtype_of(t, what, dt);
  if (st) return st;
  if (!t->data && bn_numel(t) > 0)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: data is NULL for a non-empty tensor", what);
  /* data + byte_offset must be an address, with room for the elements' reach, aligned for the type */
  const uintptr_t data = (uintptr_t)t->data;
  if (data > (uintptr_t)INTPTR_MAX || t->byte_offset > (uint64_t)((uintptr_t)INTPTR_MAX - data))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: byte_offset %" PRIu64 " leaves the address space", what,
                   (uint64_t)t->byte_offset);
  if (bn_numel(t) > 0 && (data + (uintptr_t)t->byte_offset) % bn_dtype_size(*dt) != 0)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: element 0 at %p + %" PRIu64 " is not aligned to its %zu-byte type",
                   what, t->data, (uint64_t)t->byte_offset, bn_dtype_size(*dt));
  return BN_STATUS_SUCCESS;
}

int bn_is_host(DLDevice device) {
  return device.device_type == kDLCPU || device.device_type == kDLCUDAHost || device.device_type == kDLCUDAManaged;
}

bn_status_t bn_check_host(const DLTensor *t, const char *what) {
  if (bn_is_host(t->device)) return BN_STATUS_SUCCESS;
  return bn_fail(BN_STATUS_UNSUPPORTED_DEVICE,
                 "%s: expected a tensor in host memory (cpu, cuda_host or cuda_managed), got one on device type %d "
                 "(id %d)",
                 what, (int)t->device.device_type, (int)t->device.device_id);
}

static void shape_text(const DLTensor *t, char *buf, size_t cap) {
  size_t k = (size_t)snprintf(buf, cap, "(");
  for (int32_t d = 0; d < t->ndim && k < cap; d++)
    k += (size_t)snprintf(buf + k, cap - k, d ? ", %" PRId64 : "%" PRId64, t->shape[d]);
  if (k < cap) snprintf(buf + k, cap - k, t->ndim == 1 ? ",)" : ")");
}

bn_status_t bn_check_same_shape(const DLTensor *t, const char *what, const DLTensor *ref, const char *refname) {
  int same = t->ndim == ref->ndim;
  for (int32_t d = 0; same && d < t->ndim; d++) same = t->shape[d] == ref->shape[d];
  if (same) return BN_STATUS_SUCCESS;
  char a[256], b[256];
  shape_text(t, a, sizeof a);
  shape_text(ref, b, sizeof b);
  return bn_fail(BN_STATUS_SHAPE_MISMATCH, "%s: expected the shape of %s %s, got %s", what, refname, b, a);
}

bn_status_t bn_check_numel(const DLTensor *t, const char *what, int64_t count, const char *of_what) {
  int64_t n = bn_numel(t);
  if (n == count) return BN_STATUS_SUCCESS;
  return bn_fail(BN_STATUS_SHAPE_MISMATCH, "%s: expected %" PRId64 " values (one per %s), got %" PRId64, what,
                 count, of_what, n);
}

/* [lo, hi) byte range that a tensor's elements span. */
static void byte_span(const DLTensor *t, size_t esize, uintptr_t *lo, uintptr_t *hi) {
  uintptr_t base = (uintptr_t)bn_base(t);
  intptr_t neg = 0, pos = 0;
  for (int32_t d = 0; d < t->ndim; d++) {
    intptr_t ext = (intptr_t)((t->shape[d] - 1) * bn_stride(t, d)) * (intptr_t)esize;
    if (ext < 0) neg += ext;
    else pos += ext;
  }
  *lo = base + neg;
  *hi = base + pos + esize;
}

bn_status_t bn_check_overlap(const DLTensor *out, const char *outname, const DLTensor *in, const char *inname,
                             int alias_ok) {
  bn_dtype_t dto = BN_F32, dti = BN_F32;
  if (!out || !in || bn_numel(out) == 0 || bn_numel(in) == 0) return BN_STATUS_SUCCESS;
  if (bn_dtype_of(out, outname, &dto) || bn_dtype_of(in, inname, &dti)) return BN_STATUS_SUCCESS;
  uintptr_t lo1, hi1, lo2, hi2;
  byte_span(out, bn_dtype_size(dto), &lo1, &hi1);
  byte_span(in, bn_dtype_size(dti), &lo2, &hi2);
  if (hi1 <= lo2 || hi2 <= lo1) return BN_STATUS_SUCCESS;
  int identical = bn_base(out) == bn_base(in) && out->ndim == in->ndim && dto == dti;
  for (int32_t d = 0; identical && d < out->ndim; d++)
    identical = out->shape[d] == in->shape[d] && (out->shape[d] == 1 || bn_stride(out, d) == bn_stride(in, d));
  if (identical && alias_ok) return BN_STATUS_SUCCESS;
  return bn_fail(BN_STATUS_OVERLAP, "%s overlaps %s in memory%s", outname, inname,
                 alias_ok ? "; it may only be the very same tensor (in place)" : "; it must not share memory with it");
}

static double load_f64(const char *p, bn_dtype_t dt) {
  switch (dt) {
    case BN_F16: { uint16_t h; memcpy(&h, p, 2); return bn_f16_to_f32(h); }
    case BN_BF16: { uint16_t h; memcpy(&h, p, 2); return bn_bf16_to_f32(h); }
    case BN_F32: { float f; memcpy(&f, p, 4); return f; }
    default: { double v; memcpy(&v, p, 8); return v; }
  }
}

static void store_f64(char *p, bn_dtype_t dt, double v) {
  switch (dt) {
    case BN_F16: { uint16_t h = bn_f32_to_f16((float)v); memcpy(p, &h, 2); break; }
    case BN_BF16: { uint16_t h = bn_f32_to_bf16((float)v); memcpy(p, &h, 2); break; }
    case BN_F32: { float f = (float)v; memcpy(p, &f, 4); break; }
    default: memcpy(p, &v, 8);
  }
}

/* The elements p[0], p[s], ..., p[(n-1)s] of dtype dt into (or, with store, from) buf: one loop per
 * dtype and direction, so that the per-channel vectors of a small call cost a few instructions each. */
#define BN_STRIDED_COPY(TYPE, LOAD, STORE)                                            \
  do {                                                                                \
    TYPE v_;                                                                          \
    if (store)                                                                        \
      for (int64_t i = 0; i < n; i++) v_ = STORE(buf[i]), memcpy(p + i * step, &v_, sizeof v_); \
    else                                                                              \
      for (int64_t i = 0; i < n; i++) memcpy(&v_, p + i * step, sizeof v_), buf[i] = LOAD(v_); \
  } while (0)
#define BN_AS_IS(v) (v)
#define BN_TO_F32(v) ((float)(v))
#define BN_TO_F16(v) bn_f32_to_f16((float)(v))
#define BN_TO_BF16(v) bn_f32_to_bf16((float)(v))

static void visit_strided(char *p, int64_t s, int64_t n, bn_dtype_t dt, double *buf, int store) {
  const int64_t step = s * (int64_t)bn_dtype_size(dt);
  switch (dt) {
    case BN_F16: BN_STRIDED_COPY(uint16_t, bn_f16_to_f32, BN_TO_F16); break;
    case BN_BF16: BN_STRIDED_COPY(uint16_t, bn_bf16_to_f32, BN_TO_BF16); break;
    case BN_F32: BN_STRIDED_COPY(float, BN_AS_IS, BN_TO_F32); break;
    default: BN_STRIDED_COPY(double, BN_AS_IS, BN_AS_IS);
  }
}

/* Visits the elements of a small tensor in row-major order of its shape. */
static void visit(const DLTensor *t, double *buf, int store) {
  bn_dtype_t dt = BN_F64;
  if (bn_dtype_of(t, "tensor", &dt)) return;
  int64_t n = bn_numel(t), idx[BN_MAX_NDIM] = {0};
  size_t es = bn_dtype_size(dt);
  char *base = bn_base(t);
  int32_t dim = -1, dims = 0; /* the dims of more than one element */
  for (int32_t d = 0; d < t->ndim; d++)
    if (t->shape[d] != 1) dim = d, dims++;
  if (dims <= 1) { /* a vector in any dims (the per-channel tensors): one stride */
    visit_strided(base, dim < 0 ? 0 : bn_stride(t, dim), n, dt, buf, store);
    return;
  }
  for (int64_t i = 0; i < n; i++) {
    int64_t off = 0;
    for (int32_t d = 0; d < t->ndim; d++) off += idx[d] * bn_stride(t, d);
    if (store) store_f64(base + off * (int64_t)es, dt, buf[i]);
    else buf[i] = load_f64(base + off * (int64_t)es, dt);
    for (int32_t d = t->ndim - 1; d >= 0; d--) {
      if (++idx[d] < t->shape[d]) break;
      idx[d] = 0;
    }
  }
}

void bn_gather_f64(const DLTensor *t, double *dst) { visit(t, dst, 0); }
void bn_scatter_f64(DLTensor *t, const double *src) { visit(t, (double *)src, 1); }

bn_status_t bn_check_own_memory(const DLTensor *t, const char *what) {
  if (!t) return BN_STATUS_SUCCESS;
  /* dims of more than one element, by |stride|: each stride must pass the reach of the smaller ones
   * (sufficient for distinct addresses; a layout that interleaves dims another way is refused too) */
  int64_t a[BN_MAX_NDIM], n[BN_MAX_NDIM];
  int32_t axis[BN_MAX_NDIM];
  int k = 0;
  for (int32_t d = 0; d < t->ndim; d++) {
    if (t->shape[d] == 0) return BN_STATUS_SUCCESS; /* no elements */
    if (t->shape[d] == 1) continue;
    const int64_t s = bn_stride(t, d);
    int j = k++;
    for (; j > 0 && a[j - 1] > (s < 0 ? -s : s); j--) a[j] = a[j - 1], n[j] = n[j - 1], axis[j] = axis[j - 1];
    a[j] = s < 0 ? -s : s, n[j] = t->shape[d], axis[j] = d;
  }
  int64_t reach = 0;
  for (int i = 0; i < k; i++) {
    if (a[i] <= reach)
      return bn_fail(BN_STATUS_OVERLAP,
                     "%s: its elements overlap each other in memory (stride %" PRId64 " at axis %d, size %" PRId64
                     "); an output needs its own address for every element",
                     what, bn_stride(t, axis[i]), (int)axis[i], n[i]);
    reach += a[i] * (n[i] - 1);
  }
  return BN_STATUS_SUCCESS;
}

/* The byte range of a tensor with elements; an empty range for an absent or empty one. */
typedef struct span_t {
  uintptr_t lo, hi;
} span_t;

static span_t span_of(const DLTensor *t) {
  span_t sp = {0, 0};
  bn_dtype_t dt = BN_F64;
  if (t && bn_numel(t) > 0 && bn_dtype_of(t, "tensor", &dt) == BN_STATUS_SUCCESS)
    byte_span(t, bn_dtype_size(dt), &sp.lo, &sp.hi);
  return sp;
}

static int spans_meet(span_t a, span_t b) { return a.lo < a.hi && b.lo < b.hi && a.lo < b.hi && b.lo < a.hi; }

bn_status_t bn_check_no_overlap(const bn_arg_t *outs, int nouts, const int *alias, const bn_arg_t *ins, int nins) {
  /* every range once, then the pairs: only pairs whose ranges meet get bn_check_overlap's full verdict
   * (a call of a few microseconds checks dozens of pairs) */
  span_t so[BN_MAX_ARGS], si[BN_MAX_ARGS];
  if (nouts > BN_MAX_ARGS || nins > BN_MAX_ARGS)
    return bn_fail(BN_STATUS_INTERNAL, "overlap check of %d outputs and %d inputs", nouts, nins);
  for (int j = 0; j < nins; j++) si[j] = span_of(ins[j].t);
  bn_status_t st;
  for (int i = 0; i < nouts; i++) {
    so[i] = span_of(outs[i].t);
    if ((st = bn_check_own_memory(outs[i].t, outs[i].name))) return st;
    for (int j = 0; j < nins; j++)
      if (spans_meet(so[i], si[j]) &&
          (st = bn_check_overlap(outs[i].t, outs[i].name, ins[j].t, ins[j].name, alias[i] == j)))
        return st;
    for (int j = 0; j < i; j++)
      if (spans_meet(so[i], so[j]) && (st = bn_check_overlap(outs[i].t, outs[i].name, outs[j].t, outs[j].name, 0)))
        return st;
  }
  return BN_STATUS_SUCCESS;
}
