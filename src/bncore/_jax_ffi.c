/*
 * bncore._jax_ffi: the XLA FFI handlers behind bncore.jax.
 *
 * Two handlers, registered with jax.ffi.register_ffi_target by bncore/jax.py:
 *   bncore_norm_forward   bn_norm_forward on XLA's buffers
 *   bncore_norm_backward  bn_norm_backward on XLA's buffers
 * Each turns XLA's row-major buffers into DLTensors over the same memory (no copy)
 * and makes one call into the C ABI with a NULL (default) context; a failing status
 * comes back to JAX as an XLA error carrying bncore's message. The problem
 * description arrives as attributes holding the fields of bn_norm_desc_t, so that
 * the Python side can describe any variant, also the vmapped ones (an extra
 * non-reduced leading axis), without new handlers.
 *
 * Attributes (scalars, integer or floating as named):
 *   reduce_axes, param_axes, split_axis, num_groups, eps, momentum, flags
 *       the bn_norm_desc_t fields of those names
 *   operands   bits saying which optional buffers are present (OPERAND_* below)
 *
 * Buffers, in this order (brackets: present when the operands bit says so):
 *   forward   args  x [weight] [bias] [running_mean running_var]
 *             rets  y save_mean save_rstd [new_running_mean new_running_var]
 *                   (the new running statistics with BN_FLAG_UPDATE_RUNNING_STATS:
 *                   they start as a copy of the old, unless XLA aliased them, and
 *                   are updated in place)
 *   backward  args  x dy [weight] save_mean save_rstd
 *             rets  dx [dweight] [dbias]
 *
 * Nothing here touches Python objects at execution time: the module only hands
 * the two function pointers to Python as capsules.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "bncore/bncore.h"
#include "xla_ffi.h"

enum {
  OPERAND_WEIGHT = 1 << 0,  /* forward: weight given; backward: weight given */
  OPERAND_BIAS = 1 << 1,    /* forward: bias given;   backward: dbias wanted */
  OPERAND_RUNNING = 1 << 2, /* forward: running_mean and running_var given */
  OPERAND_DWEIGHT = 1 << 3, /* backward: dweight wanted */
};

/* ------------------------------------------------------------------ errors */

static bn_xla_error *make_error(const bn_xla_call_frame *frame, bn_xla_error_code code, const char *fmt, ...) {
  char message[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(message, sizeof message, fmt, ap);
  va_end(ap);
  bn_xla_error_create_args args;
  memset(&args, 0, sizeof args);
  args.struct_size = BN_XLA_STRUCT_SIZE(bn_xla_error_create_args, errc);
  args.message = message;
  args.errc = code;
  return frame->api->error_create(&args);
}

static bn_xla_error_code xla_code(bn_status_t st) {
  switch (st) {
    case BN_STATUS_OUT_OF_MEMORY: return BN_XLA_ERROR_RESOURCE_EXHAUSTED;
    case BN_STATUS_UNSUPPORTED_DEVICE: return BN_XLA_ERROR_UNIMPLEMENTED;
    case BN_STATUS_INTERNAL: return BN_XLA_ERROR_INTERNAL;
    default: return BN_XLA_ERROR_INVALID_ARGUMENT;
  }
}

static bn_xla_error *status_error(const bn_xla_call_frame *frame, const char *what, bn_status_t st) {
  return make_error(frame, xla_code(st), "bncore %s: %s: %s", what, bn_status_string(st), bn_last_error());
}

/* ------------------------------------------------------------------ the metadata query */

/* At registration XLA asks, through a metadata extension, which FFI version the
 * handler was written for; the answer is all a handler does with such a frame.
 * Returns 1 when the frame was such a query. */
static int answer_metadata(bn_xla_call_frame *frame) {
  for (bn_xla_extension_base *ext = frame->extension_start; ext; ext = ext->next) {
    if (ext->type != BN_XLA_EXTENSION_METADATA) continue;
    bn_xla_metadata_extension *m = (bn_xla_metadata_extension *)ext;
    if (ext->struct_size < BN_XLA_STRUCT_SIZE(bn_xla_metadata_extension, metadata) || !m->metadata)
      return 1;
    bn_xla_metadata *md = m->metadata;
    if (md->struct_size < BN_XLA_STRUCT_SIZE(bn_xla_metadata, traits)) return 1;
    md->api_version.struct_size = BN_XLA_STRUCT_SIZE(bn_xla_api_version, minor_version);
    md->api_version.extension_start = NULL;
    md->api_version.major_version = BN_XLA_FFI_API_MAJOR;
    md->api_version.minor_version = BN_XLA_FFI_API_MINOR;
    md->traits = 0;
    if (md->struct_size >= BN_XLA_STRUCT_SIZE(bn_xla_metadata, state_type_id))
      md->state_type_id.type_id = 0;
    return 1;
  }
  return 0;
}

/* ------------------------------------------------------------------ attributes */

static const void *find_scalar(const bn_xla_attrs *attrs, const char *name, bn_xla_dtype *dtype) {
  const size_t len = strlen(name);
  for (int64_t i = 0; i < attrs->size; ++i) {
    const bn_xla_byte_span *n = attrs->names[i];
    if (attrs->types[i] != BN_XLA_ATTR_SCALAR || n->len != len || memcmp(n->ptr, name, len) != 0) continue;
    const bn_xla_scalar *s = (const bn_xla_scalar *)attrs->attrs[i];
    *dtype = s->dtype;
    return s->value;
  }
  return NULL;
}

/* An integer attribute into *out; returns 0, or -1 when missing or not an integer. */
static int attr_int(const bn_xla_attrs *attrs, const char *name, int64_t *out) {
  bn_xla_dtype dt;
  const void *v = find_scalar(attrs, name, &dt);
  if (!v) return -1;
  switch (dt) {
    case BN_XLA_DTYPE_S32: *out = *(const int32_t *)v; return 0;
    case BN_XLA_DTYPE_S64: *out = *(const int64_t *)v; return 0;
    case BN_XLA_DTYPE_U32: *out = *(const uint32_t *)v; return 0;
    case BN_XLA_DTYPE_U64: *out = (int64_t) * (const uint64_t *)v; return 0;
    default: return -1;
  }
}

static int attr_float(const bn_xla_attrs *attrs, const char *name, double *out) {
  bn_xla_dtype dt;
  const void *v = find_scalar(attrs, name, &dt);
  if (!v) return -1;
  switch (dt) {
    case BN_XLA_DTYPE_F32: *out = *(const float *)v; return 0;
    case BN_XLA_DTYPE_F64: *out = *(const double *)v; return 0;
    default: return -1;
  }
}

/* The problem description and operand bits of a call. */
static bn_xla_error *read_desc(const bn_xla_call_frame *frame, bn_norm_desc_t *desc, int64_t *operands) {
  int64_t reduce, param, split, groups, flags;
  double eps, momentum;
  const bn_xla_attrs *a = &frame->attrs;
  if (attr_int(a, "reduce_axes", &reduce) || attr_int(a, "param_axes", &param) ||
      attr_int(a, "split_axis", &split) || attr_int(a, "num_groups", &groups) || attr_int(a, "flags", &flags) ||
      attr_int(a, "operands", operands) || attr_float(a, "eps", &eps) || attr_float(a, "momentum", &momentum))
    return make_error(frame, BN_XLA_ERROR_INVALID_ARGUMENT,
                      "bncore: the call lacks an attribute (reduce_axes, param_axes, split_axis, num_groups, "
                      "flags, operands: integers; eps, momentum: floats)");
  if (split < INT32_MIN || split > INT32_MAX || flags < 0 || flags > UINT32_MAX)
    return make_error(frame, BN_XLA_ERROR_INVALID_ARGUMENT, "bncore: split_axis %lld or flags %lld out of range",
                      (long long)split, (long long)flags);
  memset(desc, 0, sizeof *desc);
  desc->struct_size = sizeof *desc;
  desc->reduce_axes = (uint64_t)reduce;
  desc->param_axes = (uint64_t)param;
  desc->split_axis = (int32_t)split;
  desc->num_groups = groups;
  desc->eps = eps;
  desc->momentum = momentum;
  desc->flags = (uint32_t)flags;
  return NULL;
}

/* ------------------------------------------------------------------ buffers as DLTensors */

static int dl_dtype(bn_xla_dtype dt, DLDataType *out) {
  switch (dt) {
    case BN_XLA_DTYPE_F16: *out = (DLDataType){kDLFloat, 16, 1}; return 0;
    case BN_XLA_DTYPE_BF16: *out = (DLDataType){kDLBfloat, 16, 1}; return 0;
    case BN_XLA_DTYPE_F32: *out = (DLDataType){kDLFloat, 32, 1}; return 0;
    case BN_XLA_DTYPE_F64: *out = (DLDataType){kDLFloat, 64, 1}; return 0;
    default: return -1;
  }
}

/* A DLTensor over one of XLA's buffers (compact row-major: strides NULL). */
static bn_xla_error *as_tensor(const bn_xla_call_frame *frame, void *buffer, const char *what, DLTensor *t) {
  const bn_xla_buffer *b = (const bn_xla_buffer *)buffer;
  memset(t, 0, sizeof *t);
  if (dl_dtype(b->dtype, &t->dtype))
    return make_error(frame, BN_XLA_ERROR_INVALID_ARGUMENT,
                      "bncore: %s: expected float16, bfloat16, float32 or float64, got XLA type %d", what,
                      (int)b->dtype);
  if (b->rank < 0 || b->rank > BN_MAX_NDIM)
    return make_error(frame, BN_XLA_ERROR_INVALID_ARGUMENT, "bncore: %s: rank %lld outside [0, %d]", what,
                      (long long)b->rank, BN_MAX_NDIM);
  t->data = b->data;
  t->device = (DLDevice){kDLCPU, 0};
  t->ndim = (int32_t)b->rank;
  t->shape = b->dims;
  return NULL;
}

/* Binds `n` args (or rets) as tensors after checking that the call has exactly n. */
static bn_xla_error *bind(const bn_xla_call_frame *frame, int64_t have, void **buffers, int64_t n,
                          const char *const *names, DLTensor *out, const char *side) {
  if (have != n)
    return make_error(frame, BN_XLA_ERROR_INVALID_ARGUMENT, "bncore: expected %lld %s, got %lld", (long long)n,
                      side, (long long)have);
  for (int64_t i = 0; i < n; ++i) {
    bn_xla_error *err = as_tensor(frame, buffers[i], names[i], &out[i]);
    if (err) return err;
  }
  return NULL;
}

static size_t nbytes(const DLTensor *t) {
  size_t n = (size_t)(t->dtype.bits / 8);
  for (int32_t d = 0; d < t->ndim; ++d) n *= (size_t)t->shape[d];
  return n;
}

/* ------------------------------------------------------------------ forward and backward */

static bn_xla_error *norm_forward(bn_xla_call_frame *frame) {
  if (answer_metadata(frame)) return NULL;
  bn_norm_desc_t desc;
  int64_t ops;
  bn_xla_error *err = read_desc(frame, &desc, &ops);
  if (err) return err;
  const int update = (desc.flags & BN_FLAG_UPDATE_RUNNING_STATS) != 0;

  const char *arg_names[5] = {"x"}, *ret_names[5] = {"y", "save_mean", "save_rstd"};
  int64_t nargs = 1, nrets = 3, iw = -1, ib = -1, irun = -1;
  if (ops & OPERAND_WEIGHT) arg_names[iw = nargs++] = "weight";
  if (ops & OPERAND_BIAS) arg_names[ib = nargs++] = "bias";
  if (ops & OPERAND_RUNNING) {
    arg_names[irun = nargs++] = "running_mean";
    arg_names[nargs++] = "running_var";
  }
  if (update) {
    ret_names[nrets++] = "new_running_mean";
    ret_names[nrets++] = "new_running_var";
  }
  DLTensor in[5], out[5];
  if ((err = bind(frame, frame->args.size, frame->args.args, nargs, arg_names, in, "inputs")) ||
      (err = bind(frame, frame->rets.size, frame->rets.rets, nrets, ret_names, out, "outputs")))
    return err;
  DLTensor *running_mean = irun >= 0 ? &in[irun] : NULL, *running_var = irun >= 0 ? &in[irun + 1] : NULL;
  if (update) {
    if (irun < 0)
      return make_error(frame, BN_XLA_ERROR_INVALID_ARGUMENT,
                        "bncore: updating running statistics needs them as inputs");
    /* the new statistics start from the old ones (XLA may already have aliased them) */
    for (int k = 0; k < 2; ++k)
      if (out[3 + k].data != in[irun + k].data && nbytes(&out[3 + k]) == nbytes(&in[irun + k]))
        memcpy(out[3 + k].data, in[irun + k].data, nbytes(&in[irun + k]));
    running_mean = &out[3];
    running_var = &out[4];
  }
  bn_status_t st = bn_norm_forward(NULL, &desc, &in[0], iw >= 0 ? &in[iw] : NULL, ib >= 0 ? &in[ib] : NULL, NULL,
                                   NULL, 0, running_mean, running_var, &out[0], &out[1], &out[2]);
  return st == BN_STATUS_SUCCESS ? NULL : status_error(frame, "forward", st);
}

static bn_xla_error *norm_backward(bn_xla_call_frame *frame) {
  if (answer_metadata(frame)) return NULL;
  bn_norm_desc_t desc;
  int64_t ops;
  bn_xla_error *err = read_desc(frame, &desc, &ops);
  if (err) return err;

  const char *arg_names[5] = {"x", "grad_output"}, *ret_names[3] = {"grad_input"};
  int64_t nargs = 2, nrets = 1, iw = -1, idw = -1, idb = -1;
  if (ops & OPERAND_WEIGHT) arg_names[iw = nargs++] = "weight";
  const int64_t isave = nargs;
  arg_names[nargs++] = "save_mean";
  arg_names[nargs++] = "save_rstd";
  if (ops & OPERAND_DWEIGHT) ret_names[idw = nrets++] = "grad_weight";
  if (ops & OPERAND_BIAS) ret_names[idb = nrets++] = "grad_bias";
  DLTensor in[5], out[3];
  if ((err = bind(frame, frame->args.size, frame->args.args, nargs, arg_names, in, "inputs")) ||
      (err = bind(frame, frame->rets.size, frame->rets.rets, nrets, ret_names, out, "outputs")))
    return err;
  bn_status_t st = bn_norm_backward(NULL, &desc, &in[0], &in[1], iw >= 0 ? &in[iw] : NULL, &in[isave],
                                    &in[isave + 1], &out[0], idw >= 0 ? &out[idw] : NULL,
                                    idb >= 0 ? &out[idb] : NULL);
  return st == BN_STATUS_SUCCESS ? NULL : status_error(frame, "backward", st);
}

/* ------------------------------------------------------------------ the Python module */

/* XLA takes a handler as a capsule of its address (function pointers as data pointers: POSIX). */
static PyObject *capsule(bn_xla_handler *fn) { return PyCapsule_New((void *)fn, NULL, NULL); }

/* PyModule_AddObject, taking `value` whatever happens (PyModule_Add of Python 3.13). */
static int add(PyObject *m, const char *name, PyObject *value) {
  if (!value) return -1;
  if (PyModule_AddObject(m, name, value) < 0) {
    Py_DECREF(value);
    return -1;
  }
  return 0;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "bncore._jax_ffi",
    .m_doc = "XLA FFI handlers of bncore.jax (PyCapsules of bn_norm_forward / bn_norm_backward on XLA buffers).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__jax_ffi(void) {
  PyObject *m = PyModule_Create(&module);
  if (!m) return NULL;
  if (add(m, "norm_forward", capsule(norm_forward)) < 0 ||
      add(m, "norm_backward", capsule(norm_backward)) < 0 ||
      add(m, "ffi_api_version", Py_BuildValue("(ii)", BN_XLA_FFI_API_MAJOR, BN_XLA_FFI_API_MINOR)) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
