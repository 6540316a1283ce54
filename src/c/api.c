/*
 * Public compute entry points: validate -> plan -> backend = table[device] -> commit.
 *
 * Every bn_norm_* function lives here. Each checks all of its arguments before it
 * writes anything, builds one plan on the host and runs the steps of the backend that
 * computes on the tensors' device. Per-group and per-parameter numbers travel as host
 * doubles (bn_coef_t); running statistics are folded by state.c's one rule and written
 * last, so a failing call leaves them as they were.
 */
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"

static const char *const PER_PARAM = "parameter index (the product of the parameter axes' sizes)";
static const char *const PER_GROUP = "statistic group";

/* ------------------------------------------------------------------ argument checks */

/* A copy of *desc at this library's layout: fields the caller's struct_size does not cover are 0. */
static bn_status_t read_desc(const bn_norm_desc_t *desc, bn_norm_desc_t *out) {
  if (!desc) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc: expected a problem description, got NULL");
  const size_t known = sizeof *out, given = (size_t)desc->struct_size;
  const size_t minimum = offsetof(bn_norm_desc_t, flags) + sizeof desc->flags;
  if (given < minimum)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                   "desc.struct_size: expected sizeof(bn_norm_desc_t) = %zu (at least %zu, through flags; the "
                   "bn_norm_desc_init_* functions set it), got %zu",
                   known, minimum, given);
  if (given > known) {
    const unsigned char *extra = (const unsigned char *)desc + known;
    for (size_t i = 0; i < given - known; i++)
      if (extra[i])
        return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                       "desc: fields beyond the %zu bytes of this library's bn_norm_desc_t are set (struct_size %zu); "
                       "they need a newer bncore",
                       known, given);
  }
  memset(out, 0, sizeof *out);
  memcpy(out, desc, given < known ? given : known);
  out->struct_size = known;
  return BN_STATUS_SUCCESS;
}

static bn_status_t check_desc(const bn_norm_desc_t *desc, const DLTensor *x) {
  if (desc->flags & ~BN_FLAG_ALL)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc.flags: unknown bits 0x%x", (unsigned)(desc->flags & ~BN_FLAG_ALL));
  if (desc->reserved != 0 || desc->reserved2 != 0)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc.reserved, desc.reserved2: expected 0");
  if (!isfinite(desc->eps) || desc->eps < 0)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "eps: expected a finite value >= 0, got %g", desc->eps);
  if ((desc->flags & BN_FLAG_UPDATE_RUNNING_STATS) && !(desc->momentum >= 0 && desc->momentum <= 1))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "momentum: expected a value in [0, 1], got %g", desc->momentum);
  if ((desc->flags & BN_FLAG_USE_RUNNING_STATS) && (desc->flags & (BN_FLAG_UPDATE_RUNNING_STATS | BN_FLAG_GIVEN_STATS)))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                   "desc.flags: USE_RUNNING_STATS (eval) excludes UPDATE_RUNNING_STATS and GIVEN_STATS (training)");
  if ((desc->flags & BN_FLAG_RMS) && (desc->flags & (BN_FLAG_USE_RUNNING_STATS | BN_FLAG_UPDATE_RUNNING_STATS)))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc.flags: RMS normalization keeps no running statistics");
  const uint64_t axes = x->ndim >= 64 ? ~0ull : ((1ull << x->ndim) - 1);
  if ((desc->reduce_axes | desc->param_axes) & ~axes)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc: reduce_axes 0x%llx / param_axes 0x%llx name axes beyond the %d of x",
                   (unsigned long long)desc->reduce_axes, (unsigned long long)desc->param_axes, (int)x->ndim);
  if (desc->reserved3 != 0) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc.reserved3: expected 0");
  if (desc->activation >= BN_ACTIVATION_COUNT)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "activation: expected a bn_activation_t (0 to %d), got %u",
                   (int)BN_ACTIVATION_COUNT - 1, (unsigned)desc->activation);
  if (desc->virtual_batch_size < 0)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "virtual_batch_size: expected 0 (none) or a size >= 1, got %lld",
                   (long long)desc->virtual_batch_size);
  if (desc->virtual_batch_size > 0 && (!(desc->reduce_axes & 1u) || (desc->param_axes & 1u)))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                   "virtual_batch_size: axis 0 must be reduced and not index the parameters (batch norm's batch axis)");
  if (desc->flags & BN_FLAG_RENORM) {
    if (!(desc->rmax >= 1.0))
      return bn_fail(BN_STATUS_INVALID_ARGUMENT, "rmax: expected a value >= 1 (inf: unbounded), got %g", desc->rmax);
    if (!(desc->dmax >= 0.0))
      return bn_fail(BN_STATUS_INVALID_ARGUMENT, "dmax: expected a value >= 0 (inf: unbounded), got %g", desc->dmax);
    if (desc->flags & (BN_FLAG_USE_RUNNING_STATS | BN_FLAG_RMS))
      return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                     "desc.flags: RENORM is a training forward (eval-mode renormalization is USE_RUNNING_STATS "
                     "alone) and keeps running statistics (not RMS)");
  }
  if (desc->split_axis != -1) {
    if (desc->split_axis < 0 || desc->split_axis >= x->ndim)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc.split_axis: expected -1 or an axis of x (ndim %d), got %d",
                     (int)x->ndim, (int)desc->split_axis);
    if ((desc->reduce_axes >> desc->split_axis) & 1u)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc.split_axis: axis %d must not also be in reduce_axes",
                     (int)desc->split_axis);
  }
  return BN_STATUS_SUCCESS;
}

/* A tensor the call reads or writes: float, countable, where ex computes. */
static bn_status_t check_arg(const bn_exec_t *ex, const DLTensor *t, const char *what, bn_dtype_t *dt) {
  bn_status_t st = bn_check_tensor(t, what, dt);
  return st ? st : bn_check_device(ex, t, what);
}

/* weight / bias / statistics: optional, float, on the device, `count` values */
static bn_status_t check_small(const bn_exec_t *ex, const DLTensor *t, const char *what, int64_t count,
                               const char *per) {
  if (!t) return BN_STATUS_SUCCESS;
  bn_dtype_t dt;
  bn_status_t st = check_arg(ex, t, what, &dt);
  return st ? st : bn_check_numel(t, what, count, per);
}

/* An operand of x's shape and dtype (y, dy, dx). */
static bn_status_t check_like_x(const bn_exec_t *ex, const DLTensor *t, const char *what, const DLTensor *x,
                                bn_dtype_t dt) {
  bn_dtype_t dtt;
  bn_status_t st;
  if ((st = check_arg(ex, t, what, &dtt)) || (st = bn_check_same_shape(t, what, x, "x"))) return st;
  if (dtt != dt)
    return bn_fail(BN_STATUS_UNSUPPORTED_DTYPE, "%s: expected x's dtype %s, got %s", what, bn_dtype_name(dt),
                   bn_dtype_name(dtt));
  return BN_STATUS_SUCCESS;
}

/* The start of every call on x: a readable desc, a valid x, the backend of its device. */
static bn_status_t begin(bn_context_t *ctx, const bn_norm_desc_t *desc_in, const DLTensor *x, bn_norm_desc_t *desc,
                         bn_exec_t *ex, bn_dtype_t *dt) {
  bn_status_t st;
  if ((st = bn_check_tensor(x, "x", dt))) return st;
  if ((st = read_desc(desc_in, desc)) || (st = check_desc(desc, x))) return st;
  if ((st = bn_exec_resolve(ctx, x->device, "x", ex))) return st;
  return bn_check_device(ex, x, "x");
}

/* ------------------------------------------------------------------ per-call host arrays */

/* One block for every per-group and per-parameter array of a call: on the stack up to
 * SCRATCH_LOCAL doubles (a small call then allocates nothing), else from the heap. */
#define SCRATCH_LOCAL 1024

typedef struct scratch_t {
  double *mean, *rstd, *var, *s1, *s2, *weight, *bias, *pa, *pb, *pc, *run_mean, *run_var, *r, *d, *weff, *beff;
  int64_t *param_of_group;
  double *block; /* local or heap; NULL before scratch_alloc */
  double local[SCRATCH_LOCAL];
} scratch_t;

static void scratch_free(scratch_t *s) {
  if (s->block != s->local) free(s->block);
  s->block = NULL;
}

static bn_status_t scratch_alloc(scratch_t *s, int64_t ng, int64_t np) {
  const size_t g = (size_t)(ng > 0 ? ng : 1), p = (size_t)(np > 0 ? np : 1);
  const size_t count = 5 * g + 11 * p + g;
  if (count <= SCRATCH_LOCAL) {
    s->block = s->local;
    memset(s->local, 0, count * sizeof(double));
  } else {
    s->block = calloc(count, sizeof(double));
  }
  if (!s->block) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "statistics for %" PRId64 " groups", ng);
  double *d = s->block;
  s->mean = d, d += g;
  s->rstd = d, d += g;
  s->var = d, d += g;
  s->s1 = d, d += g;
  s->s2 = d, d += g;
  s->weight = d, d += p;
  s->bias = d, d += p;
  s->pa = d, d += p;
  s->pb = d, d += p;
  s->pc = d, d += p;
  s->run_mean = d, d += p;
  s->run_var = d, d += p;
  s->r = d, d += p;
  s->d = d, d += p;
  s->weff = d, d += p;
  s->beff = d, d += p;
  s->param_of_group = (int64_t *)d;
  return BN_STATUS_SUCCESS;
}

/* Optional tensors into host doubles (absent ones leave their array alone). */
static bn_status_t gather(const bn_exec_t *ex, const DLTensor *t, double *dst) {
  return t ? ex->backend->gather(ex, t, dst) : BN_STATUS_SUCCESS;
}

static bn_status_t scatter(const bn_exec_t *ex, DLTensor *t, const double *src) {
  return t ? ex->backend->scatter(ex, t, src) : BN_STATUS_SUCCESS;
}

/* ------------------------------------------------------------------ forward */

/* What the forward's running-statistics update does: the rule, and whether a state counts it. */
typedef struct update_t {
  bn_fold_rule_t rule;
  int skipped; /* out: the rule left the batch out */
} update_t;

/* The batch value of each parameter index (the average of its groups' mean and biased variance),
 * folded into the running statistics by the rule; all-or-nothing (computed, then written). */
static bn_status_t fold_running(const bn_exec_t *ex, const bn_plan_t *plan, scratch_t *s, int64_t n,
                                  DLTensor *running_mean, DLTensor *running_var, update_t *up) {
  const int64_t ng = plan->ngroups, np = plan->nparams;
  bn_status_t st;
  for (int64_t p = 0; p < np; p++) s->pa[p] = s->pb[p] = s->pc[p] = 0.0;
  for (int64_t g = 0; g < ng; g++) {
    const int64_t p = s->param_of_group[g];
    s->pa[p] += s->mean[g], s->pb[p] += s->var[g], s->pc[p] += 1.0;
  }
  for (int64_t p = 0; p < np; p++) s->pa[p] /= s->pc[p], s->pb[p] /= s->pc[p];
  if ((st = gather(ex, running_mean, s->run_mean)) || (st = gather(ex, running_var, s->run_var))) return st;
  up->skipped = bn_fold(&up->rule, n, np, s->pa, s->pb, s->run_mean, s->run_var);
  if (up->skipped) return BN_STATUS_SUCCESS;
  if ((st = scatter(ex, running_mean, s->run_mean))) return st;
  return scatter(ex, running_var, s->run_var);
}

/* The forward behind bn_norm_forward and bn_norm_forward_stats. `up` is NULL for a plain call
 * (the rule then comes from desc). */
static bn_status_t forward(bn_context_t *ctx, const bn_norm_desc_t *desc_in, const DLTensor *x,
                           const DLTensor *weight, const DLTensor *bias, const DLTensor *residual,
                           const DLTensor *stats_mean, const DLTensor *stats_m2, int64_t stats_count,
                           DLTensor *running_mean, DLTensor *running_var, DLTensor *y, DLTensor *save_mean,
                           DLTensor *save_rstd, DLTensor *save_r, DLTensor *save_d, update_t *up) {
  bn_norm_desc_t desc;
  bn_exec_t ex;
  bn_dtype_t dt;
  bn_status_t st;
  if ((st = begin(ctx, desc_in, x, &desc, &ex, &dt))) return st;
  if ((st = check_like_x(&ex, y, "y", x, dt))) return st;
  if (residual && (st = check_like_x(&ex, residual, "residual", x, dt))) return st;

  bn_plan_t plan;
  if ((st = bn_plan_build(&desc, x, residual, y, dt, &plan))) return st;
  const int64_t ng = plan.ngroups, np = plan.nparams;
  const uint32_t flags = desc.flags;
  const int use_running = (flags & BN_FLAG_USE_RUNNING_STATS) != 0;
  const int update_running = (flags & BN_FLAG_UPDATE_RUNNING_STATS) != 0;
  const int given = (flags & BN_FLAG_GIVEN_STATS) != 0;
  const int renorm = (flags & BN_FLAG_RENORM) != 0;
  if ((st = check_small(&ex, weight, "weight", np, PER_PARAM)) || (st = check_small(&ex, bias, "bias", np, PER_PARAM)))
    return st;
  if ((st = check_small(&ex, save_mean, "save_mean", ng, PER_GROUP)) ||
      (st = check_small(&ex, save_rstd, "save_rstd", ng, PER_GROUP)))
    return st;
  if ((st = check_small(&ex, save_r, "save_r", np, PER_PARAM)) || (st = check_small(&ex, save_d, "save_d", np, PER_PARAM)))
    return st;
  if (renorm && (!plan.params_in_groups || ng != np))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                   "desc.flags: RENORM needs one statistic group per parameter index (batch norm without virtual "
                   "batches); got %" PRId64 " groups and %" PRId64 " parameter indices", ng, np);
  if (given) {
    if (!stats_mean || !stats_m2)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: required with GIVEN_STATS, got NULL",
                     stats_mean ? "stats_m2" : "stats_mean");
    if ((st = check_small(&ex, stats_mean, "stats_mean", ng, PER_GROUP)) ||
        (st = check_small(&ex, stats_m2, "stats_m2", ng, PER_GROUP)))
      return st;
    if (stats_count < 0)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT, "stats_count: expected the number of elements behind the "
                     "statistics (>= 0), got %" PRId64, stats_count);
  } else if (stats_mean || stats_m2 || stats_count) {
    return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                   "stats_mean, stats_m2, stats_count: given without BN_FLAG_GIVEN_STATS (expected NULL, NULL, 0)");
  }
  const int64_t n = given ? stats_count : plan.group_size; /* elements behind each group's statistics */
  if (use_running || update_running || renorm) {
    if (!running_mean || !running_var)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT, "running_mean and running_var: both required %s",
                     use_running ? "in evaluation mode (USE_RUNNING_STATS)"
                     : update_running ? "to update them (UPDATE_RUNNING_STATS)" : "for batch renormalization (RENORM)");
    if ((st = check_small(&ex, running_mean, "running_mean", np, PER_PARAM)) ||
        (st = check_small(&ex, running_var, "running_var", np, PER_PARAM)))
      return st;
    if (!plan.params_in_groups)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                     "running statistics: every parameter axis must separate statistic groups (not be reduced)");
    const int biased = up ? up->rule.biased : (flags & BN_FLAG_RUNNING_VAR_BIASED) != 0;
    if (update_running && !biased && n == 1)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                     "%s: expected more than 1 value per statistic group to update the unbiased running variance",
                     given ? "stats_count" : "x");
  }
  {
    /* y may be x itself; nothing else written may share memory with anything read or written.
     * Running statistics are written when updated, only read in evaluation mode. */
    const int read_running = (use_running || renorm) && !update_running;
    const bn_arg_t ins[] = {{x, "x"}, {weight, "weight"}, {bias, "bias"}, {stats_mean, "stats_mean"},
                            {stats_m2, "stats_m2"}, {read_running ? running_mean : NULL, "running_mean"},
                            {read_running ? running_var : NULL, "running_var"}, {residual, "residual"}};
    const bn_arg_t outs[] = {{y, "y"}, {save_mean, "save_mean"}, {save_rstd, "save_rstd"},
                             {update_running ? running_mean : NULL, "running_mean"},
                             {update_running ? running_var : NULL, "running_var"}, {save_r, "save_r"},
                             {save_d, "save_d"}};
    const int alias[] = {0, -1, -1, -1, -1, -1, -1};
    if ((st = bn_check_no_overlap(outs, 7, alias, ins, 8))) return st;
  }

  scratch_t s;
  if ((st = scratch_alloc(&s, ng, np))) return st;
  if ((st = gather(&ex, weight, s.weight)) || (st = gather(&ex, bias, s.bias))) goto done;
  if (plan.params_in_groups) bn_plan_group_params(&plan, s.param_of_group);
  bn_coef_t coef = {.mean = s.mean, .rstd = s.rstd, .var = s.var, .weight = weight ? s.weight : NULL,
                    .bias = bias ? s.bias : NULL, .param_of_group = plan.params_in_groups ? s.param_of_group : NULL,
                    .eps = desc.eps, .rms = (flags & BN_FLAG_RMS) != 0,
                    .relu = desc.activation == BN_ACTIVATION_RELU};
  for (int64_t p = 0; p < np; p++) s.r[p] = 1.0; /* s.d is zeroed: no renormalization */
  /* renorm: finishing each group's statistics sets r, d and the apply step's effective weight and
   * bias (bn_renorm_group), so the fused path still reads x once */
  const bn_renorm_t rn = {.rmax = desc.rmax, .dmax = desc.dmax, .run_mean = s.run_mean, .run_var = s.run_var,
                          .weight = coef.weight, .bias = coef.bias, .r = s.r, .d = s.d, .weight_eff = s.weff,
                          .bias_eff = s.beff};
  if (renorm) {
    if ((st = gather(&ex, running_mean, s.run_mean)) || (st = gather(&ex, running_var, s.run_var))) goto done;
    coef.renorm = &rn, coef.weight = s.weff, coef.bias = s.beff;
  }
  if (use_running) {
    if ((st = gather(&ex, running_mean, s.run_mean)) || (st = gather(&ex, running_var, s.run_var))) goto done;
    for (int64_t g = 0; g < ng; g++) {
      const int64_t p = s.param_of_group[g];
      s.mean[g] = s.run_mean[p];
      s.rstd[g] = 1.0 / sqrt(s.run_var[p] + desc.eps);
    }
  } else if (given) {
    if ((st = gather(&ex, stats_mean, s.mean)) || (st = gather(&ex, stats_m2, s.var))) goto done;
    for (int64_t g = 0; g < ng; g++) bn_finish_stats(&coef, g, (double)n);
  }
  if ((st = ex.backend->forward(&ex, &plan, &coef, !use_running && !given))) goto done;
  if ((st = scatter(&ex, save_mean, s.mean)) || (st = scatter(&ex, save_rstd, s.rstd))) goto done;
  if ((st = scatter(&ex, save_r, s.r)) || (st = scatter(&ex, save_d, s.d))) goto done;

  if (update_running && n > 0 && ng > 0) { /* no groups (instance norm of N = 0): nothing to fold */
    update_t plain = {.rule = {desc.momentum, (flags & BN_FLAG_RUNNING_VAR_BIASED) != 0,
                               (flags & BN_FLAG_SKIP_NONFINITE) != 0}, .skipped = 0};
    st = fold_running(&ex, &plan, &s, n, running_mean, running_var, up ? up : &plain);
  }
done:
  scratch_free(&s);
  return st;
}

bn_status_t bn_norm_forward(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x, const DLTensor *weight,
                            const DLTensor *bias, const DLTensor *stats_mean, const DLTensor *stats_m2,
                            int64_t stats_count, DLTensor *running_mean, DLTensor *running_var, DLTensor *y,
                            DLTensor *save_mean, DLTensor *save_rstd) {
  bn_clear_error();
  return forward(ctx, desc, x, weight, bias, NULL, stats_mean, stats_m2, stats_count, running_mean, running_var, y,
                 save_mean, save_rstd, NULL, NULL, NULL);
}

bn_status_t bn_norm_forward_ex(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                               const DLTensor *weight, const DLTensor *bias, const DLTensor *residual,
                               const DLTensor *stats_mean, const DLTensor *stats_m2, int64_t stats_count,
                               DLTensor *running_mean, DLTensor *running_var, DLTensor *y, DLTensor *save_mean,
                               DLTensor *save_rstd, DLTensor *save_r, DLTensor *save_d) {
  bn_clear_error();
  return forward(ctx, desc, x, weight, bias, residual, stats_mean, stats_m2, stats_count, running_mean, running_var,
                 y, save_mean, save_rstd, save_r, save_d, NULL);
}

static bn_status_t forward_state(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                 const DLTensor *weight, const DLTensor *bias, const DLTensor *residual,
                                 const DLTensor *stats_mean, const DLTensor *stats_m2, int64_t stats_count,
                                 bn_running_stats_t *state, DLTensor *y, DLTensor *save_mean, DLTensor *save_rstd,
                                 DLTensor *save_r, DLTensor *save_d) {
  if (!state) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "stats: expected a running-statistics state, got NULL");
  bn_norm_desc_t d;
  bn_status_t st = read_desc(desc, &d);
  if (st) return st;
  const int update = (d.flags & BN_FLAG_UPDATE_RUNNING_STATS) != 0;
  const int uses = update || (d.flags & (BN_FLAG_USE_RUNNING_STATS | BN_FLAG_RENORM));
  update_t up = {.skipped = 0};
  DLTensor tm, tv;
  bn_running_stats_lock(state); /* the whole call: readers never see half of another thread's update */
  bn_running_stats_bind(state, &tm, &tv, &up.rule);
  /* the state's rule replaces the description's: its factor, variance convention, non-finite policy */
  d.flags &= ~(BN_FLAG_RUNNING_VAR_BIASED | BN_FLAG_SKIP_NONFINITE);
  d.momentum = update ? up.rule.factor : 0.0;
  st = forward(ctx, &d, x, weight, bias, residual, stats_mean, stats_m2, stats_count, uses ? &tm : NULL,
               uses ? &tv : NULL, y, save_mean, save_rstd, save_r, save_d, &up);
  if (!st && update) bn_running_stats_count(state, up.skipped);
  bn_running_stats_unlock(state);
  return st;
}

bn_status_t bn_norm_forward_stats(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                  const DLTensor *weight, const DLTensor *bias, const DLTensor *stats_mean,
                                  const DLTensor *stats_m2, int64_t stats_count, bn_running_stats_t *state,
                                  DLTensor *y, DLTensor *save_mean, DLTensor *save_rstd) {
  bn_clear_error();
  return forward_state(ctx, desc, x, weight, bias, NULL, stats_mean, stats_m2, stats_count, state, y, save_mean,
                       save_rstd, NULL, NULL);
}

bn_status_t bn_norm_forward_stats_ex(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                     const DLTensor *weight, const DLTensor *bias, const DLTensor *residual,
                                     const DLTensor *stats_mean, const DLTensor *stats_m2, int64_t stats_count,
                                     bn_running_stats_t *state, DLTensor *y, DLTensor *save_mean,
                                     DLTensor *save_rstd, DLTensor *save_r, DLTensor *save_d) {
  bn_clear_error();
  return forward_state(ctx, desc, x, weight, bias, residual, stats_mean, stats_m2, stats_count, state, y, save_mean,
                       save_rstd, save_r, save_d);
}

/* ------------------------------------------------------------------ statistics and merges */

bn_status_t bn_norm_stats(bn_context_t *ctx, const bn_norm_desc_t *desc_in, const DLTensor *x, DLTensor *mean,
                          DLTensor *m2, int64_t *count) {
  bn_clear_error();
  bn_norm_desc_t desc;
  bn_exec_t ex;
  bn_dtype_t dt;
  bn_status_t st;
  if ((st = bn_check_tensor(x, "x", &dt))) return st;
  if ((st = read_desc(desc_in, &desc))) return st;
  desc.flags = 0, desc.eps = 0.0, desc.momentum = 0.0; /* only the axes matter here */
  if ((st = check_desc(&desc, x))) return st;
  if ((st = bn_exec_resolve(ctx, x->device, "x", &ex)) || (st = bn_check_device(&ex, x, "x"))) return st;
  if (!mean || !m2) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: required, got NULL", mean ? "m2" : "mean");
  bn_plan_t plan;
  if ((st = bn_plan_build(&desc, x, NULL, NULL, dt, &plan))) return st;
  if ((st = check_small(&ex, mean, "mean", plan.ngroups, PER_GROUP)) ||
      (st = check_small(&ex, m2, "m2", plan.ngroups, PER_GROUP)))
    return st;
  const bn_arg_t ins[] = {{x, "x"}};
  const bn_arg_t outs[] = {{mean, "mean"}, {m2, "m2"}};
  const int alias[] = {-1, -1};
  if ((st = bn_check_no_overlap(outs, 2, alias, ins, 1))) return st;
  scratch_t s;
  if ((st = scratch_alloc(&s, plan.ngroups, plan.nparams))) return st;
  bn_coef_t coef = {.mean = s.mean, .var = s.var};
  if (!(st = ex.backend->stats(&ex, &plan, &coef)) && !(st = scatter(&ex, mean, s.mean)) &&
      !(st = scatter(&ex, m2, s.var)) && count)
    *count = plan.group_size;
  scratch_free(&s);
  return st;
}

/* A count tensor of a merge: float, finite values >= 0, n or 1 of them. */
static bn_status_t check_count(const bn_exec_t *ex, const DLTensor *t, const char *what, int64_t n, int64_t *len) {
  bn_dtype_t dt;
  bn_status_t st = check_arg(ex, t, what, &dt);
  if (st) return st;
  *len = bn_numel(t);
  if (*len != n && *len != 1)
    return bn_fail(BN_STATUS_SHAPE_MISMATCH, "%s: expected %" PRId64 " values (one per entry) or 1, got %" PRId64, what,
                   n, *len);
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_moments_merge(bn_context_t *ctx, const DLTensor *count_a, const DLTensor *mean_a, const DLTensor *m2_a,
                             const DLTensor *count_b, const DLTensor *mean_b, const DLTensor *m2_b, DLTensor *count,
                             DLTensor *mean, DLTensor *m2) {
  bn_clear_error();
  bn_exec_t ex;
  bn_dtype_t dt;
  bn_status_t st;
  if ((st = bn_check_tensor(mean_a, "mean_a", &dt))) return st;
  if ((st = bn_exec_resolve(ctx, mean_a->device, "mean_a", &ex))) return st;
  const int64_t n = bn_numel(mean_a);
  const char *per = "entry of mean_a";
  if ((st = check_small(&ex, mean_a, "mean_a", n, per)) || (st = check_small(&ex, m2_a, "m2_a", n, per)) ||
      (st = check_small(&ex, mean_b, "mean_b", n, per)) || (st = check_small(&ex, m2_b, "m2_b", n, per)) ||
      (st = check_small(&ex, mean, "mean", n, per)) || (st = check_small(&ex, m2, "m2", n, per)))
    return st;
  if (!m2_a || !mean_b || !m2_b || !mean || !m2 || !count_a || !count_b)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: required, got NULL",
                   !count_a ? "count_a" : !m2_a ? "m2_a" : !count_b ? "count_b" : !mean_b ? "mean_b"
                   : !m2_b ? "m2_b" : !mean ? "mean" : "m2");
  int64_t la, lb, lo = 0;
  if ((st = check_count(&ex, count_a, "count_a", n, &la)) || (st = check_count(&ex, count_b, "count_b", n, &lb)))
    return st;
  if (count && (st = check_count(&ex, count, "count", n, &lo))) return st;
  if (count && lo == 1 && n != 1 && (la != 1 || lb != 1))
    return bn_fail(BN_STATUS_SHAPE_MISMATCH, "count: expected %" PRId64 " values, since count_a or count_b has one "
                   "per entry; got 1", n);
  {
    /* each output may be its own a- or b-side input exactly (in-place accumulation) */
    const bn_arg_t outs[] = {{count, "count"}, {mean, "mean"}, {m2, "m2"}};
    const bn_arg_t ins[] = {{count_a, "count_a"}, {mean_a, "mean_a"}, {m2_a, "m2_a"},
                            {count_b, "count_b"}, {mean_b, "mean_b"}, {m2_b, "m2_b"}};
    for (int i = 0; i < 3; i++) {
      if ((st = bn_check_own_memory(outs[i].t, outs[i].name))) return st;
      for (int j = 0; j < 6; j++)
        if ((st = bn_check_overlap(outs[i].t, outs[i].name, ins[j].t, ins[j].name, j % 3 == i))) return st;
      for (int j = 0; j < i; j++)
        if ((st = bn_check_overlap(outs[i].t, outs[i].name, outs[j].t, outs[j].name, 0))) return st;
    }
  }
  const size_t len = (size_t)(n > 0 ? n : 1);
  double *buf = malloc(7 * len * sizeof *buf);
  if (!buf) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "moments of %" PRId64 " entries", n);
  double *ca = buf, *ma = ca + len, *qa = ma + len, *cb = qa + len, *mb = cb + len, *qb = mb + len, *tmp = qb + len;
  if ((st = gather(&ex, count_a, ca)) || (st = gather(&ex, mean_a, ma)) || (st = gather(&ex, m2_a, qa)) ||
      (st = gather(&ex, count_b, cb)) || (st = gather(&ex, mean_b, mb)) || (st = gather(&ex, m2_b, qb)))
    goto done;
  for (int64_t i = 0; i < (la > lb ? la : lb); i++) {
    const double a = ca[la == 1 ? 0 : i], b = cb[lb == 1 ? 0 : i];
    if (!(isfinite(a) && a >= 0 && isfinite(b) && b >= 0)) {
      st = bn_fail(BN_STATUS_INVALID_ARGUMENT, "count_a, count_b: expected finite counts >= 0, got %g and %g at "
                   "entry %" PRId64, a, b, i);
      goto done;
    }
  }
  for (int64_t i = 0; i < n; i++) {
    tmp[i] = ca[la == 1 ? 0 : i];
    bn_chan_merge(&tmp[i], &ma[i], &qa[i], cb[lb == 1 ? 0 : i], mb[i], qb[i]);
    if (tmp[i] == 0.0) ma[i] = qa[i] = 0.0;
  }
  if (count && lo == 1) tmp[0] = ca[0] + cb[0]; /* one count for every entry */
  if ((st = scatter(&ex, mean, ma)) || (st = scatter(&ex, m2, qa))) goto done;
  if (count) st = scatter(&ex, count, tmp);
done:
  free(buf);
  return st;
}

/* ------------------------------------------------------------------ backward */

/* The checks and host arrays every backward entry shares. */
typedef struct backward_call_t {
  bn_exec_t ex;
  bn_plan_t plan;
  bn_norm_desc_t desc;
  scratch_t s;
  bn_coef_t coef;
  int training;
  int extended; /* in: called by bn_norm_backward_ex (RENORM and activations allowed) */
} backward_call_t;

static bn_status_t backward_begin(bn_context_t *ctx, const bn_norm_desc_t *desc_in, const DLTensor *x,
                                  const DLTensor *dy, const DLTensor *weight, const DLTensor *save_mean,
                                  const DLTensor *save_rstd, DLTensor *dx, backward_call_t *B) {
  bn_dtype_t dt;
  bn_status_t st;
  B->s.block = NULL;
  if ((st = bn_check_tensor(x, "x", &dt))) return st;
  if ((st = read_desc(desc_in, &B->desc))) return st;
  /* the running-statistics update, its momentum and given statistics belong to the forward: ignored here */
  B->desc.flags &= ~(BN_FLAG_UPDATE_RUNNING_STATS | BN_FLAG_RUNNING_VAR_BIASED | BN_FLAG_SKIP_NONFINITE |
                     BN_FLAG_GIVEN_STATS);
  B->desc.momentum = 0.0;
  if ((st = check_desc(&B->desc, x))) return st;
  if (!B->extended && ((B->desc.flags & BN_FLAG_RENORM) || B->desc.activation != BN_ACTIVATION_NONE))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc: the backward of RENORM or an activation is bn_norm_backward_ex "
                   "(it needs the forward's r, d or y)");
  if ((st = bn_exec_resolve(ctx, x->device, "x", &B->ex)) || (st = bn_check_device(&B->ex, x, "x"))) return st;
  if ((st = check_like_x(&B->ex, dy, "grad_output", x, dt))) return st;
  if (dx && (st = check_like_x(&B->ex, dx, "grad_input", x, dt))) return st;
  if ((st = bn_plan_build(&B->desc, x, dy, dx, dt, &B->plan))) return st;
  const int64_t ng = B->plan.ngroups, np = B->plan.nparams;
  const int rms = (B->desc.flags & BN_FLAG_RMS) != 0;
  B->training = !(B->desc.flags & BN_FLAG_USE_RUNNING_STATS);
  if ((st = check_small(&B->ex, weight, "weight", np, PER_PARAM))) return st;
  if (!save_rstd || (!save_mean && !rms))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: required for the backward pass, got NULL",
                   save_rstd ? "save_mean" : "save_rstd");
  if ((st = check_small(&B->ex, save_mean, "save_mean", ng, PER_GROUP)) ||
      (st = check_small(&B->ex, save_rstd, "save_rstd", ng, PER_GROUP)))
    return st;
  return BN_STATUS_SUCCESS;
}

/* A one-element group normalizes to the constant 0: xhat and dx are exactly 0, which the formula
 * reaches only up to rounding (dy*w*rstd - rstd*sum(dy*w) in two precisions). `count` is the
 * number of elements behind the statistics: the whole group's, not this call's part of it. */
static void one_element_groups(backward_call_t *B, int64_t count) {
  if (B->training && !(B->desc.flags & BN_FLAG_RMS) && count == 1)
    for (int64_t g = 0; g < B->plan.ngroups; g++) B->s.rstd[g] = 0.0;
}

/* After the overlap checks: the host arrays, filled from weight and the saved statistics. */
static bn_status_t backward_load(backward_call_t *B, const DLTensor *weight, const DLTensor *save_mean,
                                 const DLTensor *save_rstd) {
  bn_status_t st;
  const int rms = (B->desc.flags & BN_FLAG_RMS) != 0;
  if ((st = scratch_alloc(&B->s, B->plan.ngroups, B->plan.nparams))) return st;
  scratch_t *s = &B->s;
  if ((st = gather(&B->ex, weight, s->weight))) return st;
  if (!rms && (st = gather(&B->ex, save_mean, s->mean))) return st;
  if ((st = gather(&B->ex, save_rstd, s->rstd))) return st;
  if (B->plan.params_in_groups) bn_plan_group_params(&B->plan, s->param_of_group);
  B->coef = (bn_coef_t){.mean = s->mean, .rstd = s->rstd, .weight = weight ? s->weight : NULL,
                        .param_of_group = B->plan.params_in_groups ? s->param_of_group : NULL, .sum_dy = s->s1,
                        .sum_dyx = s->s2,
                        .inv_n = B->plan.group_size > 0 ? 1.0 / (double)B->plan.group_size : 0.0, .rms = rms};
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_norm_backward(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x, const DLTensor *dy,
                             const DLTensor *weight, const DLTensor *save_mean, const DLTensor *save_rstd,
                             DLTensor *dx, DLTensor *dweight, DLTensor *dbias) {
  bn_clear_error();
  backward_call_t B = {.extended = 0};
  bn_status_t st;
  if ((st = backward_begin(ctx, desc, x, dy, weight, save_mean, save_rstd, dx, &B))) return st;
  const int64_t np = B.plan.nparams;
  if ((st = check_small(&B.ex, dweight, "grad_weight", np, PER_PARAM)) ||
      (st = check_small(&B.ex, dbias, "grad_bias", np, PER_PARAM)))
    return st;
  {
    /* grad_input may be grad_output itself; no other sharing */
    const bn_arg_t ins[] = {{x, "x"}, {dy, "grad_output"}, {weight, "weight"}, {save_mean, "save_mean"},
                            {save_rstd, "save_rstd"}};
    const bn_arg_t outs[] = {{dx, "grad_input"}, {dweight, "grad_weight"}, {dbias, "grad_bias"}};
    const int alias[] = {1, -1, -1};
    if ((st = bn_check_no_overlap(outs, 3, alias, ins, 5))) return st;
  }
  if ((st = backward_load(&B, weight, save_mean, save_rstd))) goto done;
  one_element_groups(&B, B.plan.group_size);
  if ((st = B.ex.backend->backward(&B.ex, &B.plan, &B.coef, B.training, dweight ? B.s.pa : NULL,
                                   dbias ? B.s.pb : NULL)))
    goto done;
  if ((st = scatter(&B.ex, dweight, B.s.pa))) goto done;
  st = scatter(&B.ex, dbias, B.s.pb);
done:
  scratch_free(&B.s);
  return st;
}

bn_status_t bn_norm_backward_ex(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x, const DLTensor *dy,
                                const DLTensor *weight, const DLTensor *save_mean, const DLTensor *save_rstd,
                                const DLTensor *y, const DLTensor *save_r, const DLTensor *save_d, DLTensor *dx,
                                DLTensor *dweight, DLTensor *dbias, DLTensor *dresidual) {
  bn_clear_error();
  backward_call_t B = {.extended = 1};
  bn_status_t st;
  bn_dtype_t dt;
  if ((st = backward_begin(ctx, desc, x, dy, weight, save_mean, save_rstd, dx, &B))) return st;
  dt = B.plan.dtype;
  const int64_t np = B.plan.nparams;
  const int relu = B.desc.activation == BN_ACTIVATION_RELU, renorm = (B.desc.flags & BN_FLAG_RENORM) != 0;
  if ((st = check_small(&B.ex, dweight, "grad_weight", np, PER_PARAM)) ||
      (st = check_small(&B.ex, dbias, "grad_bias", np, PER_PARAM)))
    return st;
  if (relu && !y) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "y: the forward's output is required with a ReLU, got NULL");
  if (relu && (st = check_like_x(&B.ex, y, "y", x, dt))) return st;
  if (dresidual && (st = check_like_x(&B.ex, dresidual, "grad_residual", x, dt))) return st;
  if (renorm && (!save_r || !save_d))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: required with RENORM (the forward's r and d), got NULL",
                   save_r ? "save_d" : "save_r");
  if (renorm && ((st = check_small(&B.ex, save_r, "save_r", np, PER_PARAM)) ||
                 (st = check_small(&B.ex, save_d, "save_d", np, PER_PARAM))))
    return st;
  {
    const bn_arg_t ins[] = {{x, "x"}, {dy, "grad_output"}, {weight, "weight"}, {save_mean, "save_mean"},
                            {save_rstd, "save_rstd"}, {relu ? y : NULL, "y"}, {renorm ? save_r : NULL, "save_r"},
                            {renorm ? save_d : NULL, "save_d"}};
    const bn_arg_t outs[] = {{dx, "grad_input"}, {dweight, "grad_weight"}, {dbias, "grad_bias"},
                             {dresidual, "grad_residual"}};
    const int alias[] = {1, -1, -1, -1};
    if ((st = bn_check_no_overlap(outs, 4, alias, ins, 8))) return st;
  }
  void *masked = NULL;
  if ((st = backward_load(&B, weight, save_mean, save_rstd))) goto done;
  if (relu || dresidual) { /* g = dy through the epilogue, into dresidual or a workspace */
    DLTensor g = {0};
    if (!dresidual) {
      masked = bn_ws_alloc(&B.ex, (size_t)(B.plan.numel > 0 ? B.plan.numel : 1) * bn_dtype_size(dt));
      if (!masked) {
        st = bn_fail(BN_STATUS_OUT_OF_MEMORY, "the masked gradient of %" PRId64 " elements", B.plan.numel);
        goto done;
      }
      g = (DLTensor){.data = masked, .device = x->device, .ndim = x->ndim, .dtype = x->dtype, .shape = x->shape};
    }
    const DLTensor *gt = dresidual ? dresidual : &g;
    bn_plan_t mask_plan;
    if ((st = bn_plan_build(&B.desc, relu ? y : dy, dy, (DLTensor *)gt, dt, &mask_plan)) ||
        (st = B.ex.backend->mask_grad(&B.ex, &mask_plan, relu)))
      goto done;
    if (relu && (st = bn_plan_build(&B.desc, x, gt, dx, dt, &B.plan))) goto done;
  }
  if (renorm) { /* r and d are constants: batch norm's backward with weight * r */
    scratch_t *s = &B.s;
    if ((st = gather(&B.ex, save_r, s->r)) || (st = gather(&B.ex, save_d, s->d))) goto done;
    for (int64_t p = 0; p < np; p++) s->weff[p] = (B.coef.weight ? B.coef.weight[p] : 1.0) * s->r[p];
    B.coef.weight = s->weff;
  }
  one_element_groups(&B, B.plan.group_size);
  /* renorm's dweight needs sum(g) too */
  if ((st = B.ex.backend->backward(&B.ex, &B.plan, &B.coef, B.training, dweight ? B.s.pa : NULL,
                                   (dbias || (renorm && dweight)) ? B.s.pb : NULL)))
    goto done;
  if (renorm && dweight) /* dweight = sum(g * (xhat * r + d)) */
    for (int64_t p = 0; p < np; p++) B.s.pa[p] = B.s.r[p] * B.s.pa[p] + B.s.d[p] * B.s.pb[p];
  if ((st = scatter(&B.ex, dweight, B.s.pa))) goto done;
  st = scatter(&B.ex, dbias, B.s.pb);
done:
  bn_ws_free(&B.ex, masked);
  scratch_free(&B.s);
  return st;
}

bn_status_t bn_norm_backward_reduce(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                    const DLTensor *dy, const DLTensor *save_mean, const DLTensor *save_rstd,
                                    DLTensor *sum_dy, DLTensor *sum_dy_xhat) {
  bn_clear_error();
  backward_call_t B = {.extended = 0};
  bn_status_t st;
  if ((st = backward_begin(ctx, desc, x, dy, NULL, save_mean, save_rstd, NULL, &B))) return st;
  const int64_t np = B.plan.nparams;
  if ((st = check_small(&B.ex, sum_dy, "sum_dy", np, PER_PARAM)) ||
      (st = check_small(&B.ex, sum_dy_xhat, "sum_dy_xhat", np, PER_PARAM)))
    return st;
  {
    const bn_arg_t ins[] = {{x, "x"}, {dy, "grad_output"}, {save_mean, "save_mean"}, {save_rstd, "save_rstd"}};
    const bn_arg_t outs[] = {{sum_dy, "sum_dy"}, {sum_dy_xhat, "sum_dy_xhat"}};
    const int alias[] = {-1, -1};
    if ((st = bn_check_no_overlap(outs, 2, alias, ins, 4))) return st;
  }
  if ((st = backward_load(&B, NULL, save_mean, save_rstd))) goto done;
  /* parameter sums only: the group sums of the training dx come in step 2 from these */
  if ((st = B.ex.backend->backward_reduce(&B.ex, &B.plan, &B.coef, 0, sum_dy_xhat ? B.s.pa : NULL,
                                          sum_dy ? B.s.pb : NULL)))
    goto done;
  if ((st = scatter(&B.ex, sum_dy_xhat, B.s.pa))) goto done;
  st = scatter(&B.ex, sum_dy, B.s.pb);
done:
  scratch_free(&B.s);
  return st;
}

bn_status_t bn_norm_backward_apply(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                   const DLTensor *dy, const DLTensor *weight, const DLTensor *save_mean,
                                   const DLTensor *save_rstd, const DLTensor *sum_dy, const DLTensor *sum_dy_xhat,
                                   int64_t count, DLTensor *dx) {
  bn_clear_error();
  backward_call_t B = {.extended = 0};
  bn_status_t st;
  if (!dx) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "grad_input: expected a tensor to write, got NULL");
  if ((st = backward_begin(ctx, desc, x, dy, weight, save_mean, save_rstd, dx, &B))) return st;
  const int64_t ng = B.plan.ngroups, np = B.plan.nparams;
  const int rms = (B.desc.flags & BN_FLAG_RMS) != 0;
  if (B.training) {
    if (!B.plan.params_in_groups || ng != np)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                     "desc: the training backward from parameter sums needs one statistic group per parameter index "
                     "(the parameter axes exactly the non-reduced axes, as in batch norm); got %" PRId64
                     " groups and %" PRId64 " parameter indices; use bn_norm_backward",
                     ng, np);
    if (!sum_dy_xhat || (!sum_dy && !rms))
      return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: required in training, got NULL",
                     sum_dy_xhat ? "sum_dy" : "sum_dy_xhat");
    if (count < 1 && B.plan.numel > 0)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT, "count: expected the number of elements behind the sums (> 0), "
                     "got %" PRId64, count);
    if ((st = check_small(&B.ex, sum_dy, "sum_dy", np, PER_PARAM)) ||
        (st = check_small(&B.ex, sum_dy_xhat, "sum_dy_xhat", np, PER_PARAM)))
      return st;
  }
  {
    const bn_arg_t ins[] = {{x, "x"}, {dy, "grad_output"}, {weight, "weight"}, {save_mean, "save_mean"},
                            {save_rstd, "save_rstd"}, {sum_dy, "sum_dy"}, {sum_dy_xhat, "sum_dy_xhat"}};
    const bn_arg_t outs[] = {{dx, "grad_input"}};
    const int alias[] = {1};
    if ((st = bn_check_no_overlap(outs, 1, alias, ins, 7))) return st;
  }
  if ((st = backward_load(&B, weight, save_mean, save_rstd))) goto done;
  if (B.training) {
    scratch_t *s = &B.s;
    if ((!rms && (st = gather(&B.ex, sum_dy, s->pb))) || (st = gather(&B.ex, sum_dy_xhat, s->pa))) goto done;
    for (int64_t g = 0; g < ng; g++) { /* the group sums of dy*w and dy*w*xhat */
      const int64_t p = s->param_of_group[g];
      const double w = B.coef.weight ? B.coef.weight[p] : 1.0;
      s->s1[g] = rms ? 0.0 : w * s->pb[p], s->s2[g] = w * s->pa[p];
    }
    B.coef.inv_n = count > 0 ? 1.0 / (double)count : 0.0;
    one_element_groups(&B, count);
  }
  st = B.ex.backend->backward_apply(&B.ex, &B.plan, &B.coef, B.training);
done:
  scratch_free(&B.s);
  return st;
}
