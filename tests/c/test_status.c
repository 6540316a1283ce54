/* Statuses, the thread-local error message and the version. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "bncore/bncore.h"
#include "harness.h"
#include "tensors.h"

/* A small valid batch-norm problem: x (2, 3, 4) float32, y separate. */
static float xs[24], ys[24];
static int64_t shape3[3] = {2, 3, 4};

static bn_status_t good_forward(void) {
  tt_t x, y;
  bn_norm_desc_t desc;
  bn_status_t st = bn_norm_desc_init_batch(&desc, 3, 1, 1e-5);
  if (st) return st;
  for (int i = 0; i < 24; i++) xs[i] = (float)(i % 7) - 3.0f;
  return bn_norm_forward(NULL, &desc, tt_init(&x, xs, TT_F32, 3, shape3, NULL), NULL, NULL, NULL, NULL, 0, NULL, NULL, tt_init(&y, ys, TT_F32, 3, shape3, NULL), NULL, NULL);
}

static bn_status_t forward_with_eps(double eps) {
  tt_t x, y;
  bn_norm_desc_t desc;
  bn_norm_desc_init_batch(&desc, 3, 1, 1e-5);
  desc.eps = eps;
  return bn_norm_forward(NULL, &desc, tt_init(&x, xs, TT_F32, 3, shape3, NULL), NULL, NULL, NULL, NULL, 0, NULL, NULL, tt_init(&y, ys, TT_F32, 3, shape3, NULL), NULL, NULL);
}

static void *fail_on_other_thread(void *out) {
  forward_with_eps(-2.0);
  snprintf((char *)out, 256, "%s", bn_last_error());
  return NULL;
}

static void *succeed_on_other_thread(void *unused) {
  (void)unused;
  good_forward();
  return NULL;
}

SUITE(status) {
  TEST(status_strings_nonempty_and_distinct) {
    for (int s = 0; s < BN_STATUS_COUNT; s++) {
      const char *str = bn_status_string((bn_status_t)s);
      CHECK(str != NULL);
      if (!str) continue;
      CHECK(str[0] != '\0');
      CHECK(strcmp(str, "unknown status") != 0);
      for (int t = 0; t < s; t++) {
        const char *other = bn_status_string((bn_status_t)t);
        if (other && !CHECK(strcmp(str, other) != 0)) fprintf(stderr, "  statuses %d and %d: \"%s\"\n", t, s, str);
      }
    }
    CHECK(strcmp(bn_status_string(BN_STATUS_SUCCESS), "success") == 0);
  }

  TEST(status_values_are_stable) {
    CHECK(BN_STATUS_SUCCESS == 0);
    CHECK(BN_STATUS_INVALID_ARGUMENT == 1);
    CHECK(BN_STATUS_SHAPE_MISMATCH == 2);
    CHECK(BN_STATUS_UNSUPPORTED_DTYPE == 3);
    CHECK(BN_STATUS_UNSUPPORTED_DEVICE == 4);
    CHECK(BN_STATUS_OVERLAP == 5);
    CHECK(BN_STATUS_OUT_OF_MEMORY == 6);
    CHECK(BN_STATUS_INTERNAL == 7);
    CHECK(BN_STATUS_COUNT == 8);
  }

  TEST(out_of_range_is_unknown) {
    CHECK(strcmp(bn_status_string(BN_STATUS_COUNT), "unknown status") == 0);
    CHECK(strcmp(bn_status_string((bn_status_t)(BN_STATUS_COUNT + 1)), "unknown status") == 0);
    CHECK(strcmp(bn_status_string((bn_status_t)-1), "unknown status") == 0);
    CHECK(strcmp(bn_status_string((bn_status_t)1000000), "unknown status") == 0);
    CHECK(strcmp(bn_status_string((bn_status_t)INT32_MIN), "unknown status") == 0);
  }

  TEST(last_error_empty_after_success) {
    CHECK(good_forward() == BN_STATUS_SUCCESS);
    CHECK(bn_last_error() != NULL);
    CHECK(strcmp(bn_last_error(), "") == 0);
  }

  TEST(last_error_names_the_argument) {
    CHECK(forward_with_eps(-1.0) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "eps") != NULL);

    bn_norm_desc_t desc;
    CHECK(bn_norm_desc_init_batch(NULL, 4, 1, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "desc") != NULL);
    CHECK(bn_norm_desc_init_group(&desc, 4, 0, 1e-5) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bn_last_error(), "num_groups") != NULL);

    tt_t x, y, w;
    float wv[2] = {1, 1};
    CHECK(bn_norm_desc_init_batch(&desc, 3, 1, 1e-5) == BN_STATUS_SUCCESS);
    CHECK(bn_norm_forward(NULL, &desc, tt_init(&x, xs, TT_F32, 3, shape3, NULL), tt_vec(&w, wv, TT_F32, 2), NULL, NULL, NULL, 0, NULL, NULL, tt_init(&y, ys, TT_F32, 3, shape3, NULL), NULL, NULL) == BN_STATUS_SHAPE_MISMATCH);
    CHECK(strstr(bn_last_error(), "weight") != NULL);
    CHECK(bn_norm_forward(NULL, &desc, NULL, NULL, NULL, NULL, NULL, 0, NULL, NULL, tt_init(&y, ys, TT_F32, 3, shape3, NULL), NULL, NULL) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(strncmp(bn_last_error(), "x:", 2) == 0);
  }

  TEST(last_error_cleared_by_next_successful_call) {
    CHECK(forward_with_eps(-1.0) == BN_STATUS_INVALID_ARGUMENT);
    CHECK(bn_last_error()[0] != '\0');
    CHECK(good_forward() == BN_STATUS_SUCCESS);
    CHECK(strcmp(bn_last_error(), "") == 0);
  }

  /* bncore.h: bn_last_error is "" when the last call succeeded. The desc
   * initializers and bn_set_num_threads are bncore calls returning bn_status_t
   * like forward and backward. */
  TEST(last_error_cleared_by_every_successful_call) {
    bn_norm_desc_t desc;
    const char *names[] = {"bn_norm_desc_init_batch", "bn_norm_desc_init_layer", "bn_norm_desc_init_rms",
                           "bn_norm_desc_init_instance", "bn_norm_desc_init_group", "bn_set_num_threads"};
    for (int i = 0; i < 6; i++) {
      CHECK(forward_with_eps(-1.0) == BN_STATUS_INVALID_ARGUMENT);
      bn_status_t st = BN_STATUS_INTERNAL;
      switch (i) {
        case 0: st = bn_norm_desc_init_batch(&desc, 4, 1, 1e-5); break;
        case 1: st = bn_norm_desc_init_layer(&desc, 4, 2, 1e-5); break;
        case 2: st = bn_norm_desc_init_rms(&desc, 4, 2, 1e-5); break;
        case 3: st = bn_norm_desc_init_instance(&desc, 4, 1e-5); break;
        case 4: st = bn_norm_desc_init_group(&desc, 4, 2, 1e-5); break;
        default: st = bn_set_num_threads(0); break;
      }
      CHECK(st == BN_STATUS_SUCCESS);
      if (!CHECK(strcmp(bn_last_error(), "") == 0))
        fprintf(stderr, "  bn_last_error() after a successful %s: \"%s\"\n", names[i], bn_last_error());
    }
  }

  TEST(last_error_is_thread_local) {
    CHECK(good_forward() == BN_STATUS_SUCCESS);
    pthread_t t;
    char seen_there[256] = "";
    CHECK(pthread_create(&t, NULL, fail_on_other_thread, seen_there) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(strstr(seen_there, "eps") != NULL); /* the other thread saw its own failure */
    CHECK(strcmp(bn_last_error(), "") == 0);  /* and this thread still sees its success */
    CHECK(forward_with_eps(NAN) == BN_STATUS_INVALID_ARGUMENT);
    char mine[256];
    snprintf(mine, sizeof mine, "%s", bn_last_error());
    CHECK(pthread_create(&t, NULL, succeed_on_other_thread, NULL) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(strcmp(bn_last_error(), mine) == 0);
  }

  TEST(version_matches_macros) {
    CHECK(bn_version() == (uint32_t)BN_VERSION);
    CHECK(BN_VERSION == BN_VERSION_MAJOR * 10000 + BN_VERSION_MINOR * 100 + BN_VERSION_PATCH);
    CHECK(bn_version_string() != NULL);
    CHECK(strcmp(bn_version_string(), BN_VERSION_STRING) == 0);
    char buf[64];
    snprintf(buf, sizeof buf, "%d.%d.%d", BN_VERSION_MAJOR, BN_VERSION_MINOR, BN_VERSION_PATCH);
    CHECK(strcmp(bn_version_string(), buf) == 0);
    unsigned maj = 0, min = 0, pat = 0;
    CHECK(sscanf(bn_version_string(), "%u.%u.%u", &maj, &min, &pat) == 3);
    CHECK(bn_version() == maj * 10000u + min * 100u + pat);
  }

  TEST(thread_count_setting) {
    CHECK(bn_set_num_threads(1) == BN_STATUS_SUCCESS);
    CHECK(bn_get_num_threads() == 1);
    CHECK(bn_set_num_threads(0) == BN_STATUS_SUCCESS);
    CHECK(bn_get_num_threads() >= 1);
    CHECK(bn_set_num_threads(-5) == BN_STATUS_SUCCESS);
    CHECK(bn_get_num_threads() >= 1);
  }

  TEST(build_features) {
    uint32_t features = 0xffffffffu;
    const char *archs = NULL;
    CHECK(bn_build_features(&features, &archs) == BN_STATUS_SUCCESS && archs != NULL);
    CHECK(bn_build_features(NULL, NULL) == BN_STATUS_SUCCESS);
    CHECK((features & ~(uint32_t)(BN_BUILD_CUDA | BN_BUILD_OPENMP)) == 0);
    CHECK(((features & BN_BUILD_CUDA) != 0) == (BNCORE_TEST_EXPECT_CUDA != 0));
    CHECK((archs[0] != '\0') == ((features & BN_BUILD_CUDA) != 0));
    int32_t count = -1;
    CHECK(bn_cuda_device_count(&count) == BN_STATUS_SUCCESS && count >= 0);
    if (!(features & BN_BUILD_CUDA)) CHECK(count == 0);
    CHECK(bn_cuda_device_count(NULL) == BN_STATUS_INVALID_ARGUMENT);
  }
}
