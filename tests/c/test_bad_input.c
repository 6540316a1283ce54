/*
 * Inputs the library must refuse: the right status, a message naming the
 * argument, and running statistics left bit for bit as they were.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "bncore/bncore.h"
#include "harness.h"
#include "tensors.h"

enum { N = 2, C = 3, H = 4, W = 5, NUMEL = N * C * H * W };

/* A valid training batch-norm call (running statistics updated) that each test breaks in one way. */
typedef struct fx_t {
  float mem[3 * NUMEL]; /* x at mem, y at mem + NUMEL + ..., room for overlapping views */
  float w[C + 1], b[C + 1], rm[C + 1], rv[C + 1], sm[C], sr[C];
  float rm0[C + 1], rv0[C + 1];
  int64_t shape[4];
  tt_t x, y, tw, tb, trm, trv, tsm, tsr;
  DLTensor *X, *Y, *W_, *B_, *RM, *RV, *SM, *SR;
  bn_norm_desc_t desc;
  const bn_norm_desc_t *D;
} fx_t;

static void fx_init(fx_t *f) {
  memset(f, 0, sizeof *f);
  f->shape[0] = N, f->shape[1] = C, f->shape[2] = H, f->shape[3] = W;
  uint64_t seed = 3;
  for (int i = 0; i < 3 * NUMEL; i++) f->mem[i] = (float)tt_rand(&seed);
  for (int c = 0; c < C + 1; c++) {
    f->w[c] = 1.0f + 0.5f * (float)c, f->b[c] = 0.25f * (float)c;
    f->rm[c] = f->rm0[c] = 0.125f * (float)c + 0.1f;
    f->rv[c] = f->rv0[c] = 1.0f + 0.3f * (float)c;
  }
  f->X = tt_init(&f->x, f->mem, TT_F32, 4, f->shape, NULL);
  f->Y = tt_init(&f->y, f->mem + 2 * NUMEL, TT_F32, 4, f->shape, NULL);
  f->W_ = tt_vec(&f->tw, f->w, TT_F32, C);
  f->B_ = tt_vec(&f->tb, f->b, TT_F32, C);
  f->RM = tt_vec(&f->trm, f->rm, TT_F32, C);
  f->RV = tt_vec(&f->trv, f->rv, TT_F32, C);
  f->SM = tt_vec(&f->tsm, f->sm, TT_F32, C);
  f->SR = tt_vec(&f->tsr, f->sr, TT_F32, C);
  bn_norm_desc_init_batch(&f->desc, 4, 1, 1e-5);
  f->desc.flags = BN_FLAG_UPDATE_RUNNING_STATS;
  f->desc.momentum = 0.1;
  f->D = &f->desc;
}

static bn_status_t fx_forward(fx_t *f) {
  return bn_norm_forward(NULL, f->D, f->X, f->W_, f->B_, NULL, NULL, 0, f->RM, f->RV, f->Y, f->SM, f->SR);
}

static int stats_unchanged(const fx_t *f) {
  return memcmp(f->rm, f->rm0, sizeof f->rm) == 0 && memcmp(f->rv, f->rv0, sizeof f->rv) == 0;
}

/* The call fails with `want`, its message contains `names`, and the running statistics
 * (given to every failing call here) are bit for bit as before. */
static void expect_forward_fails(fx_t *f, bn_status_t want, const char *names, int line) {
  const bn_status_t st = fx_forward(f);
  if (!CHECK(st == want))
    fprintf(stderr, "  line %d: got %s (%s), want %s\n", line, bn_status_string(st), bn_last_error(),
            bn_status_string(want));
  if (!CHECK(strstr(bn_last_error(), names) != NULL))
    fprintf(stderr, "  line %d: message \"%s\" does not name \"%s\"\n", line, bn_last_error(), names);
  if (!CHECK(stats_unchanged(f))) fprintf(stderr, "  line %d: running statistics changed by a failing call\n", line);
}
#define EXPECT_FAIL(f, want, names) expect_forward_fails((f), (want), (names), __LINE__)

SUITE(bad_input) {
  fx_t f;

  TEST(the_fixture_is_valid) {
    fx_init(&f);
    bn_status_t st = fx_forward(&f);
    if (!CHECK(st == BN_STATUS_SUCCESS)) fprintf(stderr, "  %s\n", bn_last_error());
    CHECK(!stats_unchanged(&f)); /* a successful update does change them */
  }

  TEST(null_pointers) {
    fx_init(&f), f.D = NULL;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "desc");
    fx_init(&f), f.X = NULL;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "x");
    fx_init(&f), f.Y = NULL;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "y");
    fx_init(&f), f.RV = NULL;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "running_var");
    fx_init(&f), f.RM = NULL;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "running_mean");
    fx_init(&f), f.x.t.data = NULL;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "x");
    fx_init(&f), f.x.t.shape = NULL;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "x");
  }

  TEST(unknown_flag_bits) {
    const uint32_t bad[] = {BN_FLAG_ALL + 1u, 1u << 7, 1u << 31, ~0u};
    for (int i = 0; i < 4; i++) {
      fx_init(&f), f.desc.flags |= bad[i];
      EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "flags");
    }
  }

  TEST(bad_eps) {
    const double bad[] = {-1e-5, -1.0, NAN, INFINITY, -INFINITY};
    for (int i = 0; i < 5; i++) {
      fx_init(&f), f.desc.eps = bad[i];
      EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "eps");
    }
    bn_norm_desc_t d;
    CHECK(bn_norm_desc_init_batch(&d, 4, 1, -1.0) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_batch(&d, 4, 1, NAN) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "eps") != NULL);
  }

  TEST(bad_dtypes) {
    fx_init(&f), f.x.t.dtype = TT_I32, f.y.t.dtype = TT_I32;
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DTYPE, "x");
    fx_init(&f), f.x.t.dtype = TT_I32;
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DTYPE, "x");
    fx_init(&f), f.y.t.dtype = TT_I32;
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DTYPE, "y");
    fx_init(&f), f.y.t.dtype = TT_F64; /* float, but not x's dtype */
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DTYPE, "y");
    fx_init(&f), f.x.t.dtype.lanes = 2, f.y.t.dtype.lanes = 2;
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DTYPE, "x");
    fx_init(&f), f.x.t.dtype.code = kDLComplex, f.x.t.dtype.bits = 64;
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DTYPE, "x");
    fx_init(&f), f.x.t.dtype.code = 200; /* not a DLPack code at all */
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DTYPE, "x");
    fx_init(&f), f.tw.t.dtype = TT_I32;
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DTYPE, "weight");
    fx_init(&f), f.trv.t.dtype = TT_I32;
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DTYPE, "running_var");
  }

  TEST(cuda_device) {
    int32_t devices = 0;
    CHECK(bn_cuda_device_count(&devices) == BN_STATUS_SUCCESS);
    if (devices == 0) { /* with a device, x and y labelled cuda would reach its kernels with host pointers */
      fx_init(&f), f.x.t.device.device_type = kDLCUDA, f.y.t.device.device_type = kDLCUDA;
      EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DEVICE, "x");
    }
    fx_init(&f), f.x.t.device.device_type = kDLCUDA;
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DEVICE, "x");
    fx_init(&f), f.y.t.device.device_type = kDLCUDA;
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DEVICE, "y");
    fx_init(&f), f.tw.t.device.device_type = kDLCUDA;
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DEVICE, "weight");
    fx_init(&f), f.trm.t.device.device_type = kDLCUDA;
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DEVICE, "running_mean");
    fx_init(&f), f.x.t.device.device_type = kDLROCM;
    EXPECT_FAIL(&f, BN_STATUS_UNSUPPORTED_DEVICE, "x");
  }

  TEST(wrong_parameter_lengths) {
    fx_init(&f), f.tw.shape[0] = C - 1;
    EXPECT_FAIL(&f, BN_STATUS_SHAPE_MISMATCH, "weight");
    fx_init(&f), f.tw.shape[0] = C + 1;
    EXPECT_FAIL(&f, BN_STATUS_SHAPE_MISMATCH, "weight");
    fx_init(&f), f.tb.shape[0] = C + 1;
    EXPECT_FAIL(&f, BN_STATUS_SHAPE_MISMATCH, "bias");
    fx_init(&f), f.trm.shape[0] = C + 1;
    EXPECT_FAIL(&f, BN_STATUS_SHAPE_MISMATCH, "running_mean");
    fx_init(&f), f.trv.shape[0] = C - 1;
    EXPECT_FAIL(&f, BN_STATUS_SHAPE_MISMATCH, "running_var");
    fx_init(&f), f.tsm.shape[0] = C - 1;
    EXPECT_FAIL(&f, BN_STATUS_SHAPE_MISMATCH, "save_mean");
  }

  TEST(shape_mismatch_between_x_and_y) {
    fx_init(&f), f.y.shape[3] = W - 1;
    EXPECT_FAIL(&f, BN_STATUS_SHAPE_MISMATCH, "y");
    fx_init(&f), f.y.t.ndim = 3;
    EXPECT_FAIL(&f, BN_STATUS_SHAPE_MISMATCH, "y");
  }

  TEST(bad_shapes) {
    fx_init(&f), f.x.shape[2] = -1, f.y.shape[2] = -1;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "x");
    fx_init(&f), f.x.t.ndim = BN_MAX_NDIM + 1;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "x");
    fx_init(&f), f.x.t.ndim = -1;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "x");
  }

  TEST(partial_overlap_of_y_and_x) {
    fx_init(&f), f.y.t.data = f.mem + 1; /* y shifted by one element over x */
    EXPECT_FAIL(&f, BN_STATUS_OVERLAP, "y");
    fx_init(&f), f.y.t.data = f.mem + NUMEL - 1; /* a single shared element */
    EXPECT_FAIL(&f, BN_STATUS_OVERLAP, "y");
    fx_init(&f), f.y.t.data = f.mem, f.y.t.byte_offset = 2; /* misaligned by half an element: refused first */
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "aligned");
    /* the same memory read in another layout (x NCHW, y NHWC) */
    int64_t nhwc[4] = {H * W * C, 1, W * C, C};
    fx_init(&f), f.y.t.data = f.mem, f.y.t.strides = nhwc;
    EXPECT_FAIL(&f, BN_STATUS_OVERLAP, "y");
    /* y right after x is fine, and y exactly x is in place */
    fx_init(&f), f.y.t.data = f.mem + NUMEL;
    CHECK(fx_forward(&f) == BN_STATUS_SUCCESS);
    fx_init(&f), f.Y = f.X;
    CHECK(fx_forward(&f) == BN_STATUS_SUCCESS);
  }

  TEST(running_statistics_overlapping_outputs) {
    fx_init(&f), f.trm.t.data = f.sm; /* running_mean is save_mean */
    f.desc.flags = BN_FLAG_UPDATE_RUNNING_STATS;
    memcpy(f.sm, f.rm, sizeof f.sm);
    bn_status_t st = fx_forward(&f);
    CHECK(st == BN_STATUS_OVERLAP);
    CHECK(memcmp(f.sm, f.rm0, sizeof f.sm) == 0);
    CHECK(memcmp(f.rv, f.rv0, sizeof f.rv) == 0);
    fx_init(&f), f.trv.t.data = f.mem + 2 * NUMEL + 5; /* running_var inside y */
    memcpy(f.mem + 2 * NUMEL + 5, f.rv0, sizeof(float) * C);
    st = fx_forward(&f);
    CHECK(st == BN_STATUS_OVERLAP);
    CHECK(strstr(bn_last_error(), "running_var") != NULL);
  }

  /* bncore.h: OVERLAP is "an output partly overlaps an input". save_mean / save_rstd
   * (forward) and grad_weight / grad_bias (backward) are outputs; x and dy are inputs. */
  TEST(saved_statistics_overlapping_x) {
    float before[NUMEL];
    fx_init(&f), f.tsm.t.data = f.mem + 7;
    memcpy(before, f.mem, sizeof before);
    EXPECT_FAIL(&f, BN_STATUS_OVERLAP, "save_mean");
    if (!CHECK(memcmp(before, f.mem, sizeof before) == 0)) fprintf(stderr, "  x was overwritten through save_mean\n");
    fx_init(&f), f.tsr.t.data = f.mem + NUMEL - 2; /* straddles x's last element */
    memcpy(before, f.mem, sizeof before);
    EXPECT_FAIL(&f, BN_STATUS_OVERLAP, "save_rstd");
    if (!CHECK(memcmp(before, f.mem, sizeof before) == 0)) fprintf(stderr, "  x was overwritten through save_rstd\n");
  }

  TEST(parameter_gradients_overlapping_x_or_dy) {
    fx_init(&f);
    CHECK(fx_forward(&f) == BN_STATUS_SUCCESS);
    float dys[NUMEL], dxs[NUMEL], db[C], before_x[NUMEL], before_dy[NUMEL];
    for (int i = 0; i < NUMEL; i++) dys[i] = 0.01f * (float)i;
    tt_t dy, dx, tdw, tdb;
    DLTensor *DY = tt_init(&dy, dys, TT_F32, 4, f.shape, NULL), *DX = tt_init(&dx, dxs, TT_F32, 4, f.shape, NULL);
    DLTensor *DW = tt_vec(&tdw, f.mem + 10, TT_F32, C), *DB = tt_vec(&tdb, db, TT_F32, C); /* grad_weight inside x */
    memcpy(before_x, f.mem, sizeof before_x);
    bn_status_t st = bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, f.SM, f.SR, DX, DW, DB);
    if (!CHECK(st == BN_STATUS_OVERLAP)) fprintf(stderr, "  grad_weight inside x: got %s\n", bn_status_string(st));
    CHECK(memcmp(before_x, f.mem, sizeof before_x) == 0);
    tdw.t.data = f.w, tdb.t.data = dys + 20; /* grad_bias inside dy */
    memcpy(before_dy, dys, sizeof before_dy);
    st = bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, f.SM, f.SR, DX, DW, DB);
    if (!CHECK(st == BN_STATUS_OVERLAP)) fprintf(stderr, "  grad_bias inside grad_output: got %s\n", bn_status_string(st));
    CHECK(memcmp(before_dy, dys, sizeof before_dy) == 0);
  }

  TEST(batch_desc_needs_two_dims) {
    /* bncore.h: "batch: statistics over every axis but channel_axis ... ndim >= 2" */
    bn_norm_desc_t d;
    bn_status_t st = bn_norm_desc_init_batch(&d, 1, 0, 1e-5);
    if (!CHECK(st == BN_STATUS_INVALID_ARGUMENT))
      fprintf(stderr, "  bn_norm_desc_init_batch(ndim 1): got %s\n", bn_status_string(st));
    CHECK(bn_norm_desc_init_batch(&d, 2, 1, 1e-5) == BN_STATUS_SUCCESS);
  }

  TEST(use_and_update_together) {
    fx_init(&f), f.desc.flags = BN_FLAG_USE_RUNNING_STATS | BN_FLAG_UPDATE_RUNNING_STATS;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "flags");
    fx_init(&f), f.desc.flags = BN_FLAG_RMS | BN_FLAG_UPDATE_RUNNING_STATS;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "flags");
  }

  TEST(bad_momentum_with_update) {
    const double bad[] = {1.5, -0.1, NAN, INFINITY};
    for (int i = 0; i < 4; i++) {
      fx_init(&f), f.desc.momentum = bad[i];
      EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "momentum");
    }
    /* without UPDATE the momentum is unused */
    fx_init(&f), f.desc.flags = 0, f.desc.momentum = 1.5;
    CHECK(fx_forward(&f) == BN_STATUS_SUCCESS);
    CHECK(stats_unchanged(&f));
  }

  TEST(bad_description_fields) {
    fx_init(&f), f.desc.reserved = 1;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "reserved");
    fx_init(&f), f.desc.reduce_axes |= 1ull << 4;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "reduce_axes");
    fx_init(&f), f.desc.param_axes = 1ull << 63;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "param_axes");
    fx_init(&f), f.desc.split_axis = 4;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "split_axis");
    fx_init(&f), f.desc.split_axis = -2;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "split_axis");
    fx_init(&f), f.desc.split_axis = 0; /* axis 0 is reduced in batch norm */
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "split_axis");
    fx_init(&f), f.desc.split_axis = 1, f.desc.num_groups = 2; /* 2 does not divide 3 channels */
    EXPECT_FAIL(&f, BN_STATUS_SHAPE_MISMATCH, "num_groups");
    fx_init(&f), f.desc.split_axis = 1, f.desc.num_groups = 0;
    EXPECT_FAIL(&f, BN_STATUS_SHAPE_MISMATCH, "num_groups");
    /* running statistics need parameter axes that are not reduced */
    fx_init(&f), f.desc.param_axes = 1ull << 2, f.tw.shape[0] = H, f.tb.shape[0] = H, f.trm.shape[0] = H,
                 f.trv.shape[0] = H, f.SM = f.SR = NULL;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "running");
  }

  TEST(one_value_per_group_cannot_update_unbiased_variance) {
    fx_init(&f), f.x.shape[0] = f.y.shape[0] = 1, f.x.shape[2] = f.y.shape[2] = 1, f.x.shape[3] = f.y.shape[3] = 1;
    EXPECT_FAIL(&f, BN_STATUS_INVALID_ARGUMENT, "x");
    fx_init(&f), f.x.shape[0] = f.y.shape[0] = 1, f.x.shape[2] = f.y.shape[2] = 1, f.x.shape[3] = f.y.shape[3] = 1;
    f.desc.flags |= BN_FLAG_RUNNING_VAR_BIASED;
    CHECK(fx_forward(&f) == BN_STATUS_SUCCESS);
  }

  TEST(desc_initializers) {
    bn_norm_desc_t d;
    CHECK(bn_norm_desc_init_batch(NULL, 4, 1, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_batch(&d, 0, 0, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_batch(&d, BN_MAX_NDIM + 1, 1, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_batch(&d, 4, 4, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_batch(&d, 4, -5, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_batch(&d, 4, -1, 1e-5) == BN_STATUS_SUCCESS);
    CHECK(d.param_axes == (1u << 3) && d.reduce_axes == 7u);
    CHECK(bn_norm_desc_init_layer(&d, 3, 0, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_layer(&d, 3, 4, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_instance(&d, 2, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_group(&d, 4, 0, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_group(&d, 4, -3, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_desc_init_rms(&d, 3, 1, INFINITY) == BN_STATUS_INVALID_ARGUMENT);
  }

  TEST(backward_bad_inputs) {
    fx_init(&f);
    CHECK(fx_forward(&f) == BN_STATUS_SUCCESS);
    float dys[NUMEL], dxs[3 * NUMEL], dw[C], db[C];
    for (int i = 0; i < NUMEL; i++) dys[i] = 0.01f * (float)i;
    tt_t dy, dx, tdw, tdb;
    DLTensor *DY = tt_init(&dy, dys, TT_F32, 4, f.shape, NULL), *DX = tt_init(&dx, dxs, TT_F32, 4, f.shape, NULL);
    DLTensor *DW = tt_vec(&tdw, dw, TT_F32, C), *DB = tt_vec(&tdb, db, TT_F32, C);
    CHECK(bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, f.SM, f.SR, DX, DW, DB) == BN_STATUS_SUCCESS);
    CHECK(bn_norm_backward(NULL, NULL, f.X, DY, f.W_, f.SM, f.SR, DX, DW, DB) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "desc") != NULL);
    CHECK(bn_norm_backward(NULL, &f.desc, NULL, DY, f.W_, f.SM, f.SR, DX, DW, DB) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_backward(NULL, &f.desc, f.X, NULL, f.W_, f.SM, f.SR, DX, DW, DB) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, f.SM, NULL, DX, DW, DB) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "save_rstd") != NULL);
    CHECK(bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, NULL, f.SR, DX, DW, DB) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "save_mean") != NULL);
    tdw.shape[0] = C + 1;
    CHECK(bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, f.SM, f.SR, DX, DW, DB) == BN_STATUS_SHAPE_MISMATCH);
    tdw.shape[0] = C;
    dy.t.dtype = TT_I32;
    CHECK(bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, f.SM, f.SR, DX, DW, DB) == BN_STATUS_UNSUPPORTED_DTYPE);
    dy.t.dtype = TT_F32, dy.t.device.device_type = kDLCUDA;
    CHECK(bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, f.SM, f.SR, DX, DW, DB) == BN_STATUS_UNSUPPORTED_DEVICE);
    dy.t.device.device_type = kDLCPU;
    dx.t.data = f.mem + 3; /* dx over x */
    CHECK(bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, f.SM, f.SR, DX, DW, DB) == BN_STATUS_OVERLAP);
    dx.t.data = f.mem; /* dx exactly x: not allowed either */
    CHECK(bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, f.SM, f.SR, DX, DW, DB) == BN_STATUS_OVERLAP);
    dx.t.data = dys + 1; /* partly over dy */
    CHECK(bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, f.SM, f.SR, DX, DW, DB) == BN_STATUS_OVERLAP);
    dx.t.data = dys; /* exactly dy: in place, allowed */
    CHECK(bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, f.SM, f.SR, DX, DW, DB) == BN_STATUS_SUCCESS);
    dx.t.data = dxs, dx.shape[1] = C + 1;
    CHECK(bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, f.SM, f.SR, DX, DW, DB) == BN_STATUS_SHAPE_MISMATCH);
    dx.shape[1] = C;
    f.desc.eps = NAN;
    CHECK(bn_norm_backward(NULL, &f.desc, f.X, DY, f.W_, f.SM, f.SR, DX, DW, DB) == BN_STATUS_INVALID_ARGUMENT);
  }
}
