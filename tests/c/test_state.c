/*
 * The running-statistics state (bn_running_stats_*), bn_norm_forward_stats and
 * bn_norm_moments: creation and its refusals, zero-copy views, the update rule of
 * each flag against a plain double-precision model, the non-finite policy, the
 * counters, all-or-nothing failures (memcmp of the state before and after), and the
 * moments against a two-pass reference.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bncore/bncore.h"
#include "harness.h"
#include "tensors.h"

enum { NF = 3 };

static const DLDataType TT_F16 = {kDLFloat, 16, 1};

static int check_ok(bn_status_t st, const char *call) {
  if (!CHECK(st == BN_STATUS_SUCCESS))
    fprintf(stderr, "  %s: %s: %s\n", call, bn_status_string(st), bn_last_error());
  return st == BN_STATUS_SUCCESS;
}

static void check_fails(bn_status_t st, bn_status_t want, const char *names, int line) {
  if (!CHECK(st == want))
    fprintf(stderr, "  line %d: got %s (%s), want %s\n", line, bn_status_string(st), bn_last_error(),
            bn_status_string(want));
  if (!CHECK(strstr(bn_last_error(), names) != NULL))
    fprintf(stderr, "  line %d: message \"%s\" does not name \"%s\"\n", line, bn_last_error(), names);
}
#define EXPECT_FAIL(call, want, names) check_fails((call), (want), (names), __LINE__)

/* ------------------------------------------------------------------ the state as bytes */

/* Everything observable of a state: its mean and var bytes, counters. */
typedef struct snap_t {
  unsigned char mean[NF * 8], var[NF * 8];
  int64_t updates, skipped;
} snap_t;

static void snap(bn_running_stats_t *s, snap_t *out) {
  DLTensor m, v;
  memset(out, 0, sizeof *out);
  bn_running_stats_tensors(s, &m, &v);
  const size_t bytes = (size_t)m.shape[0] * (m.dtype.bits / 8);
  memcpy(out->mean, m.data, bytes);
  memcpy(out->var, v.data, bytes);
  bn_running_stats_counts(s, &out->updates, &out->skipped);
}

static int snap_equal(const snap_t *a, const snap_t *b) { return memcmp(a, b, sizeof *a) == 0; }

static double get_i(const DLTensor *t, int64_t i) { return tt_get(t, &i); }

/* (double)(float)v through memory: GCC 12 at -O2/-O3 folds the round trip away in some
 * vectorized loops, which would leave the model with unrounded values. */
static double round_to_float(double v) {
  volatile float f = (float)v;
  return (double)f;
}

static void set_state(bn_running_stats_t *s, const double *mean, const double *var) {
  DLTensor m, v;
  bn_running_stats_tensors(s, &m, &v);
  for (int64_t i = 0; i < m.shape[0]; i++) tt_set(&m, &i, mean[i]), tt_set(&v, &i, var[i]);
}

/* ------------------------------------------------------------------ the model of an update */

/* One update of the model state (double) by the state's rule; k is the update number (1, 2, ...).
 * `round32`: the state is float32, so the model is rounded like it after each update. */
static void model_update(double *rm, double *rv, const double *bm, const double *bv, int64_t n, double factor,
                         uint32_t flags, int64_t k, int round32) {
  const double f = (flags & BN_STATS_CUMULATIVE) ? 1.0 / (double)k : factor;
  const double unbias = (flags & BN_STATS_BIASED_VAR) ? 1.0 : (double)n / (double)(n - 1);
  for (int i = 0; i < NF; i++) {
    rm[i] = (1.0 - f) * rm[i] + f * bm[i];
    rv[i] = (1.0 - f) * rv[i] + f * bv[i] * unbias;
    if (round32) rm[i] = (float)rm[i], rv[i] = (float)rv[i];
  }
}

static void check_state(bn_running_stats_t *s, const double *rm, const double *rv, double rtol, int line) {
  DLTensor m, v;
  bn_running_stats_tensors(s, &m, &v);
  for (int64_t i = 0; i < NF; i++) {
    const double gm = get_i(&m, i), gv = get_i(&v, i);
    if (!CHECK(fabs(gm - rm[i]) <= rtol * (1.0 + fabs(rm[i])) && fabs(gv - rv[i]) <= rtol * (1.0 + fabs(rv[i]))))
      fprintf(stderr, "  line %d: [%lld] mean %.17g (want %.17g), var %.17g (want %.17g)\n", line, (long long)i, gm,
              rm[i], gv, rv[i]);
  }
}
#define CHECK_STATE(s, rm, rv, rtol) check_state((s), (rm), (rv), (rtol), __LINE__)

/* ------------------------------------------------------------------ a small NCHW batch */

enum { BN = 4, BC = NF, BH = 2, BW = 5, BNUMEL = BN * BC * BH * BW };

/* Per-channel mean and biased variance of an NCHW double array, two-pass. */
static void ref_channel_stats(const double *x, int64_t n, int64_t c, int64_t hw, double *mean, double *var) {
  for (int64_t k = 0; k < c; k++) {
    double s = 0.0, q = 0.0;
    for (int64_t i = 0; i < n; i++)
      for (int64_t j = 0; j < hw; j++) s += x[(i * c + k) * hw + j];
    mean[k] = s / (double)(n * hw);
    for (int64_t i = 0; i < n; i++)
      for (int64_t j = 0; j < hw; j++) {
        const double d = x[(i * c + k) * hw + j] - mean[k];
        q += d * d;
      }
    var[k] = q / (double)(n * hw);
  }
}

static void fill_batch(double *x, uint64_t seed) {
  for (int i = 0; i < BNUMEL; i++) {
    const int c = (i / (BH * BW)) % BC;
    x[i] = (double)c - 0.5 + (1.0 + 0.5 * c) * tt_rand(&seed);
  }
}

SUITE(state) {
  const DLDataType dts[2] = {TT_F32, TT_F64};

  TEST(create_and_destroy) {
    const uint32_t all_flags[] = {0, BN_STATS_BIASED_VAR, BN_STATS_CUMULATIVE, BN_STATS_SKIP_NONFINITE, BN_STATS_ALL};
    for (int d = 0; d < 2; d++)
      for (int f = 0; f < 5; f++) {
        bn_running_stats_t *s = NULL;
        if (check_ok(bn_running_stats_create(7, dts[d], 0.1, all_flags[f], &s), "create")) {
          CHECK(s != NULL);
          int64_t u = -1, k = -1;
          CHECK(bn_running_stats_counts(s, &u, &k) == BN_STATUS_SUCCESS && u == 0 && k == 0);
          CHECK(strcmp(bn_last_error(), "") == 0);
        }
        CHECK(bn_running_stats_destroy(s) == BN_STATUS_SUCCESS);
      }
    CHECK(bn_running_stats_destroy(NULL) == BN_STATUS_SUCCESS);
    CHECK(strcmp(bn_last_error(), "") == 0);
    bn_running_stats_t *s = NULL;
    CHECK(check_ok(bn_running_stats_create(1, TT_F32, 0.0, 0, &s), "create with factor 0"));
    bn_running_stats_destroy(s);
    CHECK(check_ok(bn_running_stats_create(1, TT_F32, 1.0, 0, &s), "create with factor 1"));
    bn_running_stats_destroy(s);
  }

  TEST(create_refusals) {
    bn_running_stats_t *s = (bn_running_stats_t *)&s; /* not NULL: a failure must reset it */
    EXPECT_FAIL(bn_running_stats_create(0, TT_F32, 0.1, 0, &s), BN_STATUS_INVALID_ARGUMENT, "num_features");
    CHECK(s == NULL);
    EXPECT_FAIL(bn_running_stats_create(-5, TT_F32, 0.1, 0, &s), BN_STATUS_INVALID_ARGUMENT, "num_features");
    EXPECT_FAIL(bn_running_stats_create(3, TT_F32, 0.1, 1u << 3, &s), BN_STATUS_INVALID_ARGUMENT, "flags");
    EXPECT_FAIL(bn_running_stats_create(3, TT_F32, 0.1, 0x80000000u, &s), BN_STATUS_INVALID_ARGUMENT, "flags");
    EXPECT_FAIL(bn_running_stats_create(3, TT_F32, -0.1, 0, &s), BN_STATUS_INVALID_ARGUMENT, "factor");
    EXPECT_FAIL(bn_running_stats_create(3, TT_F32, 1.5, 0, &s), BN_STATUS_INVALID_ARGUMENT, "factor");
    EXPECT_FAIL(bn_running_stats_create(3, TT_F32, NAN, 0, &s), BN_STATUS_INVALID_ARGUMENT, "factor");
    EXPECT_FAIL(bn_running_stats_create(3, TT_I32, 0.1, 0, &s), BN_STATUS_UNSUPPORTED_DTYPE, "dtype");
    EXPECT_FAIL(bn_running_stats_create(3, TT_F16, 0.1, 0, &s), BN_STATUS_UNSUPPORTED_DTYPE, "dtype");
    const DLDataType lanes = {kDLFloat, 32, 2};
    EXPECT_FAIL(bn_running_stats_create(3, lanes, 0.1, 0, &s), BN_STATUS_UNSUPPORTED_DTYPE, "dtype");
    CHECK(s == NULL);
    EXPECT_FAIL(bn_running_stats_create(3, TT_F32, 0.1, 0, NULL), BN_STATUS_INVALID_ARGUMENT, "out");
  }

  TEST(views_point_into_the_state) {
    for (int d = 0; d < 2; d++) {
      bn_running_stats_t *s = NULL;
      if (!check_ok(bn_running_stats_create(NF, dts[d], 0.5, 0, &s), "create")) continue;
      DLTensor m, v, m2, v2;
      CHECK(check_ok(bn_running_stats_tensors(s, &m, &v), "tensors"));
      CHECK(m.ndim == 1 && m.shape[0] == NF && v.ndim == 1 && v.shape[0] == NF);
      CHECK(m.dtype.code == kDLFloat && m.dtype.bits == dts[d].bits && m.dtype.lanes == 1);
      CHECK(v.dtype.bits == dts[d].bits);
      CHECK(m.device.device_type == kDLCPU && v.device.device_type == kDLCPU);
      CHECK(m.strides == NULL && m.byte_offset == 0 && m.data != v.data);
      for (int64_t i = 0; i < NF; i++) CHECK(get_i(&m, i) == 0.0 && get_i(&v, i) == 1.0);
      /* the same memory each time; updates are seen through earlier views */
      CHECK(check_ok(bn_running_stats_tensors(s, &m2, &v2), "tensors again"));
      CHECK(m2.data == m.data && v2.data == v.data);
      double bm[NF] = {4, 4, 4}, bv[NF] = {3, 3, 3};
      tt_t tbm, tbv;
      CHECK(check_ok(bn_running_stats_update(s, tt_vec(&tbm, bm, TT_F64, NF), tt_vec(&tbv, bv, TT_F64, NF), 4),
                     "update"));
      for (int64_t i = 0; i < NF; i++) CHECK(get_i(&m, i) == 2.0 && get_i(&v, i) == 0.5 + 0.5 * 4.0);
      /* writes through a view change the state: the next update starts from them */
      int64_t one = 1;
      tt_set(&m, &one, 10.0);
      CHECK(check_ok(bn_running_stats_update(s, &tbm.t, &tbv.t, 4), "update"));
      CHECK(get_i(&m2, 1) == 7.0 && get_i(&m2, 0) == 3.0);
      EXPECT_FAIL(bn_running_stats_tensors(s, NULL, &v), BN_STATUS_INVALID_ARGUMENT, "mean");
      EXPECT_FAIL(bn_running_stats_tensors(s, &m, NULL), BN_STATUS_INVALID_ARGUMENT, "var");
      EXPECT_FAIL(bn_running_stats_tensors(NULL, &m, &v), BN_STATUS_INVALID_ARGUMENT, "stats");
      bn_running_stats_destroy(s);
    }
  }

  TEST(update_rules) {
    /* every flag combination except skip, both state dtypes, float32 and float64 batch values */
    const uint32_t rules[] = {0, BN_STATS_BIASED_VAR, BN_STATS_CUMULATIVE, BN_STATS_CUMULATIVE | BN_STATS_BIASED_VAR};
    const double factors[] = {0.1, 0.37, 0.0, 1.0};
    const int64_t ns[] = {5, 2, 17, 100, 3, 2};
    for (int d = 0; d < 2; d++)
      for (int r = 0; r < 4; r++)
        for (int fi = 0; fi < 4; fi++) {
          bn_running_stats_t *s = NULL;
          if (!check_ok(bn_running_stats_create(NF, dts[d], factors[fi], rules[r], &s), "create")) continue;
          double rm[NF] = {0, 0, 0}, rv[NF] = {1, 1, 1};
          uint64_t seed = 11 + (uint64_t)(d * 100 + r * 10 + fi);
          for (int step = 0; step < 6; step++) {
            /* odd steps pass float32 batch values, even steps float64 ones; the model sees
             * exactly the values passed (float32 values are drawn as floats) */
            double bm[NF], bv[NF];
            float bm32[NF], bv32[NF];
            for (int i = 0; i < NF; i++) {
              bm[i] = 3.0 * tt_rand(&seed) + step;
              bv[i] = 2.0 + tt_rand(&seed);
              if (step % 2) {
                bm32[i] = (float)bm[i];
                bv32[i] = (float)bv[i];
                bm[i] = round_to_float(bm[i]);
                bv[i] = round_to_float(bv[i]);
              }
            }
            tt_t tbm, tbv;
            DLTensor *pm = step % 2 ? tt_vec(&tbm, bm32, TT_F32, NF) : tt_vec(&tbm, bm, TT_F64, NF);
            DLTensor *pv = step % 2 ? tt_vec(&tbv, bv32, TT_F32, NF) : tt_vec(&tbv, bv, TT_F64, NF);
            if (!check_ok(bn_running_stats_update(s, pm, pv, ns[step]), "update")) break;
            model_update(rm, rv, bm, bv, ns[step], factors[fi], rules[r], step + 1, dts[d].bits == 32);
            CHECK_STATE(s, rm, rv, dts[d].bits == 32 ? 1e-6 : 1e-14);
            int64_t u, k;
            bn_running_stats_counts(s, &u, &k);
            CHECK(u == step + 1 && k == 0);
          }
          bn_running_stats_destroy(s);
        }
  }

  TEST(update_by_hand) {
    /* batch mean 3, biased var 3.5 of n = 4 values: unbiased 14/3 */
    double bm[1] = {3.0}, bv[1] = {3.5};
    tt_t tbm, tbv;
    DLTensor *pm = tt_vec(&tbm, bm, TT_F64, 1), *pv = tt_vec(&tbv, bv, TT_F64, 1);
    bn_running_stats_t *s = NULL;
    DLTensor m, v;
    bn_running_stats_create(1, TT_F64, 0.1, 0, &s);
    bn_running_stats_tensors(s, &m, &v);
    bn_running_stats_update(s, pm, pv, 4);
    CHECK_CLOSE(get_i(&m, 0), 0.1 * 3.0, 1e-16);
    CHECK_CLOSE(get_i(&v, 0), 0.9 + 0.1 * 14.0 / 3.0, 1e-15);
    bn_running_stats_destroy(s);
    /* keras: factor 1 - 0.99, biased variance */
    bn_running_stats_create(1, TT_F64, 1.0 - 0.99, BN_STATS_BIASED_VAR, &s);
    bn_running_stats_tensors(s, &m, &v);
    bn_running_stats_update(s, pm, pv, 4);
    CHECK_CLOSE(get_i(&m, 0), 0.01 * 3.0, 1e-16);
    CHECK_CLOSE(get_i(&v, 0), 0.99 + 0.01 * 3.5, 1e-15);
    CHECK(check_ok(bn_running_stats_update(s, pm, pv, 1), "biased update with n = 1"));
    bn_running_stats_destroy(s);
    /* cumulative: the plain average, whatever the factor */
    bn_running_stats_create(1, TT_F64, 0.9, BN_STATS_CUMULATIVE, &s);
    bn_running_stats_tensors(s, &m, &v);
    const double means[4] = {1, 2, 6, -3};
    for (int i = 0; i < 4; i++) {
      bm[0] = means[i], bv[0] = 1.0;
      bn_running_stats_update(s, pm, pv, 2);
    }
    CHECK_CLOSE(get_i(&m, 0), 1.5, 1e-15);
    CHECK_CLOSE(get_i(&v, 0), 2.0, 1e-15);
    bn_running_stats_destroy(s);
  }

  TEST(strided_batch_values) {
    /* batch_mean / batch_var with a stride: only their logical values count */
    double bm[2 * NF] = {1, 99, 2, 99, 3, 99}, bv[2 * NF] = {4, -1, 5, -1, 6, -1};
    int64_t n = NF, st = 2;
    tt_t tbm, tbv;
    bn_running_stats_t *s = NULL;
    bn_running_stats_create(NF, TT_F64, 1.0, BN_STATS_BIASED_VAR, &s);
    CHECK(check_ok(bn_running_stats_update(s, tt_init(&tbm, bm, TT_F64, 1, &n, &st),
                                           tt_init(&tbv, bv, TT_F64, 1, &n, &st), 3),
                   "strided update"));
    const double want_m[NF] = {1, 2, 3}, want_v[NF] = {4, 5, 6};
    CHECK_STATE(s, want_m, want_v, 0.0);
    bn_running_stats_destroy(s);
  }

  TEST(skip_nonfinite) {
    for (int d = 0; d < 2; d++) {
      bn_running_stats_t *s = NULL;
      bn_running_stats_create(NF, dts[d], 0.2, BN_STATS_SKIP_NONFINITE, &s);
      double bm[NF] = {1, 2, 3}, bv[NF] = {1, 1, 1};
      tt_t tbm, tbv;
      DLTensor *pm = tt_vec(&tbm, bm, TT_F64, NF), *pv = tt_vec(&tbv, bv, TT_F64, NF);
      CHECK(check_ok(bn_running_stats_update(s, pm, pv, 5), "finite update"));
      snap_t before, after;
      snap(s, &before);
      const double bad[] = {NAN, INFINITY, -INFINITY};
      for (int b = 0; b < 3; b++)
        for (int which = 0; which < 2; which++) {
          double *arr = which ? bv : bm;
          const double keep = arr[b % NF];
          arr[b % NF] = bad[b];
          CHECK(check_ok(bn_running_stats_update(s, pm, pv, 5), "non-finite update (skipped)"));
          arr[b % NF] = keep;
        }
      snap(s, &after);
      CHECK(memcmp(before.mean, after.mean, sizeof before.mean) == 0);
      CHECK(memcmp(before.var, after.var, sizeof before.var) == 0);
      CHECK(after.updates == 1 && after.skipped == 6);
      /* without the flag the same batch propagates */
      bn_running_stats_t *p = NULL;
      bn_running_stats_create(NF, dts[d], 0.2, 0, &p);
      bm[0] = NAN, bv[2] = INFINITY;
      CHECK(check_ok(bn_running_stats_update(p, pm, pv, 5), "non-finite update (propagated)"));
      DLTensor m, v;
      bn_running_stats_tensors(p, &m, &v);
      CHECK(isnan(get_i(&m, 0)) && isfinite(get_i(&m, 1)) && isinf(get_i(&v, 2)) && isfinite(get_i(&v, 0)));
      int64_t u, k;
      bn_running_stats_counts(p, &u, &k);
      CHECK(u == 1 && k == 0);
      bn_running_stats_destroy(p);
      bn_running_stats_destroy(s);
    }
  }

  TEST(skip_with_cumulative_counts_only_folded_batches) {
    bn_running_stats_t *s = NULL;
    bn_running_stats_create(1, TT_F64, 0.0, BN_STATS_CUMULATIVE | BN_STATS_SKIP_NONFINITE, &s);
    double bm[1], bv[1] = {1.0};
    tt_t tbm, tbv;
    DLTensor *pm = tt_vec(&tbm, bm, TT_F64, 1), *pv = tt_vec(&tbv, bv, TT_F64, 1);
    const double seq[5] = {2.0, NAN, 4.0, INFINITY, 9.0};
    for (int i = 0; i < 5; i++) bm[0] = seq[i], bn_running_stats_update(s, pm, pv, 2);
    DLTensor m, v;
    bn_running_stats_tensors(s, &m, &v);
    CHECK_CLOSE(get_i(&m, 0), 5.0, 1e-15); /* (2 + 4 + 9) / 3 */
    int64_t u, k;
    bn_running_stats_counts(s, &u, &k);
    CHECK(u == 3 && k == 2);
    bn_running_stats_destroy(s);
  }

  TEST(counters_and_factor) {
    bn_running_stats_t *s = NULL;
    bn_running_stats_create(NF, TT_F32, 0.1, 0, &s);
    int64_t u = -1, k = -1;
    CHECK(check_ok(bn_running_stats_set_counts(s, 12, 3), "set_counts"));
    CHECK(bn_running_stats_counts(s, &u, NULL) == BN_STATUS_SUCCESS && u == 12);
    CHECK(bn_running_stats_counts(s, NULL, &k) == BN_STATUS_SUCCESS && k == 3);
    CHECK(bn_running_stats_counts(s, NULL, NULL) == BN_STATUS_SUCCESS);
    EXPECT_FAIL(bn_running_stats_set_counts(s, -1, 0), BN_STATUS_INVALID_ARGUMENT, "counts");
    EXPECT_FAIL(bn_running_stats_set_counts(s, 0, -1), BN_STATUS_INVALID_ARGUMENT, "counts");
    bn_running_stats_counts(s, &u, &k);
    CHECK(u == 12 && k == 3);
    EXPECT_FAIL(bn_running_stats_counts(NULL, &u, &k), BN_STATUS_INVALID_ARGUMENT, "stats");
    EXPECT_FAIL(bn_running_stats_set_counts(NULL, 1, 1), BN_STATUS_INVALID_ARGUMENT, "stats");
    /* the factor: refused values leave the old one in use */
    EXPECT_FAIL(bn_running_stats_set_factor(s, 1.5), BN_STATUS_INVALID_ARGUMENT, "factor");
    EXPECT_FAIL(bn_running_stats_set_factor(s, -0.5), BN_STATUS_INVALID_ARGUMENT, "factor");
    EXPECT_FAIL(bn_running_stats_set_factor(s, NAN), BN_STATUS_INVALID_ARGUMENT, "factor");
    EXPECT_FAIL(bn_running_stats_set_factor(NULL, 0.5), BN_STATUS_INVALID_ARGUMENT, "stats");
    double bm[NF] = {1, 1, 1}, bv[NF] = {1, 1, 1};
    tt_t tbm, tbv;
    bn_running_stats_update(s, tt_vec(&tbm, bm, TT_F64, NF), tt_vec(&tbv, bv, TT_F64, NF), 2);
    double rm[NF] = {0.1, 0.1, 0.1}, rv[NF] = {0.9 + 0.2, 0.9 + 0.2, 0.9 + 0.2};
    CHECK_STATE(s, rm, rv, 1e-6);
    CHECK(check_ok(bn_running_stats_set_factor(s, 0.5), "set_factor"));
    bn_running_stats_update(s, &tbm.t, &tbv.t, 2);
    for (int i = 0; i < NF; i++) rm[i] = 0.5 * rm[i] + 0.5, rv[i] = 0.5 * rv[i] + 1.0;
    CHECK_STATE(s, rm, rv, 1e-6);
    bn_running_stats_counts(s, &u, &k);
    CHECK(u == 14 && k == 3);
    bn_running_stats_destroy(s);
  }

  TEST(failing_updates_change_nothing) {
    for (int d = 0; d < 2; d++)
      for (int biased = 0; biased < 2; biased++) {
        bn_running_stats_t *s = NULL;
        bn_running_stats_create(NF, dts[d], 0.3, biased ? BN_STATS_BIASED_VAR : 0, &s);
        double m0[NF] = {0.5, -1.0, 2.0}, v0[NF] = {1.5, 0.25, 3.0};
        set_state(s, m0, v0);
        bn_running_stats_set_counts(s, 5, 2);
        snap_t before, after;
        snap(s, &before);
        double bm[NF + 1] = {1, 2, 3, 4}, bv[NF + 1] = {1, 2, 3, 4};
        int32_t im[NF] = {1, 2, 3};
        tt_t tbm, tbv, tlong, tint, tcuda, t2d;
        DLTensor *pm = tt_vec(&tbm, bm, TT_F64, NF), *pv = tt_vec(&tbv, bv, TT_F64, NF);
        const int64_t shape2[2] = {NF, 2};
        if (biased) {
          EXPECT_FAIL(bn_running_stats_update(s, pm, pv, 0), BN_STATUS_INVALID_ARGUMENT, "n");
        } else {
          EXPECT_FAIL(bn_running_stats_update(s, pm, pv, 1), BN_STATUS_INVALID_ARGUMENT, "n");
          EXPECT_FAIL(bn_running_stats_update(s, pm, pv, 0), BN_STATUS_INVALID_ARGUMENT, "n");
        }
        EXPECT_FAIL(bn_running_stats_update(s, pm, pv, -7), BN_STATUS_INVALID_ARGUMENT, "n");
        EXPECT_FAIL(bn_running_stats_update(s, tt_vec(&tlong, bm, TT_F64, NF + 1), pv, 5), BN_STATUS_SHAPE_MISMATCH,
                    "batch_mean");
        EXPECT_FAIL(bn_running_stats_update(s, pm, tt_vec(&tlong, bv, TT_F64, NF - 1), 5), BN_STATUS_SHAPE_MISMATCH,
                    "batch_var");
        EXPECT_FAIL(bn_running_stats_update(s, pm, tt_init(&t2d, bv, TT_F64, 2, shape2, NULL), 5),
                    BN_STATUS_SHAPE_MISMATCH, "batch_var");
        EXPECT_FAIL(bn_running_stats_update(s, tt_vec(&tint, im, TT_I32, NF), pv, 5), BN_STATUS_UNSUPPORTED_DTYPE,
                    "batch_mean");
        DLTensor *cu = tt_vec(&tcuda, bv, TT_F64, NF);
        cu->device.device_type = kDLCUDA;
        EXPECT_FAIL(bn_running_stats_update(s, pm, cu, 5), BN_STATUS_UNSUPPORTED_DEVICE, "batch_var");
        EXPECT_FAIL(bn_running_stats_update(s, NULL, pv, 5), BN_STATUS_INVALID_ARGUMENT, "batch_mean");
        EXPECT_FAIL(bn_running_stats_update(s, pm, NULL, 5), BN_STATUS_INVALID_ARGUMENT, "batch_var");
        EXPECT_FAIL(bn_running_stats_update(NULL, pm, pv, 5), BN_STATUS_INVALID_ARGUMENT, "stats");
        snap(s, &after);
        CHECK(snap_equal(&before, &after));
        /* and the next good update starts from the untouched state */
        CHECK(check_ok(bn_running_stats_update(s, pm, pv, 5), "update after failures"));
        double rm[NF], rv[NF];
        memcpy(rm, m0, sizeof rm), memcpy(rv, v0, sizeof rv);
        model_update(rm, rv, bm, bv, 5, 0.3, biased ? BN_STATS_BIASED_VAR : 0, 6, dts[d].bits == 32);
        CHECK_STATE(s, rm, rv, dts[d].bits == 32 ? 1e-6 : 1e-14);
        bn_running_stats_destroy(s);
      }
  }

  /* ---------------------------------------------------------------- bn_norm_forward_stats */

  TEST(forward_stats_train_and_eval) {
    const uint32_t rules[] = {0, BN_STATS_BIASED_VAR, BN_STATS_CUMULATIVE};
    for (int d = 0; d < 2; d++)
      for (int r = 0; r < 3; r++) {
        bn_running_stats_t *s = NULL;
        bn_running_stats_create(NF, dts[d], 0.25, rules[r], &s);
        double x[BNUMEL], y[BNUMEL], sm[NF], sr[NF], w[NF] = {1.5, 0.5, 2.0}, b[NF] = {0.1, -0.2, 0.3};
        int64_t shape[4] = {BN, BC, BH, BW};
        tt_t tx, ty, tsm, tsr, tw, tb;
        bn_norm_desc_t desc;
        bn_norm_desc_init_batch(&desc, 4, 1, 1e-5);
        double rm[NF] = {0, 0, 0}, rv[NF] = {1, 1, 1};
        for (int step = 1; step <= 3; step++) {
          fill_batch(x, (uint64_t)(step * 7 + r + 10 * d));
          desc.flags = BN_FLAG_UPDATE_RUNNING_STATS;
          desc.momentum = 0.9; /* ignored: the state's factor rules */
          if (!check_ok(bn_norm_forward_stats(NULL, &desc, tt_init(&tx, x, TT_F64, 4, shape, NULL), tt_vec(&tw, w, TT_F64, NF), tt_vec(&tb, b, TT_F64, NF), NULL, NULL, 0, s, tt_init(&ty, y, TT_F64, 4, shape, NULL), tt_vec(&tsm, sm, TT_F64, NF), tt_vec(&tsr, sr, TT_F64, NF)),
                        "forward_stats (train)"))
            break;
          double bm[NF], bv[NF];
          ref_channel_stats(x, BN, BC, BH * BW, bm, bv);
          model_update(rm, rv, bm, bv, BN * BH * BW, 0.25, rules[r], step, dts[d].bits == 32);
          CHECK_STATE(s, rm, rv, dts[d].bits == 32 ? 1e-6 : 1e-13);
          int bad = 0;
          for (int i = 0; i < BNUMEL; i++) {
            const int c = (i / (BH * BW)) % BC;
            const double want = (x[i] - bm[c]) / sqrt(bv[c] + 1e-5) * w[c] + b[c];
            bad += !(fabs(y[i] - want) <= 1e-12 * (1 + fabs(want)));
          }
          CHECK(bad == 0);
          for (int c = 0; c < NF; c++) CHECK_CLOSE(sm[c], bm[c], 1e-13), CHECK_CLOSE(sr[c], 1 / sqrt(bv[c] + 1e-5), 1e-12);
          int64_t u, k;
          bn_running_stats_counts(s, &u, &k);
          CHECK(u == step && k == 0);
        }
        /* eval: the state normalizes and stays as it was */
        snap_t before, after;
        snap(s, &before);
        desc.flags = BN_FLAG_USE_RUNNING_STATS;
        fill_batch(x, 99);
        CHECK(check_ok(bn_norm_forward_stats(NULL, &desc, &tx.t, &tw.t, &tb.t, NULL, NULL, 0, s, &ty.t, &tsm.t, &tsr.t), "forward_stats (eval)"));
        snap(s, &after);
        CHECK(snap_equal(&before, &after));
        DLTensor m, v;
        bn_running_stats_tensors(s, &m, &v);
        int bad = 0;
        for (int i = 0; i < BNUMEL; i++) {
          const int64_t c = (i / (BH * BW)) % BC;
          const double want = (x[i] - get_i(&m, c)) / sqrt(get_i(&v, c) + 1e-5) * w[c] + b[c];
          bad += !(fabs(y[i] - want) <= 1e-12 * (1 + fabs(want)));
        }
        CHECK(bad == 0);
        /* neither flag: batch statistics, the state is not touched */
        desc.flags = 0;
        CHECK(check_ok(bn_norm_forward_stats(NULL, &desc, &tx.t, &tw.t, &tb.t, NULL, NULL, 0, s, &ty.t, NULL, NULL), "forward_stats (plain)"));
        snap(s, &after);
        CHECK(snap_equal(&before, &after));
        bn_running_stats_destroy(s);
      }
  }

  TEST(forward_stats_variance_convention_is_the_state_s) {
    /* desc's BN_FLAG_RUNNING_VAR_BIASED is replaced by the state's own convention */
    double x[4] = {1, 2, 3, 6}, y[4];
    int64_t shape[2] = {4, 1};
    tt_t tx, ty;
    bn_norm_desc_t desc;
    bn_norm_desc_init_batch(&desc, 2, 1, 0.0);
    desc.flags = BN_FLAG_UPDATE_RUNNING_STATS | BN_FLAG_RUNNING_VAR_BIASED;
    bn_running_stats_t *s = NULL;
    bn_running_stats_create(1, TT_F64, 1.0, 0, &s);
    CHECK(check_ok(bn_norm_forward_stats(NULL, &desc, tt_init(&tx, x, TT_F64, 2, shape, NULL), NULL, NULL, NULL, NULL, 0, s, tt_init(&ty, y, TT_F64, 2, shape, NULL), NULL, NULL),
                   "forward_stats"));
    DLTensor m, v;
    bn_running_stats_tensors(s, &m, &v);
    CHECK_CLOSE(get_i(&m, 0), 3.0, 1e-15);
    CHECK_CLOSE(get_i(&v, 0), 14.0 / 3.0, 1e-14); /* unbiased: the state's convention */
    bn_running_stats_destroy(s);
    bn_running_stats_create(1, TT_F64, 1.0, BN_STATS_BIASED_VAR, &s);
    desc.flags = BN_FLAG_UPDATE_RUNNING_STATS;
    CHECK(check_ok(bn_norm_forward_stats(NULL, &desc, &tx.t, NULL, NULL, NULL, NULL, 0, s, &ty.t, NULL, NULL), "forward_stats (biased)"));
    bn_running_stats_tensors(s, &m, &v);
    CHECK_CLOSE(get_i(&v, 0), 3.5, 1e-15);
    /* the biased state takes one value per channel */
    int64_t one[2] = {1, 1};
    CHECK(check_ok(bn_norm_forward_stats(NULL, &desc, tt_init(&tx, x, TT_F64, 2, one, NULL), NULL, NULL, NULL, NULL, 0, s, tt_init(&ty, y, TT_F64, 2, one, NULL), NULL, NULL),
                   "forward_stats (biased, n = 1)"));
    bn_running_stats_destroy(s);
  }

  TEST(forward_stats_skips_nonfinite_batches) {
    for (int skip = 0; skip < 2; skip++) {
      bn_running_stats_t *s = NULL;
      bn_running_stats_create(NF, TT_F32, 0.1, skip ? BN_STATS_SKIP_NONFINITE : 0, &s);
      double x[BNUMEL], y[BNUMEL];
      int64_t shape[4] = {BN, BC, BH, BW};
      tt_t tx, ty;
      bn_norm_desc_t desc;
      bn_norm_desc_init_batch(&desc, 4, 1, 1e-5);
      desc.flags = BN_FLAG_UPDATE_RUNNING_STATS;
      fill_batch(x, 5);
      CHECK(check_ok(bn_norm_forward_stats(NULL, &desc, tt_init(&tx, x, TT_F64, 4, shape, NULL), NULL, NULL, NULL, NULL, 0, s, tt_init(&ty, y, TT_F64, 4, shape, NULL), NULL, NULL),
                     "finite batch"));
      snap_t before, after;
      snap(s, &before);
      x[BH * BW + 3] = NAN; /* channel 1 of sample 0 */
      CHECK(check_ok(bn_norm_forward_stats(NULL, &desc, &tx.t, NULL, NULL, NULL, NULL, 0, s, &ty.t, NULL, NULL), "NaN batch"));
      snap(s, &after);
      /* the output is written either way: NaN in channel 1 only */
      int nan1 = 0, nan_other = 0;
      for (int i = 0; i < BNUMEL; i++) {
        if ((i / (BH * BW)) % BC == 1) nan1 += isnan(y[i]) != 0;
        else nan_other += !isfinite(y[i]);
      }
      CHECK(nan1 == BN * BH * BW && nan_other == 0);
      if (skip) {
        CHECK(memcmp(before.mean, after.mean, sizeof before.mean) == 0 &&
              memcmp(before.var, after.var, sizeof before.var) == 0);
        CHECK(after.updates == 1 && after.skipped == 1);
      } else {
        DLTensor m, v;
        bn_running_stats_tensors(s, &m, &v);
        CHECK(isnan(get_i(&m, 1)) && isnan(get_i(&v, 1)) && isfinite(get_i(&m, 0)) && isfinite(get_i(&v, 2)));
        CHECK(after.updates == 2 && after.skipped == 0);
      }
      bn_running_stats_destroy(s);
    }
  }

  TEST(failing_forward_stats_change_nothing) {
    bn_running_stats_t *s = NULL, *wide = NULL;
    bn_running_stats_create(NF, TT_F32, 0.1, 0, &s);
    bn_running_stats_create(NF + 1, TT_F32, 0.1, 0, &wide);
    double m0[NF] = {0.5, -1.0, 2.0}, v0[NF] = {1.5, 0.25, 3.0};
    set_state(s, m0, v0);
    bn_running_stats_set_counts(s, 4, 1);
    snap_t before, after;
    snap(s, &before);
    double x[BNUMEL], y[BNUMEL], w[NF + 1] = {1, 1, 1, 1};
    int64_t shape[4] = {BN, BC, BH, BW}, yshape[4] = {BN, BC, BH, BW - 1}, one[4] = {1, BC, 1, 1};
    fill_batch(x, 8);
    tt_t tx, ty, tw, tbad;
    DLTensor *X = tt_init(&tx, x, TT_F64, 4, shape, NULL), *Y = tt_init(&ty, y, TT_F64, 4, shape, NULL);
    bn_norm_desc_t desc;
    bn_norm_desc_init_batch(&desc, 4, 1, 1e-5);
    desc.flags = BN_FLAG_UPDATE_RUNNING_STATS;
    EXPECT_FAIL(bn_norm_forward_stats(NULL, &desc, X, tt_vec(&tw, w, TT_F64, NF + 1), NULL, NULL, NULL, 0, s, Y, NULL, NULL),
                BN_STATUS_SHAPE_MISMATCH, "weight");
    EXPECT_FAIL(bn_norm_forward_stats(NULL, &desc, X, NULL, NULL, NULL, NULL, 0, s, tt_init(&tbad, y, TT_F64, 4, yshape, NULL), NULL, NULL),
                BN_STATUS_SHAPE_MISMATCH, "y");
    EXPECT_FAIL(bn_norm_forward_stats(NULL, &desc, X, NULL, NULL, NULL, NULL, 0, s, tt_init(&tbad, y, TT_F32, 4, shape, NULL), NULL, NULL),
                BN_STATUS_UNSUPPORTED_DTYPE, "y");
    EXPECT_FAIL(bn_norm_forward_stats(NULL, &desc, tt_init(&tbad, x, TT_F64, 4, one, NULL), NULL, NULL, NULL, NULL, 0, s, tt_init(&ty, y, TT_F64, 4, one, NULL), NULL, NULL),
                BN_STATUS_INVALID_ARGUMENT, "more than 1 value");
    tt_init(&ty, y, TT_F64, 4, shape, NULL);
    EXPECT_FAIL(bn_norm_forward_stats(NULL, &desc, X, NULL, NULL, NULL, NULL, 0, NULL, Y, NULL, NULL), BN_STATUS_INVALID_ARGUMENT, "stats");
    EXPECT_FAIL(bn_norm_forward_stats(NULL, NULL, X, NULL, NULL, NULL, NULL, 0, s, Y, NULL, NULL), BN_STATUS_INVALID_ARGUMENT, "desc");
    EXPECT_FAIL(bn_norm_forward_stats(NULL, &desc, NULL, NULL, NULL, NULL, NULL, 0, s, Y, NULL, NULL), BN_STATUS_INVALID_ARGUMENT, "x");
    snap(s, &after);
    CHECK(snap_equal(&before, &after));
    /* y == x is allowed: the only call here that succeeds (and so updates the state) */
    CHECK(check_ok(bn_norm_forward_stats(NULL, &desc, X, NULL, NULL, NULL, NULL, 0, s, X, NULL, NULL), "in place"));
    snap(s, &before);
    CHECK(before.updates == 5);
    fill_batch(x, 8);
    bn_norm_desc_t bad = desc;
    bad.eps = -1.0;
    EXPECT_FAIL(bn_norm_forward_stats(NULL, &bad, X, NULL, NULL, NULL, NULL, 0, s, Y, NULL, NULL), BN_STATUS_INVALID_ARGUMENT, "eps");
    bad = desc;
    bad.flags |= 1u << 7;
    EXPECT_FAIL(bn_norm_forward_stats(NULL, &bad, X, NULL, NULL, NULL, NULL, 0, s, Y, NULL, NULL), BN_STATUS_INVALID_ARGUMENT, "flags");
    bad = desc;
    bad.flags |= BN_FLAG_USE_RUNNING_STATS;
    EXPECT_FAIL(bn_norm_forward_stats(NULL, &bad, X, NULL, NULL, NULL, NULL, 0, s, Y, NULL, NULL), BN_STATUS_INVALID_ARGUMENT, "flags");
    bad = desc;
    bad.flags = BN_FLAG_UPDATE_RUNNING_STATS | BN_FLAG_RMS;
    EXPECT_FAIL(bn_norm_forward_stats(NULL, &bad, X, NULL, NULL, NULL, NULL, 0, s, Y, NULL, NULL), BN_STATUS_INVALID_ARGUMENT, "RMS");
    /* a state of another width: the parameter count must equal num_features */
    snap_t wbefore, wafter;
    snap(wide, &wbefore);
    EXPECT_FAIL(bn_norm_forward_stats(NULL, &desc, X, NULL, NULL, NULL, NULL, 0, wide, Y, NULL, NULL), BN_STATUS_SHAPE_MISMATCH,
                "running_mean");
    desc.flags = BN_FLAG_USE_RUNNING_STATS;
    EXPECT_FAIL(bn_norm_forward_stats(NULL, &desc, X, NULL, NULL, NULL, NULL, 0, wide, Y, NULL, NULL), BN_STATUS_SHAPE_MISMATCH,
                "running_mean");
    snap(wide, &wafter);
    CHECK(snap_equal(&wbefore, &wafter));
    /* eval output overlapping the state */
    DLTensor m, v;
    bn_running_stats_tensors(s, &m, &v);
    int64_t row[2] = {1, NF};
    float xf[NF] = {1, 2, 3};
    tt_t txf, tyf;
    bn_norm_desc_t d2;
    bn_norm_desc_init_batch(&d2, 2, 1, 1e-5);
    d2.flags = BN_FLAG_USE_RUNNING_STATS;
    EXPECT_FAIL(bn_norm_forward_stats(NULL, &d2, tt_init(&txf, xf, TT_F32, 2, row, NULL), NULL, NULL, NULL, NULL, 0, s, tt_init(&tyf, m.data, TT_F32, 2, row, NULL), NULL, NULL),
                BN_STATUS_OVERLAP, "running_mean");
    snap(s, &after);
    CHECK(snap_equal(&before, &after));
    bn_running_stats_destroy(s);
    bn_running_stats_destroy(wide);
  }

  /* ---------------------------------------------------------------- bn_norm_moments */

  TEST(moments_against_two_pass) {
    for (int d = 0; d < 2; d++) {
      enum { N = 5, CC = 4, HW = 37, NUMEL = N * CC * HW };
      double *xd = malloc(NUMEL * sizeof *xd);
      float *xf = malloc(NUMEL * sizeof *xf);
      uint64_t seed = 21;
      for (int i = 0; i < NUMEL; i++) {
        const int c = (i / HW) % CC;
        xd[i] = 1000.0 * c + (1.0 + c) * tt_rand(&seed);
        xf[i] = (float)xd[i];
        if (d == 0) xd[i] = round_to_float(xd[i]); /* the reference sees the float32 values */
      }
      /* docs/numerics.md: float32 inputs sum their contiguous pieces in float32 lanes (then a
       * corrected second pass), float64 inputs in float64 */
      const double tol_mean = d == 0 ? 1e-8 : 1e-14, tol_m2 = d == 0 ? 1e-6 : 1e-11;
      int64_t shape[3] = {N, CC, HW}, count = -1;
      double mean[CC], m2[CC], rmean[CC], rvar[CC];
      tt_t tx, tm, tm2;
      DLTensor *X = d == 0 ? tt_init(&tx, xf, TT_F32, 3, shape, NULL) : tt_init(&tx, xd, TT_F64, 3, shape, NULL);
      bn_norm_desc_t desc;
      bn_norm_desc_init_batch(&desc, 3, 1, 0.0);
      desc.flags = BN_FLAG_UPDATE_RUNNING_STATS; /* ignored by moments */
      desc.momentum = 7.0;                       /* (even out of range) */
      desc.eps = 1e-3;
      CHECK(check_ok(bn_norm_stats(NULL, &desc, X, tt_vec(&tm, mean, TT_F64, CC), tt_vec(&tm2, m2, TT_F64, CC), &count),
                     "moments"));
      CHECK(count == N * HW);
      ref_channel_stats(xd, N, CC, HW, rmean, rvar);
      for (int c = 0; c < CC; c++) {
        CHECK_CLOSE(mean[c], rmean[c], tol_mean * (1 + fabs(rmean[c])));
        CHECK_CLOSE(m2[c], rvar[c] * (double)(N * HW), tol_m2 * rvar[c] * (double)(N * HW));
      }
      /* count may be NULL; float32 outputs are rounded values of the same */
      float mf[CC], m2f[CC];
      tt_t tmf, tm2f;
      CHECK(check_ok(bn_norm_stats(NULL, &desc, X, tt_vec(&tmf, mf, TT_F32, CC), tt_vec(&tm2f, m2f, TT_F32, CC), NULL),
                     "moments (float32 out, no count)"));
      for (int c = 0; c < CC; c++) CHECK(mf[c] == (float)mean[c] && m2f[c] == (float)m2[c]);
      /* layer-norm groups: one per sample */
      bn_norm_desc_t ld;
      bn_norm_desc_init_layer(&ld, 3, 2, 0.0);
      double lmean[N], lm2[N];
      tt_t tlm, tlm2;
      CHECK(check_ok(bn_norm_stats(NULL, &ld, X, tt_vec(&tlm, lmean, TT_F64, N), tt_vec(&tlm2, lm2, TT_F64, N), &count),
                     "moments (layer)"));
      CHECK(count == CC * HW);
      for (int i = 0; i < N; i++) {
        double s = 0, q = 0;
        for (int j = 0; j < CC * HW; j++) s += xd[i * CC * HW + j];
        s /= CC * HW;
        for (int j = 0; j < CC * HW; j++) q += (xd[i * CC * HW + j] - s) * (xd[i * CC * HW + j] - s);
        CHECK_CLOSE(lmean[i], s, tol_mean * (1 + fabs(s)));
        CHECK_CLOSE(lm2[i], q, tol_m2 * q);
      }
      free(xd), free(xf);
    }
  }

  TEST(moments_strided_and_empty) {
    /* channels-last strides over a (2, 3, 4) logical tensor */
    double buf[24];
    uint64_t seed = 4;
    for (int i = 0; i < 24; i++) buf[i] = tt_rand(&seed) * 5;
    int64_t shape[3] = {2, 3, 4}, st[3] = {12, 1, 3}, count = 0;
    double mean[3], m2[3];
    tt_t tx, tm, tm2;
    DLTensor *X = tt_init(&tx, buf, TT_F64, 3, shape, st);
    bn_norm_desc_t desc;
    bn_norm_desc_init_batch(&desc, 3, 1, 0.0);
    CHECK(check_ok(bn_norm_stats(NULL, &desc, X, tt_vec(&tm, mean, TT_F64, 3), tt_vec(&tm2, m2, TT_F64, 3), &count),
                   "moments (strided)"));
    CHECK(count == 8);
    for (int c = 0; c < 3; c++) {
      double s = 0, q = 0;
      int64_t idx[3];
      for (idx[0] = 0; idx[0] < 2; idx[0]++)
        for (idx[2] = 0; idx[2] < 4; idx[2]++) idx[1] = c, s += tt_get(X, idx);
      s /= 8;
      for (idx[0] = 0; idx[0] < 2; idx[0]++)
        for (idx[2] = 0; idx[2] < 4; idx[2]++) idx[1] = c, q += (tt_get(X, idx) - s) * (tt_get(X, idx) - s);
      CHECK_CLOSE(mean[c], s, 1e-14);
      CHECK_CLOSE(m2[c], q, 1e-13 * (1 + q));
    }
    /* an empty batch: count 0, finite zeros */
    int64_t empty[3] = {0, 3, 4};
    CHECK(check_ok(bn_norm_stats(NULL, &desc, tt_init(&tx, buf, TT_F64, 3, empty, NULL), &tm.t, &tm2.t, &count),
                   "moments (empty)"));
    CHECK(count == 0);
    for (int c = 0; c < 3; c++) CHECK(mean[c] == 0.0 && m2[c] == 0.0);
  }

  TEST(moments_refusals) {
    double x[24], mean[4], m2[4];
    int64_t shape[2] = {6, 4}, count = 42;
    tt_t tx, tm, tm2, tbad;
    DLTensor *X = tt_init(&tx, x, TT_F64, 2, shape, NULL);
    for (int i = 0; i < 24; i++) x[i] = i;
    bn_norm_desc_t desc;
    bn_norm_desc_init_batch(&desc, 2, 1, 0.0);
    DLTensor *M = tt_vec(&tm, mean, TT_F64, 4), *M2 = tt_vec(&tm2, m2, TT_F64, 4);
    EXPECT_FAIL(bn_norm_stats(NULL, &desc, X, NULL, M2, &count), BN_STATUS_INVALID_ARGUMENT, "mean");
    EXPECT_FAIL(bn_norm_stats(NULL, &desc, X, M, NULL, &count), BN_STATUS_INVALID_ARGUMENT, "m2");
    EXPECT_FAIL(bn_norm_stats(NULL, NULL, X, M, M2, &count), BN_STATUS_INVALID_ARGUMENT, "desc");
    EXPECT_FAIL(bn_norm_stats(NULL, &desc, NULL, M, M2, &count), BN_STATUS_INVALID_ARGUMENT, "x");
    EXPECT_FAIL(bn_norm_stats(NULL, &desc, X, tt_vec(&tbad, mean, TT_F64, 3), M2, &count), BN_STATUS_SHAPE_MISMATCH, "mean");
    EXPECT_FAIL(bn_norm_stats(NULL, &desc, X, M, tt_vec(&tbad, x, TT_F64, 4), &count), BN_STATUS_OVERLAP, "m2");
    EXPECT_FAIL(bn_norm_stats(NULL, &desc, X, M, M, &count), BN_STATUS_OVERLAP, "");
    int32_t ix[24] = {0};
    EXPECT_FAIL(bn_norm_stats(NULL, &desc, tt_init(&tbad, ix, TT_I32, 2, shape, NULL), M, M2, &count),
                BN_STATUS_UNSUPPORTED_DTYPE, "x");
    bn_norm_desc_t bad = desc;
    bad.reduce_axes = 1u << 5;
    EXPECT_FAIL(bn_norm_stats(NULL, &bad, X, M, M2, &count), BN_STATUS_INVALID_ARGUMENT, "reduce_axes");
    CHECK(count == 42); /* untouched by failures */
  }
}
