/*
 * The V2 pieces of the ABI: batch renormalization (BN_FLAG_RENORM, save_r / save_d), ghost
 * batch norm (desc.virtual_batch_size), the fused epilogue (desc.activation, the residual of
 * bn_norm_forward_ex) and bn_norm_backward_ex; a 0.2-layout struct (struct_size 64).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bncore/bncore.h"
#include "harness.h"
#include "tensors.h"

#define N 8
#define C 3
#define L 10 /* spatial elements per (sample, channel) */
#define NUMEL (N * C * L)

static int same_bits(const double *a, const double *b, int64_t n) { return memcmp(a, b, (size_t)n * sizeof *a) == 0; }

static DLTensor *x3d(tt_t *tt, double *data, int64_t n) {
  const int64_t shape[3] = {n, C, L};
  return tt_init(tt, data, TT_F64, 3, shape, NULL);
}

static void fill(double *v, int64_t n, uint64_t seed, double scale, double shift) {
  for (int64_t i = 0; i < n; i++) v[i] = scale * (tt_rand(&seed) - 0.5) + shift + 0.3 * (double)((i / L) % C);
}

/* The batch mean and biased variance of channel c over samples [n0, n0 + nn). */
static void channel_moments(const double *x, int64_t n0, int64_t nn, int c, double *mean, double *var) {
  double s = 0, q = 0;
  for (int64_t n = n0; n < n0 + nn; n++)
    for (int l = 0; l < L; l++) s += x[(n * C + c) * L + l];
  *mean = s / (double)(nn * L);
  for (int64_t n = n0; n < n0 + nn; n++)
    for (int l = 0; l < L; l++) {
      const double d = x[(n * C + c) * L + l] - *mean;
      q += d * d;
    }
  *var = q / (double)(nn * L);
}

static double clip(double v, double lo, double hi) { return v < lo ? lo : v > hi ? hi : v; }

SUITE(extensions) {
  double x[NUMEL], y[NUMEL], y2[NUMEL], res[NUMEL], dy[NUMEL], dx[NUMEL], dx2[NUMEL], dres[NUMEL];
  double w[C] = {0.8, 1.3, -0.6}, b[C] = {0.1, -0.4, 0.25};
  fill(x, NUMEL, 1, 4.0, 0.5);
  fill(res, NUMEL, 2, 2.0, 0.0);
  fill(dy, NUMEL, 3, 2.0, 0.0);
  tt_t tx, ty, ty2, tres, tdy, tdx, tdx2, tdres, tw, tb, trm, trv, tsm, tsr, tr, td, tsm2, tsr2;
  DLTensor *X = x3d(&tx, x, N), *Y = x3d(&ty, y, N), *Y2 = x3d(&ty2, y2, N), *R = x3d(&tres, res, N);
  DLTensor *DY = x3d(&tdy, dy, N), *DX = x3d(&tdx, dx, N), *DX2 = x3d(&tdx2, dx2, N), *DR = x3d(&tdres, dres, N);
  DLTensor *W = tt_vec(&tw, w, TT_F64, C), *B = tt_vec(&tb, b, TT_F64, C);

  TEST(renorm_forward_matches_the_formula) {
    double rm[C] = {0.4, 3.0, -1.0}, rv[C] = {6.0, 1.0, 200.0}, rm0[C], rv0[C], sm[C], sr[C], r[C], d[C];
    memcpy(rm0, rm, sizeof rm), memcpy(rv0, rv, sizeof rv);
    bn_norm_desc_t desc;
    CHECK(bn_norm_desc_init_batch(&desc, 3, 1, 1e-5) == BN_STATUS_SUCCESS);
    desc.flags |= BN_FLAG_RENORM | BN_FLAG_UPDATE_RUNNING_STATS;
    desc.momentum = 0.25, desc.rmax = 1.7, desc.dmax = 0.6;
    CHECK(bn_norm_forward_ex(NULL, &desc, X, W, B, NULL, NULL, NULL, 0, tt_vec(&trm, rm, TT_F64, C),
                             tt_vec(&trv, rv, TT_F64, C), Y, tt_vec(&tsm, sm, TT_F64, C), tt_vec(&tsr, sr, TT_F64, C),
                             tt_vec(&tr, r, TT_F64, C), tt_vec(&td, d, TT_F64, C)) == BN_STATUS_SUCCESS);
    for (int c = 0; c < C; c++) {
      double mean, var;
      channel_moments(x, 0, N, c, &mean, &var);
      const double sb = sqrt(var + 1e-5), s = sqrt(rv0[c] + 1e-5);
      const double er = clip(sb / s, 1 / 1.7, 1.7), ed = clip((mean - rm0[c]) / s, -0.6, 0.6);
      CHECK_CLOSE(r[c], er, 1e-12);
      CHECK_CLOSE(d[c], ed, 1e-12);
      CHECK_CLOSE(sm[c], mean, 1e-12);
      CHECK_CLOSE(sr[c], 1 / sb, 1e-12);
      CHECK_CLOSE(rm[c], 0.75 * rm0[c] + 0.25 * mean, 1e-12);
      CHECK_CLOSE(rv[c], 0.75 * rv0[c] + 0.25 * var * (N * L) / (N * L - 1.0), 1e-12);
      for (int64_t n = 0; n < N; n++)
        for (int l = 0; l < L; l++) {
          const int64_t i = (n * C + c) * L + l;
          CHECK_CLOSE(y[i], ((x[i] - mean) / sb * er + ed) * w[c] + b[c], 1e-12);
        }
    }
    /* this data clips some factors and not others */
    CHECK(fabs(r[2] - 1 / 1.7) < 1e-15 || fabs(r[2] - 1.7) < 1e-15);
    CHECK(fabs(d[1]) == 0.6);
    CHECK(r[0] < 1.7 && r[0] > 1 / 1.7);
    CHECK(fabs(d[2]) < 0.6);
  }

  TEST(renorm_with_rmax_1_dmax_0_is_batch_norm_bit_for_bit) {
    double rm[C] = {0.2, 3.0, -1.0}, rv[C] = {0.5, 1.0, 20.0}, rm2[C], rv2[C], sm[C], sr[C], sm2[C], sr2[C], r[C], d[C];
    memcpy(rm2, rm, sizeof rm), memcpy(rv2, rv, sizeof rv);
    double dw[C], db[C], dw2[C], db2[C];
    tt_t tdw, tdb, tdw2, tdb2;
    bn_norm_desc_t desc, plain;
    CHECK(bn_norm_desc_init_batch(&plain, 3, 1, 1e-5) == BN_STATUS_SUCCESS);
    plain.flags |= BN_FLAG_UPDATE_RUNNING_STATS, plain.momentum = 0.1;
    desc = plain;
    desc.flags |= BN_FLAG_RENORM, desc.rmax = 1.0, desc.dmax = 0.0;
    CHECK(bn_norm_forward_ex(NULL, &desc, X, W, B, NULL, NULL, NULL, 0, tt_vec(&trm, rm, TT_F64, C),
                             tt_vec(&trv, rv, TT_F64, C), Y, tt_vec(&tsm, sm, TT_F64, C), tt_vec(&tsr, sr, TT_F64, C),
                             tt_vec(&tr, r, TT_F64, C), tt_vec(&td, d, TT_F64, C)) == BN_STATUS_SUCCESS);
    CHECK(bn_norm_forward(NULL, &plain, X, W, B, NULL, NULL, 0, tt_vec(&trm, rm2, TT_F64, C),
                          tt_vec(&trv, rv2, TT_F64, C), Y2, tt_vec(&tsm2, sm2, TT_F64, C),
                          tt_vec(&tsr2, sr2, TT_F64, C)) == BN_STATUS_SUCCESS);
    CHECK(same_bits(y, y2, NUMEL) && same_bits(sm, sm2, C) && same_bits(sr, sr2, C));
    CHECK(same_bits(rm, rm2, C) && same_bits(rv, rv2, C));
    for (int c = 0; c < C; c++) CHECK(r[c] == 1.0 && d[c] == 0.0);
    /* backward: RENORM with r = 1, d = 0 is batch norm's */
    CHECK(bn_norm_backward_ex(NULL, &desc, X, DY, W, &tsm.t, &tsr.t, NULL, &tr.t, &td.t, DX, tt_vec(&tdw, dw, TT_F64, C),
                              tt_vec(&tdb, db, TT_F64, C), NULL) == BN_STATUS_SUCCESS);
    CHECK(bn_norm_backward(NULL, &plain, X, DY, W, &tsm2.t, &tsr2.t, DX2, tt_vec(&tdw2, dw2, TT_F64, C),
                           tt_vec(&tdb2, db2, TT_F64, C)) == BN_STATUS_SUCCESS);
    CHECK(same_bits(dx, dx2, NUMEL) && same_bits(dw, dw2, C) && same_bits(db, db2, C));
  }

  TEST(renorm_backward_is_batch_norm_backward_with_weight_times_r) {
    double sm[C], sr[C], r[C] = {1.5, 0.7, 1.1}, d[C] = {0.3, -0.2, 0.0}, wr[C], dw[C], db[C], dw2[C], db2[C];
    tt_t tdw, tdb, tdw2, tdb2, twr;
    bn_norm_desc_t desc, plain;
    CHECK(bn_norm_desc_init_batch(&plain, 3, 1, 1e-5) == BN_STATUS_SUCCESS);
    CHECK(bn_norm_forward(NULL, &plain, X, W, B, NULL, NULL, 0, NULL, NULL, Y, tt_vec(&tsm, sm, TT_F64, C),
                          tt_vec(&tsr, sr, TT_F64, C)) == BN_STATUS_SUCCESS);
    desc = plain;
    desc.flags |= BN_FLAG_RENORM, desc.rmax = 2.0, desc.dmax = 1.0;
    CHECK(bn_norm_backward_ex(NULL, &desc, X, DY, W, &tsm.t, &tsr.t, NULL, tt_vec(&tr, r, TT_F64, C),
                              tt_vec(&td, d, TT_F64, C), DX, tt_vec(&tdw, dw, TT_F64, C), tt_vec(&tdb, db, TT_F64, C),
                              NULL) == BN_STATUS_SUCCESS);
    for (int c = 0; c < C; c++) wr[c] = w[c] * r[c];
    CHECK(bn_norm_backward(NULL, &plain, X, DY, tt_vec(&twr, wr, TT_F64, C), &tsm.t, &tsr.t, DX2,
                           tt_vec(&tdw2, dw2, TT_F64, C), tt_vec(&tdb2, db2, TT_F64, C)) == BN_STATUS_SUCCESS);
    CHECK(same_bits(dx, dx2, NUMEL) && same_bits(db, db2, C));
    /* dw2 = sum(dy * xhat) (the weight does not enter it): dweight = r * dw2 + d * db */
    for (int c = 0; c < C; c++) CHECK_CLOSE(dw[c], r[c] * dw2[c] + d[c] * db2[c], 1e-12);
    /* the plain backward refuses RENORM: it has no r and d */
    CHECK(bn_norm_backward(NULL, &desc, X, DY, W, &tsm.t, &tsr.t, DX2, NULL, NULL) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "bn_norm_backward_ex") != NULL);
    CHECK(bn_norm_backward_ex(NULL, &desc, X, DY, W, &tsm.t, &tsr.t, NULL, NULL, &td.t, DX, NULL, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "save_r") != NULL);
  }

  TEST(ghost_batch_norm_is_batch_norm_per_virtual_batch) {
    const int64_t V = 2;
    double sm[N / 2 * C], sr[N / 2 * C], rm[C] = {0, 0, 0}, rv[C] = {1, 1, 1};
    bn_norm_desc_t desc;
    CHECK(bn_norm_desc_init_batch(&desc, 3, 1, 1e-5) == BN_STATUS_SUCCESS);
    desc.virtual_batch_size = V;
    desc.flags |= BN_FLAG_UPDATE_RUNNING_STATS, desc.momentum = 1.0;
    tt_t tsmg, tsrg;
    CHECK(bn_norm_forward(NULL, &desc, X, W, B, NULL, NULL, 0, tt_vec(&trm, rm, TT_F64, C), tt_vec(&trv, rv, TT_F64, C),
                          Y, tt_vec(&tsmg, sm, TT_F64, N / V * C), tt_vec(&tsrg, sr, TT_F64, N / V * C)) ==
          BN_STATUS_SUCCESS);
    double mean_of_means[C] = {0}, mean_of_vars[C] = {0};
    for (int64_t k = 0; k < N / V; k++)
      for (int c = 0; c < C; c++) {
        double mean, var;
        channel_moments(x, k * V, V, c, &mean, &var);
        CHECK_CLOSE(sm[k * C + c], mean, 1e-12);
        CHECK_CLOSE(sr[k * C + c], 1 / sqrt(var + 1e-5), 1e-10);
        mean_of_means[c] += mean / (double)(N / V);
        mean_of_vars[c] += var * (V * L) / (V * L - 1.0) / (double)(N / V);
        for (int64_t n = k * V; n < (k + 1) * V; n++)
          for (int l = 0; l < L; l++) {
            const int64_t i = (n * C + c) * L + l;
            CHECK_CLOSE(y[i], (x[i] - mean) / sqrt(var + 1e-5) * w[c] + b[c], 1e-11);
          }
      }
    for (int c = 0; c < C; c++) {
      CHECK_CLOSE(rm[c], mean_of_means[c], 1e-12);
      CHECK_CLOSE(rv[c], mean_of_vars[c], 1e-12);
    }
    /* the backward of one call: dx of each chunk is the chunk's own batch-norm backward */
    CHECK(bn_norm_backward(NULL, &desc, X, DY, W, &tsmg.t, &tsrg.t, DX, NULL, NULL) == BN_STATUS_SUCCESS);
    bn_norm_desc_t plain;
    CHECK(bn_norm_desc_init_batch(&plain, 3, 1, 1e-5) == BN_STATUS_SUCCESS);
    for (int64_t k = 0; k < N / V; k++) {
      tt_t cx, cy, cdy, cdx, csm, csr;
      double msm[C], msr[C];
      DLTensor *CX = x3d(&cx, x + k * V * C * L, V), *CDY = x3d(&cdy, dy + k * V * C * L, V);
      DLTensor *CDX = x3d(&cdx, dx2 + k * V * C * L, V);
      CHECK(bn_norm_forward(NULL, &plain, CX, W, B, NULL, NULL, 0, NULL, NULL, x3d(&cy, y2, V),
                            tt_vec(&csm, msm, TT_F64, C), tt_vec(&csr, msr, TT_F64, C)) == BN_STATUS_SUCCESS);
      CHECK(bn_norm_backward(NULL, &plain, CX, CDY, W, &csm.t, &csr.t, CDX, NULL, NULL) == BN_STATUS_SUCCESS);
    }
    for (int64_t i = 0; i < NUMEL; i++) CHECK_CLOSE(dx[i], dx2[i], 1e-11);
    /* a batch that is not a multiple: SHAPE_MISMATCH naming both numbers, running statistics untouched */
    double rm0[C];
    memcpy(rm0, rm, sizeof rm);
    desc.virtual_batch_size = 3;
    CHECK(bn_norm_forward(NULL, &desc, X, W, B, NULL, NULL, 0, &trm.t, &trv.t, Y, NULL, NULL) ==
          BN_STATUS_SHAPE_MISMATCH);
    CHECK(strstr(bn_last_error(), "8") != NULL && strstr(bn_last_error(), "3") != NULL);
    CHECK(same_bits(rm, rm0, C));
    /* RENORM needs one group per channel */
    desc.virtual_batch_size = V, desc.flags |= BN_FLAG_RENORM, desc.rmax = 2.0, desc.dmax = 1.0;
    CHECK(bn_norm_forward(NULL, &desc, X, W, B, NULL, NULL, 0, &trm.t, &trv.t, Y, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    CHECK(same_bits(rm, rm0, C));
  }

  TEST(relu_and_residual_epilogue) {
    double sm[C], sr[C], dw[C], db[C], dw2[C], db2[C], g[NUMEL];
    tt_t tdw, tdb, tdw2, tdb2, tg;
    bn_norm_desc_t plain, desc;
    CHECK(bn_norm_desc_init_batch(&plain, 3, 1, 1e-5) == BN_STATUS_SUCCESS);
    desc = plain;
    desc.activation = BN_ACTIVATION_RELU;
    CHECK(bn_norm_forward(NULL, &plain, X, W, B, NULL, NULL, 0, NULL, NULL, Y2, NULL, NULL) == BN_STATUS_SUCCESS);
    CHECK(bn_norm_forward_ex(NULL, &desc, X, W, B, R, NULL, NULL, 0, NULL, NULL, Y, tt_vec(&tsm, sm, TT_F64, C),
                             tt_vec(&tsr, sr, TT_F64, C), NULL, NULL) == BN_STATUS_SUCCESS);
    int zeros = 0, positives = 0;
    for (int64_t i = 0; i < NUMEL; i++) {
      const double v = y2[i] + res[i];
      CHECK(y[i] == (v < 0 ? 0.0 : v)); /* the same double operations: bit for bit */
      zeros += y[i] == 0.0, positives += y[i] > 0.0;
    }
    CHECK(zeros > 0 && positives > 0);
    /* the backward: dresidual = dy where y > 0; dx, dw, db are batch norm's of that */
    CHECK(bn_norm_backward_ex(NULL, &desc, X, DY, W, &tsm.t, &tsr.t, Y, NULL, NULL, DX, tt_vec(&tdw, dw, TT_F64, C),
                              tt_vec(&tdb, db, TT_F64, C), DR) == BN_STATUS_SUCCESS);
    for (int64_t i = 0; i < NUMEL; i++) {
      g[i] = y[i] > 0 ? dy[i] : 0.0;
      CHECK(dres[i] == g[i]);
    }
    CHECK(bn_norm_backward(NULL, &plain, X, x3d(&tg, g, N), W, &tsm.t, &tsr.t, DX2, tt_vec(&tdw2, dw2, TT_F64, C),
                           tt_vec(&tdb2, db2, TT_F64, C)) == BN_STATUS_SUCCESS);
    CHECK(same_bits(dx, dx2, NUMEL) && same_bits(dw, dw2, C) && same_bits(db, db2, C));
    /* without dresidual the mask goes to a workspace: the same dx */
    CHECK(bn_norm_backward_ex(NULL, &desc, X, DY, W, &tsm.t, &tsr.t, Y, NULL, NULL, DX, NULL, NULL, NULL) ==
          BN_STATUS_SUCCESS);
    CHECK(same_bits(dx, dx2, NUMEL));
    /* dx may be dy itself */
    double dyc[NUMEL];
    memcpy(dyc, dy, sizeof dy);
    tt_t tdyc;
    DLTensor *DYC = x3d(&tdyc, dyc, N);
    CHECK(bn_norm_backward_ex(NULL, &desc, X, DYC, W, &tsm.t, &tsr.t, Y, NULL, NULL, DYC, NULL, NULL, NULL) ==
          BN_STATUS_SUCCESS);
    CHECK(same_bits(dyc, dx2, NUMEL));
    /* y is required with a ReLU; the plain backward refuses the activation */
    CHECK(bn_norm_backward_ex(NULL, &desc, X, DY, W, &tsm.t, &tsr.t, NULL, NULL, NULL, DX, NULL, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "y") != NULL);
    CHECK(bn_norm_backward(NULL, &desc, X, DY, W, &tsm.t, &tsr.t, DX, NULL, NULL) == BN_STATUS_INVALID_ARGUMENT);
    /* the residual: x's shape, and no sharing with y */
    tt_t tshort;
    CHECK(bn_norm_forward_ex(NULL, &desc, X, W, B, x3d(&tshort, res, N - 1), NULL, NULL, 0, NULL, NULL, Y, NULL, NULL,
                             NULL, NULL) == BN_STATUS_SHAPE_MISMATCH);
    CHECK(strstr(bn_last_error(), "residual") != NULL);
    CHECK(bn_norm_forward_ex(NULL, &desc, X, W, B, Y, NULL, NULL, 0, NULL, NULL, Y, NULL, NULL, NULL, NULL) ==
          BN_STATUS_OVERLAP);
    desc.activation = BN_ACTIVATION_COUNT;
    CHECK(bn_norm_forward(NULL, &desc, X, W, B, NULL, NULL, 0, NULL, NULL, Y, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "activation") != NULL);
  }

  TEST(a_0_2_layout_struct_reads_the_v2_fields_as_zero) {
    CHECK(BN_NORM_DESC_SIZE_V1 == 64 && BN_NORM_DESC_SIZE_V2 == sizeof(bn_norm_desc_t));
    bn_norm_desc_t desc;
    CHECK(bn_norm_desc_init_batch(&desc, 3, 1, 1e-5) == BN_STATUS_SUCCESS);
    CHECK(desc.struct_size == BN_NORM_DESC_SIZE_V2);
    CHECK(bn_norm_forward(NULL, &desc, X, W, B, NULL, NULL, 0, NULL, NULL, Y2, NULL, NULL) == BN_STATUS_SUCCESS);
    /* V2 fields beyond a V1 struct_size are not read: garbage there changes nothing */
    desc.struct_size = BN_NORM_DESC_SIZE_V1;
    desc.virtual_batch_size = 3, desc.activation = 77, desc.reserved3 = 5;
    CHECK(bn_norm_forward(NULL, &desc, X, W, B, NULL, NULL, 0, NULL, NULL, Y, NULL, NULL) == BN_STATUS_SUCCESS);
    CHECK(same_bits(y, y2, NUMEL));
    desc.flags |= BN_FLAG_RENORM; /* rmax reads as 0 */
    CHECK(bn_norm_forward(NULL, &desc, X, W, B, NULL, NULL, 0, NULL, NULL, Y, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "rmax") != NULL);
  }
}
