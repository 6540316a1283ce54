/*
 * The backend seam: where a device's kernels plug in.
 *
 * Entry points (api.c) validate their arguments, build one plan on the host and then
 * call the backend of the tensors' device through this table; nothing outside a
 * backend's own folder names its functions. A backend implements the steps below for
 * every variant alike: it sees plans (canonical dims, group and parameter strides,
 * the path) and the per-call numbers of bn_coef_t, never a variant's name.
 *
 * Adding a device: write src/c/<device>/ with the same steps (cuda/ mirrors cpu/ file
 * for file), define its table and list it in backend_for() in context.c.
 */
#ifndef BNCORE_BACKEND_H
#define BNCORE_BACKEND_H

#include "internal.h"

typedef struct bn_backend_t bn_backend_t;

/* What a call runs with: the context's settings, resolved. */
typedef struct bn_exec_t {
  const bn_backend_t *backend;
  DLDevice device;
  void *stream;
  int nthreads;            /* threads of CPU kernels, >= 1 */
  bn_alloc_fn alloc;       /* workspace allocator (never NULL once resolved) */
  bn_free_fn free;
  void *alloc_user;
} bn_exec_t;

struct bn_backend_t {
  const char *name;
  /* Does this backend compute on memory of `device` (for a context of `home`)? */
  int (*accepts)(DLDevice home, DLDevice device);
  /* Statistics: per-group mean and m2 (into c->mean, c->var) with the forward's numerics
   * and blocking (the plan's forward_path), so that a forward with these numbers given
   * equals the one-call forward bit for bit. */
  bn_status_t (*stats)(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c);
  /* Forward: with compute_stats, statistics then bn_finish_stats then apply (fused per
   * group where the plan says so); without, apply only, from c->mean / c->rstd. With c->renorm,
   * bn_finish_stats also sets the group's effective parameters, which its apply must read. */
  bn_status_t (*forward)(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c, int compute_stats);
  /* Backward reduce: dweight / dbias (nparams each, may be NULL) receive sum(dy*xhat) and
   * sum(dy); with `training`, c->sum_dy / c->sum_dyx the per-group sums of dy*w, dy*w*xhat. */
  bn_status_t (*backward_reduce)(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c, int training,
                                 double *dweight, double *dbias);
  /* Backward apply: dx from c (group sums and inv_n in training; constant statistics else). */
  bn_status_t (*backward_apply)(const bn_exec_t *ex, const bn_plan_t *P, const bn_coef_t *c, int training);
  /* The whole backward: reduce then apply, fused per group where the plan says so. */
  bn_status_t (*backward)(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c, int training, double *dweight,
                          double *dbias);
  /* The masked gradient of a forward epilogue: out = dy where x > 0 (relu), else 0; or out = dy.
   * The plan's X operand is the forward's y, DY is dy, OUT receives the mask's result. */
  bn_status_t (*mask_grad)(const bn_exec_t *ex, const bn_plan_t *P, int relu);
  /* Small per-channel tensors (parameters, statistics) to and from host doubles. */
  bn_status_t (*gather)(const bn_exec_t *ex, const DLTensor *t, double *dst);
  bn_status_t (*scatter)(const bn_exec_t *ex, DLTensor *t, const double *src);
  /* Can this process compute on `device` now (a driver, the device present)? NULL: always. */
  bn_status_t (*probe)(DLDevice device);
  /* The default workspace allocator of this device (user: the call's stream); NULL: malloc. */
  bn_alloc_fn alloc;
  bn_free_fn free;
};

/* The CPU backend (cpu/engine.c). */
extern const bn_backend_t bn_cpu_backend;
#ifdef BNCORE_WITH_CUDA
/* The CUDA backend (cuda/engine.cu), in CUDA builds only; and its device count (0 without a
 * driver or a device, never an error). */
extern const bn_backend_t bn_cuda_backend;
int bn_cuda_device_count_raw(void);
#endif

/* Resolves ctx (NULL: the default context of `home`) into *ex. UNSUPPORTED_DEVICE when no
 * backend of this build computes there; `what` names the tensor whose device decided. */
bn_status_t bn_exec_resolve(const bn_context_t *ctx, DLDevice home, const char *what, bn_exec_t *ex);
/* UNSUPPORTED_DEVICE (naming `what` and both devices) unless t may be used by ex. NULL passes. */
bn_status_t bn_check_device(const bn_exec_t *ex, const DLTensor *t, const char *what);

/* Workspace of a call on ex's device; NULL when the allocator cannot serve it. */
void *bn_ws_alloc(const bn_exec_t *ex, size_t bytes);
/* As bn_ws_alloc, zero-filled (host-visible workspaces only: the CPU backend). */
void *bn_ws_calloc(const bn_exec_t *ex, size_t count, size_t size);
void bn_ws_free(const bn_exec_t *ex, void *ptr);

#endif /* BNCORE_BACKEND_H */
