/* Running statistics: the fold rule, the opaque state and its forward. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct bn_running_stats_t {
  int64_t num_features;
  int64_t shape[1];
  DLDataType dtype;
  double factor;
  uint32_t flags;
  int64_t updates, skipped;
  void *mean, *var; /* num_features values of dtype each */
};

int bn_all_finite(const double *v, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (!isfinite(v[i])) return 0;
  return 1;
}

void bn_fold_running(double *run_mean, double *run_var, const double *batch_mean, const double *batch_var,
                     int64_t n, double factor, double unbias) {
  for (int64_t p = 0; p < n; p++) {
    run_mean[p] = (1.0 - factor) * run_mean[p] + factor * batch_mean[p];
    run_var[p] = (1.0 - factor) * run_var[p] + factor * (batch_var[p] * unbias);
  }
}

static bn_status_t check_stats(const bn_running_stats_t *s) {
  if (!s) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "stats: expected a running-statistics state, got NULL");
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_running_stats_create(int64_t num_features, DLDataType dtype, double factor, uint32_t flags,
                                    bn_running_stats_t **out) {
  bn_clear_error();
  if (!out) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "out: expected a place for the new state, got NULL");
  *out = NULL;
  if (num_features < 1 || num_features > BN_MAX_NUMEL)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "num_features: expected a positive count, got %lld",
                   (long long)num_features);
  if (flags & ~BN_STATS_ALL) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "flags: unknown bits 0x%x", flags & ~BN_STATS_ALL);
  if (!(factor >= 0.0 && factor <= 1.0))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "factor: expected a value in [0, 1], got %g", factor);
  if (dtype.code != kDLFloat || (dtype.bits != 32 && dtype.bits != 64) || dtype.lanes != 1)
    return bn_fail(BN_STATUS_UNSUPPORTED_DTYPE, "dtype: expected float32 or float64 for running statistics");
  bn_running_stats_t *s = calloc(1, sizeof *s);
  const size_t bytes = (size_t)num_features * (dtype.bits / 8);
  if (s) s->mean = malloc(bytes), s->var = malloc(bytes);
  if (!s || !s->mean || !s->var) {
    bn_running_stats_destroy(s);
    return bn_fail(BN_STATUS_OUT_OF_MEMORY, "running statistics of %lld features", (long long)num_features);
  }
  s->num_features = s->shape[0] = num_features;
  s->dtype = dtype;
  s->factor = factor;
  s->flags = flags;
  for (int64_t i = 0; i < num_features; i++) {
    if (dtype.bits == 32) ((float *)s->mean)[i] = 0.0f, ((float *)s->var)[i] = 1.0f;
    else ((double *)s->mean)[i] = 0.0, ((double *)s->var)[i] = 1.0;
  }
  *out = s;
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_running_stats_destroy(bn_running_stats_t *s) {
  bn_clear_error();
  if (s) free(s->mean), free(s->var), free(s);
  return BN_STATUS_SUCCESS;
}

static DLTensor view(bn_running_stats_t *s, void *data) {
  DLTensor t = {.data = data, .device = {kDLCPU, 0}, .ndim = 1, .dtype = s->dtype, .shape = s->shape,
                .strides = NULL, .byte_offset = 0};
  return t;
}

bn_status_t bn_running_stats_tensors(bn_running_stats_t *s, DLTensor *mean, DLTensor *var) {
  bn_clear_error();
  bn_status_t st = check_stats(s);
  if (st) return st;
  if (!mean || !var) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "mean, var: expected tensors to fill, got NULL");
  *mean = view(s, s->mean);
  *var = view(s, s->var);
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_running_stats_counts(const bn_running_stats_t *s, int64_t *updates, int64_t *skipped) {
  bn_clear_error();
  bn_status_t st = check_stats(s);
  if (st) return st;
  if (updates) *updates = s->updates;
  if (skipped) *skipped = s->skipped;
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_running_stats_set_counts(bn_running_stats_t *s, int64_t updates, int64_t skipped) {
  bn_clear_error();
  bn_status_t st = check_stats(s);
  if (st) return st;
  if (updates < 0 || skipped < 0)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "counts: expected values >= 0, got %lld and %lld",
                   (long long)updates, (long long)skipped);
  s->updates = updates, s->skipped = skipped;
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_running_stats_set_factor(bn_running_stats_t *s, double factor) {
  bn_clear_error();
  bn_status_t st = check_stats(s);
  if (st) return st;
  if (!(factor >= 0.0 && factor <= 1.0))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "factor: expected a value in [0, 1], got %g", factor);
  s->factor = factor;
  return BN_STATUS_SUCCESS;
}

/* The factor of the next update, by the state's rule. */
static double next_factor(const bn_running_stats_t *s) {
  return (s->flags & BN_STATS_CUMULATIVE) ? 1.0 / (double)(s->updates + 1) : s->factor;
}

bn_status_t bn_running_stats_update(bn_running_stats_t *s, const DLTensor *batch_mean, const DLTensor *batch_var,
                                    int64_t n) {
  bn_clear_error();
  bn_status_t st = check_stats(s);
  bn_dtype_t dt;
  if (st) return st;
  if ((st = bn_check_tensor(batch_mean, "batch_mean", &dt)) || (st = bn_check_tensor(batch_var, "batch_var", &dt)))
    return st;
  const int64_t nf = s->num_features;
  if ((st = bn_check_numel(batch_mean, "batch_mean", nf, "feature")) ||
      (st = bn_check_numel(batch_var, "batch_var", nf, "feature")))
    return st;
  const int biased = (s->flags & BN_STATS_BIASED_VAR) != 0;
  if (n < (biased ? 1 : 2))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "n: expected more than %d value%s behind the batch statistics, got %lld",
                   biased ? 0 : 1, biased ? "" : "s (the unbiased variance divides by n - 1)", (long long)n);
  double *buf = malloc(4 * (size_t)nf * sizeof *buf);
  if (!buf) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "running statistics update");
  double *bm = buf, *bv = buf + nf, *rm = buf + 2 * nf, *rv = buf + 3 * nf;
  bn_gather_f64(batch_mean, bm);
  bn_gather_f64(batch_var, bv);
  if ((s->flags & BN_STATS_SKIP_NONFINITE) && !(bn_all_finite(bm, nf) && bn_all_finite(bv, nf))) {
    s->skipped++;
    free(buf);
    return BN_STATUS_SUCCESS;
  }
  DLTensor tm = view(s, s->mean), tv = view(s, s->var);
  bn_gather_f64(&tm, rm);
  bn_gather_f64(&tv, rv);
  bn_fold_running(rm, rv, bm, bv, nf, next_factor(s), biased ? 1.0 : (double)n / (double)(n - 1));
  bn_scatter_f64(&tm, rm);
  bn_scatter_f64(&tv, rv);
  s->updates++;
  free(buf);
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_norm_forward_stats(const bn_norm_desc_t *desc, const DLTensor *x, const DLTensor *weight,
                                  const DLTensor *bias, bn_running_stats_t *s, DLTensor *y, DLTensor *save_mean,
                                  DLTensor *save_rstd) {
  bn_clear_error();
  bn_status_t st = check_stats(s);
  if (st) return st;
  if (!desc) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc: expected a problem description, got NULL");
  bn_norm_desc_t d = *desc;
  const int update = (d.flags & BN_FLAG_UPDATE_RUNNING_STATS) != 0;
  d.flags &= ~(BN_FLAG_RUNNING_VAR_BIASED | BN_FLAG_SKIP_NONFINITE);
  if (s->flags & BN_STATS_BIASED_VAR) d.flags |= BN_FLAG_RUNNING_VAR_BIASED;
  if (s->flags & BN_STATS_SKIP_NONFINITE) d.flags |= BN_FLAG_SKIP_NONFINITE;
  d.momentum = update ? next_factor(s) : 0.0;
  DLTensor tm = view(s, s->mean), tv = view(s, s->var);
  int skipped = 0;
  if ((st = bn_forward_impl(&d, x, weight, bias, &tm, &tv, y, save_mean, save_rstd, &skipped))) return st;
  if (update) {
    if (skipped) s->skipped++;
    else s->updates++;
  }
  return BN_STATUS_SUCCESS;
}
