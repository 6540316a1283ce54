/* Canonicalization facts of bn_plan_build (internal.h). The plan sources are
 * compiled into this executable: the library does not export them. */
#include <stdio.h>
#include <string.h>

#include "harness.h"
#include "internal.h"
#include "tensors.h"

static float buf[4096], obuf[4096], dbuf[4096];

/* Checks plan dims against expected (n, x stride, sg, sp) columns. */
static void check_dims(const bn_plan_t *P, int nd, const int64_t *n, const int64_t *sx, const int64_t *sg,
                       const int64_t *sp) {
  if (!CHECK(P->ndim == nd)) {
    fprintf(stderr, "  plan ndim %d, expected %d; dims:", P->ndim, nd);
    for (int i = 0; i < P->ndim; i++)
      fprintf(stderr, " [n %lld sx %lld sg %lld sp %lld]", (long long)P->dim[i].n, (long long)P->dim[i].s[BN_OP_X],
              (long long)P->dim[i].sg, (long long)P->dim[i].sp);
    fprintf(stderr, "\n");
    return;
  }
  for (int i = 0; i < nd; i++) {
    CHECK(P->dim[i].n == n[i]);
    CHECK(P->dim[i].s[BN_OP_X] == sx[i]);
    if (sg) CHECK(P->dim[i].sg == sg[i]);
    if (sp) CHECK(P->dim[i].sp == sp[i]);
  }
}

static bn_norm_desc_t batch_desc(int ndim) {
  bn_norm_desc_t d;
  bn_norm_desc_init_batch(&d, ndim, 1, 1e-5);
  return d;
}

SUITE(plan) {
  TEST(contiguous_nchw_batch_norm_is_n_c_hw) {
    int64_t shape[4] = {2, 3, 4, 5};
    tt_t x, y;
    bn_norm_desc_t d = batch_desc(4);
    bn_plan_t P;
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape, NULL), NULL, tt_init(&y, obuf, TT_F32, 4, shape, NULL),
                        BN_F32, &P) == BN_STATUS_SUCCESS);
    const int64_t n[] = {2, 3, 20}, sx[] = {60, 20, 1}, sg[] = {0, 1, 0}, sp[] = {0, 1, 0};
    check_dims(&P, 3, n, sx, sg, sp);
    for (int i = 0; i < P.ndim; i++) CHECK(P.dim[i].s[BN_OP_OUT] == P.dim[i].s[BN_OP_X]);
    for (int i = 0; i < P.ndim; i++) CHECK(P.dim[i].s[BN_OP_DY] == 0);
    CHECK(P.ngroups == 3);
    CHECK(P.group_size == 40);
    CHECK(P.nparams == 3);
    CHECK(P.params_in_groups == 1);
    CHECK(P.numel == 120);
    CHECK(P.dtype == BN_F32);
    CHECK(P.g0 == 0 && P.p0 == 0);
    CHECK(P.base[BN_OP_X] == (char *)buf);
    CHECK(P.base[BN_OP_OUT] == (char *)obuf);
    CHECK(P.base[BN_OP_DY] == NULL);
    int64_t pog[3] = {-1, -1, -1};
    bn_plan_group_params(&P, pog);
    CHECK(pog[0] == 0 && pog[1] == 1 && pog[2] == 2);
  }

  TEST(explicit_compact_strides_equal_null_strides) {
    int64_t shape[4] = {2, 3, 4, 5}, strides[4] = {60, 20, 5, 1};
    tt_t x;
    bn_norm_desc_t d = batch_desc(4);
    bn_plan_t P;
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape, strides), NULL, NULL, BN_F32, &P) == 0);
    const int64_t n[] = {2, 3, 20}, sx[] = {60, 20, 1}, sg[] = {0, 1, 0}, sp[] = {0, 1, 0};
    check_dims(&P, 3, n, sx, sg, sp);
    CHECK(P.base[BN_OP_OUT] == NULL);
  }

  TEST(channels_last_merges_nhw) {
    /* logical NCHW (2, 3, 4, 5) stored NHWC */
    int64_t shape[4] = {2, 3, 4, 5}, strides[4] = {60, 1, 15, 3};
    tt_t x, y, dy;
    bn_norm_desc_t d = batch_desc(4);
    bn_plan_t P;
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape, strides), tt_init(&dy, dbuf, TT_F32, 4, shape, strides),
                        tt_init(&y, obuf, TT_F32, 4, shape, strides), BN_F32, &P) == 0);
    const int64_t n[] = {40, 3}, sx[] = {3, 1}, sg[] = {0, 1}, sp[] = {0, 1};
    check_dims(&P, 2, n, sx, sg, sp);
    if (P.ndim == 2)
      for (int k = 0; k < BN_NOPS; k++) CHECK(P.dim[0].s[k] == 3 && P.dim[1].s[k] == 1);
    CHECK(P.ngroups == 3 && P.group_size == 40 && P.nparams == 3 && P.params_in_groups == 1);
    CHECK(P.base[BN_OP_DY] == (char *)dbuf);
  }

  TEST(channels_last_x_with_contiguous_y_keeps_y_strides) {
    int64_t shape[4] = {2, 3, 4, 5}, strides[4] = {60, 1, 15, 3};
    tt_t x, y;
    bn_norm_desc_t d = batch_desc(4);
    bn_plan_t P;
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape, strides), NULL, tt_init(&y, obuf, TT_F32, 4, shape, NULL),
                        BN_F32, &P) == 0);
    /* ordered by x's strides: N, H, W, C; H and W merge for both operands, N does not (y's
     * N stride 60 is not its H stride 5 times 4) */
    const int64_t n[] = {2, 20, 3}, sx[] = {60, 3, 1}, sg[] = {0, 0, 1};
    check_dims(&P, 3, n, sx, sg, NULL);
    if (P.ndim == 3) {
      const int64_t so[] = {60, 1, 20};
      for (int i = 0; i < 3; i++) CHECK(P.dim[i].s[BN_OP_OUT] == so[i]);
    }
  }

  TEST(size_one_dims_dropped) {
    int64_t shape[4] = {1, 3, 1, 5};
    tt_t x;
    bn_norm_desc_t d = batch_desc(4);
    bn_plan_t P;
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape, NULL), NULL, NULL, BN_F32, &P) == 0);
    const int64_t n[] = {3, 5}, sx[] = {5, 1}, sg[] = {1, 0}, sp[] = {1, 0};
    check_dims(&P, 2, n, sx, sg, sp);
    CHECK(P.ngroups == 3 && P.group_size == 5);

    /* a size-1 dim with a nonsense stride must not block merging */
    int64_t shape2[5] = {2, 3, 4, 1, 5}, strides2[5] = {60, 20, 5, 12345, 1};
    bn_norm_desc_t d5 = batch_desc(5);
    CHECK(bn_plan_build(&d5, tt_init(&x, buf, TT_F32, 5, shape2, strides2), NULL, NULL, BN_F32, &P) == 0);
    const int64_t n2[] = {2, 3, 20}, sx2[] = {60, 20, 1}, sg2[] = {0, 1, 0};
    check_dims(&P, 3, n2, sx2, sg2, NULL);

    /* (N, C, 1, 1): rows of C channels */
    int64_t shape3[4] = {4, 3, 1, 1};
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape3, NULL), NULL, NULL, BN_F32, &P) == 0);
    const int64_t n3[] = {4, 3}, sx3[] = {3, 1}, sg3[] = {0, 1};
    check_dims(&P, 2, n3, sx3, sg3, NULL);

    /* all dims of size 1: one dim of size 1 */
    int64_t shape4[4] = {1, 1, 1, 1};
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape4, NULL), NULL, NULL, BN_F32, &P) == 0);
    CHECK(P.ndim == 1 && P.dim[0].n == 1);
    CHECK(P.ngroups == 1 && P.group_size == 1 && P.numel == 1);
  }

  TEST(negative_inner_stride_flipped) {
    /* W reversed: element (n, c, h, w) at 60n + 20c + 5h + (4 - w) */
    int64_t shape[4] = {2, 3, 4, 5}, strides[4] = {60, 20, 5, -1};
    tt_t x, y;
    tt_init(&x, buf, TT_F32, 4, shape, strides);
    x.t.byte_offset = 4 * sizeof(float);
    bn_norm_desc_t d = batch_desc(4);
    bn_plan_t P;
    CHECK(bn_plan_build(&d, &x.t, NULL, tt_init(&y, obuf, TT_F32, 4, shape, NULL), BN_F32, &P) == 0);
    /* x is walked forwards from buf; y, contiguous, is walked backwards from its element w = 4 */
    CHECK(P.base[BN_OP_X] == (char *)buf);
    CHECK(P.base[BN_OP_OUT] == (char *)(obuf + 4));
    CHECK(P.g0 == 0 && P.p0 == 0);
    for (int i = 0; i < P.ndim; i++) CHECK(P.dim[i].s[BN_OP_X] > 0);
    const int64_t n[] = {2, 3, 4, 5}, sx[] = {60, 20, 5, 1}, sg[] = {0, 1, 0, 0};
    check_dims(&P, 4, n, sx, sg, NULL); /* y's strides (5, -1) stop H and W from merging */
    if (P.ndim == 4) CHECK(P.dim[3].s[BN_OP_OUT] == -1 && P.dim[2].s[BN_OP_OUT] == 5);

    /* same strides for y: H and W merge again */
    tt_t y2;
    tt_init(&y2, obuf, TT_F32, 4, shape, strides);
    y2.t.byte_offset = 4 * sizeof(float);
    CHECK(bn_plan_build(&d, &x.t, NULL, &y2.t, BN_F32, &P) == 0);
    const int64_t n2[] = {2, 3, 20}, sx2[] = {60, 20, 1}, sg2[] = {0, 1, 0}, sp2[] = {0, 1, 0};
    check_dims(&P, 3, n2, sx2, sg2, sp2);
    CHECK(P.base[BN_OP_OUT] == (char *)obuf);
  }

  TEST(negative_channel_stride_flips_group_and_param_index) {
    /* C reversed: element 0 is channel 0 at offset 40, channel 2 at offset 0 */
    int64_t shape[4] = {2, 3, 4, 5}, strides[4] = {60, -20, 5, 1};
    tt_t x;
    tt_init(&x, buf, TT_F32, 4, shape, strides);
    x.t.byte_offset = 40 * sizeof(float);
    bn_norm_desc_t d = batch_desc(4);
    bn_plan_t P;
    CHECK(bn_plan_build(&d, &x.t, NULL, NULL, BN_F32, &P) == 0);
    CHECK(P.base[BN_OP_X] == (char *)buf);
    CHECK(P.g0 == 2 && P.p0 == 2);
    const int64_t n[] = {2, 3, 20}, sx[] = {60, 20, 1}, sg[] = {0, -1, 0}, sp[] = {0, -1, 0};
    check_dims(&P, 3, n, sx, sg, sp);
    int64_t pog[3] = {-1, -1, -1};
    bn_plan_group_params(&P, pog);
    CHECK(pog[0] == 0 && pog[1] == 1 && pog[2] == 2);
  }

  TEST(all_strides_negative) {
    int64_t shape[4] = {2, 3, 4, 5}, strides[4] = {-60, -20, -5, -1};
    tt_t x;
    tt_init(&x, buf, TT_F32, 4, shape, strides);
    x.t.byte_offset = 119 * sizeof(float);
    bn_norm_desc_t d = batch_desc(4);
    bn_plan_t P;
    CHECK(bn_plan_build(&d, &x.t, NULL, NULL, BN_F32, &P) == 0);
    CHECK(P.base[BN_OP_X] == (char *)buf);
    CHECK(P.g0 == 2 && P.p0 == 2);
    const int64_t n[] = {2, 3, 20}, sx[] = {60, 20, 1}, sg[] = {0, -1, 0};
    check_dims(&P, 3, n, sx, sg, NULL);
  }

  TEST(group_norm_split_axis) {
    /* (N, C, H, W) = (2, 6, 2, 3), 2 groups of 3 channels */
    int64_t shape[4] = {2, 6, 2, 3};
    tt_t x;
    bn_norm_desc_t d;
    CHECK(bn_norm_desc_init_group(&d, 4, 2, 1e-5) == 0);
    CHECK(d.split_axis == 1 && d.num_groups == 2);
    bn_plan_t P;
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape, NULL), NULL, NULL, BN_F32, &P) == 0);
    CHECK(P.ngroups == 2 * 2);           /* N * G */
    CHECK(P.group_size == (6 / 2) * 6);  /* C / G * H * W */
    CHECK(P.nparams == 6);
    CHECK(P.params_in_groups == 0);      /* a parameter axis is partly reduced */
    CHECK(P.numel == 72);
    /* dims: N, G, C/G, HW; the weight index runs over the whole C axis */
    const int64_t n[] = {2, 2, 3, 6}, sx[] = {36, 18, 6, 1}, sg[] = {2, 1, 0, 0}, sp[] = {0, 3, 1, 0};
    check_dims(&P, 4, n, sx, sg, sp);
  }

  TEST(group_norm_without_params_merges_n_and_groups) {
    int64_t shape[4] = {2, 6, 2, 3};
    tt_t x;
    bn_norm_desc_t d;
    CHECK(bn_norm_desc_init_group(&d, 4, 3, 1e-5) == 0);
    d.param_axes = 0;
    bn_plan_t P;
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape, NULL), NULL, NULL, BN_F32, &P) == 0);
    CHECK(P.ngroups == 2 * 3 && P.group_size == 2 * 6 && P.nparams == 1);
    const int64_t n[] = {6, 12}, sx[] = {12, 1}, sg[] = {1, 0}, sp[] = {0, 0};
    check_dims(&P, 2, n, sx, sg, sp);
  }

  TEST(group_norm_one_group_and_c_groups) {
    int64_t shape[4] = {2, 6, 2, 3};
    tt_t x;
    bn_norm_desc_t d;
    bn_plan_t P;
    CHECK(bn_norm_desc_init_group(&d, 4, 1, 1e-5) == 0);
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape, NULL), NULL, NULL, BN_F32, &P) == 0);
    CHECK(P.ngroups == 2 && P.group_size == 36 && P.nparams == 6);
    CHECK(bn_norm_desc_init_group(&d, 4, 6, 1e-5) == 0);
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape, NULL), NULL, NULL, BN_F32, &P) == 0);
    CHECK(P.ngroups == 12 && P.group_size == 6 && P.nparams == 6 && P.params_in_groups == 1);
    int64_t pog[12];
    bn_plan_group_params(&P, pog);
    for (int g = 0; g < 12; g++) CHECK(pog[g] == g % 6);
  }

  TEST(group_norm_groups_must_divide_channels) {
    int64_t shape[4] = {2, 6, 2, 3};
    tt_t x;
    bn_norm_desc_t d;
    bn_plan_t P;
    CHECK(bn_norm_desc_init_group(&d, 4, 4, 1e-5) == 0);
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape, NULL), NULL, NULL, BN_F32, &P) ==
          BN_STATUS_SHAPE_MISMATCH);
    CHECK(strstr(bn_last_error(), "num_groups") != NULL);
  }

  TEST(instance_norm_group_params) {
    /* groups (N, C), parameters C: group g = n*C + c maps to c, in NCHW and NHWC */
    int64_t shape[4] = {3, 4, 2, 5}, cl[4] = {40, 1, 20, 4};
    tt_t x;
    bn_norm_desc_t d;
    bn_plan_t P;
    CHECK(bn_norm_desc_init_instance(&d, 4, 1e-5) == 0);
    for (int layout = 0; layout < 2; layout++) {
      CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape, layout ? cl : NULL), NULL, NULL, BN_F32, &P) == 0);
      CHECK(P.ngroups == 12 && P.group_size == 10 && P.nparams == 4 && P.params_in_groups == 1);
      int64_t pog[12];
      for (int g = 0; g < 12; g++) pog[g] = -1;
      bn_plan_group_params(&P, pog);
      for (int g = 0; g < 12; g++) CHECK(pog[g] == g % 4);
    }
    /* NCHW: (N*C) merges into one group dim over rows of H*W */
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape, NULL), NULL, NULL, BN_F32, &P) == 0);
    const int64_t n[] = {3, 4, 10}, sx[] = {40, 10, 1}, sg[] = {4, 1, 0}, sp[] = {0, 1, 0};
    check_dims(&P, 3, n, sx, sg, sp);
  }

  TEST(layer_norm_plan) {
    int64_t shape[3] = {4, 5, 6};
    tt_t x;
    bn_norm_desc_t d;
    bn_plan_t P;
    CHECK(bn_norm_desc_init_layer(&d, 3, 1, 1e-5) == 0);
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 3, shape, NULL), NULL, NULL, BN_F64, &P) == 0);
    CHECK(P.dtype == BN_F64);
    CHECK(P.ngroups == 20 && P.group_size == 6 && P.nparams == 6 && P.params_in_groups == 0);
    const int64_t n[] = {20, 6}, sx[] = {6, 1}, sg[] = {1, 0}, sp[] = {0, 1};
    check_dims(&P, 2, n, sx, sg, sp);
  }

  TEST(empty_tensor_plan) {
    int64_t shape[4] = {0, 3, 4, 5};
    tt_t x;
    bn_norm_desc_t d = batch_desc(4);
    bn_plan_t P;
    CHECK(bn_plan_build(&d, tt_init(&x, buf, TT_F32, 4, shape, NULL), NULL, NULL, BN_F32, &P) == 0);
    CHECK(P.numel == 0 && P.ngroups == 3 && P.group_size == 0 && P.nparams == 3);
  }
}
