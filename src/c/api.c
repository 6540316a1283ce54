/* Public entry points: validate -> plan -> dispatch (device, dtype) -> commit. */
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static bn_status_t check_desc(const bn_norm_desc_t *desc, const DLTensor *x) {
  if (!desc) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc: expected a problem description, got NULL");
  if (desc->flags & ~BN_FLAG_ALL)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc.flags: unknown bits 0x%x", (unsigned)(desc->flags & ~BN_FLAG_ALL));
  if (desc->reserved != 0) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc.reserved: expected 0");
  if (!isfinite(desc->eps) || desc->eps < 0)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "eps: expected a finite value >= 0, got %g", desc->eps);
  if ((desc->flags & BN_FLAG_UPDATE_RUNNING_STATS) && !(desc->momentum >= 0 && desc->momentum <= 1))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "momentum: expected a value in [0, 1], got %g", desc->momentum);
  if ((desc->flags & BN_FLAG_USE_RUNNING_STATS) && (desc->flags & BN_FLAG_UPDATE_RUNNING_STATS))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                   "desc.flags: USE_RUNNING_STATS (eval) and UPDATE_RUNNING_STATS (training) exclude each other");
  if ((desc->flags & BN_FLAG_RMS) && (desc->flags & (BN_FLAG_USE_RUNNING_STATS | BN_FLAG_UPDATE_RUNNING_STATS)))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc.flags: RMS normalization keeps no running statistics");
  const uint64_t axes = x->ndim >= 64 ? ~0ull : ((1ull << x->ndim) - 1);
  if ((desc->reduce_axes | desc->param_axes) & ~axes)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc: reduce_axes 0x%llx / param_axes 0x%llx name axes beyond the %d of x",
                   (unsigned long long)desc->reduce_axes, (unsigned long long)desc->param_axes, (int)x->ndim);
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

/* weight / bias / running statistic / saved statistic: optional, float, CPU, `count` values */
static bn_status_t check_small(const DLTensor *t, const char *what, int64_t count, const char *per) {
  if (!t) return BN_STATUS_SUCCESS;
  bn_dtype_t dt;
  bn_status_t st = bn_check_tensor(t, what, &dt);
  return st ? st : bn_check_numel(t, what, count, per);
}

/* One allocation for every per-group and per-parameter array of a call. */
typedef struct scratch_t {
  double *mean, *rstd, *weight, *bias, *s1, *s2, *pa, *pb, *pc, *run_mean, *run_var;
  int64_t *param_of_group;
  void *block;
} scratch_t;

static bn_status_t scratch_alloc(scratch_t *s, int64_t ng, int64_t np) {
  const size_t g = (size_t)(ng > 0 ? ng : 1), p = (size_t)(np > 0 ? np : 1);
  s->block = calloc(4 * g + 7 * p + g, sizeof(double));
  if (!s->block) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "statistics for %" PRId64 " groups", ng);
  double *d = s->block;
  s->mean = d, d += g;
  s->rstd = d, d += g;
  s->s1 = d, d += g;
  s->s2 = d, d += g;
  s->weight = d, d += p;
  s->bias = d, d += p;
  s->pa = d, d += p;
  s->pb = d, d += p;
  s->pc = d, d += p;
  s->run_mean = d, d += p;
  s->run_var = d, d += p;
  s->param_of_group = (int64_t *)d;
  return BN_STATUS_SUCCESS;
}

/* Sums per-group values into their parameter index, in group order (accumulates). */
static void sum_groups_into_params(const scratch_t *s, int64_t ng, const double *by_group, double *by_param) {
  for (int64_t g = 0; g < ng; g++) by_param[s->param_of_group[g]] += by_group[g];
}

bn_status_t bn_norm_forward(const bn_norm_desc_t *desc, const DLTensor *x, const DLTensor *weight,
                            const DLTensor *bias, DLTensor *running_mean, DLTensor *running_var, DLTensor *y,
                            DLTensor *save_mean, DLTensor *save_rstd) {
  bn_clear_error();
  return bn_forward_impl(desc, x, weight, bias, running_mean, running_var, y, save_mean, save_rstd, NULL);
}

bn_status_t bn_forward_impl(const bn_norm_desc_t *desc, const DLTensor *x, const DLTensor *weight,
                            const DLTensor *bias, DLTensor *running_mean, DLTensor *running_var, DLTensor *y,
                            DLTensor *save_mean, DLTensor *save_rstd, int *skipped) {
  bn_dtype_t dt, dty;
  bn_status_t st;
  if ((st = bn_check_tensor(x, "x", &dt))) return st;
  if ((st = check_desc(desc, x))) return st;
  if ((st = bn_check_tensor(y, "y", &dty))) return st;
  if ((st = bn_check_same_shape(y, "y", x, "x"))) return st;
  if (dty != dt)
    return bn_fail(BN_STATUS_UNSUPPORTED_DTYPE, "y: expected x's dtype %s, got %s", bn_dtype_name(dt),
                   bn_dtype_name(dty));

  bn_plan_t plan;
  if ((st = bn_plan_build(desc, x, NULL, y, dt, &plan))) return st;
  const int64_t ng = plan.ngroups, np = plan.nparams;
  const uint32_t flags = desc->flags;
  const int use_running = (flags & BN_FLAG_USE_RUNNING_STATS) != 0;
  const int update_running = (flags & BN_FLAG_UPDATE_RUNNING_STATS) != 0;
  const char *per_param = "parameter index (the product of the parameter axes' sizes)";
  const char *per_group = "statistic group";
  if ((st = check_small(weight, "weight", np, per_param)) || (st = check_small(bias, "bias", np, per_param)))
    return st;
  if ((st = check_small(save_mean, "save_mean", ng, per_group)) ||
      (st = check_small(save_rstd, "save_rstd", ng, per_group)))
    return st;
  if (use_running || update_running) {
    if (!running_mean || !running_var)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT, "running_mean and running_var: both required %s",
                     use_running ? "in evaluation mode (USE_RUNNING_STATS)" : "to update them (UPDATE_RUNNING_STATS)");
    if ((st = check_small(running_mean, "running_mean", np, per_param)) ||
        (st = check_small(running_var, "running_var", np, per_param)))
      return st;
    if (!plan.params_in_groups)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                     "running statistics: every parameter axis must separate statistic groups (not be reduced)");
    if (update_running && !(flags & BN_FLAG_RUNNING_VAR_BIASED) && plan.group_size == 1)
      return bn_fail(BN_STATUS_INVALID_ARGUMENT,
                     "x: expected more than 1 value per statistic group to update the unbiased running variance");
  }
  {
    /* y may be x itself; nothing else written may share memory with anything read or written */
    const int in_out = use_running || update_running;
    const bn_arg_t ins[] = {{x, "x"}, {weight, "weight"}, {bias, "bias"}};
    const bn_arg_t outs[] = {{y, "y"}, {save_mean, "save_mean"}, {save_rstd, "save_rstd"},
                             {in_out ? running_mean : NULL, "running_mean"},
                             {in_out ? running_var : NULL, "running_var"}};
    const int alias[] = {0, -1, -1, -1, -1};
    if ((st = bn_check_no_overlap(outs, 5, alias, ins, 3))) return st;
  }

  scratch_t s;
  if ((st = scratch_alloc(&s, ng, np))) return st;
  if (weight) bn_gather_f64(weight, s.weight);
  if (bias) bn_gather_f64(bias, s.bias);
  if (plan.params_in_groups) bn_plan_group_params(&plan, s.param_of_group);
  bn_coef_t coef = {.mean = s.mean, .rstd = s.rstd, .var = s.s1, .weight = weight ? s.weight : NULL,
                    .bias = bias ? s.bias : NULL, .param_of_group = plan.params_in_groups ? s.param_of_group : NULL,
                    .eps = desc->eps, .rms = (flags & BN_FLAG_RMS) != 0};
  if (use_running) {
    bn_gather_f64(running_mean, s.run_mean);
    bn_gather_f64(running_var, s.run_var);
    for (int64_t g = 0; g < ng; g++) {
      const int64_t p = s.param_of_group[g];
      s.mean[g] = s.run_mean[p];
      s.rstd[g] = 1.0 / sqrt(s.run_var[p] + desc->eps);
    }
  }
  if ((st = bn_cpu_forward(&plan, &coef, !use_running))) goto done;
  if (save_mean) bn_scatter_f64(save_mean, s.mean);
  if (save_rstd) bn_scatter_f64(save_rstd, s.rstd);

  if (skipped) *skipped = 0;
  if (update_running && plan.group_size > 0) {
    /* all-or-nothing: the new values are computed in full, then written. The batch value
     * of a parameter index is the average over its groups (one group each in batch norm). */
    const double n = (double)plan.group_size;
    const double unbias = (flags & BN_FLAG_RUNNING_VAR_BIASED) ? 1.0 : n / (n - 1.0);
    for (int64_t p = 0; p < np; p++) s.pa[p] = s.pb[p] = s.pc[p] = 0.0;
    sum_groups_into_params(&s, ng, s.mean, s.pa);
    sum_groups_into_params(&s, ng, s.s1, s.pb);
    for (int64_t g = 0; g < ng; g++) s.pc[s.param_of_group[g]] += 1.0;
    for (int64_t p = 0; p < np; p++) s.pa[p] /= s.pc[p], s.pb[p] /= s.pc[p];
    if ((flags & BN_FLAG_SKIP_NONFINITE) && !(bn_all_finite(s.pa, np) && bn_all_finite(s.pb, np))) {
      if (skipped) *skipped = 1;
    } else {
      bn_gather_f64(running_mean, s.run_mean);
      bn_gather_f64(running_var, s.run_var);
      bn_fold_running(s.run_mean, s.run_var, s.pa, s.pb, np, desc->momentum, unbias);
      bn_scatter_f64(running_mean, s.run_mean);
      bn_scatter_f64(running_var, s.run_var);
    }
  }
done:
  free(s.block);
  return st;
}

bn_status_t bn_norm_backward(const bn_norm_desc_t *desc_in, const DLTensor *x, const DLTensor *dy,
                             const DLTensor *weight, const DLTensor *save_mean, const DLTensor *save_rstd,
                             DLTensor *dx, DLTensor *dweight, DLTensor *dbias) {
  bn_clear_error();
  bn_dtype_t dt, dt2;
  bn_status_t st;
  if ((st = bn_check_tensor(x, "x", &dt))) return st;
  if (!desc_in) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc: expected a problem description, got NULL");
  /* the running-statistics update and its momentum belong to the forward: ignored here */
  bn_norm_desc_t backward_desc = *desc_in;
  const bn_norm_desc_t *desc = &backward_desc;
  backward_desc.flags &= ~(BN_FLAG_UPDATE_RUNNING_STATS | BN_FLAG_RUNNING_VAR_BIASED | BN_FLAG_SKIP_NONFINITE);
  backward_desc.momentum = 0.0;
  if ((st = check_desc(desc, x))) return st;
  if ((st = bn_check_tensor(dy, "grad_output", &dt2))) return st;
  if ((st = bn_check_same_shape(dy, "grad_output", x, "x"))) return st;
  if (dt2 != dt)
    return bn_fail(BN_STATUS_UNSUPPORTED_DTYPE, "grad_output: expected x's dtype %s, got %s", bn_dtype_name(dt),
                   bn_dtype_name(dt2));
  if (dx) {
    if ((st = bn_check_tensor(dx, "grad_input", &dt2))) return st;
    if ((st = bn_check_same_shape(dx, "grad_input", x, "x"))) return st;
    if (dt2 != dt)
      return bn_fail(BN_STATUS_UNSUPPORTED_DTYPE, "grad_input: expected x's dtype %s, got %s", bn_dtype_name(dt),
                     bn_dtype_name(dt2));
  }
  bn_plan_t plan;
  if ((st = bn_plan_build(desc, x, dy, dx, dt, &plan))) return st;
  const int64_t ng = plan.ngroups, np = plan.nparams;
  const int rms = (desc->flags & BN_FLAG_RMS) != 0;
  const int training = !(desc->flags & BN_FLAG_USE_RUNNING_STATS);
  const char *per_param = "parameter index (the product of the parameter axes' sizes)";
  if ((st = check_small(weight, "weight", np, per_param)) || (st = check_small(dweight, "grad_weight", np, per_param)) ||
      (st = check_small(dbias, "grad_bias", np, per_param)))
    return st;
  if (!save_rstd || (!save_mean && !rms))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: required for the backward pass, got NULL",
                   save_rstd ? "save_mean" : "save_rstd");
  if ((st = check_small(save_mean, "save_mean", ng, "statistic group")) ||
      (st = check_small(save_rstd, "save_rstd", ng, "statistic group")))
    return st;
  {
    /* grad_input may be grad_output itself; no other sharing */
    const bn_arg_t ins[] = {{x, "x"}, {dy, "grad_output"}, {weight, "weight"}, {save_mean, "save_mean"},
                            {save_rstd, "save_rstd"}};
    const bn_arg_t outs[] = {{dx, "grad_input"}, {dweight, "grad_weight"}, {dbias, "grad_bias"}};
    const int alias[] = {1, -1, -1};
    if ((st = bn_check_no_overlap(outs, 3, alias, ins, 5))) return st;
  }

  scratch_t s;
  if ((st = scratch_alloc(&s, ng, np))) return st;
  if (weight) bn_gather_f64(weight, s.weight);
  if (save_mean && !rms) bn_gather_f64(save_mean, s.mean);
  bn_gather_f64(save_rstd, s.rstd);
  if (plan.params_in_groups) bn_plan_group_params(&plan, s.param_of_group);
  bn_coef_t coef = {.mean = s.mean, .rstd = s.rstd, .weight = weight ? s.weight : NULL,
                    .param_of_group = plan.params_in_groups ? s.param_of_group : NULL, .sum_dy = s.s1,
                    .sum_dyx = s.s2, .inv_n = plan.group_size > 0 ? 1.0 / (double)plan.group_size : 0.0,
                    .rms = rms};
  if ((st = bn_cpu_backward(&plan, &coef, training, dweight ? s.pa : NULL, dbias ? s.pb : NULL))) goto done;
  if (dweight) bn_scatter_f64(dweight, s.pa);
  if (dbias) bn_scatter_f64(dbias, s.pb);
done:
  free(s.block);
  return st;
}

bn_status_t bn_norm_moments(const bn_norm_desc_t *desc_in, const DLTensor *x, DLTensor *mean, DLTensor *m2,
                            int64_t *count) {
  bn_clear_error();
  bn_dtype_t dt;
  bn_status_t st;
  if ((st = bn_check_tensor(x, "x", &dt))) return st;
  if (!desc_in) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc: expected a problem description, got NULL");
  bn_norm_desc_t desc = *desc_in; /* only the axes matter here */
  desc.flags = 0, desc.eps = 0.0, desc.momentum = 0.0;
  if ((st = check_desc(&desc, x))) return st;
  if (!mean || !m2) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "%s: required, got NULL", mean ? "m2" : "mean");
  bn_plan_t plan;
  if ((st = bn_plan_build(&desc, x, NULL, NULL, dt, &plan))) return st;
  if ((st = check_small(mean, "mean", plan.ngroups, "statistic group")) ||
      (st = check_small(m2, "m2", plan.ngroups, "statistic group")))
    return st;
  const bn_arg_t ins[] = {{x, "x"}};
  const bn_arg_t outs[] = {{mean, "mean"}, {m2, "m2"}};
  const int alias[] = {-1, -1};
  if ((st = bn_check_no_overlap(outs, 2, alias, ins, 1))) return st;
  scratch_t s;
  if ((st = scratch_alloc(&s, plan.ngroups, plan.nparams))) return st;
  bn_coef_t coef = {.mean = s.mean, .var = s.s1};
  if (!(st = bn_cpu_moments(&plan, &coef))) {
    bn_scatter_f64(mean, s.mean);
    bn_scatter_f64(m2, s.s1);
    if (count) *count = plan.group_size;
  }
  free(s.block);
  return st;
}
