/*
 * The CUDA backend: drivers that launch the kernels of kernels.cuh over a plan, and the
 * backend table (bn_cuda_backend) at the end. It mirrors cpu/engine.c step for step.
 *
 * Per-group and per-parameter numbers cross the seam as host doubles (bn_coef_t), so each
 * step that produces them (statistics, backward sums, gather) copies them to the host and
 * waits for its stream; steps that only consume them (apply, scatter) upload them and
 * return without waiting. docs/cuda.md lists which entry points wait.
 *
 * Memory: workspaces come from the context's allocator, by default cudaMallocAsync on the
 * call's stream, so they are stream-ordered and never wait either.
 */
#ifdef BNCORE_CUDA_EMULATE /* tools/cuda_emulate.sh: the host compiler runs the kernels on CPU threads */
#include "cuda_emulator.h"
#else
#include <cuda_runtime.h>
/* a launch; _SYNC for kernels that call __syncthreads (the emulator needs to know) */
#define BN_CUDA_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define BN_CUDA_LAUNCH_SYNC BN_CUDA_LAUNCH
#endif
#include <stdlib.h>
#include <string.h>

#include <type_traits>

extern "C" {
#include "../backend.h"
}
#include "kernels.cuh"

static_assert(BN_CUDA_DIMS == BN_MAX_CANON, "kernels.cuh walks the plan's canonical dims");
static_assert(BN_MAX_NDIM <= 16, "bn_cuda_small_t holds a small tensor's dims");

#define BN_CUDA_CHUNK 4096     /* elements per chunk of a reduction, about (a fixed function of the shape) */
#define BN_CUDA_MAX_GRID 65535 /* blocks per launch along y, and a bound along x for grid-stride loops */

/* Out of memory; no usable device or driver; anything else (a launch or a fault) is a bug of ours. */
static bn_status_t cuda_fail(cudaError_t e, const char *what) {
  const bn_status_t st = e == cudaErrorMemoryAllocation ? BN_STATUS_OUT_OF_MEMORY
                         : (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInvalidDevice ||
                            e == cudaErrorDevicesUnavailable)
                             ? BN_STATUS_UNSUPPORTED_DEVICE
                             : BN_STATUS_INTERNAL;
  return bn_fail(st, "CUDA: %s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

/* After a launch: configuration errors now, asynchronous faults at the next wait. */
#define BN_CUDA_LAUNCHED(what)                      \
  do {                                              \
    cudaError_t e_ = cudaGetLastError();            \
    if (e_ != cudaSuccess) return cuda_fail(e_, what); \
  } while (0)

static cudaStream_t stream_of(const bn_exec_t *ex) { return (cudaStream_t)ex->stream; }

/* The tensors' device made current for the call, the caller's restored after it. */
struct device_scope {
  int prev = -1;
  cudaError_t err = cudaSuccess;
  explicit device_scope(const bn_exec_t *ex) {
    if ((err = cudaGetDevice(&prev)) == cudaSuccess && prev != ex->device.device_id)
      err = cudaSetDevice(ex->device.device_id);
  }
  ~device_scope() {
    int now;
    if (prev >= 0 && cudaGetDevice(&now) == cudaSuccess && now != prev) cudaSetDevice(prev);
  }
};

#define BN_CUDA_ENTER(ex)                                           \
  device_scope scope_(ex);                                          \
  if (scope_.err != cudaSuccess) return cuda_fail(scope_.err, "selecting the tensors' device")

static unsigned blocks_for(int64_t n) {
  const int64_t b = (n + BN_CUDA_THREADS - 1) / BN_CUDA_THREADS;
  return (unsigned)(b < 1 ? 1 : b > BN_CUDA_MAX_GRID ? BN_CUDA_MAX_GRID : b);
}

/* ------------------------------------------------------------------ device copies of host doubles */

/* One device block for a call's per-group and per-parameter numbers. */
struct device_numbers {
  const bn_exec_t *ex;
  double *block = NULL;
  size_t used = 0, cap = 0;
  explicit device_numbers(const bn_exec_t *e) : ex(e) {}
  ~device_numbers() { bn_ws_free(ex, block); }
  bn_status_t reserve(size_t count) {
    cap = count ? count : 1;
    block = (double *)bn_ws_alloc(ex, cap * sizeof(double));
    return block ? BN_STATUS_SUCCESS : bn_fail(BN_STATUS_OUT_OF_MEMORY, "CUDA: %zu device doubles", cap);
  }
  /* n doubles on the device: a copy of src (NULL src: left uninitialised for outputs) */
  bn_status_t take(const double *src, int64_t n, const double **out) {
    double *d = block + used;
    used += (size_t)n;
    if (used > cap) return bn_fail(BN_STATUS_INTERNAL, "CUDA: device numbers overflow");
    *out = d;
    if (!src || n == 0) return BN_STATUS_SUCCESS;
    cudaError_t e = cudaMemcpyAsync(d, src, (size_t)n * sizeof(double), cudaMemcpyHostToDevice, stream_of(ex));
    return e == cudaSuccess ? BN_STATUS_SUCCESS : cuda_fail(e, "copying per-group numbers to the device");
  }
};

/* Device results into host doubles: the copy, then the wait for the stream (a host sync). */
static bn_status_t download(const bn_exec_t *ex, double *dst, const double *src, int64_t n) {
  if (n == 0) return BN_STATUS_SUCCESS;
  cudaError_t e = cudaMemcpyAsync(dst, src, (size_t)n * sizeof(double), cudaMemcpyDeviceToHost, stream_of(ex));
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream_of(ex));
  return e == cudaSuccess ? BN_STATUS_SUCCESS : cuda_fail(e, "copying per-group numbers to the host");
}

/* ------------------------------------------------------------------ the plan on the device */

/* The plan's dims whose target stride (sg or sp) is nonzero (`want_target`) or zero. */
static bn_cuda_dims_t select_dims(const bn_plan_t *P, int by_param, int want_target, int64_t *count) {
  bn_cuda_dims_t D;
  memset(&D, 0, sizeof D);
  *count = 1;
  for (int d = 0; d < P->ndim; d++) {
    const bn_dim_t *dim = &P->dim[d];
    if (((by_param ? dim->sp : dim->sg) != 0) != want_target) continue;
    const int k = D.nd++;
    D.n[k] = dim->n;
    for (int o = 0; o < 3; o++) D.s[o][k] = dim->s[o];
    D.sg[k] = dim->sg, D.sp[k] = dim->sp;
    *count *= dim->n;
  }
  return D;
}

/* Every dim of the plan, in its order (outermost first). */
static bn_cuda_dims_t all_dims(const bn_plan_t *P) {
  bn_cuda_dims_t D;
  memset(&D, 0, sizeof D);
  D.nd = P->ndim;
  for (int d = 0; d < P->ndim; d++) {
    const bn_dim_t *dim = &P->dim[d];
    D.n[d] = dim->n;
    for (int o = 0; o < 3; o++) D.s[o][d] = dim->s[o];
    D.sg[d] = dim->sg, D.sp[d] = dim->sp;
  }
  return D;
}

template <typename F>
static bn_status_t by_dtype(bn_dtype_t dt, F &&f) {
  switch (dt) {
    case BN_F16: return f((__half *)0);
    case BN_BF16: return f((__nv_bfloat16 *)0);
    case BN_F32: return f((float *)0);
    case BN_F64: return f((double *)0);
    default: return bn_fail(BN_STATUS_INTERNAL, "CUDA: dtype %d", (int)dt);
  }
}

/*
 * One reduction of the whole problem, by group (by_param 0) or parameter index: moments of x
 * into a = mean, b = m2, or the backward sums into (a, b); a and b are device arrays of
 * ntargets doubles each, indexed by group or parameter index.
 */
static bn_status_t reduce(const bn_exec_t *ex, const bn_plan_t *P, int kind, const bn_cuda_coef_t &c, double *a,
                          double *b) {
  const int by_param = kind == BN_RED_PARAM_SUMS;
  int64_t ntargets, inner_n;
  const bn_cuda_dims_t outer = select_dims(P, by_param, 1, &ntargets), inner = select_dims(P, by_param, 0, &inner_n);
  const int64_t expected = by_param ? P->nparams : P->ngroups;
  if (expected == 0) return BN_STATUS_SUCCESS;
  if (P->numel == 0) { /* no elements: zero statistics and sums, as the CPU's empty path */
    cudaError_t e = cudaMemsetAsync(a, 0, (size_t)expected * sizeof(double), stream_of(ex));
    if (e == cudaSuccess) e = cudaMemsetAsync(b, 0, (size_t)expected * sizeof(double), stream_of(ex));
    return e == cudaSuccess ? BN_STATUS_SUCCESS : cuda_fail(e, "zeroing sums");
  }
  if (ntargets != expected) /* the kernels assume the target dims enumerate every index once */
    return bn_fail(BN_STATUS_INTERNAL, "CUDA: the plan's %s dims count %lld indices, expected %lld",
                   by_param ? "parameter" : "group", (long long)ntargets, (long long)expected);
  int64_t nchunks = (inner_n + BN_CUDA_CHUNK - 1) / BN_CUDA_CHUNK;
  if (nchunks > BN_CUDA_MAX_GRID) nchunks = BN_CUDA_MAX_GRID;
  const int64_t chunk = (inner_n + nchunks - 1) / nchunks;
  nchunks = (inner_n + chunk - 1) / chunk; /* every chunk holds elements */
  if (ntargets > INT64_MAX / (int64_t)sizeof(bn_cuda_part_t) / nchunks)
    return bn_fail(BN_STATUS_OUT_OF_MEMORY, "CUDA: reduction partials");
  bn_cuda_part_t *part = (bn_cuda_part_t *)bn_ws_alloc(ex, (size_t)(ntargets * nchunks) * sizeof *part);
  if (!part) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "CUDA: %lld reduction partials", (long long)(ntargets * nchunks));
  const dim3 grid((unsigned)nchunks, (unsigned)(ntargets < BN_CUDA_MAX_GRID ? ntargets : BN_CUDA_MAX_GRID));
  bn_status_t st = by_dtype(P->dtype, [&](auto *tag) -> bn_status_t {
    typedef typename std::remove_pointer<decltype(tag)>::type T;
    BN_CUDA_LAUNCH_SYNC(bn_cuda_reduce_partials<T>, grid, BN_CUDA_THREADS, stream_of(ex),
        outer, inner, ntargets, inner_n, chunk, P->base[BN_OP_X], P->base[BN_OP_DY], P->g0, P->p0, c, kind, part);
    BN_CUDA_LAUNCHED("reduction partials");
    return BN_STATUS_SUCCESS;
  });
  if (!st) {
    BN_CUDA_LAUNCH(bn_cuda_reduce_finish, blocks_for(ntargets), BN_CUDA_THREADS, stream_of(ex),
        outer, ntargets, nchunks, kind, by_param, by_param ? P->p0 : P->g0, part, a, b);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) st = cuda_fail(e, "reduction finish");
  }
  bn_ws_free(ex, part);
  return st;
}

static bn_status_t apply(const bn_exec_t *ex, const bn_plan_t *P, const bn_cuda_coef_t &c, int mode) {
  if (P->numel == 0 || !P->base[BN_OP_OUT]) return BN_STATUS_SUCCESS;
  const bn_cuda_dims_t D = all_dims(P);
  return by_dtype(P->dtype, [&](auto *tag) -> bn_status_t {
    typedef typename std::remove_pointer<decltype(tag)>::type T;
    BN_CUDA_LAUNCH(bn_cuda_apply<T>, blocks_for(P->numel), BN_CUDA_THREADS, stream_of(ex),
        D, P->numel, P->base[BN_OP_X], P->base[BN_OP_DY], P->base[BN_OP_OUT], P->g0, P->p0, c, mode);
    BN_CUDA_LAUNCHED("apply");
    return BN_STATUS_SUCCESS;
  });
}

/* ------------------------------------------------------------------ steps */

/* Moments of every group into c->mean, c->var (m2): device reduction, then to the host. */
static bn_status_t moments_to_host(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c) {
  const int64_t ng = P->ngroups;
  device_numbers dn(ex);
  const double *dmean, *dm2;
  bn_status_t st;
  if ((st = dn.reserve(2 * (size_t)ng)) || (st = dn.take(NULL, ng, &dmean)) || (st = dn.take(NULL, ng, &dm2)))
    return st;
  const bn_cuda_coef_t none = {};
  if ((st = reduce(ex, P, BN_RED_MOMENTS, none, (double *)dmean, (double *)dm2))) return st;
  if ((st = download(ex, c->mean, dmean, ng))) return st;
  return download(ex, c->var, dm2, ng);
}

static bn_status_t cuda_stats(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c) {
  BN_CUDA_ENTER(ex);
  return moments_to_host(ex, P, c);
}

/* The apply step's numbers on the device (sums only for a training backward). */
static bn_status_t upload_coef(device_numbers &dn, const bn_plan_t *P, const bn_coef_t *c, int backward_sums,
                               bn_cuda_coef_t *k) {
  const int64_t ng = P->ngroups, np = P->nparams;
  bn_status_t st;
  memset(k, 0, sizeof *k);
  if ((st = dn.reserve(4 * (size_t)ng + 2 * (size_t)np))) return st;
  if ((st = dn.take(c->mean, ng, &k->mean)) || (st = dn.take(c->rstd, ng, &k->rstd))) return st;
  if (c->weight && (st = dn.take(c->weight, np, &k->weight))) return st;
  if (c->bias && (st = dn.take(c->bias, np, &k->bias))) return st;
  if (backward_sums && c->sum_dy && !c->rms && (st = dn.take(c->sum_dy, ng, &k->sum_dy))) return st;
  if (backward_sums && c->sum_dyx && (st = dn.take(c->sum_dyx, ng, &k->sum_dyx))) return st;
  k->inv_n = c->inv_n, k->relu = c->relu;
  return BN_STATUS_SUCCESS;
}

static bn_status_t cuda_forward(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c, int compute_stats) {
  BN_CUDA_ENTER(ex);
  bn_status_t st;
  if (compute_stats) {
    if ((st = moments_to_host(ex, P, c))) return st;
    for (int64_t g = 0; g < P->ngroups; g++) bn_finish_stats(c, g, (double)P->group_size);
  }
  device_numbers dn(ex);
  bn_cuda_coef_t k;
  if ((st = upload_coef(dn, P, c, 0, &k))) return st;
  return apply(ex, P, k, BN_APPLY_FORWARD);
}

static bn_status_t cuda_backward_reduce(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c, int training,
                                        double *dweight, double *dbias) {
  BN_CUDA_ENTER(ex);
  const int64_t ng = P->ngroups, np = P->nparams;
  device_numbers dn(ex), out(ex);
  bn_cuda_coef_t k;
  bn_status_t st;
  const double *a, *b;
  if ((st = upload_coef(dn, P, c, 0, &k))) return st;
  k.bias = NULL;
  if ((st = out.reserve(2 * (size_t)(ng > np ? ng : np)))) return st;
  if (training && c->sum_dy) {
    out.used = 0;
    if ((st = out.take(NULL, ng, &a)) || (st = out.take(NULL, ng, &b))) return st;
    if ((st = reduce(ex, P, BN_RED_GROUP_SUMS, k, (double *)a, (double *)b))) return st;
    if ((st = download(ex, c->sum_dy, a, ng)) || (st = download(ex, c->sum_dyx, b, ng))) return st;
  }
  if (!dweight && !dbias) return BN_STATUS_SUCCESS;
  out.used = 0;
  if ((st = out.take(NULL, np, &a)) || (st = out.take(NULL, np, &b))) return st;
  if ((st = reduce(ex, P, BN_RED_PARAM_SUMS, k, (double *)a, (double *)b))) return st;
  if (dbias && (st = download(ex, dbias, a, np))) return st;
  return dweight ? download(ex, dweight, b, np) : BN_STATUS_SUCCESS;
}

static bn_status_t cuda_backward_apply(const bn_exec_t *ex, const bn_plan_t *P, const bn_coef_t *c, int training) {
  BN_CUDA_ENTER(ex);
  device_numbers dn(ex);
  bn_cuda_coef_t k;
  bn_status_t st = upload_coef(dn, P, c, training, &k);
  return st ? st : apply(ex, P, k, BN_APPLY_BACKWARD);
}

static bn_status_t cuda_backward(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c, int training,
                                 double *dweight, double *dbias) {
  bn_status_t st = cuda_backward_reduce(ex, P, c, training, dweight, dbias);
  return st ? st : cuda_backward_apply(ex, P, c, training);
}

static bn_status_t cuda_mask_grad(const bn_exec_t *ex, const bn_plan_t *P, int relu) {
  BN_CUDA_ENTER(ex);
  const bn_cuda_coef_t none = {};
  return apply(ex, P, none, relu ? BN_APPLY_MASK_RELU : BN_APPLY_MASK);
}

/* ------------------------------------------------------------------ small tensors */

static bn_cuda_small_t small_of(const DLTensor *t) {
  bn_cuda_small_t S;
  memset(&S, 0, sizeof S);
  S.nd = t->ndim;
  for (int d = 0; d < t->ndim; d++) S.n[d] = t->shape[d], S.s[d] = bn_stride(t, d);
  return S;
}

static bn_status_t small_dtype(const DLTensor *t, bn_dtype_t *dt) { return bn_dtype_of(t, "tensor", dt); }

static bn_status_t cuda_gather(const bn_exec_t *ex, const DLTensor *t, double *dst) {
  BN_CUDA_ENTER(ex);
  const int64_t n = bn_numel(t);
  bn_dtype_t dt;
  bn_status_t st;
  if (n == 0) return BN_STATUS_SUCCESS;
  if ((st = small_dtype(t, &dt))) return st;
  device_numbers dn(ex);
  const double *tmp;
  if ((st = dn.reserve((size_t)n)) || (st = dn.take(NULL, n, &tmp))) return st;
  const bn_cuda_small_t S = small_of(t);
  st = by_dtype(dt, [&](auto *tag) -> bn_status_t {
    typedef typename std::remove_pointer<decltype(tag)>::type T;
    BN_CUDA_LAUNCH(bn_cuda_gather<T>, blocks_for(n), BN_CUDA_THREADS, stream_of(ex), S, n, bn_base(t), (double *)tmp);
    BN_CUDA_LAUNCHED("gather");
    return BN_STATUS_SUCCESS;
  });
  return st ? st : download(ex, dst, tmp, n);
}

static bn_status_t cuda_scatter(const bn_exec_t *ex, DLTensor *t, const double *src) {
  BN_CUDA_ENTER(ex);
  const int64_t n = bn_numel(t);
  bn_dtype_t dt;
  bn_status_t st;
  if (n == 0) return BN_STATUS_SUCCESS;
  if ((st = small_dtype(t, &dt))) return st;
  device_numbers dn(ex);
  const double *tmp;
  if ((st = dn.reserve((size_t)n)) || (st = dn.take(src, n, &tmp))) return st;
  const bn_cuda_small_t S = small_of(t);
  return by_dtype(dt, [&](auto *tag) -> bn_status_t {
    typedef typename std::remove_pointer<decltype(tag)>::type T;
    BN_CUDA_LAUNCH(bn_cuda_scatter<T>, blocks_for(n), BN_CUDA_THREADS, stream_of(ex), S, n, tmp, bn_base(t));
    BN_CUDA_LAUNCHED("scatter");
    return BN_STATUS_SUCCESS;
  });
}

/* ------------------------------------------------------------------ devices and memory */

/* Device memory of the home device, or managed memory (reachable from every device). */
static int cuda_accepts(DLDevice home, DLDevice device) {
  if (device.device_type == kDLCUDAManaged) return 1;
  return device.device_type == kDLCUDA && device.device_id == home.device_id;
}

static bn_status_t cuda_probe(DLDevice device) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess)
    return bn_fail(BN_STATUS_UNSUPPORTED_DEVICE, "no CUDA device is usable (%s: %s); this build computes on CUDA "
                   "devices when a driver and a device are present", cudaGetErrorName(e), cudaGetErrorString(e));
  if (device.device_id < 0 || device.device_id >= count)
    return bn_fail(BN_STATUS_UNSUPPORTED_DEVICE, "CUDA device %d does not exist (%d present)", (int)device.device_id,
                   count);
  return BN_STATUS_SUCCESS;
}

/* The default workspace allocator: stream-ordered device memory (user: the stream). */
static void *cuda_alloc(void *stream, size_t bytes) {
  void *p = NULL;
  return cudaMallocAsync(&p, bytes ? bytes : 1, (cudaStream_t)stream) == cudaSuccess ? p : NULL;
}

static void cuda_free(void *stream, void *ptr) { cudaFreeAsync(ptr, (cudaStream_t)stream); }

extern "C" int bn_cuda_device_count_raw(void) {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

extern "C" const bn_backend_t bn_cuda_backend = {
    /* .name = */ "cuda",
    /* .accepts = */ cuda_accepts,
    /* .stats = */ cuda_stats,
    /* .forward = */ cuda_forward,
    /* .backward_reduce = */ cuda_backward_reduce,
    /* .backward_apply = */ cuda_backward_apply,
    /* .backward = */ cuda_backward,
    /* .mask_grad = */ cuda_mask_grad,
    /* .gather = */ cuda_gather,
    /* .scatter = */ cuda_scatter,
    /* .probe = */ cuda_probe,
    /* .alloc = */ cuda_alloc,
    /* .free = */ cuda_free,
};
