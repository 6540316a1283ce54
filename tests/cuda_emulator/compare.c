/*
 * The CUDA backend, emulated on the host (tools/cuda_emulate.sh), against the CPU backend: the
 * same problems through the public API, once on kDLCPU tensors and once on the same data
 * labelled kDLCUDA (the emulator's device memory is host memory). Forward (training with a
 * running-statistics update, evaluation, the ReLU + residual epilogue, ghost batches, renorm),
 * backward (training, evaluation, the epilogue's), the steps (statistics, backward reduce and
 * apply), four dtypes, contiguous and strided layouts; and each emulated run twice, bit for bit.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bncore/bncore.h"
#include "half.h"

static int failures = 0, checks = 0;

typedef struct buf_t {
  DLTensor t;
  int64_t shape[8], strides[8];
  void *data;
} buf_t;

static size_t esize(DLDataType d) { return d.bits / 8; }

static double get(const buf_t *b, int64_t i) { /* element i of the storage */
  const DLDataType d = b->t.dtype;
  if (d.code == kDLFloat && d.bits == 64) return ((double *)b->data)[i];
  if (d.code == kDLFloat && d.bits == 32) return ((float *)b->data)[i];
  if (d.code == kDLFloat) return bn_f16_to_f32(((uint16_t *)b->data)[i]);
  return bn_bf16_to_f32(((uint16_t *)b->data)[i]);
}

static void set(buf_t *b, int64_t i, double v) {
  const DLDataType d = b->t.dtype;
  if (d.code == kDLFloat && d.bits == 64) ((double *)b->data)[i] = v;
  else if (d.code == kDLFloat && d.bits == 32) ((float *)b->data)[i] = (float)v;
  else if (d.code == kDLFloat) ((uint16_t *)b->data)[i] = bn_f32_to_f16((float)v);
  else ((uint16_t *)b->data)[i] = bn_f32_to_bf16((float)v);
}

/* A tensor over `count` storage elements (shape, optional element strides). */
static buf_t *make(DLDataType dt, int ndim, const int64_t *shape, const int64_t *strides, int64_t count) {
  buf_t *b = calloc(1, sizeof *b);
  b->data = calloc((size_t)(count > 0 ? count : 1), esize(dt));
  b->t.data = b->data, b->t.device.device_type = kDLCPU, b->t.ndim = ndim, b->t.dtype = dt;
  for (int d = 0; d < ndim; d++) b->shape[d] = shape[d], b->strides[d] = strides ? strides[d] : 0;
  b->t.shape = b->shape, b->t.strides = strides ? b->strides : NULL;
  return b;
}

static int64_t count_of(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int d = 0; d < ndim; d++) n *= shape[d];
  return n;
}

/* A copy labelled as CUDA memory (same contents, own storage). */
static buf_t *cuda_copy(const buf_t *b, int64_t count) {
  buf_t *c = make(b->t.dtype, b->t.ndim, b->shape, b->t.strides ? b->strides : NULL, count);
  memcpy(c->data, b->data, (size_t)count * esize(b->t.dtype));
  c->t.device.device_type = kDLCUDA;
  return c;
}

static void release(buf_t *b) {
  if (b) free(b->data), free(b);
}

static DLTensor *T(buf_t *b) { return b ? &b->t : NULL; }

static double frand(unsigned *s) {
  *s = *s * 1664525u + 1013904223u;
  return ((*s >> 8) / 16777216.0) * 2.0 - 1.0;
}

static void compare(const char *name, const char *what, const buf_t *a, const buf_t *b, int64_t count, double tol) {
  if (!a || !b) return;
  double worst = 0.0;
  int64_t at = -1;
  for (int64_t i = 0; i < count; i++) {
    const double x = get(a, i), y = get(b, i), err = fabs(x - y) / (1.0 + fabs(x));
    if (!(err <= worst)) worst = err, at = i;
    if (isnan(x) != isnan(y)) worst = INFINITY, at = i;
  }
  checks++;
  if (!(worst <= tol)) {
    failures++;
    printf("FAIL %s %s: worst relative error %.3g at %lld (cpu %.9g, cuda %.9g), tolerance %.1g\n", name, what,
           worst, (long long)at, get(a, at), get(b, at), tol);
  }
}

static void same_bits(const char *name, const char *what, const buf_t *a, const buf_t *b, int64_t count) {
  if (!a || !b) return;
  checks++;
  if (memcmp(a->data, b->data, (size_t)count * esize(a->t.dtype))) {
    failures++;
    printf("FAIL %s %s: two emulated CUDA runs differ\n", name, what);
  }
}

static void ok(bn_status_t st, const char *name, const char *what) {
  if (st) {
    failures++;
    printf("FAIL %s %s: status %d: %s\n", name, what, (int)st, bn_last_error());
  }
}

typedef struct problem_t {
  const char *name;
  bn_norm_desc_t desc;
  int ndim;
  int64_t shape[6];
  const int64_t *strides; /* element strides of x, y, dy, dx (NULL: compact) */
  int64_t storage;        /* elements of x's storage */
  int64_t ngroups, nparams;
  int running; /* running statistics: 1 update (training), 2 use (eval) */
  int residual;
} problem_t;

static void run(const problem_t *p, DLDataType dt) {
  char name[128];
  snprintf(name, sizeof name, "%s/%s%d", p->name, dt.code == kDLBfloat ? "bf" : "f", dt.bits);
  const double tol = dt.bits == 64 ? 1e-10 : dt.bits == 32 ? 1e-5 : dt.code == kDLBfloat ? 2e-2 : 3e-3;
  const DLDataType f32 = {kDLFloat, 32, 1};
  const int64_t n = p->storage, ng = p->ngroups, np = p->nparams;
  unsigned seed = 12345u + (unsigned)dt.bits;
  buf_t *x = make(dt, p->ndim, p->shape, p->strides, n), *dy = make(dt, p->ndim, p->shape, p->strides, n);
  buf_t *res = p->residual ? make(dt, p->ndim, p->shape, p->strides, n) : NULL;
  for (int64_t i = 0; i < n; i++) {
    set(x, i, 2.0 + 1.5 * frand(&seed) + (double)(i % 3));
    set(dy, i, frand(&seed));
    if (res) set(res, i, frand(&seed));
  }
  buf_t *w = make(dt, 1, &np, NULL, np), *b = make(dt, 1, &np, NULL, np);
  buf_t *rm = make(f32, 1, &np, NULL, np), *rv = make(f32, 1, &np, NULL, np);
  for (int64_t i = 0; i < np; i++) set(w, i, 0.5 + 0.25 * (double)(i % 5)), set(b, i, 0.1 * (double)i);
  for (int64_t i = 0; i < np; i++) set(rm, i, 0.5 * frand(&seed)), set(rv, i, 1.0 + 0.5 * frand(&seed));
  buf_t *y[3], *sm[3], *sr[3], *dx[3], *dw[3], *db[3], *rmk[3], *rvk[3], *r_[3], *d_[3];
  const int renorm = (p->desc.flags & BN_FLAG_RENORM) != 0;
  for (int k = 0; k < 3; k++) { /* 0: cpu, 1 and 2: emulated cuda */
    buf_t *xk = k ? cuda_copy(x, n) : x, *dyk = k ? cuda_copy(dy, n) : dy;
    buf_t *resk = res ? (k ? cuda_copy(res, n) : res) : NULL;
    buf_t *wk = k ? cuda_copy(w, np) : w, *bk = k ? cuda_copy(b, np) : b;
    rmk[k] = k ? cuda_copy(rm, np) : cuda_copy(rm, np), rvk[k] = cuda_copy(rv, np);
    if (!k) rmk[k]->t.device.device_type = rvk[k]->t.device.device_type = kDLCPU;
    const DLDeviceType dev = k ? kDLCUDA : kDLCPU;
    y[k] = make(dt, p->ndim, p->shape, p->strides, n), dx[k] = make(dt, p->ndim, p->shape, p->strides, n);
    sm[k] = make(f32, 1, &ng, NULL, ng), sr[k] = make(f32, 1, &ng, NULL, ng);
    dw[k] = make(f32, 1, &np, NULL, np), db[k] = make(f32, 1, &np, NULL, np);
    r_[k] = make(f32, 1, &np, NULL, np), d_[k] = make(f32, 1, &np, NULL, np);
    buf_t *outs[] = {y[k], dx[k], sm[k], sr[k], dw[k], db[k], r_[k], d_[k]};
    for (int o = 0; o < 8; o++) outs[o]->t.device.device_type = dev;
    const int use_running = p->running || renorm;
    ok(bn_norm_forward_ex(NULL, &p->desc, T(xk), T(wk), T(bk), T(resk), NULL, NULL, 0,
                          use_running ? T(rmk[k]) : NULL, use_running ? T(rvk[k]) : NULL, T(y[k]), T(sm[k]),
                          T(sr[k]), renorm ? T(r_[k]) : NULL, renorm ? T(d_[k]) : NULL),
       name, "forward");
    bn_norm_desc_t bd = p->desc;
    ok(bn_norm_backward_ex(NULL, &bd, T(xk), T(dyk), T(wk), T(sm[k]), T(sr[k]), T(y[k]), renorm ? T(r_[k]) : NULL,
                           renorm ? T(d_[k]) : NULL, T(dx[k]), T(dw[k]), T(db[k]), NULL),
       name, "backward");
    if (k) {
      release(xk), release(dyk), release(wk), release(bk);
      if (resk) release(resk);
    }
  }
  compare(name, "y", y[0], y[1], n, tol);
  compare(name, "save_mean", sm[0], sm[1], ng, tol);
  compare(name, "save_rstd", sr[0], sr[1], ng, tol);
  compare(name, "grad_input", dx[0], dx[1], n, 4 * tol);
  compare(name, "grad_weight", dw[0], dw[1], np, 4 * tol);
  compare(name, "grad_bias", db[0], db[1], np, 4 * tol);
  if (p->running == 1) compare(name, "running_mean", rmk[0], rmk[1], np, tol), compare(name, "running_var", rvk[0], rvk[1], np, tol);
  if (renorm) compare(name, "r", r_[0], r_[1], np, tol), compare(name, "d", d_[0], d_[1], np, tol);
  same_bits(name, "y", y[1], y[2], n), same_bits(name, "grad_input", dx[1], dx[2], n);
  same_bits(name, "save_rstd", sr[1], sr[2], ng), same_bits(name, "grad_weight", dw[1], dw[2], np);
  for (int k = 0; k < 3; k++) {
    buf_t *all[] = {y[k], sm[k], sr[k], dx[k], dw[k], db[k], rmk[k], rvk[k], r_[k], d_[k]};
    for (int o = 0; o < 10; o++) release(all[o]);
  }
  release(x), release(dy), release(res), release(w), release(b), release(rm), release(rv);
}

/* The steps: statistics, then a forward given them; backward reduce, then apply. */
static void steps(DLDataType dt) {
  const char *name = "steps/batch";
  const int64_t shape[4] = {6, 3, 40, 41}, C = 3, n = 6 * 3 * 40 * 41;
  const DLDataType f32 = {kDLFloat, 32, 1};
  bn_norm_desc_t desc;
  bn_norm_desc_init_batch(&desc, 4, 1, 1e-5);
  buf_t *x = make(dt, 4, shape, NULL, n), *dy = make(dt, 4, shape, NULL, n);
  unsigned seed = 7;
  for (int64_t i = 0; i < n; i++) set(x, i, 1.0 + frand(&seed)), set(dy, i, frand(&seed));
  buf_t *m[2], *q[2], *s1[2], *s2[2], *dx[2], *sr[2];
  int64_t count[2];
  for (int k = 0; k < 2; k++) {
    buf_t *xk = k ? cuda_copy(x, n) : x, *dyk = k ? cuda_copy(dy, n) : dy;
    const DLDeviceType dev = k ? kDLCUDA : kDLCPU;
    m[k] = make(f32, 1, &C, NULL, C), q[k] = make(f32, 1, &C, NULL, C), sr[k] = make(f32, 1, &C, NULL, C);
    s1[k] = make(f32, 1, &C, NULL, C), s2[k] = make(f32, 1, &C, NULL, C), dx[k] = make(dt, 4, shape, NULL, n);
    buf_t *outs[] = {m[k], q[k], sr[k], s1[k], s2[k], dx[k]};
    for (int o = 0; o < 6; o++) outs[o]->t.device.device_type = dev;
    ok(bn_norm_stats(NULL, &desc, T(xk), T(m[k]), T(q[k]), &count[k]), name, "stats");
    for (int64_t c = 0; c < C; c++) set(sr[k], c, 1.0 / sqrt(get(q[k], c) / (double)count[k] + 1e-5));
    ok(bn_norm_backward_reduce(NULL, &desc, T(xk), T(dyk), T(m[k]), T(sr[k]), T(s1[k]), T(s2[k])), name, "reduce");
    ok(bn_norm_backward_apply(NULL, &desc, T(xk), T(dyk), NULL, T(m[k]), T(sr[k]), T(s1[k]), T(s2[k]), count[k],
                              T(dx[k])),
       name, "apply");
    if (k) release(xk), release(dyk);
  }
  const double tol = dt.bits == 32 ? 1e-5 : 1e-10;
  compare(name, "mean", m[0], m[1], C, tol), compare(name, "m2", q[0], q[1], C, tol);
  compare(name, "sum_dy", s1[0], s1[1], C, 1e-4), compare(name, "sum_dy_xhat", s2[0], s2[1], C, 1e-4);
  compare(name, "grad_input", dx[0], dx[1], n, 4 * tol);
  for (int k = 0; k < 2; k++) release(m[k]), release(q[k]), release(sr[k]), release(s1[k]), release(s2[k]), release(dx[k]);
  release(x), release(dy);
}

int main(void) {
  static const int64_t nhwc[4] = {5 * 6 * 3, 1, 6 * 3, 3}; /* (N, C, H, W) = (4, 3, 5, 6) channels-last */
  static const int64_t tr[3] = {1, 70, 7};                 /* (7, 9, 10) with axis 0 fastest */
  problem_t P[12];
  int np_ = 0;
  problem_t *p;
#define NEW(nm) (p = &P[np_++], memset(p, 0, sizeof *p), p->name = nm, p)
  NEW("batch-nchw-train"), bn_norm_desc_init_batch(&p->desc, 4, 1, 1e-5), p->ndim = 4;
  p->shape[0] = 8, p->shape[1] = 3, p->shape[2] = 33, p->shape[3] = 35, p->storage = 8 * 3 * 33 * 35;
  p->ngroups = p->nparams = 3, p->running = 1, p->desc.flags |= BN_FLAG_UPDATE_RUNNING_STATS, p->desc.momentum = 0.1;
  NEW("batch-nhwc-train"), bn_norm_desc_init_batch(&p->desc, 4, 1, 1e-5), p->ndim = 4;
  p->shape[0] = 4, p->shape[1] = 3, p->shape[2] = 5, p->shape[3] = 6, p->strides = nhwc, p->storage = 360;
  p->ngroups = p->nparams = 3, p->running = 1, p->desc.flags |= BN_FLAG_UPDATE_RUNNING_STATS, p->desc.momentum = 0.1;
  NEW("batch-eval"), bn_norm_desc_init_batch(&p->desc, 3, 1, 1e-3), p->ndim = 3;
  p->shape[0] = 4, p->shape[1] = 5, p->shape[2] = 6, p->storage = 120, p->ngroups = p->nparams = 5, p->running = 2;
  p->desc.flags |= BN_FLAG_USE_RUNNING_STATS;
  NEW("batch-relu-residual"), bn_norm_desc_init_batch(&p->desc, 3, 1, 1e-5), p->ndim = 3;
  p->shape[0] = 6, p->shape[1] = 4, p->shape[2] = 9, p->storage = 216, p->ngroups = p->nparams = 4, p->residual = 1;
  p->desc.activation = BN_ACTIVATION_RELU;
  NEW("batch-ghost"), bn_norm_desc_init_batch(&p->desc, 3, 1, 1e-5), p->ndim = 3;
  p->shape[0] = 8, p->shape[1] = 3, p->shape[2] = 5, p->storage = 120, p->ngroups = 6, p->nparams = 3;
  p->desc.virtual_batch_size = 4;
  NEW("batch-renorm"), bn_norm_desc_init_batch(&p->desc, 3, 1, 1e-5), p->ndim = 3;
  p->shape[0] = 6, p->shape[1] = 3, p->shape[2] = 7, p->storage = 126, p->ngroups = p->nparams = 3;
  p->desc.flags |= BN_FLAG_RENORM | BN_FLAG_UPDATE_RUNNING_STATS, p->desc.momentum = 0.1, p->desc.rmax = 1.2, p->desc.dmax = 0.3;
  NEW("layer"), bn_norm_desc_init_layer(&p->desc, 3, 1, 1e-5), p->ndim = 3;
  p->shape[0] = 5, p->shape[1] = 20, p->shape[2] = 64, p->storage = 6400, p->ngroups = 100, p->nparams = 64;
  NEW("layer-long-rows"), bn_norm_desc_init_layer(&p->desc, 2, 1, 1e-5), p->ndim = 2;
  p->shape[0] = 3, p->shape[1] = 5000, p->storage = 15000, p->ngroups = 3, p->nparams = 5000;
  NEW("rms"), bn_norm_desc_init_rms(&p->desc, 2, 1, 1e-6), p->ndim = 2;
  p->shape[0] = 16, p->shape[1] = 48, p->storage = 768, p->ngroups = 16, p->nparams = 48;
  NEW("group"), bn_norm_desc_init_group(&p->desc, 4, 2, 1e-5), p->ndim = 4;
  p->shape[0] = 3, p->shape[1] = 6, p->shape[2] = 4, p->shape[3] = 5, p->storage = 360, p->ngroups = 6, p->nparams = 6;
  NEW("instance-strided"), bn_norm_desc_init_instance(&p->desc, 3, 1e-5), p->ndim = 3;
  p->shape[0] = 7, p->shape[1] = 9, p->shape[2] = 10, p->strides = tr, p->storage = 630, p->ngroups = 63, p->nparams = 9;
  const DLDataType dts[4] = {{kDLFloat, 32, 1}, {kDLFloat, 64, 1}, {kDLFloat, 16, 1}, {kDLBfloat, 16, 1}};
  for (int i = 0; i < np_; i++)
    for (int d = 0; d < 4; d++) run(&P[i], dts[d]);
  steps(dts[0]), steps(dts[1]);
  printf("cuda emulation: %d checks, %d failures\n", checks, failures);
  return failures != 0;
}
