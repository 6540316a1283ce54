/* Internal declarations shared by the C core. Nothing here is exported. */
#ifndef BNCORE_INTERNAL_H
#define BNCORE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "bncore/bncore.h"

/* ------------------------------------------------------------------ errors (status.c) */

/* Records a detail message for bn_last_error() and returns `status`. */
bn_status_t bn_fail(bn_status_t status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void bn_clear_error(void);

/* ------------------------------------------------------------------ element types (tensor.c) */

typedef enum bn_dtype_t { BN_F16 = 0, BN_BF16 = 1, BN_F32 = 2, BN_F64 = 3, BN_DTYPE_COUNT } bn_dtype_t;

/* Maps a DLDataType onto bn_dtype_t; SUCCESS or UNSUPPORTED_DTYPE naming `what`. */
bn_status_t bn_dtype_of(const DLTensor *t, const char *what, bn_dtype_t *out);
size_t bn_dtype_size(bn_dtype_t dt);
const char *bn_dtype_name(bn_dtype_t dt);

/* ------------------------------------------------------------------ tensor checks (tensor.c) */

/* Largest element count accepted: every byte offset and workspace size then fits in 64 bits. */
#define BN_MAX_NUMEL (INT64_C(1) << 56)

int64_t bn_numel(const DLTensor *t);
/* Stride of axis d in elements (compact row-major when t->strides is NULL). */
int64_t bn_stride(const DLTensor *t, int32_t d);
/* Address of element 0. */
char *bn_base(const DLTensor *t);

/* A CPU tensor of float dtype with ndim in [0, BN_MAX_NDIM]. */
bn_status_t bn_check_tensor(const DLTensor *t, const char *what, bn_dtype_t *dt);
/* Same shape as `ref`. */
bn_status_t bn_check_same_shape(const DLTensor *t, const char *what, const DLTensor *ref, const char *refname);
/* One value per index: numel must equal `count`. */
bn_status_t bn_check_numel(const DLTensor *t, const char *what, int64_t count, const char *of_what);
/* out may equal `in` exactly (same base and strides) when `alias_ok`; any other overlap fails. */
bn_status_t bn_check_overlap(const DLTensor *out, const char *outname, const DLTensor *in, const char *inname,
                             int alias_ok);

/* A tensor argument of a call, for the overlap checks of all its outputs at once. */
typedef struct bn_arg_t {
  const DLTensor *t; /* may be NULL (absent) */
  const char *name;
} bn_arg_t;
/* Every output against every input and every other output; outs[i] may alias ins[alias[i]]
 * exactly when alias[i] >= 0. */
bn_status_t bn_check_no_overlap(const bn_arg_t *outs, int nouts, const int *alias, const bn_arg_t *ins, int nins);

/* Reads a small tensor (parameters, statistics) of any float dtype and strides into
 * `dst` (numel doubles), in row-major order of its own shape. */
void bn_gather_f64(const DLTensor *t, double *dst);
/* Writes `src` (numel doubles) into a small tensor, rounding to its dtype. */
void bn_scatter_f64(DLTensor *t, const double *src);

/* ------------------------------------------------------------------ running statistics (state.c, api.c) */

/* run = (1 - factor) * run + factor * batch, the variance times `unbias` first. */
void bn_fold_running(double *run_mean, double *run_var, const double *batch_mean, const double *batch_var,
                     int64_t n, double factor, double unbias);
int bn_all_finite(const double *v, int64_t n);
/* bn_norm_forward; *skipped (may be NULL) says whether BN_FLAG_SKIP_NONFINITE left the
 * running statistics untouched. */
bn_status_t bn_forward_impl(const bn_norm_desc_t *desc, const DLTensor *x, const DLTensor *weight,
                            const DLTensor *bias, DLTensor *running_mean, DLTensor *running_var, DLTensor *y,
                            DLTensor *save_mean, DLTensor *save_rstd, int *skipped);

/* ------------------------------------------------------------------ plan (plan.c) */

/* Operand slots of a plan: forward uses X and OUT (y); backward X, DY and OUT (dx). */
enum { BN_OP_X = 0, BN_OP_DY = 1, BN_OP_OUT = 2, BN_NOPS = 3 };

/* Canonical dimensions: BN_MAX_NDIM input axes plus one for the split axis. */
#define BN_MAX_CANON (BN_MAX_NDIM + 1)

typedef struct bn_dim_t {
  int64_t n;              /* size (> 1 after canonicalization) */
  int64_t s[BN_NOPS];     /* element strides of each operand */
  int64_t sg;             /* stride of the statistic-group index; 0 on reduced dims */
  int64_t sp;             /* stride of the parameter index; 0 on dims that do not index parameters */
} bn_dim_t;

/*
 * The canonical problem every kernel sees: dims ordered outermost first by
 * x's strides, size-1 dims dropped, mergeable neighbours merged, negative
 * strides flipped. The last dim is the row that inner loops run along.
 */
typedef struct bn_plan_t {
  int ndim;
  bn_dim_t dim[BN_MAX_CANON];
  char *base[BN_NOPS];    /* element 0 of each operand after flips (NULL if absent) */
  int64_t g0, p0;         /* group / parameter index of element 0 after flips */
  bn_dtype_t dtype;       /* element type of x (and y, dy, dx) */
  int64_t numel;
  int64_t ngroups;        /* number of statistic groups */
  int64_t group_size;     /* elements per group */
  int64_t nparams;        /* number of parameter indices */
  int params_in_groups;   /* every parameter axis separates groups: p is a function of g */
} bn_plan_t;

/* Builds the plan for x (and optional dy, out tensors of the same shape). */
bn_status_t bn_plan_build(const bn_norm_desc_t *desc, const DLTensor *x, const DLTensor *dy,
                          const DLTensor *out, bn_dtype_t dtype, bn_plan_t *plan);
/* For each group g, its parameter index (requires params_in_groups). */
void bn_plan_group_params(const bn_plan_t *plan, int64_t *param_of_group);

/* ------------------------------------------------------------------ CPU kernels (cpu/) */

/*
 * The numbers of one call that the CPU backend reads and writes, per statistic
 * group (ngroups) and per parameter index (nparams). api.c owns the arrays.
 */
typedef struct bn_coef_t {
  double *mean;               /* [ngroups] the mean used (0 for RMS); in: with given stats, else out */
  double *rstd;               /* [ngroups] 1 / sqrt(var + eps); in or out as mean */
  double *var;                /* [ngroups] out: biased variance (forward with computed stats) */
  const double *weight;       /* [nparams] or NULL (1) */
  const double *bias;         /* [nparams] or NULL (0) */
  const void *weight_ct;      /* weight in the compute type (float, or double for float64), or NULL */
  const void *bias_ct;        /* bias likewise */
  const int64_t *param_of_group; /* [ngroups] when every parameter axis separates groups, else NULL */
  double *sum_dy;             /* [ngroups] backward: sum over the group of dy*w (NULL: constant stats) */
  double *sum_dyx;            /* [ngroups] backward: sum over the group of dy*w*xhat */
  const void *gmean_ct, *gscale_ct, *gshift_ct, *gslope_ct; /* engine-internal per-group coefficients */
  double eps;
  double inv_n;               /* 1 / group_size (0 for empty groups) */
  int rms;                    /* no mean: BN_FLAG_RMS */
} bn_coef_t;

/* Group moments only, every sum in double: coef->mean and coef->var (holding m2, the sum of
 * squared deviations). */
bn_status_t bn_cpu_moments(const bn_plan_t *plan, bn_coef_t *coef);

/* Forward: with `compute_stats`, fills mean / rstd / var from x; then writes y. */
bn_status_t bn_cpu_forward(const bn_plan_t *plan, bn_coef_t *coef, int compute_stats);

/* Backward: with `training`, the group sums and dx of training mode, else dx = dy*w*rstd.
 * dweight / dbias (nparams each, may be NULL) receive sum(dy*xhat) and sum(dy). dx is written
 * when the plan has an output operand. */
bn_status_t bn_cpu_backward(const bn_plan_t *plan, bn_coef_t *coef, int training, double *dweight,
                            double *dbias);

/* Thread count for parallel regions (bn_set_num_threads). */
int bn_threads(void);

#endif /* BNCORE_INTERNAL_H */
