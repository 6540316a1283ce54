/*
 * Batch norm end to end: forward (training and eval) and backward on float32
 * and float64 NCHW tensors in several memory layouts, against a plain
 * double-precision reference; running-statistic updates; bitwise equality of
 * results for 1 and 2 threads.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bncore/bncore.h"
#include "harness.h"
#include "tensors.h"

#include "views.h"

/* x[n, c, h, w] = (c + 1) * 0.5 + (1 + 0.3 c) * uniform: channels differ in mean and spread. */
static void fill_x(DLTensor *x, uint64_t seed) {
  int64_t idx[4] = {0};
  do tt_set(x, idx, (double)(idx[1] + 1) * 0.5 + (1.0 + 0.3 * (double)idx[1]) * tt_rand(&seed));
  while (tt_next(4, x->shape, idx));
}

/* ------------------------------------------------------------------ the reference */

/* Per-channel mean and biased variance, two-pass in double. */
static void ref_stats(const DLTensor *x, double *mean, double *var) {
  const int64_t C = x->shape[1], n = tt_numel(x) / C;
  for (int64_t c = 0; c < C; c++) mean[c] = var[c] = 0.0;
  int64_t idx[4] = {0};
  do mean[idx[1]] += tt_get(x, idx);
  while (tt_next(4, x->shape, idx));
  for (int64_t c = 0; c < C; c++) mean[c] /= (double)n;
  do {
    const double d = tt_get(x, idx) - mean[idx[1]];
    var[idx[1]] += d * d;
  } while (tt_next(4, x->shape, idx));
  for (int64_t c = 0; c < C; c++) var[c] /= (double)n;
}

/* y = (x - mean) * rstd * w + b, into out[] in logical row-major order. */
static void ref_forward(const DLTensor *x, const double *mean, const double *rstd, const double *w,
                        const double *b, double *out) {
  int64_t idx[4] = {0}, i = 0;
  do {
    const int64_t c = idx[1];
    out[i++] = (tt_get(x, idx) - mean[c]) * rstd[c] * (w ? w[c] : 1.0) + (b ? b[c] : 0.0);
  } while (tt_next(4, x->shape, idx));
}

/* dweight, dbias and dx (training: the full gradient; eval: statistics constant). */
static void ref_backward(const DLTensor *x, const DLTensor *dy, const double *mean, const double *rstd,
                         const double *w, int training, double *dx, double *dw, double *db) {
  const int64_t C = x->shape[1], n = tt_numel(x) / C;
  double *sdy = calloc((size_t)C, sizeof *sdy), *sdyx = calloc((size_t)C, sizeof *sdyx);
  int64_t idx[4] = {0}, i = 0;
  do {
    const int64_t c = idx[1];
    const double g = tt_get(dy, idx), xh = (tt_get(x, idx) - mean[c]) * rstd[c];
    sdy[c] += g, sdyx[c] += g * xh;
  } while (tt_next(4, x->shape, idx));
  for (int64_t c = 0; c < C; c++) db[c] = sdy[c], dw[c] = sdyx[c];
  do {
    const int64_t c = idx[1];
    const double wc = w ? w[c] : 1.0, g = tt_get(dy, idx) * wc, xh = (tt_get(x, idx) - mean[c]) * rstd[c];
    dx[i++] = training ? rstd[c] * (g - sdy[c] * wc / (double)n - xh * sdyx[c] * wc / (double)n) : rstd[c] * g;
  } while (tt_next(4, x->shape, idx));
  free(sdy), free(sdyx);
}

/* ------------------------------------------------------------------ comparisons */

static int h_close(double got, double want, double rtol) { return fabs(got - want) <= rtol * (1.0 + fabs(want)); }

/* Every element of t (logical order) against want[]: one CHECK, first mismatches printed. */
static void check_tensor(const char *what, const DLTensor *t, const double *want, double rtol) {
  int64_t idx[BN_MAX_NDIM] = {0}, i = 0, bad = 0;
  if (tt_numel(t) == 0) return;
  do {
    const double got = tt_get(t, idx);
    if (!h_close(got, want[i], rtol) && bad++ < 3)
      fprintf(stderr, "  %s[%lld]: got %.17g, want %.17g\n", what, (long long)i, got, want[i]);
    i++;
  } while (tt_next(t->ndim, t->shape, idx));
  if (!CHECK(bad == 0)) fprintf(stderr, "  %s: %lld of %lld values off (rtol %g)\n", what, (long long)bad, (long long)i, rtol);
}

static void check_vec(const char *what, const vec_t *v, const double *want, double rtol) {
  check_tensor(what, &v->tt.t, want, rtol);
}

static int check_ok(bn_status_t st, const char *call) {
  if (!CHECK(st == BN_STATUS_SUCCESS))
    fprintf(stderr, "  %s: %s: %s\n", call, bn_status_string(st), bn_last_error());
  return st == BN_STATUS_SUCCESS;
}

/* ------------------------------------------------------------------ one case, forward and backward */

typedef struct case_t {
  DLDataType dt;       /* of x, y, dy, dx */
  DLDataType pdt;      /* of weight, bias, running and saved statistics, gradients of parameters */
  int64_t shape[4];
  int xl, yl;          /* layout of x (and dx); of y (and dy) */
  int affine;          /* weight and bias given */
  int eval;            /* USE_RUNNING_STATS, else training with UPDATE_RUNNING_STATS */
  uint32_t extra_flags;
  double momentum;
  int in_place;        /* y is x */
} case_t;

static void run_case(const case_t *k) {
  const int64_t C = k->shape[1], numel = k->shape[0] * k->shape[1] * k->shape[2] * k->shape[3], n = numel / C;
  const double eps = 1e-5;
  const double rtol = k->dt.bits == 32 ? 2e-5 : 1e-11;
  const double rtol_p = k->dt.bits == 32 || k->pdt.bits == 32 ? 2e-6 : 1e-12;
  char name[160];
  snprintf(name, sizeof name, "f%d/%s x %s y%s%s%s", k->dt.bits, layout_names[k->xl], layout_names[k->yl],
           k->affine ? " affine" : "", k->eval ? " eval" : " training", k->in_place ? " in-place" : "");

  double *w = malloc((size_t)C * sizeof *w), *b = malloc((size_t)C * sizeof *b);
  double *rm0 = malloc((size_t)C * sizeof *rm0), *rv0 = malloc((size_t)C * sizeof *rv0);
  for (int64_t c = 0; c < C; c++) w[c] = 0.5 + 0.25 * (double)c, b[c] = 0.1 * (double)c - 0.2;
  for (int64_t c = 0; c < C; c++) rm0[c] = 0.3 * (double)c - 0.1, rv0[c] = 0.5 + 0.2 * (double)c;

  view_t x, y, dy, dx;
  vec_t vw, vb, rm, rv, sm, sr, dw, db;
  DLTensor *X = view_alloc(&x, k->dt, k->shape, k->xl);
  DLTensor *Y = k->in_place ? X : view_alloc(&y, k->dt, k->shape, k->yl);
  DLTensor *DY = view_alloc(&dy, k->dt, k->shape, k->yl);
  DLTensor *DX = view_alloc(&dx, k->dt, k->shape, k->xl);
  fill_x(X, 1234 + (uint64_t)k->xl);
  uint64_t seed = 99;
  tt_fill(DY, &seed, 1.0, 0.0);
  DLTensor *W = k->affine ? vec_alloc(&vw, k->pdt, C, w) : NULL;
  DLTensor *B = k->affine ? vec_alloc(&vb, k->pdt, C, b) : NULL;
  DLTensor *RM = vec_alloc(&rm, k->pdt, C, rm0), *RV = vec_alloc(&rv, k->pdt, C, rv0);
  DLTensor *SM = vec_alloc(&sm, k->pdt, C, NULL), *SR = vec_alloc(&sr, k->pdt, C, NULL);
  DLTensor *DW = vec_alloc(&dw, k->pdt, C, NULL), *DB = vec_alloc(&db, k->pdt, C, NULL);

  /* the reference, from x's values before the call (which may overwrite x) */
  double *mean = malloc((size_t)C * sizeof *mean), *var = malloc((size_t)C * sizeof *var);
  double *rstd = malloc((size_t)C * sizeof *rstd), *yref = malloc((size_t)numel * sizeof *yref);
  double *xcopy = malloc((size_t)numel * sizeof *xcopy);
  double rm_in[64], rv_in[64]; /* running statistics as stored (rounded to pdt) */
  for (int64_t c = 0; c < C; c++) rm_in[c] = vec_get(&rm, c), rv_in[c] = vec_get(&rv, c);
  if (k->eval) {
    for (int64_t c = 0; c < C; c++) mean[c] = rm_in[c], var[c] = rv_in[c];
  } else {
    ref_stats(X, mean, var);
  }
  for (int64_t c = 0; c < C; c++) rstd[c] = 1.0 / sqrt(var[c] + eps);
  double win[64], bin[64]; /* parameters as stored */
  for (int64_t c = 0; c < C; c++) win[c] = k->affine ? vec_get(&vw, c) : 1.0, bin[c] = k->affine ? vec_get(&vb, c) : 0.0;
  ref_forward(X, mean, rstd, win, bin, yref);
  {
    int64_t idx[4] = {0}, i = 0;
    do xcopy[i++] = tt_get(X, idx);
    while (tt_next(4, X->shape, idx));
  }

  bn_norm_desc_t desc;
  check_ok(bn_norm_desc_init_batch(&desc, 4, 1, eps), "bn_norm_desc_init_batch");
  desc.flags = (k->eval ? BN_FLAG_USE_RUNNING_STATS : BN_FLAG_UPDATE_RUNNING_STATS) | k->extra_flags;
  desc.momentum = k->momentum;

  unsigned char rm_before[64 * 8], rv_before[64 * 8];
  memcpy(rm_before, rm.buf, (size_t)C * (k->pdt.bits / 8));
  memcpy(rv_before, rv.buf, (size_t)C * (k->pdt.bits / 8));
  const int fwd_ok = check_ok(bn_norm_forward(NULL, &desc, X, W, B, NULL, NULL, 0, RM, RV, Y, SM, SR), name);

  if (fwd_ok) {
    check_tensor("y", Y, yref, rtol);
    check_vec("save_mean", &sm, mean, rtol_p);
    check_vec("save_rstd", &sr, rstd, rtol_p);
    if (!k->in_place) CHECK(view_gaps_untouched(&y));
    if (k->eval) {
      CHECK(memcmp(rm_before, rm.buf, (size_t)C * (k->pdt.bits / 8)) == 0);
      CHECK(memcmp(rv_before, rv.buf, (size_t)C * (k->pdt.bits / 8)) == 0);
    } else {
      double want_m[64], want_v[64];
      const double f = k->momentum;
      const double unbias = (k->extra_flags & BN_FLAG_RUNNING_VAR_BIASED) ? 1.0 : (double)n / (double)(n - 1);
      for (int64_t c = 0; c < C; c++) {
        want_m[c] = (1.0 - f) * rm_in[c] + f * mean[c];
        want_v[c] = (1.0 - f) * rv_in[c] + f * var[c] * unbias;
      }
      check_vec("running_mean", &rm, want_m, rtol_p);
      check_vec("running_var", &rv, want_v, rtol_p);
    }
  }

  if (fwd_ok && !k->in_place) {
    /* backward from the saved statistics as the library stored them */
    double smv[64], srv[64];
    for (int64_t c = 0; c < C; c++) smv[c] = vec_get(&sm, c), srv[c] = vec_get(&sr, c);
    double *dxref = malloc((size_t)numel * sizeof *dxref), dwref[64], dbref[64];
    ref_backward(X, DY, smv, srv, win, !k->eval, dxref, dwref, dbref);
    bn_norm_desc_t bdesc = desc;
    if (check_ok(bn_norm_backward(NULL, &bdesc, X, DY, W, SM, SR, DX, DW, DB), name)) {
      check_tensor("dx", DX, dxref, k->dt.bits == 32 ? 1e-4 : 1e-10);
      check_vec("dweight", &dw, dwref, rtol_p * 10);
      check_vec("dbias", &db, dbref, rtol_p * 10);
      CHECK(view_gaps_untouched(&dx));
    }
    /* x and dy are inputs: unchanged */
    int64_t idx[4] = {0}, i = 0, changed = 0;
    do changed += tt_get(X, idx) != xcopy[i++];
    while (tt_next(4, X->shape, idx));
    CHECK(changed == 0);
    free(dxref);
  }

  view_free(&x), view_free(&dy), view_free(&dx);
  if (!k->in_place) view_free(&y);
  if (k->affine) free(vw.buf), free(vb.buf);
  free(rm.buf), free(rv.buf), free(sm.buf), free(sr.buf), free(dw.buf), free(db.buf);
  free(w), free(b), free(rm0), free(rv0), free(mean), free(var), free(rstd), free(yref), free(xcopy);
}

/* ------------------------------------------------------------------ thread determinism */

typedef struct outputs_t {
  view_t y, dx;
  vec_t sm, sr, rm, rv, dw, db;
} outputs_t;

static void run_threads(int nthreads, DLDataType dt, const int64_t *shape, int layout, DLTensor *X, DLTensor *DY,
                        outputs_t *o) {
  const int64_t C = shape[1];
  double w[64], b[64], z[64], one[64];
  for (int64_t c = 0; c < C; c++) w[c] = 1.0 + 0.01 * (double)c, b[c] = -0.05 * (double)c, z[c] = 0.0, one[c] = 1.0;
  vec_t vw, vb;
  DLTensor *W = vec_alloc(&vw, dt, C, w), *B = vec_alloc(&vb, dt, C, b);
  DLTensor *Y = view_alloc(&o->y, dt, shape, layout), *DX = view_alloc(&o->dx, dt, shape, layout);
  DLTensor *SM = vec_alloc(&o->sm, dt, C, NULL), *SR = vec_alloc(&o->sr, dt, C, NULL);
  DLTensor *RM = vec_alloc(&o->rm, dt, C, z), *RV = vec_alloc(&o->rv, dt, C, one);
  DLTensor *DW = vec_alloc(&o->dw, dt, C, NULL), *DB = vec_alloc(&o->db, dt, C, NULL);
  bn_norm_desc_t desc;
  bn_norm_desc_init_batch(&desc, 4, 1, 1e-5);
  desc.flags = BN_FLAG_UPDATE_RUNNING_STATS;
  desc.momentum = 0.1;
  CHECK(bn_set_num_threads(nthreads) == BN_STATUS_SUCCESS);
  check_ok(bn_norm_forward(NULL, &desc, X, W, B, NULL, NULL, 0, RM, RV, Y, SM, SR), "forward");
  check_ok(bn_norm_backward(NULL, &desc, X, DY, W, SM, SR, DX, DW, DB), "backward");
  bn_set_num_threads(0);
  free(vw.buf), free(vb.buf);
}

static void free_outputs(outputs_t *o) {
  view_free(&o->y), view_free(&o->dx);
  free(o->sm.buf), free(o->sr.buf), free(o->rm.buf), free(o->rv.buf), free(o->dw.buf), free(o->db.buf);
}

static int same_bytes(const char *a, const char *b, size_t n, const char *what) {
  if (memcmp(a, b, n) == 0) return 1;
  fprintf(stderr, "  %s differs between 1 and 2 threads\n", what);
  return 0;
}

static void check_thread_determinism(DLDataType dt, int layout, const int64_t *shape) {
  const int64_t C = shape[1];
  view_t x, dy;
  DLTensor *X = view_alloc(&x, dt, shape, layout), *DY = view_alloc(&dy, dt, shape, layout);
  CHECK(tt_numel(X) >= 200000);
  fill_x(X, 7);
  uint64_t seed = 11;
  tt_fill(DY, &seed, 1.0, 0.0);
  outputs_t one, two;
  run_threads(1, dt, shape, layout, X, DY, &one);
  run_threads(2, dt, shape, layout, X, DY, &two);
  const size_t es = dt.bits / 8, ps = (size_t)C * es;
  CHECK(same_bytes(one.y.buf, two.y.buf, (size_t)one.y.span * es, "y"));
  CHECK(same_bytes(one.dx.buf, two.dx.buf, (size_t)one.dx.span * es, "dx"));
  CHECK(same_bytes(one.sm.buf, two.sm.buf, ps, "save_mean"));
  CHECK(same_bytes(one.sr.buf, two.sr.buf, ps, "save_rstd"));
  CHECK(same_bytes(one.rm.buf, two.rm.buf, ps, "running_mean"));
  CHECK(same_bytes(one.rv.buf, two.rv.buf, ps, "running_var"));
  CHECK(same_bytes(one.dw.buf, two.dw.buf, ps, "dweight"));
  CHECK(same_bytes(one.db.buf, two.db.buf, ps, "dbias"));

  /* and the large problem is right, too (the reduction splits into slabs here) */
  double mean[64], var[64], rstd[64];
  ref_stats(X, mean, var);
  for (int64_t c = 0; c < C; c++) rstd[c] = 1.0 / sqrt(var[c] + 1e-5);
  check_vec("save_mean (large)", &one.sm, mean, dt.bits == 32 ? 2e-6 : 1e-12);
  check_vec("save_rstd (large)", &one.sr, rstd, dt.bits == 32 ? 2e-6 : 1e-12);
  free_outputs(&one), free_outputs(&two);
  view_free(&x), view_free(&dy);
}

/* ------------------------------------------------------------------ tests */

SUITE(batch_norm) {
  const DLDataType dts[2] = {TT_F32, TT_F64};

  TEST(training_forward_backward_nchw) {
    for (int i = 0; i < 2; i++)
      for (int affine = 0; affine < 2; affine++) {
        case_t k = {dts[i], dts[i], {4, 3, 5, 7}, L_NCHW, L_NCHW, affine, 0, 0, 0.1, 0};
        run_case(&k);
      }
  }

  TEST(eval_forward_backward_nchw) {
    for (int i = 0; i < 2; i++)
      for (int affine = 0; affine < 2; affine++) {
        case_t k = {dts[i], dts[i], {4, 3, 5, 7}, L_NCHW, L_NCHW, affine, 1, 0, 0.1, 0};
        run_case(&k);
      }
  }

  TEST(channels_last_and_strided_layouts) {
    for (int i = 0; i < 2; i++)
      for (int xl = 0; xl < L_COUNT; xl++)
        for (int yl = 0; yl < L_COUNT; yl++)
          for (int eval = 0; eval < 2; eval++) {
            case_t k = {dts[i], dts[i], {3, 5, 4, 6}, xl, yl, 1, eval, 0, 0.1, 0};
            run_case(&k);
          }
  }

  TEST(channels_last_dltensor_by_hand) {
    /* NHWC memory described with explicit strides, as a framework would hand it over */
    enum { N = 2, H = 3, W = 4, C = 5 };
    float xs[N * H * W * C], ys[N * H * W * C];
    int64_t shape[4] = {N, C, H, W}, strides[4] = {H * W * C, 1, W * C, C};
    uint64_t seed = 5;
    for (int i = 0; i < N * H * W * C; i++) xs[i] = (float)(tt_rand(&seed) + 0.1 * (i % C));
    tt_t x, y;
    bn_norm_desc_t desc;
    bn_norm_desc_init_batch(&desc, 4, 1, 1e-3);
    CHECK(check_ok(bn_norm_forward(NULL, &desc, tt_init(&x, xs, TT_F32, 4, shape, strides), NULL, NULL, NULL, NULL, 0, NULL, NULL, tt_init(&y, ys, TT_F32, 4, shape, strides), NULL, NULL),
                   "forward"));
    /* channel c is every C-th float of memory */
    for (int c = 0; c < C; c++) {
      double m = 0, v = 0;
      for (int i = c; i < N * H * W * C; i += C) m += xs[i];
      m /= N * H * W;
      for (int i = c; i < N * H * W * C; i += C) v += (xs[i] - m) * (xs[i] - m);
      v /= N * H * W;
      double worst = 0;
      for (int i = c; i < N * H * W * C; i += C) {
        double want = (xs[i] - m) / sqrt(v + 1e-3);
        if (fabs(ys[i] - want) > worst) worst = fabs(ys[i] - want);
      }
      CHECK_CLOSE(worst, 0.0, 1e-5);
    }
  }

  TEST(in_place_forward) {
    for (int i = 0; i < 2; i++)
      for (int eval = 0; eval < 2; eval++) {
        case_t k = {dts[i], dts[i], {4, 3, 5, 7}, L_NHWC, L_NHWC, 1, eval, 0, 0.1, 1};
        run_case(&k);
      }
  }

  TEST(mixed_parameter_dtypes) {
    /* float32 data with float64 parameters and statistics, and the other way round */
    case_t a = {TT_F32, TT_F64, {4, 3, 5, 7}, L_NCHW, L_NHWC, 1, 0, 0, 0.1, 0};
    case_t b = {TT_F64, TT_F32, {4, 3, 5, 7}, L_NHWC, L_NCHW, 1, 0, 0, 0.1, 0};
    run_case(&a);
    run_case(&b);
  }

  TEST(running_statistics_update) {
    /* momentum 0.1 with the unbiased variance; also 0, 1 and the biased convention */
    const double moms[] = {0.1, 0.0, 1.0, 0.37};
    for (int i = 0; i < 2; i++)
      for (int m = 0; m < 4; m++) {
        case_t k = {dts[i], dts[i], {4, 3, 5, 7}, L_NCHW, L_NCHW, 1, 0, 0, moms[m], 0};
        run_case(&k);
      }
    case_t biased = {TT_F64, TT_F64, {4, 3, 5, 7}, L_NCHW, L_NCHW, 1, 0, BN_FLAG_RUNNING_VAR_BIASED, 0.1, 0};
    run_case(&biased);
  }

  TEST(running_statistics_values_by_hand) {
    /* x (2, 1, 2) = {1, 2, 3, 6}: mean 3, biased var 3.5, unbiased var 14/3 */
    double xs[4] = {1, 2, 3, 6}, ys[4], rm[1] = {0.5}, rv[1] = {2.0};
    int64_t shape[3] = {2, 1, 2};
    tt_t x, y, m, v;
    bn_norm_desc_t desc;
    bn_norm_desc_init_batch(&desc, 3, 1, 0.0);
    desc.flags = BN_FLAG_UPDATE_RUNNING_STATS;
    desc.momentum = 0.1;
    CHECK(check_ok(bn_norm_forward(NULL, &desc, tt_init(&x, xs, TT_F64, 3, shape, NULL), NULL, NULL, NULL, NULL, 0, tt_vec(&m, rm, TT_F64, 1), tt_vec(&v, rv, TT_F64, 1), tt_init(&y, ys, TT_F64, 3, shape, NULL), NULL, NULL),
                   "forward"));
    CHECK_CLOSE(rm[0], 0.9 * 0.5 + 0.1 * 3.0, 1e-15);
    CHECK_CLOSE(rv[0], 0.9 * 2.0 + 0.1 * (14.0 / 3.0), 1e-15);
    CHECK_CLOSE(ys[0], (1 - 3) / sqrt(3.5), 1e-15);
    CHECK_CLOSE(ys[3], (6 - 3) / sqrt(3.5), 1e-15);
  }

  TEST(thread_count_does_not_change_bits) {
    CHECK(bn_set_num_threads(2) == BN_STATUS_SUCCESS);
    if (bn_get_num_threads() != 2) printf("note: bn_get_num_threads() = %d after bn_set_num_threads(2) (no OpenMP?)\n",
                                         (int)bn_get_num_threads());
    bn_set_num_threads(0);
    /* 204800 elements; per channel 12800 values: each channel is reduced and normalized
     * while in cache (NCHW), or by the two-phase reduction over rows of channels (NHWC) */
    const int64_t medium[4] = {8, 16, 40, 40};
    /* 327680 elements; per channel 163840 values (640 KiB of float32): too large a group to
     * stay in cache, so the two-phase reduction over slabs of rows runs for NCHW too */
    const int64_t big_groups[4] = {2, 2, 256, 320};
    check_thread_determinism(TT_F32, L_NCHW, medium);
    check_thread_determinism(TT_F32, L_NHWC, medium);
    check_thread_determinism(TT_F64, L_NCHW, medium);
    check_thread_determinism(TT_F32, L_NCHW, big_groups);
    check_thread_determinism(TT_F64, L_NHWC, big_groups);
  }
}
