/*
 * What the library promises about memory and threads: outputs need an address per element,
 * forged sizes and strides are refused before any arithmetic on them, a failing call changes
 * no state, and calls on one running-statistics state from many threads are serialized.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "bncore/bncore.h"
#include "half.h"
#include "harness.h"
#include "tensors.h"

static bn_norm_desc_t batch_desc(int ndim) {
  bn_norm_desc_t d;
  bn_norm_desc_init_batch(&d, ndim, 1, 1e-5);
  return d;
}

#define THREADS 8
#define ROUNDS 50
#define FEATURES 100000 /* long enough an update for threads to meet inside it */

typedef struct worker_t {
  bn_running_stats_t *state;
  const double *mean, *var;
  int failures;
} worker_t;

static void *update_many(void *arg) {
  worker_t *w = arg;
  tt_t tm, tv;
  for (int i = 0; i < ROUNDS; i++)
    w->failures += bn_running_stats_update(w->state, tt_vec(&tm, (void *)w->mean, TT_F64, FEATURES),
                                           tt_vec(&tv, (void *)w->var, TT_F64, FEATURES), 10) != BN_STATUS_SUCCESS;
  return NULL;
}

SUITE(guarantees) {
  TEST(outputs_need_an_address_per_element) {
    double x[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, y[12];
    const int64_t shape[2] = {6, 2}, zero[2] = {0, 1}, rows_overlap[2] = {1, 1};
    tt_t tx, ty;
    bn_norm_desc_t d = batch_desc(2);
    tt_init(&tx, x, TT_F64, 2, shape, NULL);
    CHECK(bn_norm_forward(NULL, &d, &tx.t, NULL, NULL, NULL, NULL, 0, NULL, NULL, tt_init(&ty, y, TT_F64, 2, shape, zero),
                          NULL, NULL) == BN_STATUS_OVERLAP);
    CHECK(strstr(bn_last_error(), "y:") != NULL && strstr(bn_last_error(), "axis 0") != NULL);
    CHECK(bn_norm_forward(NULL, &d, &tx.t, NULL, NULL, NULL, NULL, 0, NULL, NULL,
                          tt_init(&ty, y, TT_F64, 2, shape, rows_overlap), NULL, NULL) == BN_STATUS_OVERLAP);
    /* a running mean of stride 0 would keep one channel's value */
    double rm[2] = {0, 0}, rv[2] = {1, 1};
    const int64_t two = 2, s0 = 0;
    tt_t trm, trv;
    d.flags = BN_FLAG_UPDATE_RUNNING_STATS, d.momentum = 0.5;
    CHECK(bn_norm_forward(NULL, &d, &tx.t, NULL, NULL, NULL, NULL, 0, tt_init(&trm, rm, TT_F64, 1, &two, &s0),
                          tt_vec(&trv, rv, TT_F64, 2), tt_init(&ty, y, TT_F64, 2, shape, NULL), NULL,
                          NULL) == BN_STATUS_OVERLAP);
    CHECK(strstr(bn_last_error(), "running_mean") != NULL && rm[0] == 0 && rv[0] == 1);
    /* read-only in evaluation mode: a running mean that views x is fine there */
    d.flags = BN_FLAG_USE_RUNNING_STATS, d.momentum = 0;
    CHECK(bn_norm_forward(NULL, &d, &tx.t, NULL, NULL, NULL, NULL, 0, tt_vec(&trm, x, TT_F64, 2),
                          tt_vec(&trv, rv, TT_F64, 2), &ty.t, NULL, NULL) == BN_STATUS_SUCCESS);
    CHECK_CLOSE(y[0], (1 - 1) / sqrt(1 + 1e-5), 0) ;
    CHECK_CLOSE(y[1], (2 - 2) / sqrt(1 + 1e-5), 0);
  }

  TEST(forged_sizes_and_strides_are_refused) {
    double v = 0;
    tt_t tx, ty;
    bn_norm_desc_t d = batch_desc(3);
    /* an empty tensor whose other sizes multiply past 2^63 */
    const int64_t huge[3] = {0, INT64_C(1) << 57, INT64_C(1) << 57};
    CHECK(bn_norm_forward(NULL, &d, tt_init(&tx, &v, TT_F64, 3, huge, NULL), NULL, NULL, NULL, NULL, 0, NULL, NULL,
                          tt_init(&ty, &v, TT_F64, 3, huge, NULL), NULL, NULL) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "x:") != NULL && strstr(bn_last_error(), "elements") != NULL);
    /* strides that reach past 2^56 elements, INT64_MIN among them */
    const int64_t shape[3] = {2, 2, 2}, far[3] = {INT64_C(1) << 60, 1, 1}, minimum[3] = {INT64_MIN, 2, 1};
    double x[8] = {0};
    CHECK(bn_norm_forward(NULL, &d, tt_init(&tx, x, TT_F64, 3, shape, far), NULL, NULL, NULL, NULL, 0, NULL, NULL,
                          tt_init(&ty, x, TT_F64, 3, shape, NULL), NULL, NULL) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "stride") != NULL);
    CHECK(bn_norm_forward(NULL, &d, tt_init(&tx, x, TT_F64, 3, shape, minimum), NULL, NULL, NULL, NULL, 0, NULL,
                          NULL, tt_init(&ty, x, TT_F64, 3, shape, NULL), NULL, NULL) == BN_STATUS_INVALID_ARGUMENT);
  }

  TEST(forged_addresses_and_alignment_are_refused) {
    /* found by the fuzzer through the Python import path; refused by the C core itself too */
    tt_t tx, ty;
    bn_norm_desc_t d = batch_desc(3);
    const int64_t empty[3] = {0, 3, 5}, flipped[3] = {-(INT64_C(1) << 62), 5, 1};
    CHECK(bn_norm_forward(NULL, &d, tt_init(&tx, NULL, TT_F64, 3, empty, NULL), NULL, NULL, NULL, NULL, 0, NULL, NULL,
                          tt_init(&ty, NULL, TT_F64, 3, empty, NULL), NULL, NULL) == BN_STATUS_SUCCESS);
    tx.t.byte_offset = UINT64_C(1) << 63; /* NULL + 2^63: no address */
    CHECK(bn_norm_forward(NULL, &d, &tx.t, NULL, NULL, NULL, NULL, 0, NULL, NULL, &ty.t, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "byte_offset") != NULL);
    CHECK(bn_norm_forward(NULL, &d, tt_init(&tx, NULL, TT_F64, 3, empty, flipped), NULL, NULL, NULL, NULL, 0, NULL,
                          NULL, &ty.t, NULL, NULL) == BN_STATUS_INVALID_ARGUMENT); /* a stride on an empty axis */
    CHECK(strstr(bn_last_error(), "stride") != NULL);
    float x[8] = {0};
    const int64_t shape[3] = {2, 1, 2};
    tt_init(&tx, x, TT_F32, 3, shape, NULL), tt_init(&ty, x + 4, TT_F32, 3, shape, NULL);
    tx.t.byte_offset = 1; /* element 0 not aligned to its type */
    CHECK(bn_norm_forward(NULL, &d, &tx.t, NULL, NULL, NULL, NULL, 0, NULL, NULL, &ty.t, NULL, NULL) ==
          BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "aligned") != NULL);
  }

  TEST(instance_norm_of_no_samples_keeps_running_statistics) {
    double v = 0, rm[2] = {0.5, -0.5}, rv[2] = {2, 3};
    const int64_t shape[3] = {0, 2, 4};
    tt_t tx, ty, trm, trv;
    bn_norm_desc_t d;
    CHECK(bn_norm_desc_init_instance(&d, 3, 1e-5) == BN_STATUS_SUCCESS);
    d.flags = BN_FLAG_UPDATE_RUNNING_STATS, d.momentum = 0.1;
    CHECK(bn_norm_forward(NULL, &d, tt_init(&tx, &v, TT_F64, 3, shape, NULL), NULL, NULL, NULL, NULL, 0,
                          tt_vec(&trm, rm, TT_F64, 2), tt_vec(&trv, rv, TT_F64, 2),
                          tt_init(&ty, &v, TT_F64, 3, shape, NULL), NULL, NULL) == BN_STATUS_SUCCESS);
    CHECK(rm[0] == 0.5 && rm[1] == -0.5 && rv[0] == 2 && rv[1] == 3);
  }

  TEST(one_element_groups_have_an_exact_zero_gradient) {
    /* PyTorch's OpInfo sample layer_norm(float16 (1,), (1,)): the exact gradient is 0 */
    const DLDataType f16 = {kDLFloat, 16, 1};
    const int64_t one = 1;
    uint64_t seed = 17;
    int nonzero = 0;
    for (int trial = 0; trial < 200; trial++) {
      uint16_t x = bn_f32_to_f16((float)tt_rand(&seed)), dy = bn_f32_to_f16((float)(2 * tt_rand(&seed))),
               w = bn_f32_to_f16((float)tt_rand(&seed)), dx = 0xffff, dw = 0xffff, y;
      float sm, sr;
      tt_t tx, tdy, tw, tdx, tdw, ty, tsm, tsr;
      bn_norm_desc_t d;
      bn_norm_desc_init_layer(&d, 1, 1, 1e-5);
      tt_init(&tx, &x, f16, 1, &one, NULL), tt_init(&tdy, &dy, f16, 1, &one, NULL), tt_init(&tw, &w, f16, 1, &one, NULL);
      CHECK(bn_norm_forward(NULL, &d, &tx.t, &tw.t, NULL, NULL, NULL, 0, NULL, NULL,
                            tt_init(&ty, &y, f16, 1, &one, NULL), tt_vec(&tsm, &sm, TT_F32, 1),
                            tt_vec(&tsr, &sr, TT_F32, 1)) == BN_STATUS_SUCCESS);
      CHECK(bn_norm_backward(NULL, &d, &tx.t, &tdy.t, &tw.t, &tsm.t, &tsr.t, tt_init(&tdx, &dx, f16, 1, &one, NULL),
                             tt_init(&tdw, &dw, f16, 1, &one, NULL), NULL) == BN_STATUS_SUCCESS);
      nonzero += (dx & 0x7fff) != 0 || (dw & 0x7fff) != 0;
    }
    CHECK(nonzero == 0);
  }

  TEST(load_is_all_or_nothing) {
    bn_running_stats_t *s = NULL;
    CHECK(bn_running_stats_create(4, TT_F32, 0.1, 0, &s) == BN_STATUS_SUCCESS);
    double m[4] = {1, 2, 3, 4}, v[4] = {5, 6, 7, 8}, short_v[3] = {0};
    tt_t tm, tv;
    CHECK(bn_running_stats_load(s, tt_vec(&tm, m, TT_F64, 4), tt_vec(&tv, short_v, TT_F64, 3), 3, 0) ==
          BN_STATUS_SHAPE_MISMATCH);
    CHECK(bn_running_stats_load(s, &tm.t, tt_vec(&tv, v, TT_F64, 4), -1, 0) == BN_STATUS_INVALID_ARGUMENT);
    DLTensor sm, sv;
    int64_t u = -1, k = -1;
    CHECK(bn_running_stats_tensors(s, &sm, &sv) == BN_STATUS_SUCCESS);
    CHECK(((float *)sm.data)[0] == 0.0f && ((float *)sv.data)[3] == 1.0f);
    CHECK(bn_running_stats_counts(s, &u, &k) == BN_STATUS_SUCCESS && u == 0 && k == 0);
    CHECK(bn_running_stats_load(s, &tm.t, &tv.t, 7, 2) == BN_STATUS_SUCCESS);
    CHECK(((float *)sm.data)[3] == 4.0f && ((float *)sv.data)[0] == 5.0f);
    CHECK(bn_running_stats_counts(s, &u, &k) == BN_STATUS_SUCCESS && u == 7 && k == 2);
    bn_running_stats_destroy(s);
  }

  TEST(one_state_many_threads_is_the_serial_result) {
    /* every thread folds the same batch: updates commute, so any serialization gives the serial bits */
    double *mean = malloc(FEATURES * sizeof *mean), *var = malloc(FEATURES * sizeof *var);
    uint64_t seed = 9;
    for (int i = 0; i < FEATURES; i++) mean[i] = tt_rand(&seed), var[i] = 1.5 + tt_rand(&seed);
    bn_running_stats_t *shared = NULL, *serial = NULL;
    CHECK(bn_running_stats_create(FEATURES, TT_F64, 0.1, 0, &shared) == BN_STATUS_SUCCESS);
    CHECK(bn_running_stats_create(FEATURES, TT_F64, 0.1, 0, &serial) == BN_STATUS_SUCCESS);
    worker_t w[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
      w[i] = (worker_t){shared, mean, var, 0};
      pthread_create(&th[i], NULL, update_many, &w[i]);
    }
    worker_t one = {serial, mean, var, 0};
    for (int i = 0; i < THREADS; i++) update_many(&one);
    int failures = one.failures;
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL), failures += w[i].failures;
    CHECK(failures == 0);
    DLTensor a_m, a_v, b_m, b_v;
    int64_t ua, ub;
    bn_running_stats_tensors(shared, &a_m, &a_v);
    bn_running_stats_tensors(serial, &b_m, &b_v);
    CHECK(bn_running_stats_counts(shared, &ua, NULL) == 0 && bn_running_stats_counts(serial, &ub, NULL) == 0);
    CHECK(ua == THREADS * ROUNDS && ub == ua);
    CHECK(memcmp(a_m.data, b_m.data, FEATURES * sizeof(double)) == 0);
    CHECK(memcmp(a_v.data, b_v.data, FEATURES * sizeof(double)) == 0);
    bn_running_stats_destroy(shared);
    bn_running_stats_destroy(serial);
    free(mean), free(var);
  }
}
