/*
 * The variants end to end through the public ABI: layer norm, RMS norm, instance
 * norm (training, training with running-statistic updates, eval), group norm and
 * a hand-written description, forward and backward on float32 and float64 4-d
 * tensors, against a generic double-precision reference over (reduce mask,
 * param mask, split axis); memory layouts other than NCHW; bitwise equality of
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

/* x = 0.3 + 0.4 c + (1 + 0.2 c) * uniform: channels differ in mean and spread, mean != 0. */
static void fill_x(DLTensor *x, uint64_t seed) {
  int64_t idx[4] = {0};
  do tt_set(x, idx, 0.3 + 0.4 * (double)idx[1] + (1.0 + 0.2 * (double)idx[1]) * tt_rand(&seed));
  while (tt_next(4, x->shape, idx));
}

/* ------------------------------------------------------------------ the generic reference */

/* The problem as the test understands it, independent of bn_norm_desc_t. */
typedef struct spec_t {
  uint64_t reduce, param;
  int split;      /* -1 or the split axis */
  int64_t groups; /* with split >= 0 */
  int rms;
} spec_t;

/* Group index: row-major over the non-reduced axes, the split axis counting its group part. */
static int64_t ref_group(const spec_t *s, const int64_t *shape, const int64_t *idx) {
  int64_t g = 0;
  for (int d = 0; d < 4; d++) {
    if ((s->reduce >> d) & 1u) continue;
    if (d == s->split) g = g * s->groups + idx[d] / (shape[d] / s->groups);
    else g = g * shape[d] + idx[d];
  }
  return g;
}

static int64_t ref_num_groups(const spec_t *s, const int64_t *shape) {
  int64_t n = 1;
  for (int d = 0; d < 4; d++)
    if (!((s->reduce >> d) & 1u)) n *= d == s->split ? s->groups : shape[d];
  return n;
}

static int64_t ref_param(const spec_t *s, const int64_t *shape, const int64_t *idx) {
  int64_t p = 0;
  for (int d = 0; d < 4; d++)
    if ((s->param >> d) & 1u) p = p * shape[d] + idx[d];
  return p;
}

static int64_t ref_num_params(const spec_t *s, const int64_t *shape) {
  int64_t n = 1;
  for (int d = 0; d < 4; d++)
    if ((s->param >> d) & 1u) n *= shape[d];
  return n;
}

/* Per-group mean and biased variance (or, for RMS, mean 0 and mean of squares), two-pass in double;
 * cnt receives the group sizes. */
static void ref_stats(const spec_t *s, const DLTensor *x, double *mean, double *var, int64_t *cnt) {
  const int64_t ng = ref_num_groups(s, x->shape);
  for (int64_t g = 0; g < ng; g++) mean[g] = var[g] = 0.0, cnt[g] = 0;
  int64_t idx[4] = {0};
  do {
    const int64_t g = ref_group(s, x->shape, idx);
    if (!s->rms) mean[g] += tt_get(x, idx);
    cnt[g]++;
  } while (tt_next(4, x->shape, idx));
  for (int64_t g = 0; g < ng; g++) mean[g] /= (double)cnt[g];
  do {
    const int64_t g = ref_group(s, x->shape, idx);
    const double d = tt_get(x, idx) - mean[g];
    var[g] += d * d;
  } while (tt_next(4, x->shape, idx));
  for (int64_t g = 0; g < ng; g++) var[g] /= (double)cnt[g];
}

static void ref_forward(const spec_t *s, const DLTensor *x, const double *mean, const double *rstd, const double *w,
                        const double *b, double *out) {
  int64_t idx[4] = {0}, i = 0;
  do {
    const int64_t g = ref_group(s, x->shape, idx), p = ref_param(s, x->shape, idx);
    out[i++] = (tt_get(x, idx) - mean[g]) * rstd[g] * w[p] + b[p];
  } while (tt_next(4, x->shape, idx));
}

static void ref_backward(const spec_t *s, const DLTensor *x, const DLTensor *dy, const double *mean,
                         const double *rstd, const double *w, int training, double *dx, double *dw, double *db) {
  const int64_t ng = ref_num_groups(s, x->shape), np = ref_num_params(s, x->shape);
  double *sg = calloc((size_t)ng, sizeof *sg), *sgx = calloc((size_t)ng, sizeof *sgx);
  int64_t *cnt = calloc((size_t)ng, sizeof *cnt);
  for (int64_t p = 0; p < np; p++) dw[p] = db[p] = 0.0;
  int64_t idx[4] = {0}, i = 0;
  do {
    const int64_t g = ref_group(s, x->shape, idx), p = ref_param(s, x->shape, idx);
    const double d = tt_get(dy, idx), xh = (tt_get(x, idx) - mean[g]) * rstd[g];
    db[p] += d, dw[p] += d * xh;
    sg[g] += d * w[p], sgx[g] += d * w[p] * xh, cnt[g]++;
  } while (tt_next(4, x->shape, idx));
  do {
    const int64_t g = ref_group(s, x->shape, idx), p = ref_param(s, x->shape, idx);
    const double gw = tt_get(dy, idx) * w[p], xh = (tt_get(x, idx) - mean[g]) * rstd[g];
    const double n = (double)cnt[g];
    if (!training) dx[i++] = rstd[g] * gw;
    else if (s->rms) dx[i++] = rstd[g] * (gw - xh * sgx[g] / n);
    else dx[i++] = rstd[g] * (gw - sg[g] / n - xh * sgx[g] / n);
  } while (tt_next(4, x->shape, idx));
  free(sg), free(sgx), free(cnt);
}

/* ------------------------------------------------------------------ comparisons */

static int h_close(double got, double want, double rtol) { return fabs(got - want) <= rtol * (1.0 + fabs(want)); }

static void check_tensor(const char *ctx, const char *what, const DLTensor *t, const double *want, double rtol) {
  int64_t idx[BN_MAX_NDIM] = {0}, i = 0, bad = 0;
  if (tt_numel(t) == 0) return;
  do {
    const double got = tt_get(t, idx);
    if (!h_close(got, want[i], rtol) && bad++ < 3)
      fprintf(stderr, "  %s: %s[%lld]: got %.17g, want %.17g\n", ctx, what, (long long)i, got, want[i]);
    i++;
  } while (tt_next(t->ndim, t->shape, idx));
  if (!CHECK(bad == 0))
    fprintf(stderr, "  %s: %s: %lld of %lld values off (rtol %g)\n", ctx, what, (long long)bad, (long long)i, rtol);
}

static int check_ok(bn_status_t st, const char *call) {
  if (!CHECK(st == BN_STATUS_SUCCESS))
    fprintf(stderr, "  %s: %s: %s\n", call, bn_status_string(st), bn_last_error());
  return st == BN_STATUS_SUCCESS;
}

/* ------------------------------------------------------------------ the variants */

enum { V_LAYER1, V_LAYER3, V_RMS2, V_INSTANCE, V_GROUP2, V_GROUPC, V_GENERIC, V_COUNT };
static const char *const variant_names[V_COUNT] = {"layer(1)", "layer(3)", "rms(2)",     "instance",
                                                   "group(2)", "group(C)", "generic{1}"};

/* The description from the public init function, checked against the spec the reference uses. */
static int make_desc(int v, const int64_t *shape, double eps, bn_norm_desc_t *desc, spec_t *s) {
  bn_status_t st = BN_STATUS_SUCCESS;
  memset(s, 0, sizeof *s);
  s->split = -1;
  switch (v) {
    case V_LAYER1:
      st = bn_norm_desc_init_layer(desc, 4, 1, eps), s->reduce = s->param = 0x8;
      break;
    case V_LAYER3:
      st = bn_norm_desc_init_layer(desc, 4, 3, eps), s->reduce = s->param = 0xe;
      break;
    case V_RMS2:
      st = bn_norm_desc_init_rms(desc, 4, 2, eps), s->reduce = s->param = 0xc, s->rms = 1;
      break;
    case V_INSTANCE:
      st = bn_norm_desc_init_instance(desc, 4, eps), s->reduce = 0xc, s->param = 0x2;
      break;
    case V_GROUP2:
    case V_GROUPC:
      s->groups = v == V_GROUP2 ? 2 : shape[1];
      st = bn_norm_desc_init_group(desc, 4, s->groups, eps), s->reduce = 0xc, s->param = 0x2, s->split = 1;
      break;
    default: { /* layer norm over the channels of an NCHW tensor, by hand */
      bn_norm_desc_t d = {.struct_size = sizeof(bn_norm_desc_t), .reduce_axes = 0x2, .param_axes = 0x2, .split_axis = -1, .eps = eps};
      *desc = d;
      s->reduce = s->param = 0x2;
    }
  }
  if (!check_ok(st, variant_names[v])) return 0;
  int ok = CHECK(desc->reduce_axes == s->reduce) & CHECK(desc->param_axes == s->param) &
           CHECK(desc->split_axis == s->split) & CHECK(desc->flags == (s->rms ? BN_FLAG_RMS : 0u)) &
           CHECK(desc->eps == eps) & CHECK(desc->momentum == 0.0) & CHECK(desc->reserved == 0);
  if (s->split >= 0) ok &= CHECK(desc->num_groups == s->groups);
  return ok;
}

enum { M_TRAIN, M_UPDATE, M_EVAL };
static const char *const mode_names[3] = {"training", "training+update", "eval"};

typedef struct case_t {
  int variant;
  DLDataType dt;
  int64_t shape[4];
  int xl, yl; /* layouts of x and dx; of y and dy */
  int affine;
  int mode;
} case_t;

static void run_case(const case_t *k) {
  const double eps = 1e-5, momentum = 0.1;
  const double rtol = k->dt.bits == 32 ? 2e-5 : 1e-11;
  const double rtol_p = k->dt.bits == 32 ? 2e-6 : 1e-12;
  char name[200];
  snprintf(name, sizeof name, "%s f%d %s x %s y%s %s", variant_names[k->variant], k->dt.bits, layout_names[k->xl],
           layout_names[k->yl], k->affine ? " affine" : "", mode_names[k->mode]);
  bn_norm_desc_t desc;
  spec_t s;
  if (!make_desc(k->variant, k->shape, eps, &desc, &s)) return;
  if (k->mode == M_UPDATE) desc.flags |= BN_FLAG_UPDATE_RUNNING_STATS, desc.momentum = momentum;
  if (k->mode == M_EVAL) desc.flags |= BN_FLAG_USE_RUNNING_STATS;

  const int64_t ng = ref_num_groups(&s, k->shape), np = ref_num_params(&s, k->shape);
  const int64_t numel = k->shape[0] * k->shape[1] * k->shape[2] * k->shape[3];
  double *w = malloc((size_t)np * sizeof *w), *b = malloc((size_t)np * sizeof *b);
  double *rm0 = malloc((size_t)np * sizeof *rm0), *rv0 = malloc((size_t)np * sizeof *rv0);
  for (int64_t p = 0; p < np; p++) {
    w[p] = 0.5 + 0.03 * (double)(p % 37), b[p] = 0.02 * (double)(p % 23) - 0.2;
    rm0[p] = 0.3 * (double)p - 0.1, rv0[p] = 0.5 + 0.2 * (double)p;
  }

  view_t x, y, dy, dx;
  vec_t vw, vb, rm, rv, sm, sr, dw, db;
  DLTensor *X = view_alloc(&x, k->dt, k->shape, k->xl), *Y = view_alloc(&y, k->dt, k->shape, k->yl);
  DLTensor *DY = view_alloc(&dy, k->dt, k->shape, k->yl), *DX = view_alloc(&dx, k->dt, k->shape, k->xl);
  fill_x(X, 1234 + (uint64_t)k->variant);
  uint64_t seed = 99;
  tt_fill(DY, &seed, 1.0, 0.0);
  DLTensor *W = k->affine ? vec_alloc(&vw, k->dt, np, w) : NULL;
  DLTensor *B = k->affine ? vec_alloc(&vb, k->dt, np, b) : NULL;
  const int running = k->mode != M_TRAIN;
  DLTensor *RM = running ? vec_alloc(&rm, k->dt, np, rm0) : NULL;
  DLTensor *RV = running ? vec_alloc(&rv, k->dt, np, rv0) : NULL;
  DLTensor *SM = vec_alloc(&sm, k->dt, ng, NULL), *SR = vec_alloc(&sr, k->dt, ng, NULL);
  DLTensor *DW = vec_alloc(&dw, k->dt, np, NULL), *DB = vec_alloc(&db, k->dt, np, NULL);

  /* parameters and running statistics as stored (rounded to dt) */
  double *win = malloc((size_t)np * sizeof *win), *bin = malloc((size_t)np * sizeof *bin);
  double *rmin = malloc((size_t)np * sizeof *rmin), *rvin = malloc((size_t)np * sizeof *rvin);
  for (int64_t p = 0; p < np; p++) {
    win[p] = k->affine ? vec_get(&vw, p) : 1.0, bin[p] = k->affine ? vec_get(&vb, p) : 0.0;
    rmin[p] = running ? vec_get(&rm, p) : 0.0, rvin[p] = running ? vec_get(&rv, p) : 0.0;
  }

  double *mean = malloc((size_t)ng * sizeof *mean), *var = malloc((size_t)ng * sizeof *var);
  double *rstd = malloc((size_t)ng * sizeof *rstd), *yref = malloc((size_t)numel * sizeof *yref);
  int64_t *cnt = malloc((size_t)ng * sizeof *cnt);
  ref_stats(&s, X, mean, var, cnt);
  if (k->mode == M_EVAL) {
    /* every group normalized by its parameter's running statistics */
    int64_t idx[4] = {0};
    do {
      const int64_t g = ref_group(&s, X->shape, idx), p = ref_param(&s, X->shape, idx);
      mean[g] = rmin[p], var[g] = rvin[p];
    } while (tt_next(4, X->shape, idx));
  }
  for (int64_t g = 0; g < ng; g++) rstd[g] = 1.0 / sqrt(var[g] + eps);
  ref_forward(&s, X, mean, rstd, win, bin, yref);

  /* running-statistic updates: per parameter, the average over its groups */
  double *want_m = calloc((size_t)np, sizeof *want_m), *want_v = calloc((size_t)np, sizeof *want_v);
  if (k->mode == M_UPDATE) {
    double *sum_m = calloc((size_t)np, sizeof *sum_m), *sum_v = calloc((size_t)np, sizeof *sum_v);
    int64_t *gp = malloc((size_t)ng * sizeof *gp), *pc = calloc((size_t)np, sizeof *pc);
    int64_t idx[4] = {0};
    do gp[ref_group(&s, X->shape, idx)] = ref_param(&s, X->shape, idx);
    while (tt_next(4, X->shape, idx));
    for (int64_t g = 0; g < ng; g++) {
      sum_m[gp[g]] += mean[g], sum_v[gp[g]] += var[g] * (double)cnt[g] / (double)(cnt[g] - 1), pc[gp[g]]++;
    }
    for (int64_t p = 0; p < np; p++) {
      want_m[p] = (1.0 - momentum) * rmin[p] + momentum * sum_m[p] / (double)pc[p];
      want_v[p] = (1.0 - momentum) * rvin[p] + momentum * sum_v[p] / (double)pc[p];
    }
    free(sum_m), free(sum_v), free(gp), free(pc);
  }

  const int fwd_ok = check_ok(bn_norm_forward(NULL, &desc, X, W, B, NULL, NULL, 0, RM, RV, Y, SM, SR), name);
  if (fwd_ok) {
    check_tensor(name, "y", Y, yref, rtol);
    double *zero = calloc((size_t)ng, sizeof *zero);
    check_tensor(name, "save_mean", &sm.tt.t, s.rms ? zero : mean, rtol_p);
    free(zero);
    check_tensor(name, "save_rstd", &sr.tt.t, rstd, rtol_p);
    CHECK(view_gaps_untouched(&y));
    if (k->mode == M_UPDATE) {
      check_tensor(name, "running_mean", &rm.tt.t, want_m, rtol_p);
      check_tensor(name, "running_var", &rv.tt.t, want_v, rtol_p);
    } else if (k->mode == M_EVAL) {
      check_tensor(name, "running_mean (eval)", &rm.tt.t, rmin, 0.0);
      check_tensor(name, "running_var (eval)", &rv.tt.t, rvin, 0.0);
    }

    /* backward from the saved statistics as the library stored them */
    double *smv = malloc((size_t)ng * sizeof *smv), *srv = malloc((size_t)ng * sizeof *srv);
    for (int64_t g = 0; g < ng; g++) smv[g] = vec_get(&sm, g), srv[g] = vec_get(&sr, g);
    double *dxref = malloc((size_t)numel * sizeof *dxref);
    double *dwref = malloc((size_t)np * sizeof *dwref), *dbref = malloc((size_t)np * sizeof *dbref);
    ref_backward(&s, X, DY, smv, srv, win, k->mode != M_EVAL, dxref, dwref, dbref);
    if (check_ok(bn_norm_backward(NULL, &desc, X, DY, W, SM, SR, DX, DW, DB), name)) {
      check_tensor(name, "dx", DX, dxref, k->dt.bits == 32 ? 1e-4 : 1e-10);
      check_tensor(name, "dweight", &dw.tt.t, dwref, rtol_p * 10);
      check_tensor(name, "dbias", &db.tt.t, dbref, rtol_p * 10);
      CHECK(view_gaps_untouched(&dx));
    }
    free(smv), free(srv), free(dxref), free(dwref), free(dbref);
  }

  view_free(&x), view_free(&y), view_free(&dy), view_free(&dx);
  if (k->affine) free(vw.buf), free(vb.buf);
  if (running) free(rm.buf), free(rv.buf);
  free(sm.buf), free(sr.buf), free(dw.buf), free(db.buf);
  free(w), free(b), free(rm0), free(rv0), free(win), free(bin), free(rmin), free(rvin);
  free(mean), free(var), free(rstd), free(yref), free(cnt), free(want_m), free(want_v);
}

/* ------------------------------------------------------------------ thread determinism */

typedef struct outputs_t {
  view_t y, dx;
  vec_t sm, sr, rm, rv, dw, db;
  int64_t ng, np;
} outputs_t;

static void run_threads(int nthreads, int v, uint32_t extra, DLDataType dt, const int64_t *shape, int layout,
                        DLTensor *X, DLTensor *DY, outputs_t *o) {
  bn_norm_desc_t desc;
  spec_t s;
  make_desc(v, shape, 1e-5, &desc, &s);
  desc.flags |= extra;
  desc.momentum = 0.1;
  const int64_t ng = ref_num_groups(&s, shape), np = ref_num_params(&s, shape);
  o->ng = ng, o->np = np;
  double *w = malloc((size_t)np * sizeof *w), *b = malloc((size_t)np * sizeof *b);
  double *z = calloc((size_t)np, sizeof *z), *one = malloc((size_t)np * sizeof *one);
  for (int64_t p = 0; p < np; p++) w[p] = 1.0 + 0.01 * (double)(p % 50), b[p] = -0.05 * (double)(p % 20), one[p] = 1.0;
  vec_t vw, vb;
  DLTensor *W = vec_alloc(&vw, dt, np, w), *B = vec_alloc(&vb, dt, np, b);
  DLTensor *Y = view_alloc(&o->y, dt, shape, layout), *DX = view_alloc(&o->dx, dt, shape, layout);
  DLTensor *SM = vec_alloc(&o->sm, dt, ng, NULL), *SR = vec_alloc(&o->sr, dt, ng, NULL);
  DLTensor *RM = vec_alloc(&o->rm, dt, np, z), *RV = vec_alloc(&o->rv, dt, np, one);
  DLTensor *DW = vec_alloc(&o->dw, dt, np, NULL), *DB = vec_alloc(&o->db, dt, np, NULL);
  const int running = (extra & (BN_FLAG_UPDATE_RUNNING_STATS | BN_FLAG_USE_RUNNING_STATS)) != 0;
  CHECK(bn_set_num_threads(nthreads) == BN_STATUS_SUCCESS);
  check_ok(bn_norm_forward(NULL, &desc, X, W, B, NULL, NULL, 0, running ? RM : NULL, running ? RV : NULL, Y, SM, SR), "forward");
  check_ok(bn_norm_backward(NULL, &desc, X, DY, W, SM, SR, DX, DW, DB), "backward");
  bn_set_num_threads(0);
  free(vw.buf), free(vb.buf), free(w), free(b), free(z), free(one);
}

static void free_outputs(outputs_t *o) {
  view_free(&o->y), view_free(&o->dx);
  free(o->sm.buf), free(o->sr.buf), free(o->rm.buf), free(o->rv.buf), free(o->dw.buf), free(o->db.buf);
}

static int same_bytes(const char *ctx, const char *a, const char *b, size_t n, const char *what) {
  if (memcmp(a, b, n) == 0) return 1;
  fprintf(stderr, "  %s: %s differs between 1 and 2 threads\n", ctx, what);
  return 0;
}

static void check_thread_determinism(int v, uint32_t extra, DLDataType dt, int layout, const int64_t *shape) {
  char ctx[120];
  snprintf(ctx, sizeof ctx, "%s f%d %s flags 0x%x", variant_names[v], dt.bits, layout_names[layout], (unsigned)extra);
  view_t x, dy;
  DLTensor *X = view_alloc(&x, dt, shape, layout), *DY = view_alloc(&dy, dt, shape, layout);
  CHECK(tt_numel(X) >= 200000);
  fill_x(X, 7);
  uint64_t seed = 11;
  tt_fill(DY, &seed, 1.0, 0.0);
  outputs_t one, two;
  run_threads(1, v, extra, dt, shape, layout, X, DY, &one);
  run_threads(2, v, extra, dt, shape, layout, X, DY, &two);
  const size_t es = dt.bits / 8, gs = (size_t)one.ng * es, ps = (size_t)one.np * es;
  CHECK(same_bytes(ctx, one.y.buf, two.y.buf, (size_t)one.y.span * es, "y"));
  CHECK(same_bytes(ctx, one.dx.buf, two.dx.buf, (size_t)one.dx.span * es, "dx"));
  CHECK(same_bytes(ctx, one.sm.buf, two.sm.buf, gs, "save_mean"));
  CHECK(same_bytes(ctx, one.sr.buf, two.sr.buf, gs, "save_rstd"));
  CHECK(same_bytes(ctx, one.rm.buf, two.rm.buf, ps, "running_mean"));
  CHECK(same_bytes(ctx, one.rv.buf, two.rv.buf, ps, "running_var"));
  CHECK(same_bytes(ctx, one.dw.buf, two.dw.buf, ps, "dweight"));
  CHECK(same_bytes(ctx, one.db.buf, two.db.buf, ps, "dbias"));

  /* and the large problem's statistics are right */
  bn_norm_desc_t desc;
  spec_t s;
  make_desc(v, shape, 1e-5, &desc, &s);
  double *mean = malloc((size_t)one.ng * sizeof *mean), *var = malloc((size_t)one.ng * sizeof *var);
  double *rstd = malloc((size_t)one.ng * sizeof *rstd), *zero = calloc((size_t)one.ng, sizeof *zero);
  int64_t *cnt = malloc((size_t)one.ng * sizeof *cnt);
  ref_stats(&s, X, mean, var, cnt);
  if (extra & BN_FLAG_USE_RUNNING_STATS) /* eval: running mean 0, running variance 1 */
    for (int64_t g = 0; g < one.ng; g++) mean[g] = 0.0, var[g] = 1.0;
  for (int64_t g = 0; g < one.ng; g++) rstd[g] = 1.0 / sqrt(var[g] + 1e-5);
  const double tol = dt.bits == 32 ? 2e-6 : 1e-12;
  check_tensor(ctx, "save_mean (large)", &one.sm.tt.t, s.rms ? zero : mean, tol);
  check_tensor(ctx, "save_rstd (large)", &one.sr.tt.t, rstd, tol);
  free(mean), free(var), free(rstd), free(zero), free(cnt);
  free_outputs(&one), free_outputs(&two);
  view_free(&x), view_free(&dy);
}

/* ------------------------------------------------------------------ tests */

SUITE(variants) {
  const DLDataType dts[2] = {TT_F32, TT_F64};
  const int64_t shape[4] = {3, 6, 5, 7};

  TEST(layer_norm) {
    for (int i = 0; i < 2; i++)
      for (int affine = 0; affine < 2; affine++) {
        case_t a = {V_LAYER1, dts[i], {3, 6, 5, 7}, L_NCHW, L_NCHW, affine, M_TRAIN};
        case_t b = {V_LAYER3, dts[i], {3, 6, 5, 7}, L_NCHW, L_NCHW, affine, M_TRAIN};
        run_case(&a), run_case(&b);
      }
  }

  TEST(rms_norm) {
    for (int i = 0; i < 2; i++)
      for (int affine = 0; affine < 2; affine++) {
        case_t k = {V_RMS2, dts[i], {3, 6, 5, 7}, L_NCHW, L_NCHW, affine, M_TRAIN};
        run_case(&k);
      }
  }

  TEST(instance_norm) {
    for (int i = 0; i < 2; i++)
      for (int affine = 0; affine < 2; affine++)
        for (int mode = 0; mode < 3; mode++) {
          case_t k = {V_INSTANCE, dts[i], {3, 6, 5, 7}, L_NCHW, L_NCHW, affine, mode};
          run_case(&k);
        }
  }

  TEST(group_norm) {
    for (int i = 0; i < 2; i++)
      for (int affine = 0; affine < 2; affine++) {
        case_t a = {V_GROUP2, dts[i], {3, 6, 5, 7}, L_NCHW, L_NCHW, affine, M_TRAIN};
        case_t b = {V_GROUPC, dts[i], {3, 6, 5, 7}, L_NCHW, L_NCHW, affine, M_TRAIN};
        run_case(&a), run_case(&b);
      }
  }

  TEST(generic_description) {
    for (int i = 0; i < 2; i++)
      for (int affine = 0; affine < 2; affine++) {
        case_t k = {V_GENERIC, dts[i], {3, 6, 5, 7}, L_NCHW, L_NCHW, affine, M_TRAIN};
        run_case(&k);
      }
  }

  TEST(strided_and_channels_last) {
    for (int v = 0; v < V_COUNT; v++)
      for (int i = 0; i < 2; i++)
        for (int xl = 1; xl < L_COUNT; xl++) {
          case_t k = {v, dts[i], {2, 6, 4, 5}, xl, (xl + 1) % L_COUNT, 1, M_TRAIN};
          run_case(&k);
        }
    /* instance norm's running statistics with channels-last memory */
    for (int mode = M_UPDATE; mode <= M_EVAL; mode++) {
      case_t k = {V_INSTANCE, TT_F32, {2, 6, 4, 5}, L_NHWC, L_NHWC, 1, mode};
      run_case(&k);
    }
  }

  TEST(descriptions_from_init) {
    bn_norm_desc_t d;
    spec_t s;
    for (int v = 0; v < V_COUNT; v++) CHECK(make_desc(v, shape, 1e-3, &d, &s));
    CHECK(bn_norm_desc_init_group(&d, 4, 0, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_instance(&d, 2, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_layer(&d, 4, 5, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_rms(&d, 4, 0, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
  }

  TEST(thread_count_does_not_change_bits) {
    /* 204800 elements each */
    const int64_t big[4] = {8, 16, 40, 40};
    for (int v = 0; v < V_COUNT; v++) check_thread_determinism(v, 0, TT_F32, L_NCHW, big);
    check_thread_determinism(V_INSTANCE, BN_FLAG_UPDATE_RUNNING_STATS, TT_F32, L_NCHW, big);
    check_thread_determinism(V_INSTANCE, BN_FLAG_USE_RUNNING_STATS, TT_F64, L_NHWC, big);
    check_thread_determinism(V_GENERIC, 0, TT_F32, L_NHWC, big);
    check_thread_determinism(V_LAYER3, 0, TT_F64, L_NCHW, big);
    check_thread_determinism(V_GROUP2, 0, TT_F64, L_NHWC, big);
    /* few, huge groups: 2 groups of 163840 (group norm) and layer norm over (C, H, W) */
    const int64_t huge[4] = {2, 4, 256, 160};
    check_thread_determinism(V_GROUP2, 0, TT_F32, L_NCHW, huge);
    check_thread_determinism(V_LAYER3, 0, TT_F32, L_NCHW, huge);
    check_thread_determinism(V_RMS2, 0, TT_F32, L_NCHW, huge);
  }
}
