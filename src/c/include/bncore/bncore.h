/*
 * bncore: normalization layers (batch, layer, instance, group, RMS) over DLPack tensors.
 *
 * This is the one public header of the C library. It includes only <stddef.h>,
 * <stdint.h>,
 * the version header generated from the project's single version, and the
 * DLPack structure definitions.
 *
 * ABI rule: from 1.0 on, functions and types declared here keep their signatures
 * and layouts for all releases with the same BN_VERSION_MAJOR; a minor release may
 * add functions, statuses (before BN_STATUS_COUNT moves, so COUNT grows) and
 * flags, and never changes the meaning of existing ones. Before 1.0 a minor
 * release may change the ABI (0.2 did), so the shared library's soname carries
 * the minor version (libbncore.so.0.2) and find_package takes the same minor only. Compare the runtime
 * bn_version() with the compile-time BN_VERSION if you need to know which
 * library was loaded.
 *
 * Conventions for every function:
 *  - The return value is a bn_status_t; BN_STATUS_SUCCESS (0) means success.
 *    On failure bn_last_error() gives a message naming the argument, what was
 *    expected and what was given. No input a caller can pass reaches an
 *    assert or abort.
 *  - Tensor arguments are borrowed DLTensor pointers: the library never keeps
 *    them, nor the memory they describe, after the call returns.
 *  - Inputs come first, in-out arguments next, outputs last.
 *  - On failure, outputs may hold partial results but in-out state (running
 *    statistics) is left bit for bit as it was: updates are computed into
 *    temporaries and committed last.
 *  - Compute calls take a bn_context_t (the device, stream, workspace allocator
 *    and thread count to run with) first; NULL means the default context of the
 *    device x lives on. Every tensor of a call must live where that context
 *    computes.
 *  - Threads: calls on different tensors may run concurrently, also through one
 *    context (a context is only read by compute calls). A call that writes
 *    tensors (outputs, running statistics) must not run concurrently with any
 *    other call that reads or writes the same memory; bn_running_stats_t handles
 *    likewise take one writer at a time (see there). Results are bitwise
 *    identical for any thread count.
 *
 * What changed in 0.2 (an ABI break, allowed before 1.0): compute calls take a
 * context first; bn_norm_desc_t starts with struct_size; bn_norm_forward and
 * bn_norm_forward_stats take statistics given from outside (BN_FLAG_GIVEN_STATS);
 * bn_norm_moments became bn_norm_stats (the forward's own numbers); new are
 * bn_moments_merge, bn_norm_backward_reduce, bn_norm_backward_apply and the
 * bn_context_* functions. docs/c_api.md lists the details.
 *
 * What changed in 0.3 (an ABI break: bn_norm_desc_t grew, and the bn_norm_desc_init_*
 * functions write the whole larger struct, so a 0.2 binary must not load this library;
 * the soname says so): the V2 fields of bn_norm_desc_t (virtual_batch_size, rmax, dmax,
 * activation); BN_FLAG_RENORM; bn_activation_t; bn_norm_forward_ex,
 * bn_norm_forward_stats_ex and bn_norm_backward_ex (residual, renormalization factors,
 * the activation's mask). A hand-filled struct of the 0.2 layout (struct_size 64) is
 * still read, its V2 fields as 0.
 */
#ifndef BNCORE_BNCORE_H
#define BNCORE_BNCORE_H

#include <stddef.h>
#include <stdint.h>

#include "bncore/version.h"
#include "dlpack/dlpack.h"

#if defined(_WIN32)
#  if defined(BNCORE_BUILDING)
#    define BN_API __declspec(dllexport)
#  else
#    define BN_API __declspec(dllimport)
#  endif
#else
#  define BN_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ statuses */

/* Every public function returns one of these. Values are stable. */
typedef enum bn_status_t {
  BN_STATUS_SUCCESS = 0,
  BN_STATUS_INVALID_ARGUMENT = 1,   /* a NULL required pointer, unknown flag bit, bad eps, bad axis */
  BN_STATUS_SHAPE_MISMATCH = 2,     /* tensors whose shapes or sizes do not fit together */
  BN_STATUS_UNSUPPORTED_DTYPE = 3,  /* a dtype the operation does not take (ints, complex, lanes > 1) */
  BN_STATUS_UNSUPPORTED_DEVICE = 4, /* memory this build cannot compute on (CPU build: host memory only) */
  BN_STATUS_OVERLAP = 5,            /* an output shares memory with an input or another output (except the
                                       in-place cases each function documents) */
  BN_STATUS_OUT_OF_MEMORY = 6,      /* a workspace allocation failed */
  BN_STATUS_INTERNAL = 7,           /* a bug in bncore: please report it */
  BN_STATUS_COUNT                   /* sentinel: number of statuses, not a status */
} bn_status_t;

/* A static, never-NULL description of a status ("invalid argument", ...).
 * Values outside [0, BN_STATUS_COUNT) give "unknown status". */
BN_API const char *bn_status_string(bn_status_t status);

/* The detail message of the last failing call on this thread (thread-local,
 * owned by the library, valid until this thread's next bncore call). "" when
 * the last call succeeded. Never NULL. */
BN_API const char *bn_last_error(void);

/* ------------------------------------------------------------------ version */

/* BN_VERSION of the loaded library: major * 10000 + minor * 100 + patch. */
BN_API uint32_t bn_version(void);
/* BN_VERSION_STRING of the loaded library, e.g. "0.2.0". Static, never NULL. */
BN_API const char *bn_version_string(void);

/* ------------------------------------------------------------------ build */

/* Features compiled into the loaded library (bits of bn_build_features' out). */
#define BN_BUILD_CUDA 1u   /* the CUDA backend (kDLCUDA, kDLCUDAManaged memory) */
#define BN_BUILD_OPENMP 2u /* the CPU kernels run on OpenMP threads */

/* What the loaded library was built with: `features` (out, may be NULL) receives BN_BUILD_*
 * bits; `cuda_architectures` (out, may be NULL) a static string of the CUDA architectures
 * compiled in, CMake's spelling (e.g. "80-real;90-real;90-virtual"), "" without CUDA.
 * Returns SUCCESS. Since 0.4. */
BN_API bn_status_t bn_build_features(uint32_t *features, const char **cuda_architectures);
/* The CPU kernels' instruction-set level that this process runs: "baseline" (x86-64 SSE2, or any
 * other CPU), "x86-64-v3" (AVX2) or "x86-64-v4" (AVX-512), or, where the half types run another
 * level than float32 and float64, e.g. "x86-64-v3 (float16, bfloat16: x86-64-v4)". Picked at load:
 * the environment's BNCORE_CPU_LEVEL (one of the three names) for every dtype, else x86-64-v3 for
 * float32 and float64 and x86-64-v4 for the half types; each the highest level at or below that
 * which the CPU supports. Every level gives the same bits. Static, never NULL. Added in the 0.4
 * series. */
BN_API const char *bn_cpu_kernel_level(void);
/* The number of CUDA devices this process can use now (out): 0 in a build without CUDA, and
 * with no driver or no device (never an error; the CUDA runtime is asked once per call).
 * Returns SUCCESS, INVALID_ARGUMENT (count NULL). Since 0.4. */
BN_API bn_status_t bn_cuda_device_count(int32_t *count);

/* ------------------------------------------------------------------ threads */

/* Sets the process-wide default number of OpenMP threads of bncore's CPU kernels
 * (used by contexts whose own thread count is 0, and by NULL contexts); n <= 0
 * restores the OpenMP default. Results do not depend on it. Returns BN_STATUS_SUCCESS. */
BN_API bn_status_t bn_set_num_threads(int32_t n);
/* The process-wide default thread count kernels will use now (1 in a build without OpenMP). */
BN_API int32_t bn_get_num_threads(void);

/* ------------------------------------------------------------------ execution context */

/*
 * A context says where and how compute calls run: the device (and so the backend:
 * the CPU backend for kDLCPU and kDLCUDAHost memory; in a CUDA build (BN_BUILD_CUDA) the
 * CUDA backend for kDLCUDA memory and for kDLCUDAManaged memory when a device is present,
 * the CPU backend for managed memory otherwise),
 * the stream of devices that have them, a workspace allocator and the thread count.
 * Opaque; owned by the caller from bn_context_create to bn_context_destroy.
 * Compute calls only read a context, so one context may serve concurrent calls;
 * the bn_context_set_* functions must not run concurrently with calls using it.
 */
typedef struct bn_context_t bn_context_t;

/*
 * Workspace allocator of a context: the backend asks it for its temporary memory of a
 * call (on the context's device: the CPU kernels' slab partials, column scratch and
 * compute-type copies) and gives every block back before the call returns. The small
 * per-group and per-parameter host arrays of the entry points come from malloc. alloc returns NULL when it cannot serve `bytes`; blocks must be aligned
 * for any type (as malloc's). `user` is passed through unchanged. A CUDA context's allocator
 * must return device memory usable on the context's stream; without one, the CUDA backend
 * uses cudaMallocAsync / cudaFreeAsync on that stream.
 */
typedef void *(*bn_alloc_fn)(void *user, size_t bytes);
typedef void (*bn_free_fn)(void *user, void *ptr);

/* Creates a context for `device` (out: owned by the caller; free it with
 * bn_context_destroy): no stream, malloc for workspaces, the process-wide thread count.
 * Returns SUCCESS, INVALID_ARGUMENT (out NULL), UNSUPPORTED_DEVICE (no backend of this
 * build computes there, or a CUDA device without a usable driver or device), OUT_OF_MEMORY. */
BN_API bn_status_t bn_context_create(DLDevice device, bn_context_t **out);
/* Frees a context; NULL does nothing. Returns SUCCESS. */
BN_API bn_status_t bn_context_destroy(bn_context_t *ctx);
/* The device of a context (out). Returns SUCCESS, INVALID_ARGUMENT. */
BN_API bn_status_t bn_context_device(const bn_context_t *ctx, DLDevice *device);
/* The stream calls are ordered on (a cudaStream_t for CUDA devices; NULL: the legacy default
 * stream). Borrowed: it must outlive the calls that use it. Kernels, copies and workspaces of a
 * call are all ordered on it; docs/cuda.md lists the calls that wait for it on the host. The CPU backend has no
 * streams and refuses a non-NULL one. Returns SUCCESS, INVALID_ARGUMENT. */
BN_API bn_status_t bn_context_set_stream(bn_context_t *ctx, void *stream);
/* Threads of CPU kernels run through this context; 0 (the default) follows
 * bn_set_num_threads. Returns SUCCESS, INVALID_ARGUMENT (n < 0). */
BN_API bn_status_t bn_context_set_num_threads(bn_context_t *ctx, int32_t n);
/* The thread count calls through ctx use now (out). Returns SUCCESS, INVALID_ARGUMENT. */
BN_API bn_status_t bn_context_get_num_threads(const bn_context_t *ctx, int32_t *n);
/* Workspaces from a caller's allocator (a framework's cached memory); both NULL
 * restores malloc. Borrowed: the functions and `user` must stay valid while calls
 * use the context. Returns SUCCESS, INVALID_ARGUMENT (only one of the two given). */
BN_API bn_status_t bn_context_set_allocator(bn_context_t *ctx, bn_alloc_fn alloc, bn_free_fn free, void *user);

/* ------------------------------------------------------------------ problem description */

/* The largest tensor rank bncore accepts. */
#define BN_MAX_NDIM 16

/*
 * Option bits of bn_norm_desc_t.flags, each documented for the forward and the
 * backward. Unknown bits are refused with BN_STATUS_INVALID_ARGUMENT.
 *
 * BN_FLAG_RMS
 *   forward:  no mean is subtracted: xhat = x * rstd, rstd = 1/sqrt(mean(x^2) + eps);
 *             save_mean, if given, receives zeros.
 *   backward: the matching gradient (the mean terms vanish).
 * BN_FLAG_USE_RUNNING_STATS  (evaluation mode)
 *   forward:  statistics are not computed from x; mean and variance come from
 *             running_mean / running_var (eval-mode batch norm, instance norm
 *             with use_input_stats=False). Requires the parameter axes to be
 *             statistic-group axes.
 *   backward: the statistics are treated as constants: dx = dy * weight * rstd.
 * BN_FLAG_GIVEN_STATS  (statistics from outside the call: synchronized batch norm)
 *   forward:  statistics are not computed from x; each group's mean and m2 (the sum
 *             of squared deviations) come from stats_mean / stats_m2, over
 *             stats_count elements: var = m2 / count (the biased variance; with
 *             BN_FLAG_RMS, var = m2 / count + mean^2 and no mean is subtracted;
 *             stats_count 0 gives var 0, so rstd = 1/sqrt(eps)).
 *             These are exactly the numbers bn_norm_stats returns, merged by
 *             bn_moments_merge or a collective. May be combined with
 *             BN_FLAG_UPDATE_RUNNING_STATS (the running variance is then unbiased with
 *             stats_count), not with BN_FLAG_USE_RUNNING_STATS.
 *   backward: ignored: the backward of such a forward is the training backward
 *             (statistics depend on x), bn_norm_backward_reduce / _apply.
 * BN_FLAG_UPDATE_RUNNING_STATS
 *   forward:  (training only) running_mean and running_var are updated in place
 *             (requires the parameter axes to be statistic-group axes, and groups of
 *             more than one element for the unbiased variance):
 *             r = (1 - momentum) * r + momentum * batch, where the batch value for a
 *             parameter index is the average over the statistic groups mapped to it.
 *             running_var receives the unbiased variance unless
 *             BN_FLAG_RUNNING_VAR_BIASED is set. Groups of zero elements (with
 *             BN_FLAG_GIVEN_STATS: stats_count 0) leave the running statistics untouched.
 *   backward: ignored (so is desc.momentum).
 * BN_FLAG_RUNNING_VAR_BIASED
 *   forward:  store the biased variance in running_var (Keras's convention).
 *   backward: ignored.
 * BN_FLAG_SKIP_NONFINITE
 *   forward:  (with BN_FLAG_UPDATE_RUNNING_STATS) when any batch mean or variance is not
 *             finite, the running statistics are left untouched (the output is still
 *             written); bn_norm_forward_stats counts such batches as skipped.
 *   backward: ignored.
 * BN_FLAG_RENORM  (batch renormalization, Ioffe 2017; training only)
 *   forward:  with the batch statistics mu_B, sigma_B = sqrt(var_B + eps) and the running
 *             ones mu = running_mean, sigma = sqrt(running_var + eps) as they were before
 *             the call, per parameter index
 *               r = clip(sigma_B / sigma, 1 / desc.rmax, desc.rmax)
 *               d = clip((mu_B - mu) / sigma, -desc.dmax, desc.dmax)
 *               y = ((x - mu_B) / sigma_B * r + d) * weight + bias
 *             (r and d folded into the apply step's scale and shift). Needs one statistic
 *             group per parameter index (batch norm without virtual batches) and the
 *             running statistics (read; updated as batch norm's with
 *             BN_FLAG_UPDATE_RUNNING_STATS). Excludes BN_FLAG_USE_RUNNING_STATS: eval-mode
 *             renormalization is eval-mode batch norm. bn_norm_forward_ex returns r and d.
 *   backward: r and d are constants: bn_norm_backward_ex takes them (save_r, save_d) and
 *             gives dx of batch norm with weight * r, dweight = r * sum(dy*xhat) + d * sum(dy).
 */
#define BN_FLAG_RMS                  (1u << 0)
#define BN_FLAG_USE_RUNNING_STATS    (1u << 1)
#define BN_FLAG_UPDATE_RUNNING_STATS (1u << 2)
#define BN_FLAG_RUNNING_VAR_BIASED   (1u << 3)
#define BN_FLAG_SKIP_NONFINITE       (1u << 4)
#define BN_FLAG_GIVEN_STATS          (1u << 5)
#define BN_FLAG_RENORM               (1u << 6)
#define BN_FLAG_ALL                  (0x7fu)

/*
 * Epilogues of the forward's apply step (bn_norm_desc_t.activation), applied while y is
 * written, after the residual of bn_norm_forward_ex is added: y = act(bn(x) + residual).
 * BN_ACTIVATION_NONE  y = bn(x) (+ residual).
 * BN_ACTIVATION_RELU  y = max(bn(x) (+ residual), 0); NaN stays NaN. The backward
 *                     (bn_norm_backward_ex) takes the forward's y and masks dy where y > 0.
 */
typedef enum bn_activation_t {
  BN_ACTIVATION_NONE = 0,
  BN_ACTIVATION_RELU = 1,
  BN_ACTIVATION_COUNT /* sentinel: number of activations */
} bn_activation_t;

/*
 * What to normalize: a plain struct the caller fills (or gets from one of the
 * bn_norm_desc_init_* functions below). Axes are axes of x; bit d of a mask is
 * axis d.
 *
 * The elements of x are split into statistic groups: two elements share a
 * group when their indices agree on every axis NOT in reduce_axes. Each group
 * is normalized by its own mean and variance. weight, bias, running_mean and
 * running_var are indexed by the axes in param_axes (row-major over them, in
 * axis order).
 *
 * virtual_batch_size (ghost batch norm): 0 for none; otherwise axis 0 (which must be in
 * reduce_axes and not in param_axes) of size N, a multiple of it, is read as
 * (N / virtual_batch_size, virtual_batch_size): the outer part separates statistic groups
 * (so batch norm's groups become (virtual batch, channel)), the inner part is reduced.
 * Running statistics then receive the average over the virtual batches of their means and
 * variances. SHAPE_MISMATCH when N is not a multiple.
 *
 * split_axis (group norm): -1 for none; otherwise an axis of size C, not in
 * reduce_axes, that is read as (num_groups, C / num_groups): the outer part
 * separates groups, the inner part is reduced. If the axis is in param_axes,
 * parameters are indexed by the whole axis.
 *
 * struct_size: sizeof(bn_norm_desc_t) as the caller was compiled (the init functions
 * set it; a hand-filled struct sets it to sizeof(bn_norm_desc_t); it must cover at least
 * the fields through `flags`, so 0 is refused), so that later versions can add fields at
 * the end without breaking callers:
 * a library reads the fields the caller's size covers, treats missing ones as 0, and
 * refuses a larger struct whose extra bytes it does not know and are not zero.
 * Layouts: BN_NORM_DESC_SIZE_V1 (64 bytes, through reserved2: the 0.2 struct) and
 * BN_NORM_DESC_SIZE_V2 (the fields from virtual_batch_size on, added with batch
 * renormalization, ghost batch norm and the fused epilogues). A V1 struct reads the V2
 * fields as 0: no virtual batches, rmax = dmax = 0 (so BN_FLAG_RENORM is refused), no
 * activation.
 */
typedef struct bn_norm_desc_t {
  uint64_t struct_size;  /* sizeof(bn_norm_desc_t) of the caller */
  uint64_t reduce_axes;  /* statistics are taken over these axes */
  uint64_t param_axes;   /* weight / bias / running statistics are indexed by these axes */
  int32_t split_axis;    /* -1, or the axis read as (num_groups, C / num_groups) */
  int32_t reserved;      /* must be 0 */
  int64_t num_groups;    /* with split_axis >= 0: the number of groups, dividing that axis */
  double eps;            /* added to the variance; finite and >= 0 */
  double momentum;       /* running-statistics factor in [0, 1] (BN_FLAG_UPDATE_RUNNING_STATS) */
  uint32_t flags;        /* BN_FLAG_* bits */
  uint32_t reserved2;    /* must be 0 */
  /* V2 fields */
  int64_t virtual_batch_size; /* 0, or the size of the virtual batches that axis 0 is split into (>= 1) */
  double rmax;           /* BN_FLAG_RENORM: bound of r, >= 1 (inf: unbounded); else ignored */
  double dmax;           /* BN_FLAG_RENORM: bound of |d|, >= 0 (inf: unbounded); else ignored */
  uint32_t activation;   /* a bn_activation_t: the forward's epilogue */
  uint32_t reserved3;    /* must be 0 */
} bn_norm_desc_t;

#define BN_NORM_DESC_SIZE_V1 64u
#define BN_NORM_DESC_SIZE_V2 ((uint64_t)sizeof(bn_norm_desc_t))

/*
 * Variants as mappings onto bn_norm_desc_t. Each writes *desc (out, caller
 * owned) with struct_size set, momentum 0 and no flags; the caller may then set flags
 * and momentum.
 * Returns BN_STATUS_SUCCESS, or BN_STATUS_INVALID_ARGUMENT for a NULL desc,
 * ndim outside [1, BN_MAX_NDIM], an axis out of range, bad eps or groups.
 *
 *  batch:    statistics over every axis but `channel_axis` (negative counts from
 *            the end); parameters per channel. ndim >= 2.
 *  layer:    statistics over the trailing `normalized_ndim` axes; parameters per element of them.
 *  rms:      as layer, with BN_FLAG_RMS.
 *  instance: statistics over the axes after 1 (N, C, *); parameters per channel (axis 1). ndim >= 3.
 *  group:    axis 1 (C) split into num_groups; statistics over (C / num_groups, *);
 *            parameters per channel. ndim >= 2.
 */
BN_API bn_status_t bn_norm_desc_init_batch(bn_norm_desc_t *desc, int32_t ndim, int32_t channel_axis,
                                           double eps);
BN_API bn_status_t bn_norm_desc_init_layer(bn_norm_desc_t *desc, int32_t ndim, int32_t normalized_ndim,
                                           double eps);
BN_API bn_status_t bn_norm_desc_init_rms(bn_norm_desc_t *desc, int32_t ndim, int32_t normalized_ndim,
                                         double eps);
BN_API bn_status_t bn_norm_desc_init_instance(bn_norm_desc_t *desc, int32_t ndim, double eps);
BN_API bn_status_t bn_norm_desc_init_group(bn_norm_desc_t *desc, int32_t ndim, int64_t num_groups,
                                           double eps);

/* ------------------------------------------------------------------ forward */

/*
 * Forward:  y = (x - mean_g) * rstd_g * weight[p] + bias[p],  rstd_g = 1 / sqrt(var_g + eps)
 * with mean_g, var_g (biased) the statistics of the element's group g: computed from x,
 * given (BN_FLAG_GIVEN_STATS) or the running statistics (BN_FLAG_USE_RUNNING_STATS);
 * p is the element's parameter index.
 *
 *  ctx           in, borrowed, may be NULL (the default context of x's device).
 *  desc          in, borrowed: the problem (see bn_norm_desc_t).
 *  x             in, borrowed: any strides, float16 / bfloat16 / float32 / float64, on the
 *                context's device, at most 2^56 elements.
 *  weight, bias  in, borrowed, may be NULL (then 1 and 0): one value per parameter
 *                index (numel = product of the param_axes sizes), any float dtype.
 *  stats_mean, stats_m2, stats_count
 *                in, borrowed: with BN_FLAG_GIVEN_STATS, one value per statistic group each
 *                (any float dtype) and the number of elements behind them (>= 0); without
 *                it, NULL, NULL and 0.
 *  running_mean, running_var
 *                in-out, borrowed: one value per parameter index, any float dtype, distinct memory.
 *                Read with BN_FLAG_USE_RUNNING_STATS, written with
 *                BN_FLAG_UPDATE_RUNNING_STATS, else unused and may be NULL.
 *  y             out, borrowed: x's shape and dtype, any strides. May be x itself
 *                (same data and strides). No other output may share memory with any
 *                argument (running statistics count as outputs here).
 *  save_mean, save_rstd
 *                out, borrowed, may be NULL: one value per statistic group (numel =
 *                number of groups; group index row-major over the non-reduced axes,
 *                with the split axis's group part), any float dtype: the mean and
 *                rstd actually used (the cache the backward reads).
 *
 * Returns SUCCESS, INVALID_ARGUMENT, SHAPE_MISMATCH, UNSUPPORTED_DTYPE,
 * UNSUPPORTED_DEVICE, OVERLAP, OUT_OF_MEMORY.
 */
BN_API bn_status_t bn_norm_forward(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                   const DLTensor *weight, const DLTensor *bias, const DLTensor *stats_mean,
                                   const DLTensor *stats_m2, int64_t stats_count, DLTensor *running_mean,
                                   DLTensor *running_var, DLTensor *y, DLTensor *save_mean, DLTensor *save_rstd);

/*
 * bn_norm_forward with the V2 operands: a residual added before the activation (fused
 * BN + add + ReLU) and the renormalization factors of BN_FLAG_RENORM.
 *   y = act((x - mean_g) * rstd_g * weight_eff[p] + bias_eff[p] + residual)
 * where weight_eff = weight * r and bias_eff = bias + weight * d with BN_FLAG_RENORM,
 * else weight and bias; act from desc.activation. One pass over memory: the add and the
 * activation happen as y is written.
 *
 *  residual      in, borrowed, may be NULL: x's shape and dtype, any strides; must not
 *                share memory with y (y may still be x itself).
 *  save_r, save_d
 *                out, borrowed, may be NULL: one value per parameter index, any float dtype:
 *                r and d of BN_FLAG_RENORM (the cache bn_norm_backward_ex reads); without
 *                the flag they receive 1 and 0.
 * Other arguments as for bn_norm_forward. Returns what bn_norm_forward returns.
 */
BN_API bn_status_t bn_norm_forward_ex(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                      const DLTensor *weight, const DLTensor *bias, const DLTensor *residual,
                                      const DLTensor *stats_mean, const DLTensor *stats_m2, int64_t stats_count,
                                      DLTensor *running_mean, DLTensor *running_var, DLTensor *y,
                                      DLTensor *save_mean, DLTensor *save_rstd, DLTensor *save_r, DLTensor *save_d);

/* ------------------------------------------------------------------ the forward's steps */

/*
 * Step 1 of a forward: per-group moments of x, the very numbers bn_norm_forward
 * computes for itself (same blocking and summation order, so that
 * bn_norm_stats -> bn_norm_forward(BN_FLAG_GIVEN_STATS) is bitwise the one-call forward):
 * mean and m2, the sum of squared deviations from it (biased variance = m2 / count).
 * desc.flags, eps and momentum are ignored (BN_FLAG_RMS too: the moments are raw).
 *
 *  ctx        in, borrowed, may be NULL.
 *  x          in, borrowed: as for bn_norm_forward.
 *  mean, m2   out, borrowed: one value per statistic group, any float dtype (float64
 *             keeps every digit computed); must not overlap x or each other.
 *  count      out, may be NULL: elements per group (written on success only).
 *
 * Returns SUCCESS, INVALID_ARGUMENT, SHAPE_MISMATCH, UNSUPPORTED_DTYPE,
 * UNSUPPORTED_DEVICE, OVERLAP, OUT_OF_MEMORY.
 */
BN_API bn_status_t bn_norm_stats(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                 DLTensor *mean, DLTensor *m2, int64_t *count);

/*
 * Step 2 (between processes, or between parts of a batch): Chan's merge of two sets of
 * moments, elementwise over n entries, in double:
 *   count = ca + cb,  d = mean_b - mean_a,
 *   mean  = mean_a + d * cb / count,  m2 = m2_a + m2_b + d^2 * ca * cb / count
 * (an empty side gives the other exactly; both empty give zeros; a mean difference that is
 * not finite, from inf in the data, gives the count-weighted mean and m2 = NaN).
 *
 *  ctx          in, borrowed, may be NULL (the default context of mean_a's device).
 *  count_a, mean_a, m2_a, count_b, mean_b, m2_b
 *               in, borrowed: mean and m2 with n values each, any float dtype; counts
 *               with n values or 1 (the same count for every entry), any float dtype,
 *               finite and >= 0 (float64 counts are exact up to 2^53).
 *  count, mean, m2
 *               out, borrowed: n values each (count: 1 value when both input counts have
 *               1). Each may be its own a-side or b-side input exactly (in-place
 *               accumulation), and must share no other memory. count may be NULL.
 *
 * Returns SUCCESS, INVALID_ARGUMENT, SHAPE_MISMATCH, UNSUPPORTED_DTYPE,
 * UNSUPPORTED_DEVICE, OVERLAP, OUT_OF_MEMORY.
 */
BN_API bn_status_t bn_moments_merge(bn_context_t *ctx, const DLTensor *count_a, const DLTensor *mean_a,
                                    const DLTensor *m2_a, const DLTensor *count_b, const DLTensor *mean_b,
                                    const DLTensor *m2_b, DLTensor *count, DLTensor *mean, DLTensor *m2);

/* ------------------------------------------------------------------ backward */

/*
 * Backward of bn_norm_forward, with xhat = (x - mean_g) * rstd_g and n_g the group size:
 *   dweight[p] = sum over elements with index p of dy * xhat        (assigned, not accumulated)
 *   dbias[p]   = sum over elements with index p of dy               (assigned, not accumulated)
 *   dx = rstd_g * (dy*w - mean_g(dy*w) - xhat * mean_g(dy*w*xhat))  (training)
 *   dx = rstd_g * dy * w                                            (BN_FLAG_USE_RUNNING_STATS)
 * It is bn_norm_backward_reduce then bn_norm_backward_apply with count n_g, fused into
 * one pass over memory where a group fits in cache. A description with BN_FLAG_RENORM or an
 * activation is refused here and by the two steps (INVALID_ARGUMENT): bn_norm_backward_ex
 * takes what their backward needs.
 *
 *  ctx           in, borrowed, may be NULL.
 *  x, dy         in, borrowed: same shape and dtype, any strides.
 *  weight        in, borrowed, may be NULL (1).
 *  save_mean, save_rstd
 *                in, borrowed: as written by bn_norm_forward (any float dtype).
 *                save_mean may be NULL with BN_FLAG_RMS.
 *  dx            out, borrowed, may be NULL: x's shape and dtype. May be dy itself; no other
 *                output may share memory with any argument.
 *  dweight, dbias out, borrowed, may be NULL: one value per parameter index.
 *
 * Returns SUCCESS, INVALID_ARGUMENT, SHAPE_MISMATCH, UNSUPPORTED_DTYPE,
 * UNSUPPORTED_DEVICE, OVERLAP, OUT_OF_MEMORY.
 */
BN_API bn_status_t bn_norm_backward(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                    const DLTensor *dy, const DLTensor *weight, const DLTensor *save_mean,
                                    const DLTensor *save_rstd, DLTensor *dx, DLTensor *dweight, DLTensor *dbias);

/*
 * Backward of bn_norm_forward_ex. With g = dy masked by the activation (BN_ACTIVATION_RELU:
 * g = dy where y > 0, else 0; otherwise g = dy):
 *   dresidual = g
 *   dx, dbias as bn_norm_backward of g, with weight * r for weight under BN_FLAG_RENORM
 *   dweight   = sum(g * xhat), or r * sum(g * xhat) + d * sum(g) under BN_FLAG_RENORM
 * The masked g is materialized once (into dresidual when given, else a workspace), then
 * the batch-norm backward runs on it.
 *
 *  y             in, borrowed: the forward's output (x's shape and dtype), required with
 *                BN_ACTIVATION_RELU, else unused and may be NULL.
 *  save_r, save_d in, borrowed: as written by bn_norm_forward_ex, required with BN_FLAG_RENORM,
 *                else unused and may be NULL.
 *  dresidual     out, borrowed, may be NULL: x's shape and dtype; shares memory with nothing.
 * Other arguments as for bn_norm_backward (dx may be dy itself).
 * Returns what bn_norm_backward returns.
 */
BN_API bn_status_t bn_norm_backward_ex(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                       const DLTensor *dy, const DLTensor *weight, const DLTensor *save_mean,
                                       const DLTensor *save_rstd, const DLTensor *y, const DLTensor *save_r,
                                       const DLTensor *save_d, DLTensor *dx, DLTensor *dweight, DLTensor *dbias,
                                       DLTensor *dresidual);

/* ------------------------------------------------------------------ the backward's steps */

/*
 * Step 1 of a backward: per-parameter sums, assigned (not accumulated):
 *   sum_dy[p] = sum of dy,  sum_dy_xhat[p] = sum of dy * xhat   over the elements with index p
 * (that is grad_bias and grad_weight). Between processes, all-reduce them (sums of
 * rank-local sums), then call bn_norm_backward_apply with the global count.
 *
 *  ctx, desc, x, dy, save_mean, save_rstd   as for bn_norm_backward.
 *  sum_dy, sum_dy_xhat   out, borrowed, either may be NULL: one value per parameter index,
 *                        any float dtype (float64 keeps every digit).
 *
 * Returns SUCCESS, INVALID_ARGUMENT, SHAPE_MISMATCH, UNSUPPORTED_DTYPE,
 * UNSUPPORTED_DEVICE, OVERLAP, OUT_OF_MEMORY.
 */
BN_API bn_status_t bn_norm_backward_reduce(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                           const DLTensor *dy, const DLTensor *save_mean,
                                           const DLTensor *save_rstd, DLTensor *sum_dy, DLTensor *sum_dy_xhat);

/*
 * Step 2 of a backward: grad_input from the sums of step 1 (possibly all-reduced across
 * processes) and the number of elements behind them:
 *   dx = rstd_g * w * (dy - sum_dy[p] / count - xhat * sum_dy_xhat[p] / count)   (training)
 *   dx = rstd_g * dy * w                                     (BN_FLAG_USE_RUNNING_STATS)
 * In training this needs one statistic group per parameter index (the parameter axes
 * are exactly the non-reduced axes, as in batch norm); other variants use bn_norm_backward.
 *
 *  ctx, desc, x, dy, weight, save_mean, save_rstd   as for bn_norm_backward.
 *  sum_dy, sum_dy_xhat   in, borrowed: one value per parameter index, any float dtype;
 *                        not read (and may be NULL) with BN_FLAG_USE_RUNNING_STATS, nor sum_dy
 *                        with BN_FLAG_RMS.
 *  count         elements behind the sums (> 0 in training, unless x is empty).
 *  dx            out, borrowed: x's shape and dtype; may be dy itself.
 *
 * Returns SUCCESS, INVALID_ARGUMENT, SHAPE_MISMATCH, UNSUPPORTED_DTYPE,
 * UNSUPPORTED_DEVICE, OVERLAP, OUT_OF_MEMORY.
 */
BN_API bn_status_t bn_norm_backward_apply(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                          const DLTensor *dy, const DLTensor *weight, const DLTensor *save_mean,
                                          const DLTensor *save_rstd, const DLTensor *sum_dy,
                                          const DLTensor *sum_dy_xhat, int64_t count, DLTensor *dx);

/* ------------------------------------------------------------------ running-statistics state */

/* Opaque: running mean and variance of num_features values plus their counters.
 * Thread-safe: every call on a state (_update, _load, _counts, _set_counts, _set_factor,
 * bn_norm_forward_stats) holds the state's own lock for the whole call, so concurrent
 * calls on one state are serialized and each sees the state between two whole updates;
 * calls on different states run in parallel. Memory written through the views of
 * bn_running_stats_tensors is outside that lock (use bn_running_stats_load). */
typedef struct bn_running_stats_t bn_running_stats_t;

/*
 * Options of a state (bn_running_stats_create flags). Unknown bits are refused.
 * BN_STATS_BIASED_VAR   store the biased batch variance (Keras's convention); else the
 *                       unbiased one, var * n / (n - 1) (PyTorch's).
 * BN_STATS_CUMULATIVE   the factor of update k (k = 1, 2, ...) is 1 / k: the cumulative
 *                       average (PyTorch's momentum=None); `factor` is then ignored.
 * BN_STATS_SKIP_NONFINITE  a batch whose mean or variance is not finite leaves the state
 *                       untouched and counts as skipped.
 */
#define BN_STATS_BIASED_VAR     (1u << 0)
#define BN_STATS_CUMULATIVE     (1u << 1)
#define BN_STATS_SKIP_NONFINITE (1u << 2)
#define BN_STATS_ALL            (0x7u)

/*
 * Creates a state: mean 0, variance 1, counters 0. An update is
 *   stored = (1 - factor) * stored + factor * batch
 * (PyTorch's momentum is `factor`; Keras's momentum m is factor = 1 - m).
 *  num_features  > 0.
 *  dtype         float32 or float64: the type of the stored mean and variance.
 *  factor        in [0, 1] (ignored with BN_STATS_CUMULATIVE).
 *  out           out: the new state, owned by the caller; free it with bn_running_stats_destroy.
 * Returns SUCCESS, INVALID_ARGUMENT, UNSUPPORTED_DTYPE, OUT_OF_MEMORY.
 */
BN_API bn_status_t bn_running_stats_create(int64_t num_features, DLDataType dtype, double factor, uint32_t flags,
                                           bn_running_stats_t **out);
/* Frees a state; NULL is accepted and does nothing. Tensors from bn_running_stats_tensors
 * become invalid. Returns SUCCESS. */
BN_API bn_status_t bn_running_stats_destroy(bn_running_stats_t *stats);

/*
 * Views of the state's mean and variance: fills *mean and *var (out, caller-owned
 * structs) with 1-D CPU tensors whose data and shape point into the state (borrowed:
 * valid until bn_running_stats_destroy). Writing through them changes the state.
 * Returns SUCCESS, INVALID_ARGUMENT (a NULL pointer).
 */
BN_API bn_status_t bn_running_stats_tensors(bn_running_stats_t *stats, DLTensor *mean, DLTensor *var);

/*
 * Replaces the whole state at once (loading a checkpoint): mean and var (in, borrowed:
 * num_features values each, any float dtype, host memory; they may be the state's own
 * views) and the counters (>= 0). Everything is checked before anything is written:
 * on failure the state is unchanged.
 * Returns SUCCESS, INVALID_ARGUMENT, SHAPE_MISMATCH, UNSUPPORTED_DTYPE, UNSUPPORTED_DEVICE,
 * OUT_OF_MEMORY.
 */
BN_API bn_status_t bn_running_stats_load(bn_running_stats_t *stats, const DLTensor *mean, const DLTensor *var,
                                         int64_t updates, int64_t skipped);

/* Counters: updates applied (PyTorch's num_batches_tracked) and batches skipped.
 * Either output may be NULL. Returns SUCCESS, INVALID_ARGUMENT. */
BN_API bn_status_t bn_running_stats_counts(const bn_running_stats_t *stats, int64_t *updates, int64_t *skipped);
/* Sets the counters (loading a checkpoint); both >= 0. Returns SUCCESS, INVALID_ARGUMENT. */
BN_API bn_status_t bn_running_stats_set_counts(bn_running_stats_t *stats, int64_t updates, int64_t skipped);
/* Sets the update factor, in [0, 1]. Returns SUCCESS, INVALID_ARGUMENT. */
BN_API bn_status_t bn_running_stats_set_factor(bn_running_stats_t *stats, double factor);

/*
 * Folds in one batch: batch_mean and batch_var (in, borrowed: num_features values,
 * any float dtype; batch_var the BIASED variance of the n values behind it). All or
 * nothing: on any failure the state is unchanged. n must be > 1 unless the state
 * stores the biased variance (then > 0).
 * Returns SUCCESS, INVALID_ARGUMENT, SHAPE_MISMATCH, UNSUPPORTED_DTYPE, UNSUPPORTED_DEVICE,
 * OUT_OF_MEMORY.
 */
BN_API bn_status_t bn_running_stats_update(bn_running_stats_t *stats, const DLTensor *batch_mean,
                                           const DLTensor *batch_var, int64_t n);

/*
 * bn_norm_forward with the running statistics kept in a state: with
 * BN_FLAG_UPDATE_RUNNING_STATS in desc.flags the batch's statistics (computed, or given
 * with BN_FLAG_GIVEN_STATS) are folded in by the state's rule (its factor or cumulative
 * average, its variance convention, its non-finite policy) and the counters advance;
 * with BN_FLAG_USE_RUNNING_STATS the state normalizes. desc.momentum and
 * BN_FLAG_RUNNING_VAR_BIASED / BN_FLAG_SKIP_NONFINITE are taken from the state. With
 * either flag the parameter count must equal num_features (without one the state is not
 * used). A training call whose statistics cover no element (an empty x; with
 * BN_FLAG_GIVEN_STATS, stats_count 0) counts as an update that folds nothing in, as
 * PyTorch counts such batches.
 *  stats  in-out, borrowed. Unchanged on any failure.
 * Other arguments as for bn_norm_forward. Returns what bn_norm_forward returns.
 */
BN_API bn_status_t bn_norm_forward_stats(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                         const DLTensor *weight, const DLTensor *bias, const DLTensor *stats_mean,
                                         const DLTensor *stats_m2, int64_t stats_count, bn_running_stats_t *stats,
                                         DLTensor *y, DLTensor *save_mean, DLTensor *save_rstd);

/*
 * bn_norm_forward_stats with the operands of bn_norm_forward_ex (residual, save_r, save_d):
 * the running statistics kept in a state. With BN_FLAG_RENORM, r and d use the state's
 * statistics as they were before the call. Returns what bn_norm_forward_stats returns.
 */
BN_API bn_status_t bn_norm_forward_stats_ex(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                            const DLTensor *weight, const DLTensor *bias, const DLTensor *residual,
                                            const DLTensor *stats_mean, const DLTensor *stats_m2,
                                            int64_t stats_count, bn_running_stats_t *stats, DLTensor *y,
                                            DLTensor *save_mean, DLTensor *save_rstd, DLTensor *save_r,
                                            DLTensor *save_d);

#ifdef __cplusplus
}
#endif

#endif /* BNCORE_BNCORE_H */
