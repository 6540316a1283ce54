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

/* Reads a small tensor (parameters, statistics) of any float dtype and strides into
 * `dst` (numel doubles), in row-major order of its own shape. */
void bn_gather_f64(const DLTensor *t, double *dst);
/* Writes `src` (numel doubles) into a small tensor, rounding to its dtype. */
void bn_scatter_f64(DLTensor *t, const double *src);

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

/* Per-group coefficients the apply passes read (all arrays in double). */
typedef struct bn_coef_t {
  const double *mean;    /* [ngroups] */
  const double *rstd;    /* [ngroups] */
  const double *weight;  /* [nparams] or NULL (1) */
  const double *bias;    /* [nparams] or NULL (0) */
  const double *sum_dy;  /* backward: [ngroups] sum of dy*w; NULL in eval-mode backward */
  const double *sum_dyx; /* backward: [ngroups] sum of dy*w*xhat */
  double inv_n;          /* 1 / group_size */
} bn_coef_t;

/* Group statistics: count-free mean and m2 (sum of squared deviations) per group. */
bn_status_t bn_cpu_moments(const bn_plan_t *plan, double *mean, double *m2);

/* Backward sums keyed by `target` (BN_TARGET_GROUP: sum over the group of dy*w and
 * dy*w*xhat; BN_TARGET_PARAM: sum over the parameter index of dy and dy*xhat). */
enum { BN_TARGET_GROUP = 0, BN_TARGET_PARAM = 1 };
bn_status_t bn_cpu_grad_sums(const bn_plan_t *plan, const bn_coef_t *coef, int target, double *sum_a,
                             double *sum_b);

/* y = (x - mean) * rstd * w + b;  and  dx from bn_coef_t (see bncore.h). */
void bn_cpu_apply_forward(const bn_plan_t *plan, const bn_coef_t *coef);
void bn_cpu_apply_backward(const bn_plan_t *plan, const bn_coef_t *coef);

/* Thread count for parallel regions (bn_set_num_threads). */
int bn_threads(void);

#endif /* BNCORE_INTERNAL_H */
