/*
 * One batch-norm training step through bncore's C ABI on a malloc'ed NCHW
 * tensor: forward in training mode (updating the running statistics), backward,
 * an SGD step on weight and bias; every number checked against a plain C
 * double-precision reference. Exit status 0 when all agree.
 *
 * Build against an installed wheel:
 *   cc train_step.c $(python -m bncore --cflags) $(python -m bncore --libs) -lm -o train_step
 * or with CMake (see CMakeLists.txt beside this file).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <bncore/bncore.h>

enum { N = 8, C = 4, H = 5, W = 6, HW = H * W, COUNT = N * C * HW };

static DLTensor tensor(float *data, int32_t ndim, int64_t *shape) {
  DLTensor t = {.data = data, .device = {kDLCPU, 0}, .ndim = ndim, .dtype = {kDLFloat, 32, 1}, .shape = shape,
                .strides = NULL, .byte_offset = 0};
  return t;
}

static int check(bn_status_t st, const char *what) {
  if (st == BN_STATUS_SUCCESS) return 0;
  fprintf(stderr, "%s failed: %s (%s)\n", what, bn_status_string(st), bn_last_error());
  return 1;
}

static double worst = 0.0;
static void compare(const char *what, const float *got, const double *want, int n) {
  double err = 0.0;
  for (int i = 0; i < n; i++) err = fmax(err, fabs(got[i] - want[i]) / (1.0 + fabs(want[i])));
  printf("  %-14s max relative difference %.2e\n", what, err);
  worst = fmax(worst, err);
}

int main(void) {
  float *x = malloc(sizeof(float) * COUNT), *y = malloc(sizeof(float) * COUNT);
  float *dy = malloc(sizeof(float) * COUNT), *dx = malloc(sizeof(float) * COUNT);
  float weight[C], bias[C], rmean[C], rvar[C], mean[C], rstd[C], dweight[C], dbias[C];
  double *ry = malloc(sizeof(double) * COUNT), *rdx = malloc(sizeof(double) * COUNT);
  double rm[C], rv[C], rdw[C], rdb[C];
  if (!x || !y || !dy || !dx || !ry || !rdx) return 1;
  srand(7);
  for (int i = 0; i < COUNT; i++) {
    x[i] = 3.0f + 2.0f * ((float)rand() / RAND_MAX - 0.5f) * (float)(1 + i % C);
    dy[i] = (float)rand() / RAND_MAX - 0.5f;
  }
  for (int c = 0; c < C; c++) weight[c] = 1.0f + 0.1f * c, bias[c] = 0.05f * c, rmean[c] = 0.0f, rvar[c] = 1.0f;

  /* --- bncore: forward (training, momentum 0.1), backward, SGD */
  int64_t shape[4] = {N, C, H, W}, cshape[1] = {C};
  DLTensor tx = tensor(x, 4, shape), ty = tensor(y, 4, shape), tdy = tensor(dy, 4, shape), tdx = tensor(dx, 4, shape);
  DLTensor tw = tensor(weight, 1, cshape), tb = tensor(bias, 1, cshape), trm = tensor(rmean, 1, cshape),
           trv = tensor(rvar, 1, cshape), tm = tensor(mean, 1, cshape), tr = tensor(rstd, 1, cshape),
           tdw = tensor(dweight, 1, cshape), tdb = tensor(dbias, 1, cshape);
  bn_norm_desc_t desc;
  if (check(bn_norm_desc_init_batch(&desc, 4, 1, 1e-5), "bn_norm_desc_init_batch")) return 1;
  desc.flags = BN_FLAG_UPDATE_RUNNING_STATS;
  desc.momentum = 0.1;
  if (check(bn_norm_forward(NULL, &desc, &tx, &tw, &tb, NULL, NULL, 0, &trm, &trv, &ty, &tm, &tr), "bn_norm_forward")) return 1;
  desc.flags = 0;
  if (check(bn_norm_backward(NULL, &desc, &tx, &tdy, &tw, &tm, &tr, &tdx, &tdw, &tdb), "bn_norm_backward")) return 1;

  /* --- the plain reference, in double */
  for (int c = 0; c < C; c++) {
    double sum = 0.0, sq = 0.0, gsum = 0.0, gx = 0.0;
    for (int n = 0; n < N; n++)
      for (int k = 0; k < HW; k++) sum += x[(n * C + c) * HW + k];
    const double mu = sum / (N * HW);
    for (int n = 0; n < N; n++)
      for (int k = 0; k < HW; k++) sq += (x[(n * C + c) * HW + k] - mu) * (x[(n * C + c) * HW + k] - mu);
    const double var = sq / (N * HW), r = 1.0 / sqrt(var + 1e-5);
    rm[c] = 0.9 * 0.0 + 0.1 * mu;
    rv[c] = 0.9 * 1.0 + 0.1 * var * (N * HW) / (N * HW - 1.0);
    for (int n = 0; n < N; n++)
      for (int k = 0; k < HW; k++) {
        const int i = (n * C + c) * HW + k;
        const double xh = (x[i] - mu) * r;
        ry[i] = xh * weight[c] + bias[c];
        gsum += dy[i], gx += dy[i] * xh;
      }
    rdw[c] = gx, rdb[c] = gsum;
    for (int n = 0; n < N; n++)
      for (int k = 0; k < HW; k++) {
        const int i = (n * C + c) * HW + k;
        const double xh = (x[i] - mu) * r;
        rdx[i] = weight[c] * r * (dy[i] - gsum / (N * HW) - xh * gx / (N * HW));
      }
  }
  printf("bncore %s: one training step on a (%d, %d, %d, %d) float32 tensor\n", bn_version_string(), N, C, H, W);
  compare("y", y, ry, COUNT);
  compare("running_mean", rmean, rm, C);
  compare("running_var", rvar, rv, C);
  compare("grad_input", dx, rdx, COUNT);
  compare("grad_weight", dweight, rdw, C);
  compare("grad_bias", dbias, rdb, C);
  for (int c = 0; c < C; c++) weight[c] -= 0.1f * dweight[c], bias[c] -= 0.1f * dbias[c];
  printf("  after SGD: weight[0] = %.6f, bias[0] = %.6f\n", weight[0], bias[0]);
  free(x), free(y), free(dy), free(dx), free(ry), free(rdx);
  const int ok = worst < 1e-4;
  printf("%s\n", ok ? "OK: bncore agrees with the reference" : "FAILED: bncore disagrees with the reference");
  return ok ? 0 : 1;
}
