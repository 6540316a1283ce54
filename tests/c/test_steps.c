/*
 * The composable steps of the ABI and the execution context:
 *  - bn_norm_stats over two halves -> bn_moments_merge -> bn_norm_forward(BN_FLAG_GIVEN_STATS)
 *    is the one-call forward on the whole tensor, bit for bit (data whose sums are exact in
 *    any order, so that only a difference of method could show);
 *  - bn_norm_backward_reduce -> (sum of the halves' sums) -> bn_norm_backward_apply is the
 *    whole backward;
 *  - contexts: threads, a caller's allocator, devices, streams; desc.struct_size.
 */
#include <stdlib.h>
#include <string.h>

#include "bncore/bncore.h"
#include "harness.h"
#include "tensors.h"

#define N 8
#define C 3

static int same_bits(const double *a, const double *b, int64_t n) { return memcmp(a, b, (size_t)n * sizeof *a) == 0; }

/* Data whose statistics are exact in any blocking: channel c holds shift[c] + v, -v, v', -v', ...
 * along w (integer v), so every block of an even number of consecutive w (rows, pieces, column
 * chunks, slabs, halves of the batch) has mean shift[c] exactly and integer m2; Chan's merges then
 * add exact numbers, and the steps can be compared with the one-call forward bit for bit. */
static void fill_exact(double *x, int64_t H, int64_t W, int channels_last, uint64_t seed) {
  const double shift[C] = {0.5, -2.0, 3.25};
  double v = 0;
  for (int64_t n = 0; n < N; n++)
    for (int64_t c = 0; c < C; c++)
      for (int64_t h = 0; h < H; h++)
        for (int64_t w = 0; w < W; w++) {
          if (w % 2 == 0) v = (double)(int64_t)(4.0 * tt_rand(&seed) + 5.0);
          const int64_t at = channels_last ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
          x[at] = shift[c] + (w % 2 ? -v : v);
        }
}

/* x as (N, C, H, W) NCHW (channels_last = 0) or with NHWC memory; rows [n0, n0 + nn) of the batch. */
static DLTensor *view4(tt_t *tt, double *x, int64_t nn, int64_t n0, int64_t H, int64_t W, int channels_last) {
  const int64_t shape[4] = {nn, C, H, W};
  const int64_t nchw[4] = {C * H * W, H * W, W, 1}, nhwc[4] = {H * W * C, 1, W * C, C};
  DLTensor *t = tt_init(tt, x, TT_F64, 4, shape, channels_last ? nhwc : nchw);
  t->byte_offset = (uint64_t)(n0 * C * H * W) * sizeof(double);
  return t;
}

static void stats_merge_forward_case(int64_t H, int64_t W, int channels_last) {
  const int64_t numel = N * C * H * W, per_channel = N * H * W;
  double *x = malloc((size_t)numel * sizeof *x), *y1 = malloc((size_t)numel * sizeof *x),
         *y2 = malloc((size_t)numel * sizeof *x);
  fill_exact(x, H, W, channels_last, 11 + (uint64_t)H);
  double w[C] = {0.5, -1.25, 2.0}, b[C] = {0.25, 0.0, -3.0};
  double rm1[C] = {0.1, 0.2, 0.3}, rv1[C] = {1.0, 2.0, 0.5}, rm2[C], rv2[C];
  memcpy(rm2, rm1, sizeof rm1), memcpy(rv2, rv1, sizeof rv1);
  double sm1[C], sr1[C], sm2[C], sr2[C];
  tt_t tx, ty1, ty2, tw, tb, trm1, trv1, trm2, trv2, tsm1, tsr1, tsm2, tsr2;
  bn_norm_desc_t desc;
  CHECK(bn_norm_desc_init_batch(&desc, 4, 1, 1e-5) == BN_STATUS_SUCCESS);
  desc.flags = BN_FLAG_UPDATE_RUNNING_STATS, desc.momentum = 0.1;
  /* one call on the whole tensor */
  CHECK(bn_norm_forward(NULL, &desc, view4(&tx, x, N, 0, H, W, channels_last), tt_vec(&tw, w, TT_F64, C),
                        tt_vec(&tb, b, TT_F64, C), NULL, NULL, 0, tt_vec(&trm1, rm1, TT_F64, C),
                        tt_vec(&trv1, rv1, TT_F64, C), view4(&ty1, y1, N, 0, H, W, channels_last),
                        tt_vec(&tsm1, sm1, TT_F64, C), tt_vec(&tsr1, sr1, TT_F64, C)) == BN_STATUS_SUCCESS);
  /* the steps: statistics of each half, merged, then the forward with them given */
  double mean[2][C], m2[2][C], cnt[2];
  int64_t count[2];
  for (int h = 0; h < 2; h++) {
    tt_t th, tm, tq;
    CHECK(bn_norm_stats(NULL, &desc, view4(&th, x, N / 2, h * (N / 2), H, W, channels_last),
                        tt_vec(&tm, mean[h], TT_F64, C), tt_vec(&tq, m2[h], TT_F64, C), &count[h]) == BN_STATUS_SUCCESS);
    cnt[h] = (double)count[h];
  }
  CHECK(count[0] == per_channel / 2 && count[1] == per_channel / 2);
  tt_t tca, tma, tqa, tcb, tmb, tqb;
  CHECK(bn_moments_merge(NULL, tt_vec(&tca, &cnt[0], TT_F64, 1), tt_vec(&tma, mean[0], TT_F64, C),
                         tt_vec(&tqa, m2[0], TT_F64, C), tt_vec(&tcb, &cnt[1], TT_F64, 1),
                         tt_vec(&tmb, mean[1], TT_F64, C), tt_vec(&tqb, m2[1], TT_F64, C), &tca.t, &tma.t,
                         &tqa.t) == BN_STATUS_SUCCESS); /* in place into the first half's */
  CHECK(cnt[0] == (double)per_channel);
  bn_norm_desc_t given = desc;
  given.flags |= BN_FLAG_GIVEN_STATS;
  CHECK(bn_norm_forward(NULL, &given, view4(&tx, x, N, 0, H, W, channels_last), &tw.t, &tb.t, &tma.t, &tqa.t,
                        (int64_t)cnt[0], tt_vec(&trm2, rm2, TT_F64, C), tt_vec(&trv2, rv2, TT_F64, C),
                        view4(&ty2, y2, N, 0, H, W, channels_last), tt_vec(&tsm2, sm2, TT_F64, C),
                        tt_vec(&tsr2, sr2, TT_F64, C)) == BN_STATUS_SUCCESS);
  CHECK(same_bits(y1, y2, numel));
  CHECK(same_bits(sm1, sm2, C) && same_bits(sr1, sr2, C));
  CHECK(same_bits(rm1, rm2, C) && same_bits(rv1, rv2, C));
  /* and the merged moments are the whole tensor's own */
  double wm[C], wq[C];
  tt_t twm, twq;
  int64_t wc;
  CHECK(bn_norm_stats(NULL, &desc, &tx.t, tt_vec(&twm, wm, TT_F64, C), tt_vec(&twq, wq, TT_F64, C), &wc) == 0);
  CHECK(wc == per_channel && same_bits(wm, mean[0], C) && same_bits(wq, m2[0], C));
  free(x), free(y1), free(y2);
}

/* Random float64 data: the backward's steps against the whole backward. */
static void backward_steps_case(int64_t H, int64_t W, int channels_last) {
  const int64_t numel = N * C * H * W;
  double *x = malloc((size_t)numel * sizeof *x), *dy = malloc((size_t)numel * sizeof *x),
         *y = malloc((size_t)numel * sizeof *x), *dx1 = malloc((size_t)numel * sizeof *x),
         *dx2 = malloc((size_t)numel * sizeof *x);
  uint64_t seed = 5;
  for (int64_t i = 0; i < numel; i++) x[i] = 3.0 * tt_rand(&seed) + 1.0, dy[i] = tt_rand(&seed);
  double w[C] = {0.5, -1.25, 2.0}, sm[C], sr[C], dw[C], db[C];
  tt_t tx, tdy, ty, tdx1, tw, tsm, tsr, tdw, tdb;
  bn_norm_desc_t desc;
  CHECK(bn_norm_desc_init_batch(&desc, 4, 1, 1e-5) == BN_STATUS_SUCCESS);
  view4(&tx, x, N, 0, H, W, channels_last);
  CHECK(bn_norm_forward(NULL, &desc, &tx.t, tt_vec(&tw, w, TT_F64, C), NULL, NULL, NULL, 0, NULL, NULL,
                        view4(&ty, y, N, 0, H, W, channels_last), tt_vec(&tsm, sm, TT_F64, C),
                        tt_vec(&tsr, sr, TT_F64, C)) == BN_STATUS_SUCCESS);
  CHECK(bn_norm_backward(NULL, &desc, &tx.t, view4(&tdy, dy, N, 0, H, W, channels_last), &tw.t, &tsm.t, &tsr.t,
                         view4(&tdx1, dx1, N, 0, H, W, channels_last), tt_vec(&tdw, dw, TT_F64, C),
                         tt_vec(&tdb, db, TT_F64, C)) == BN_STATUS_SUCCESS);
  /* each half reduces with the global statistics; the sums add (an all-reduce); each half applies */
  double s1[C] = {0}, s2[C] = {0};
  for (int h = 0; h < 2; h++) {
    double a[C], q[C];
    tt_t thx, thdy, ta, tq;
    CHECK(bn_norm_backward_reduce(NULL, &desc, view4(&thx, x, N / 2, h * (N / 2), H, W, channels_last),
                                  view4(&thdy, dy, N / 2, h * (N / 2), H, W, channels_last), &tsm.t, &tsr.t,
                                  tt_vec(&ta, a, TT_F64, C), tt_vec(&tq, q, TT_F64, C)) == BN_STATUS_SUCCESS);
    for (int c = 0; c < C; c++) s1[c] += a[c], s2[c] += q[c];
  }
  for (int c = 0; c < C; c++) {
    CHECK_CLOSE(s1[c], db[c], 1e-10 * (1 + fabs(db[c])));
    CHECK_CLOSE(s2[c], dw[c], 1e-10 * (1 + fabs(dw[c])));
  }
  tt_t ts1, ts2;
  tt_vec(&ts1, s1, TT_F64, C), tt_vec(&ts2, s2, TT_F64, C);
  for (int h = 0; h < 2; h++) {
    tt_t thx, thdy, thdx;
    CHECK(bn_norm_backward_apply(NULL, &desc, view4(&thx, x, N / 2, h * (N / 2), H, W, channels_last),
                                 view4(&thdy, dy, N / 2, h * (N / 2), H, W, channels_last), &tw.t, &tsm.t, &tsr.t,
                                 &ts1.t, &ts2.t, N * H * W,
                                 view4(&thdx, dx2, N / 2, h * (N / 2), H, W, channels_last)) == BN_STATUS_SUCCESS);
  }
  double worst = 0;
  for (int64_t i = 0; i < numel; i++) worst = fmax(worst, fabs(dx1[i] - dx2[i]) / (1 + fabs(dx1[i])));
  CHECK(worst <= 1e-12);
  free(x), free(dy), free(y), free(dx1), free(dx2);
}

static int allocs, frees;
static void *counting_alloc(void *user, size_t bytes) {
  (void)user;
  allocs++;
  return malloc(bytes);
}
static void counting_free(void *user, void *p) {
  (void)user;
  frees++;
  free(p);
}

SUITE(steps) {
  TEST(stats_merge_given_forward_is_the_one_call_forward_fused) { stats_merge_forward_case(16, 32, 0); }
  TEST(stats_merge_given_forward_is_the_one_call_forward_two_phase) { stats_merge_forward_case(128, 128, 0); }
  TEST(stats_merge_given_forward_is_the_one_call_forward_channels_last) { stats_merge_forward_case(16, 32, 1); }

  TEST(backward_reduce_then_apply_is_the_backward) {
    backward_steps_case(16, 32, 0);
    backward_steps_case(128, 128, 0);
    backward_steps_case(16, 32, 1);
  }

  TEST(moments_merge_rules) {
    double ca[2] = {3, 0}, ma[2] = {1.0, 5.0}, qa[2] = {2.0, 7.0};
    double cb[2] = {1, 4}, mb[2] = {5.0, -1.0}, qb[2] = {0.0, 3.0};
    double c[2], m[2], q[2];
    tt_t t[9];
    CHECK(bn_moments_merge(NULL, tt_vec(&t[0], ca, TT_F64, 2), tt_vec(&t[1], ma, TT_F64, 2), tt_vec(&t[2], qa, TT_F64, 2),
                           tt_vec(&t[3], cb, TT_F64, 2), tt_vec(&t[4], mb, TT_F64, 2), tt_vec(&t[5], qb, TT_F64, 2),
                           tt_vec(&t[6], c, TT_F64, 2), tt_vec(&t[7], m, TT_F64, 2),
                           tt_vec(&t[8], q, TT_F64, 2)) == BN_STATUS_SUCCESS);
    /* entry 0: {1,1,1 | mean 1, m2 2} and {5}: mean 2, m2 = 2 + 0 + 16 * 3 * 1 / 4 = 14 */
    CHECK(c[0] == 4 && m[0] == 2.0 && q[0] == 14.0);
    /* entry 1: an empty a-side gives the b-side */
    CHECK(c[1] == 4 && m[1] == -1.0 && q[1] == 3.0);
    /* a negative count is refused and writes nothing */
    double bad = -1, keep[2] = {9, 9};
    tt_t tbad, tk;
    CHECK(bn_moments_merge(NULL, tt_vec(&tbad, &bad, TT_F64, 1), &t[1].t, &t[2].t, &t[3].t, &t[4].t, &t[5].t, NULL,
                           tt_vec(&tk, keep, TT_F64, 2), &t[8].t) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "count_a") != NULL && keep[0] == 9 && keep[1] == 9);
    /* counts of 3 entries for 2: a shape mismatch naming the argument */
    double three[3] = {1, 1, 1};
    tt_t t3;
    CHECK(bn_moments_merge(NULL, &t[0].t, &t[1].t, &t[2].t, tt_vec(&t3, three, TT_F64, 3), &t[4].t, &t[5].t, NULL,
                           &t[7].t, &t[8].t) == BN_STATUS_SHAPE_MISMATCH);
    CHECK(strstr(bn_last_error(), "count_b") != NULL);
    /* an output overlapping the other side's input is refused */
    CHECK(bn_moments_merge(NULL, &t[0].t, &t[1].t, &t[2].t, &t[3].t, &t[4].t, &t[5].t, NULL, &t[4].t, &t[2].t) ==
          BN_STATUS_SUCCESS); /* mean into mean_b, m2 into m2_a: each its own side's, allowed */
    CHECK(bn_moments_merge(NULL, &t[0].t, &t[1].t, &t[2].t, &t[3].t, &t[4].t, &t[5].t, NULL, &t[2].t, &t[8].t) ==
          BN_STATUS_OVERLAP); /* mean into m2_a */
  }

  TEST(backward_apply_needs_one_group_per_parameter) {
    double x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, dy[8] = {1, 0, 1, 0, 1, 0, 1, 0}, dx[8], sm[2] = {2.5, 6.5},
           sr[2] = {1, 1}, s[4] = {0};
    const int64_t shape[2] = {2, 4};
    tt_t tx, tdy, tdx, tsm, tsr, ts1, ts2;
    bn_norm_desc_t desc;
    CHECK(bn_norm_desc_init_layer(&desc, 2, 1, 1e-5) == BN_STATUS_SUCCESS);
    CHECK(bn_norm_backward_apply(NULL, &desc, tt_init(&tx, x, TT_F64, 2, shape, NULL),
                                 tt_init(&tdy, dy, TT_F64, 2, shape, NULL), NULL, tt_vec(&tsm, sm, TT_F64, 2),
                                 tt_vec(&tsr, sr, TT_F64, 2), tt_vec(&ts1, s, TT_F64, 4), tt_vec(&ts2, s, TT_F64, 4), 8,
                                 tt_init(&tdx, dx, TT_F64, 2, shape, NULL)) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "one statistic group per parameter") != NULL);
  }

  TEST(given_statistics_are_checked) {
    double x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[8], m[2] = {0}, q[2] = {1, 1}, rm[2] = {0}, rv[2] = {1, 1};
    const int64_t shape[2] = {4, 2};
    tt_t tx, ty, tm, tq, trm, trv;
    bn_norm_desc_t desc;
    CHECK(bn_norm_desc_init_batch(&desc, 2, 1, 1e-5) == BN_STATUS_SUCCESS);
    tt_init(&tx, x, TT_F64, 2, shape, NULL), tt_init(&ty, y, TT_F64, 2, shape, NULL);
    tt_vec(&tm, m, TT_F64, 2), tt_vec(&tq, q, TT_F64, 2), tt_vec(&trm, rm, TT_F64, 2), tt_vec(&trv, rv, TT_F64, 2);
    /* statistics without the flag */
    CHECK(bn_norm_forward(NULL, &desc, &tx.t, NULL, NULL, &tm.t, &tq.t, 4, NULL, NULL, &ty.t, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    desc.flags = BN_FLAG_GIVEN_STATS;
    CHECK(bn_norm_forward(NULL, &desc, &tx.t, NULL, NULL, NULL, &tq.t, 4, NULL, NULL, &ty.t, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "stats_mean") != NULL);
    CHECK(bn_norm_forward(NULL, &desc, &tx.t, NULL, NULL, &tm.t, &tq.t, -1, NULL, NULL, &ty.t, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    desc.flags = BN_FLAG_GIVEN_STATS | BN_FLAG_USE_RUNNING_STATS;
    CHECK(bn_norm_forward(NULL, &desc, &tx.t, NULL, NULL, &tm.t, &tq.t, 4, &trm.t, &trv.t, &ty.t, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    /* an unbiased running update needs a count above 1, and leaves the statistics alone otherwise */
    desc.flags = BN_FLAG_GIVEN_STATS | BN_FLAG_UPDATE_RUNNING_STATS, desc.momentum = 0.5;
    CHECK(bn_norm_forward(NULL, &desc, &tx.t, NULL, NULL, &tm.t, &tq.t, 1, &trm.t, &trv.t, &ty.t, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "stats_count") != NULL && rm[0] == 0 && rv[0] == 1);
    /* given mean 0 and m2 1 over 4: var 1/4; running var = 0.5 * 1 + 0.5 * (1/4 * 4/3) */
    CHECK(bn_norm_forward(NULL, &desc, &tx.t, NULL, NULL, &tm.t, &tq.t, 4, &trm.t, &trv.t, &ty.t, NULL, NULL) ==
          BN_STATUS_SUCCESS);
    CHECK_CLOSE(rv[0], 0.5 + 0.5 / 3.0, 1e-15);
    CHECK_CLOSE(y[0], 1.0 / sqrt(0.25 + 1e-5), 1e-12);
  }

  TEST(contexts) {
    bn_context_t *ctx = NULL;
    DLDevice cpu = {kDLCPU, 0}, cuda = {kDLCUDA, 0}, got;
    CHECK(bn_context_create(cuda, &ctx) == BN_STATUS_UNSUPPORTED_DEVICE && ctx == NULL);
    CHECK(strstr(bn_last_error(), "cuda") != NULL);
    CHECK(bn_context_create(cpu, NULL) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_context_create(cpu, &ctx) == BN_STATUS_SUCCESS && ctx != NULL);
    CHECK(bn_context_device(ctx, &got) == BN_STATUS_SUCCESS && got.device_type == kDLCPU);
    int dummy;
    CHECK(bn_context_set_stream(ctx, &dummy) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_context_set_stream(ctx, NULL) == BN_STATUS_SUCCESS);
    int32_t n = 0;
    CHECK(bn_context_set_num_threads(ctx, -1) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_context_set_num_threads(ctx, 3) == BN_STATUS_SUCCESS);
    CHECK(bn_context_get_num_threads(ctx, &n) == BN_STATUS_SUCCESS && n == 3);
    CHECK(bn_context_set_allocator(ctx, counting_alloc, NULL, NULL) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_context_set_allocator(ctx, counting_alloc, counting_free, NULL) == BN_STATUS_SUCCESS);
    /* a two-phase problem (groups over 1 MiB) allocates workspaces: all from the caller, all given back,
     * and the result is the NULL context's bit for bit */
    const int64_t H = 256, W = 256, numel = N * C * H * W;
    double *x = malloc((size_t)numel * sizeof *x), *y1 = malloc((size_t)numel * sizeof *x),
           *y2 = malloc((size_t)numel * sizeof *x);
    uint64_t seed = 3;
    for (int64_t i = 0; i < numel; i++) x[i] = tt_rand(&seed);
    tt_t tx, ty1, ty2;
    bn_norm_desc_t desc;
    CHECK(bn_norm_desc_init_batch(&desc, 4, 1, 1e-5) == BN_STATUS_SUCCESS);
    view4(&tx, x, N, 0, H, W, 0);
    CHECK(bn_norm_forward(NULL, &desc, &tx.t, NULL, NULL, NULL, NULL, 0, NULL, NULL, view4(&ty1, y1, N, 0, H, W, 0),
                          NULL, NULL) == BN_STATUS_SUCCESS);
    CHECK(bn_norm_forward(ctx, &desc, &tx.t, NULL, NULL, NULL, NULL, 0, NULL, NULL, view4(&ty2, y2, N, 0, H, W, 0),
                          NULL, NULL) == BN_STATUS_SUCCESS);
    CHECK(allocs > 0 && allocs == frees);
    CHECK(same_bits(y1, y2, numel));
    /* a tensor on another device than the context's */
    tx.t.device = cuda;
    CHECK(bn_norm_forward(ctx, &desc, &tx.t, NULL, NULL, NULL, NULL, 0, NULL, NULL, &ty2.t, NULL, NULL) ==
          BN_STATUS_UNSUPPORTED_DEVICE);
    CHECK(strstr(bn_last_error(), "x:") != NULL && strstr(bn_last_error(), "cuda:0") != NULL);
    CHECK(bn_norm_forward(NULL, &desc, &tx.t, NULL, NULL, NULL, NULL, 0, NULL, NULL, &ty2.t, NULL, NULL) ==
          BN_STATUS_UNSUPPORTED_DEVICE);
    CHECK(bn_context_destroy(ctx) == BN_STATUS_SUCCESS);
    CHECK(bn_context_destroy(NULL) == BN_STATUS_SUCCESS);
    free(x), free(y1), free(y2);
  }

  TEST(desc_struct_size) {
    double x[4] = {1, 2, 3, 4}, y[4];
    const int64_t shape[2] = {2, 2};
    tt_t tx, ty;
    tt_init(&tx, x, TT_F64, 2, shape, NULL), tt_init(&ty, y, TT_F64, 2, shape, NULL);
    struct {
      bn_norm_desc_t d;
      uint64_t newer_field;
    } big;
    memset(&big, 0, sizeof big);
    CHECK(bn_norm_desc_init_batch(&big.d, 2, 1, 1e-5) == BN_STATUS_SUCCESS);
    CHECK(big.d.struct_size == sizeof(bn_norm_desc_t));
    big.d.struct_size = sizeof big; /* a newer caller's larger struct, its new field unset */
    CHECK(bn_norm_forward(NULL, &big.d, &tx.t, NULL, NULL, NULL, NULL, 0, NULL, NULL, &ty.t, NULL, NULL) == 0);
    big.newer_field = 1;
    CHECK(bn_norm_forward(NULL, &big.d, &tx.t, NULL, NULL, NULL, NULL, 0, NULL, NULL, &ty.t, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "newer bncore") != NULL);
    big.d.struct_size = 8;
    CHECK(bn_norm_forward(NULL, &big.d, &tx.t, NULL, NULL, NULL, NULL, 0, NULL, NULL, &ty.t, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "struct_size") != NULL);
  }
}
