/* Running statistics: the one fold rule, and the opaque state. A leaf: it calls nothing above it. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if defined(_WIN32)
#include <windows.h>
typedef SRWLOCK bn_lock_t;
#define BN_LOCK_INIT(l) InitializeSRWLock(l)
#define BN_LOCK(l) AcquireSRWLockExclusive(l)
#define BN_UNLOCK(l) ReleaseSRWLockExclusive(l)
#define BN_LOCK_FREE(l) ((void)(l))
#else
#include <pthread.h>
typedef pthread_mutex_t bn_lock_t;
#define BN_LOCK_INIT(l) pthread_mutex_init((l), NULL)
#define BN_LOCK(l) pthread_mutex_lock(l)
#define BN_UNLOCK(l) pthread_mutex_unlock(l)
#define BN_LOCK_FREE(l) pthread_mutex_destroy(l)
#endif

/* Every call on a state takes its lock for the whole call: updates of one state are serialized
 * (readers never see half an update), independent states run in parallel. */
struct bn_running_stats_t {
  bn_lock_t lock;
  int64_t num_features;
  int64_t shape[1];
  DLDataType dtype;
  double factor;
  uint32_t flags;
  int64_t updates, skipped;
  void *mean, *var; /* num_features values of dtype each */
};

static int all_finite(const double *v, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (!isfinite(v[i])) return 0;
  return 1;
}

int bn_fold(const bn_fold_rule_t *rule, int64_t n, int64_t np, const double *batch_mean, const double *batch_var,
            double *run_mean, double *run_var) {
  if (rule->skip_nonfinite && !(all_finite(batch_mean, np) && all_finite(batch_var, np))) return 1;
  const double f = rule->factor, unbias = rule->biased ? 1.0 : (double)n / (double)(n - 1);
  for (int64_t p = 0; p < np; p++) {
    run_mean[p] = (1.0 - f) * run_mean[p] + f * batch_mean[p];
    run_var[p] = (1.0 - f) * run_var[p] + f * (batch_var[p] * unbias);
  }
  return 0;
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
  BN_LOCK_INIT(&s->lock);
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
  if (!s) return BN_STATUS_SUCCESS;
  if (s->mean && s->var) BN_LOCK_FREE(&s->lock); /* initialized once both arrays were allocated */
  free(s->mean), free(s->var), free(s);
  return BN_STATUS_SUCCESS;
}

void bn_running_stats_lock(const bn_running_stats_t *s) { BN_LOCK(&((bn_running_stats_t *)s)->lock); }
void bn_running_stats_unlock(const bn_running_stats_t *s) { BN_UNLOCK(&((bn_running_stats_t *)s)->lock); }

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
  bn_running_stats_lock(s);
  if (updates) *updates = s->updates;
  if (skipped) *skipped = s->skipped;
  bn_running_stats_unlock(s);
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_running_stats_set_counts(bn_running_stats_t *s, int64_t updates, int64_t skipped) {
  bn_clear_error();
  bn_status_t st = check_stats(s);
  if (st) return st;
  if (updates < 0 || skipped < 0)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "counts: expected values >= 0, got %lld and %lld",
                   (long long)updates, (long long)skipped);
  bn_running_stats_lock(s);
  s->updates = updates, s->skipped = skipped;
  bn_running_stats_unlock(s);
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_running_stats_set_factor(bn_running_stats_t *s, double factor) {
  bn_clear_error();
  bn_status_t st = check_stats(s);
  if (st) return st;
  if (!(factor >= 0.0 && factor <= 1.0))
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "factor: expected a value in [0, 1], got %g", factor);
  bn_running_stats_lock(s);
  s->factor = factor;
  bn_running_stats_unlock(s);
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
  if ((st = bn_check_tensor(batch_mean, "batch_mean", &dt)) || (st = bn_check_host(batch_mean, "batch_mean")) ||
      (st = bn_check_tensor(batch_var, "batch_var", &dt)) || (st = bn_check_host(batch_var, "batch_var")))
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
  DLTensor tm, tv;
  bn_fold_rule_t rule;
  bn_running_stats_lock(s);
  bn_running_stats_bind(s, &tm, &tv, &rule);
  bn_gather_f64(&tm, rm);
  bn_gather_f64(&tv, rv);
  const int skipped = bn_fold(&rule, n, nf, bm, bv, rm, rv);
  if (!skipped) {
    bn_scatter_f64(&tm, rm);
    bn_scatter_f64(&tv, rv);
  }
  bn_running_stats_count(s, skipped);
  bn_running_stats_unlock(s);
  free(buf);
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_running_stats_load(bn_running_stats_t *s, const DLTensor *mean, const DLTensor *var, int64_t updates,
                                  int64_t skipped) {
  bn_clear_error();
  bn_status_t st = check_stats(s);
  bn_dtype_t dt;
  if (st) return st;
  if ((st = bn_check_tensor(mean, "mean", &dt)) || (st = bn_check_host(mean, "mean")) ||
      (st = bn_check_tensor(var, "var", &dt)) || (st = bn_check_host(var, "var")))
    return st;
  const int64_t nf = s->num_features;
  if ((st = bn_check_numel(mean, "mean", nf, "feature")) || (st = bn_check_numel(var, "var", nf, "feature")))
    return st;
  if (updates < 0 || skipped < 0)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "updates, skipped: expected counts >= 0, got %lld and %lld",
                   (long long)updates, (long long)skipped);
  double *buf = malloc(2 * (size_t)nf * sizeof *buf);
  if (!buf) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "running statistics load");
  bn_gather_f64(mean, buf); /* read in full first: the sources may even be the state's own arrays */
  bn_gather_f64(var, buf + nf);
  bn_running_stats_lock(s);
  DLTensor tm = view(s, s->mean), tv = view(s, s->var);
  bn_scatter_f64(&tm, buf);
  bn_scatter_f64(&tv, buf + nf);
  s->updates = updates, s->skipped = skipped;
  bn_running_stats_unlock(s);
  free(buf);
  return BN_STATUS_SUCCESS;
}

void bn_running_stats_bind(bn_running_stats_t *s, DLTensor *mean, DLTensor *var, bn_fold_rule_t *rule) {
  *mean = view(s, s->mean);
  *var = view(s, s->var);
  rule->factor = next_factor(s);
  rule->biased = (s->flags & BN_STATS_BIASED_VAR) != 0;
  rule->skip_nonfinite = (s->flags & BN_STATS_SKIP_NONFINITE) != 0;
}

int64_t bn_running_stats_features(const bn_running_stats_t *s) { return s->num_features; }

void bn_running_stats_count(bn_running_stats_t *s, int skipped) {
  if (skipped) s->skipped++;
  else s->updates++;
}
