/*
 * A tiny test harness (in the spirit of uber/h3's): one SUITE per executable,
 * TEST blocks inside it, CHECK macros that count failures. main returns
 * non-zero when any check failed, so ctest reports the area as failed.
 *
 *   SUITE(status) {
 *     TEST(strings) { CHECK(1 + 1 == 2); CHECK_CLOSE(0.1 + 0.2, 0.3, 1e-12); }
 *   }
 *
 * An optional first argument runs only the tests whose name contains it.
 * TEST is a one-pass for loop: a bare `break` at the top level of a TEST body
 * ends that test early (its verdict is then not printed); prefer if/else.
 */
#ifndef BNCORE_TESTS_HARNESS_H
#define BNCORE_TESTS_HARNESS_H

#include <math.h>
#include <stdio.h>
#include <string.h>

static const char *h_suite = "";
static const char *h_test = "";
static const char *h_filter = NULL;
static int h_checks = 0, h_failures = 0, h_tests = 0, h_failed_tests = 0, h_test_failures_at_start = 0;

static inline int h_begin(const char *name) {
  if (h_filter && !strstr(name, h_filter)) return 0;
  h_test = name;
  h_tests++;
  h_test_failures_at_start = h_failures;
  return 1;
}

static inline void h_end(void) {
  const int failed = h_failures != h_test_failures_at_start;
  h_failed_tests += failed;
  printf("%s %s.%s\n", failed ? "FAIL" : "ok  ", h_suite, h_test);
  fflush(stdout);
}

static inline int h_check(int ok, const char *file, int line, const char *what) {
  h_checks++;
  if (!ok) {
    h_failures++;
    fprintf(stderr, "%s:%d: %s.%s: CHECK failed: %s\n", file, line, h_suite, h_test, what);
  }
  return ok;
}

static inline int h_check_close(double a, double b, double tol, const char *file, int line, const char *ea, const char *eb) {
  h_checks++;
  const int ok = fabs(a - b) <= tol; /* false for NaN */
  if (!ok) {
    h_failures++;
    fprintf(stderr, "%s:%d: %s.%s: CHECK_CLOSE failed: %s = %.17g, %s = %.17g, |diff| = %.3g > %.3g\n", file,
            line, h_suite, h_test, ea, a, eb, b, fabs(a - b), tol);
  }
  return ok;
}

/* The SUITE body runs the TEST blocks in order; main reports and sets the exit status. */
#define SUITE(NAME)                                                                               \
  static void h_run_suite(void);                                                                  \
  int main(int argc, char **argv) {                                                               \
    h_suite = #NAME;                                                                              \
    h_filter = argc > 1 ? argv[1] : NULL;                                                         \
    h_run_suite();                                                                                \
    printf("%s: %d tests, %d failed; %d checks, %d failed\n", h_suite, h_tests, h_failed_tests,   \
           h_checks, h_failures);                                                                 \
    return h_failures != 0 || h_tests == 0;                                                       \
  }                                                                                               \
  static void h_run_suite(void)

/* TEST(name) { ... }: the block runs once, then its verdict is printed. */
#define TEST(NAME) for (int h_once_ = h_begin(#NAME); h_once_; h_once_ = 0, h_end())

#define CHECK(cond) h_check(!!(cond), __FILE__, __LINE__, #cond)
/* |a - b| <= tol (absolute); NaN never passes. */
#define CHECK_CLOSE(a, b, tol) h_check_close((double)(a), (double)(b), (double)(tol), __FILE__, __LINE__, #a, #b)

#endif /* BNCORE_TESTS_HARNESS_H */
