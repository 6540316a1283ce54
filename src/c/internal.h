/* Internal declarations shared by the C core. Nothing here is exported. */
#ifndef BNCORE_INTERNAL_H
#define BNCORE_INTERNAL_H

#include <math.h>
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

/* A tensor of float dtype with ndim in [0, BN_MAX_NDIM] and countable elements (device: see backend.h). */
bn_status_t bn_check_tensor(const DLTensor *t, const char *what, bn_dtype_t *dt);
/* Memory the CPU reads directly: plain, pinned (cuda_host) and managed (cuda_managed). */
int bn_is_host(DLDevice device);
/* UNSUPPORTED_DEVICE naming `what` unless t lives in host memory. */
bn_status_t bn_check_host(const DLTensor *t, const char *what);
/* Same shape as `ref`. */
bn_status_t bn_check_same_shape(const DLTensor *t, const char *what, const DLTensor *ref, const char *refname);
/* One value per index: numel must equal `count`. */
bn_status_t bn_check_numel(const DLTensor *t, const char *what, int64_t count, const char *of_what);
/* out may equal `in` exactly (same base and strides) when `alias_ok`; any other overlap fails. */
bn_status_t bn_check_overlap(const DLTensor *out, const char *outname, const DLTensor *in, const char *inname,
                             int alias_ok);

/* OVERLAP unless every element of t has its own address (outputs: stride 0 or overlapping rows
 * would make one element's result overwrite another's). NULL passes. */
bn_status_t bn_check_own_memory(const DLTensor *t, const char *what);

/* A tensor argument of a call, for the overlap checks of all its outputs at once. */
typedef struct bn_arg_t {
  const DLTensor *t; /* may be NULL (absent) */
  const char *name;
} bn_arg_t;
#define BN_MAX_ARGS 16 /* outputs, and inputs, of one bn_check_no_overlap */
/* Every output against itself (bn_check_own_memory), every input and every other output;
 * outs[i] may alias ins[alias[i]] exactly when alias[i] >= 0. */
bn_status_t bn_check_no_overlap(const bn_arg_t *outs, int nouts, const int *alias, const bn_arg_t *ins, int nins);

/* Reads a small host tensor (parameters, statistics) of any float dtype and strides into
 * `dst` (numel doubles), in row-major order of its own shape. */
void bn_gather_f64(const DLTensor *t, double *dst);
/* Writes `src` (numel doubles) into a small host tensor, rounding to its dtype. */
void bn_scatter_f64(DLTensor *t, const double *src);

/* ------------------------------------------------------------------ running statistics (state.c) */

/* How a batch is folded into running statistics: stored = (1 - factor) * stored + factor * batch,
 * the variance unbiased by n / (n - 1) unless `biased`; with `skip_nonfinite` a batch whose
 * statistics are not all finite is left out. */
typedef struct bn_fold_rule_t {
  double factor;
  int biased;
  int skip_nonfinite;
} bn_fold_rule_t;

/* Folds per-index batch means and biased variances of n values each into run_mean / run_var
 * (np doubles each, updated in place). Returns 1 when the rule skipped the batch (nothing
 * written), else 0. */
int bn_fold(const bn_fold_rule_t *rule, int64_t n, int64_t np, const double *batch_mean, const double *batch_var,
            double *run_mean, double *run_var);

/* A state's arrays as CPU tensors and the rule of its next update (factor by its convention). */
void bn_running_stats_bind(bn_running_stats_t *s, DLTensor *mean, DLTensor *var, bn_fold_rule_t *rule);
int64_t bn_running_stats_features(const bn_running_stats_t *s);
/* The state's lock (not recursive): held around every call that reads or writes it. */
void bn_running_stats_lock(const bn_running_stats_t *s);
void bn_running_stats_unlock(const bn_running_stats_t *s);
/* Counts one update (or one skipped batch). */
void bn_running_stats_count(bn_running_stats_t *s, int skipped);

/* ------------------------------------------------------------------ plan (plan.c) */

/* Operand slots of a plan: forward uses X, OUT (y) and DY for the residual (NULL: none); backward
 * X, DY and OUT (dx). */
enum { BN_OP_X = 0, BN_OP_DY = 1, BN_OP_OUT = 2, BN_NOPS = 3 };

/* Canonical dimensions: BN_MAX_NDIM input axes plus one each for the split axis and the virtual batches. */
#define BN_MAX_CANON (BN_MAX_NDIM + 2)

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
/* How a backend walks a problem; the plan decides, from the shape alone. */
typedef enum bn_path_t {
  BN_PATH_EMPTY = 0,   /* no elements: statistics are zero, nothing is read */
  BN_PATH_FUSED,       /* each group's data fits in cache: reduce it, then apply while it is there */
  BN_PATH_TWO_PHASE    /* a blocked reduction over the whole tensor, then an apply pass */
} bn_path_t;

/* A group whose operands take at most this many bytes is fused (half of a typical L2). */
#define BN_FUSE_BYTES (1 << 20)

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
  int row_across_groups;  /* the innermost dim runs across groups (channels-last), not within one */
  bn_path_t forward_path; /* for the forward's 2 operands (x, y); statistics follow it too */
  bn_path_t backward_path;/* for the backward's 3 operands (x, dy, dx) */
} bn_plan_t;

/* Builds the plan for x (and optional dy, out tensors of the same shape). */
bn_status_t bn_plan_build(const bn_norm_desc_t *desc, const DLTensor *x, const DLTensor *dy,
                          const DLTensor *out, bn_dtype_t dtype, bn_plan_t *plan);
/* For each group g, its parameter index (requires params_in_groups). */
void bn_plan_group_params(const bn_plan_t *plan, int64_t *param_of_group);

/* ------------------------------------------------------------------ per-call numbers */

/*
 * The numbers of one call that every backend reads and writes, per statistic group
 * (ngroups) and per parameter index (nparams), as host doubles. api.c owns the arrays.
 */
/* Batch renormalization's numbers of a call (BN_FLAG_RENORM; one statistic group per parameter
 * index): finishing group g's statistics also sets r, d and the effective parameters of its index
 * p, which the apply step reads as bn_coef_t.weight / .bias (they point at weight_eff, bias_eff). */
typedef struct bn_renorm_t {
  double rmax, dmax;
  const double *run_mean, *run_var; /* [nparams] the running statistics before this call's update */
  const double *weight, *bias;      /* [nparams] the caller's parameters, or NULL (1, 0) */
  double *r, *d;                    /* [nparams] out */
  double *weight_eff, *bias_eff;    /* [nparams] out: weight * r, bias + weight * d */
} bn_renorm_t;

typedef struct bn_coef_t {
  double *mean;               /* [ngroups] the mean used (0 for RMS); in: given stats, else out */
  double *rstd;               /* [ngroups] 1 / sqrt(var + eps); in or out as mean */
  double *var;                /* [ngroups] out: biased variance (m2 from the stats step) */
  const double *weight;       /* [nparams] or NULL (1) */
  const double *bias;         /* [nparams] or NULL (0) */
  const int64_t *param_of_group; /* [ngroups] when every parameter axis separates groups, else NULL */
  double *sum_dy;             /* [ngroups] backward: sum over the group of dy*w (NULL: constant stats) */
  double *sum_dyx;            /* [ngroups] backward: sum over the group of dy*w*xhat */
  double eps;
  double inv_n;               /* 1 / count behind the backward sums (0 for empty groups) */
  int rms;                    /* no mean: BN_FLAG_RMS */
  int relu;                   /* forward epilogue: y = max(y, 0) after the residual (the plan's DY operand) */
  const bn_renorm_t *renorm;  /* BN_FLAG_RENORM, else NULL */
} bn_coef_t;

/* r = clip(sigma_B / sigma, 1/rmax, rmax), d = clip((mu_B - mu) / sigma, -dmax, dmax) for group g
 * (its statistics finished), folded into the effective parameters of its index. NaN stays NaN. */
static inline void bn_renorm_group(const bn_coef_t *c, int64_t g) {
  const bn_renorm_t *rn = c->renorm;
  const int64_t p = c->param_of_group[g];
  const double sigma = sqrt(rn->run_var[p] + c->eps), sigma_b = sqrt(c->var[g] + c->eps), lo = 1.0 / rn->rmax;
  double r = sigma_b / sigma, d = (c->mean[g] - rn->run_mean[p]) / sigma;
  r = r < lo ? lo : r > rn->rmax ? rn->rmax : r;
  d = d < -rn->dmax ? -rn->dmax : d > rn->dmax ? rn->dmax : d;
  const double w = rn->weight ? rn->weight[p] : 1.0, b = rn->bias ? rn->bias[p] : 0.0;
  rn->r[p] = r, rn->d[p] = d;
  rn->weight_eff[p] = w * r, rn->bias_eff[p] = b + w * d;
}

/* A group's statistics from its moments (n elements): var and rstd; RMS moves the mean into var. */
static inline void bn_finish_stats(bn_coef_t *c, int64_t g, double n) {
  double var = n > 0 ? c->var[g] / n : 0.0; /* c->var holds m2 until here */
  if (c->rms) var += c->mean[g] * c->mean[g], c->mean[g] = 0.0;
  c->var[g] = var;
  c->rstd[g] = 1.0 / sqrt(var + c->eps);
  if (c->renorm) bn_renorm_group(c, g);
}

/* Chan et al.: merge (nb, mb, m2b) into the running (cnt, mean, m2). */
static inline void bn_chan_merge(double *cnt, double *mean, double *m2, double nb, double mb, double m2b) {
  if (nb == 0.0) return;
  if (*cnt == 0.0) { /* an empty side gives the other exactly (and 0 * d^2 never meets d^2 = inf) */
    *cnt = nb, *mean = mb, *m2 = m2b;
    return;
  }
  const double na = *cnt, n = na + nb, d = mb - *mean;
  if (!isfinite(d)) { /* inf in the data: the plain weighted mean keeps inf + finite = inf, as sums do */
    *mean = (*mean * na + mb * nb) / n;
    *m2 = NAN; /* a spread around an infinite mean is undefined */
    *cnt = n;
    return;
  }
  *mean += d * (nb / n);
  *m2 += m2b + d * d * (na * nb / n);
  *cnt = n;
}

#endif /* BNCORE_INTERNAL_H */
