/* Execution contexts, the process-wide thread default and the backend lookup. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "backend.h"

struct bn_context_t {
  DLDevice device;
  const bn_backend_t *backend;
  void *stream;
  int32_t nthreads; /* 0: the process-wide default */
  bn_alloc_fn alloc;
  bn_free_fn free;
  void *alloc_user;
};

/* ------------------------------------------------------------------ threads */

static int requested_threads = 0;

bn_status_t bn_set_num_threads(int32_t n) {
  bn_clear_error();
  __atomic_store_n(&requested_threads, n > 0 ? n : 0, __ATOMIC_RELAXED);
  return BN_STATUS_SUCCESS;
}

static int default_threads(void) {
  int n = __atomic_load_n(&requested_threads, __ATOMIC_RELAXED);
#ifdef _OPENMP
  return n > 0 ? n : omp_get_max_threads();
#else
  (void)n;
  return 1;
#endif
}

int32_t bn_get_num_threads(void) { return default_threads(); }

/* ------------------------------------------------------------------ backends */

static const char *device_name(int32_t type) {
  switch (type) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda";
    case kDLCUDAHost: return "cuda_host";
    case kDLCUDAManaged: return "cuda_managed";
    case kDLROCM: return "rocm";
    default: return "device";
  }
}

/* The backend that computes on `device`'s memory in this build, or NULL. */
static const bn_backend_t *backend_for(DLDevice device) {
#ifdef BNCORE_WITH_CUDA
  if (device.device_type == kDLCUDA) return &bn_cuda_backend;
  /* managed memory is computed on its device when there is one; else the CPU reads it */
  if (device.device_type == kDLCUDAManaged && bn_cuda_device_count_raw() > 0) return &bn_cuda_backend;
#endif
  /* pinned (cuda_host) and managed (cuda_managed) memory are host memory to the CPU backend */
  return bn_is_host(device) ? &bn_cpu_backend : NULL;
}

static void *plain_alloc(void *user, size_t bytes) {
  (void)user;
  return malloc(bytes ? bytes : 1);
}

static void plain_free(void *user, void *ptr) {
  (void)user;
  free(ptr);
}

#ifdef BNCORE_WITH_CUDA
#define BUILD_DEVICES "cpu, cuda_host and cuda_managed memory, and cuda memory where a CUDA device is present"
#else
#define BUILD_DEVICES "cpu, cuda_host and cuda_managed memory"
#endif

/* The allocator of a call: the caller's, else the backend's own (on the stream), else malloc. */
static void resolve_alloc(const bn_backend_t *b, void *stream, bn_alloc_fn alloc, bn_free_fn free_fn, void *user,
                          bn_exec_t *ex) {
  if (alloc) ex->alloc = alloc, ex->free = free_fn, ex->alloc_user = user;
  else if (b->alloc) ex->alloc = b->alloc, ex->free = b->free, ex->alloc_user = stream;
  else ex->alloc = plain_alloc, ex->free = plain_free, ex->alloc_user = NULL;
}

bn_status_t bn_exec_resolve(const bn_context_t *ctx, DLDevice home, const char *what, bn_exec_t *ex) {
  if (ctx) {
    *ex = (bn_exec_t){ctx->backend, ctx->device, ctx->stream, ctx->nthreads > 0 ? ctx->nthreads : default_threads(),
                      NULL, NULL, NULL};
    resolve_alloc(ctx->backend, ctx->stream, ctx->alloc, ctx->free, ctx->alloc_user, ex);
    return BN_STATUS_SUCCESS;
  }
  const bn_backend_t *b = backend_for(home);
  if (!b)
    return bn_fail(BN_STATUS_UNSUPPORTED_DEVICE,
                   "%s: no backend of this build computes on %s memory (device type %d, id %d); "
                   "this build computes on " BUILD_DEVICES,
                   what, device_name(home.device_type), (int)home.device_type, (int)home.device_id);
  if (b->probe && b->probe(home)) {
    char why[256]; /* the probe's message, copied out of the buffer bn_fail rewrites */
    snprintf(why, sizeof why, "%s", bn_last_error());
    return bn_fail(BN_STATUS_UNSUPPORTED_DEVICE, "%s: on %s:%d, but %s", what, device_name(home.device_type),
                   (int)home.device_id, why);
  }
  *ex = (bn_exec_t){b, home, NULL, default_threads(), NULL, NULL, NULL};
  resolve_alloc(b, NULL, NULL, NULL, NULL, ex);
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_check_device(const bn_exec_t *ex, const DLTensor *t, const char *what) {
  if (!t || ex->backend->accepts(ex->device, t->device)) return BN_STATUS_SUCCESS;
  return bn_fail(BN_STATUS_UNSUPPORTED_DEVICE, "%s: expected a tensor the %s backend reads (%s:%d), got one on %s:%d",
                 what, ex->backend->name, device_name(ex->device.device_type), (int)ex->device.device_id,
                 device_name(t->device.device_type), (int)t->device.device_id);
}

void *bn_ws_alloc(const bn_exec_t *ex, size_t bytes) { return ex->alloc(ex->alloc_user, bytes ? bytes : 1); }

void *bn_ws_calloc(const bn_exec_t *ex, size_t count, size_t size) {
  if (size && count > SIZE_MAX / size) return NULL;
  void *p = bn_ws_alloc(ex, count * size);
  if (p) memset(p, 0, count * size);
  return p;
}

void bn_ws_free(const bn_exec_t *ex, void *ptr) {
  if (ptr) ex->free(ex->alloc_user, ptr);
}

/* ------------------------------------------------------------------ contexts */

static bn_status_t need(const void *p, const char *what) {
  return p ? BN_STATUS_SUCCESS : bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: expected a context, got NULL", what);
}

bn_status_t bn_context_create(DLDevice device, bn_context_t **out) {
  bn_clear_error();
  if (!out) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "out: expected a place for the new context, got NULL");
  *out = NULL;
  bn_exec_t ex;
  bn_status_t st = bn_exec_resolve(NULL, device, "device", &ex);
  if (st) return st;
  bn_context_t *c = calloc(1, sizeof *c);
  if (!c) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "a context");
  c->device = device;
  c->backend = ex.backend;
  *out = c;
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_context_destroy(bn_context_t *ctx) {
  bn_clear_error();
  free(ctx);
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_context_device(const bn_context_t *ctx, DLDevice *device) {
  bn_clear_error();
  bn_status_t st = need(ctx, "ctx");
  if (st) return st;
  if (!device) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "device: expected a place to write to, got NULL");
  *device = ctx->device;
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_context_set_stream(bn_context_t *ctx, void *stream) {
  bn_clear_error();
  bn_status_t st = need(ctx, "ctx");
  if (st) return st;
  if (stream && ctx->backend == &bn_cpu_backend)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "stream: the cpu backend has no streams; expected NULL");
  ctx->stream = stream;
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_context_set_num_threads(bn_context_t *ctx, int32_t n) {
  bn_clear_error();
  bn_status_t st = need(ctx, "ctx");
  if (st) return st;
  if (n < 0) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "n: expected a thread count >= 0 (0: the default), got %d", (int)n);
  ctx->nthreads = n;
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_context_get_num_threads(const bn_context_t *ctx, int32_t *n) {
  bn_clear_error();
  bn_status_t st = need(ctx, "ctx");
  if (st) return st;
  if (!n) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "n: expected a place to write to, got NULL");
  *n = ctx->nthreads > 0 ? ctx->nthreads : default_threads();
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_context_set_allocator(bn_context_t *ctx, bn_alloc_fn alloc, bn_free_fn free_fn, void *user) {
  bn_clear_error();
  bn_status_t st = need(ctx, "ctx");
  if (st) return st;
  if (!alloc != !free_fn)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "alloc, free: expected both or neither, got only %s",
                   alloc ? "alloc" : "free");
  ctx->alloc = alloc, ctx->free = free_fn, ctx->alloc_user = alloc ? user : NULL;
  return BN_STATUS_SUCCESS;
}
