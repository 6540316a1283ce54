/* 4-d test tensors in several layouts over padded buffers, and 1-d vectors: shared by
 * the C tests of the kernels. Header-only, like tensors.h. */
#ifndef BNCORE_TEST_VIEWS_H
#define BNCORE_TEST_VIEWS_H

#include <stdlib.h>
#include <string.h>

#include "tensors.h"

#define SENTINEL 777.0

/* ------------------------------------------------------------------ tensors in a few layouts */

enum { L_NCHW, L_NHWC, L_PADDED, L_REVERSED, L_COUNT };
static const char *const layout_names[L_COUNT] = {"NCHW", "NHWC", "padded", "reversed"};

/* A 4-d view (logical N, C, H, W) over its own malloc'ed buffer. */
typedef struct view_t {
  tt_t tt;
  char *buf;
  int64_t span;   /* elements in buf */
  int64_t first;  /* element index of element 0 in buf */
  size_t es;
} view_t;

static void set_raw(char *p, size_t es, double v) {
  if (es == 4) {
    float f = (float)v;
    memcpy(p, &f, 4);
  } else {
    memcpy(p, &v, 8);
  }
}

static double get_raw(const char *p, size_t es) {
  if (es == 4) {
    float f;
    memcpy(&f, p, 4);
    return f;
  }
  double v;
  memcpy(&v, p, 8);
  return v;
}

static DLTensor *view_alloc(view_t *v, DLDataType dt, const int64_t *shape, int layout) {
  const int64_t C = shape[1], H = shape[2], W = shape[3];
  int64_t st[4];
  switch (layout) {
    case L_NHWC: st[0] = H * W * C, st[1] = 1, st[2] = W * C, st[3] = C; break;
    case L_PADDED: { /* gaps between every element, row, channel and sample */
      const int64_t sw = 2, sh = 2 * W + 3, sc = H * sh + 1;
      st[0] = C * sc + 5, st[1] = sc, st[2] = sh, st[3] = sw;
      break;
    }
    case L_REVERSED: st[0] = C * H * W, st[1] = -(H * W), st[2] = W, st[3] = -1; break;
    default: st[0] = C * H * W, st[1] = H * W, st[2] = W, st[3] = 1; break;
  }
  int64_t pos = 0, neg = 0, numel = 1;
  for (int d = 0; d < 4; d++) {
    numel *= shape[d];
    const int64_t ext = (shape[d] - 1) * st[d];
    if (ext < 0) neg -= ext;
    else pos += ext;
  }
  v->es = dt.bits / 8;
  v->span = numel > 0 ? pos + neg + 1 : 1;
  v->first = numel > 0 ? neg : 0;
  v->buf = malloc((size_t)v->span * v->es);
  for (int64_t i = 0; i < v->span; i++) set_raw(v->buf + i * v->es, v->es, SENTINEL);
  tt_init(&v->tt, v->buf, dt, 4, shape, layout == L_NCHW ? NULL : st);
  v->tt.t.byte_offset = (uint64_t)v->first * v->es;
  return &v->tt.t;
}

static void view_free(view_t *v) { free(v->buf); }

/* Elements of the buffer that the view does not cover still hold SENTINEL. */
static int view_gaps_untouched(const view_t *v) {
  char *mark = calloc((size_t)v->span, 1);
  int64_t idx[4] = {0};
  if (tt_numel(&v->tt.t) > 0) {
    do mark[v->first + tt_offset(&v->tt.t, idx)] = 1;
    while (tt_next(4, v->tt.t.shape, idx));
  }
  int ok = 1;
  for (int64_t i = 0; i < v->span; i++)
    if (!mark[i] && get_raw(v->buf + i * v->es, v->es) != SENTINEL) ok = 0;
  free(mark);
  return ok;
}

/* A 1-d tensor of n values over its own buffer. */
typedef struct vec_t {
  tt_t tt;
  char *buf;
} vec_t;

static DLTensor *vec_alloc(vec_t *v, DLDataType dt, int64_t n, const double *vals) {
  v->buf = malloc((size_t)(n > 0 ? n : 1) * (dt.bits / 8));
  tt_vec(&v->tt, v->buf, dt, n);
  for (int64_t i = 0; i < n; i++) tt_set(&v->tt.t, &i, vals ? vals[i] : SENTINEL);
  return &v->tt.t;
}

static double vec_get(const vec_t *v, int64_t i) { return tt_get(&v->tt.t, &i); }

#endif /* BNCORE_TEST_VIEWS_H */
