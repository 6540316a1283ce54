/*
 * Drivers that walk the canonical problem row by row and call the row kernels.
 *
 * Determinism: reductions split the rows into blocks (an outer prefix of dims
 * whose every index is a separate target, so blocks never share a target) and
 * each block into a number of slabs fixed by the shape alone. Slab partials
 * are merged in slab order. No split depends on the thread count, so results
 * are bitwise identical for any number of threads.
 */
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu.h"

#define BN_SLAB_ELEMS (1 << 16) /* elements per slab of a reduction, at least */
#define BN_MAX_SLABS 64         /* slabs per block, at most */
#define BN_COL_CHUNK 4096       /* elements per chunk of a column reduction, about */
#define BN_PAR_MIN (1 << 15)    /* below this many elements a pass runs on one thread */

static int requested_threads = 0;

bn_status_t bn_set_num_threads(int32_t n) {
  __atomic_store_n(&requested_threads, n > 0 ? n : 0, __ATOMIC_RELAXED);
  return BN_STATUS_SUCCESS;
}

int bn_threads(void) {
  int n = __atomic_load_n(&requested_threads, __ATOMIC_RELAXED);
#ifdef _OPENMP
  return n > 0 ? n : omp_get_max_threads();
#else
  (void)n;
  return 1;
#endif
}

int32_t bn_get_num_threads(void) { return bn_threads(); }

/* Fills `row` for row number r (row-major over all dims but the last) and returns
 * the row's index under the per-dim index strides `ts` (NULL: none). */
static int64_t row_at(const bn_plan_t *P, int64_t r, const int64_t *ts, bn_row_t *row) {
  const int last = P->ndim - 1;
  const size_t es = bn_dtype_size(P->dtype);
  int64_t off[BN_NOPS] = {0, 0, 0}, g = P->g0, p = P->p0, t = 0;
  for (int d = last - 1; d >= 0; d--) {
    const bn_dim_t *dim = &P->dim[d];
    const int64_t i = r % dim->n;
    r /= dim->n;
    for (int k = 0; k < BN_NOPS; k++) off[k] += i * dim->s[k];
    g += i * dim->sg;
    p += i * dim->sp;
    if (ts) t += i * ts[d];
  }
  const bn_dim_t *in = &P->dim[last];
  row->n = in->n;
  row->x = P->base[BN_OP_X] + off[BN_OP_X] * (int64_t)es;
  row->dy = P->base[BN_OP_DY] ? P->base[BN_OP_DY] + off[BN_OP_DY] * (int64_t)es : NULL;
  row->out = P->base[BN_OP_OUT] ? P->base[BN_OP_OUT] + off[BN_OP_OUT] * (int64_t)es : NULL;
  row->sx = in->s[BN_OP_X];
  row->sdy = in->s[BN_OP_DY];
  row->so = in->s[BN_OP_OUT];
  row->g = g, row->sg = in->sg;
  row->p = p, row->sp = in->sp;
  return t;
}

static int64_t row_count(const bn_plan_t *P) {
  int64_t rows = 1;
  for (int d = 0; d < P->ndim - 1; d++) rows *= P->dim[d].n;
  return rows;
}

/* ------------------------------------------------------------------ reductions */

typedef struct reduction_t {
  const bn_plan_t *P;
  const bn_kernels_t *K;
  int moments;              /* 1: moments of x into (cnt, a=mean, b=m2); 0: backward sums into (a, b) */
  int target;               /* backward sums: BN_TARGET_GROUP or BN_TARGET_PARAM */
  const bn_coef_t *coef;
  int64_t ts[BN_MAX_CANON]; /* target-index stride per dim */
  int64_t t0;               /* target index of element 0 */
} reduction_t;

/* Reduces rows [r0, r1) into arrays indexed by `ts_idx` (global or block-local strides)
 * offset by `tbase`. `tmp` holds 2 * row length doubles for column chunks. */
static void reduce_rows(const reduction_t *R, int64_t r0, int64_t r1, const int64_t *ts_idx, int64_t tbase,
                        double *cnt, double *a, double *b, double *tmp) {
  const bn_plan_t *P = R->P;
  const int last = P->ndim - 1;
  const int64_t t_in = ts_idx[last];
  const int col_runs = last >= 1 && R->ts[last - 1] == 0; /* consecutive rows share targets */
  for (int64_t r = r0; r < r1;) {
    bn_row_t row;
    const int64_t t = tbase + row_at(P, r, ts_idx, &row);
    if (!R->moments) {
      R->K->grad_sums(&row, R->coef, R->target, t, t_in, a, b);
      r++;
    } else if (t_in == 0) {
      double mean, m2;
      R->K->moments_row(&row, &mean, &m2);
      bn_chan_merge(&cnt[t], &a[t], &b[t], (double)row.n, mean, m2);
      r++;
    } else {
      int64_t k = 1;
      if (col_runs) {
        const int64_t n_prev = P->dim[last - 1].n, left_in_run = n_prev - r % n_prev;
        k = BN_COL_CHUNK / row.n > 1 ? BN_COL_CHUNK / row.n : 1;
        if (k > left_in_run) k = left_in_run;
        if (k > r1 - r) k = r1 - r;
      }
      double *tmean = tmp, *tm2 = tmp + row.n;
      R->K->moments_cols(&row, k, P->dim[last - 1 >= 0 ? last - 1 : 0].s[BN_OP_X], tmean, tm2);
      for (int64_t i = 0; i < row.n; i++)
        bn_chan_merge(&cnt[t + i * t_in], &a[t + i * t_in], &b[t + i * t_in], (double)k, tmean[i], tm2[i]);
      r += k;
    }
  }
}

/* Block-local target strides (compact row-major over the block's target dims) and
 * the map from local to global target offsets. Returns the number of local targets. */
static int64_t local_targets(const reduction_t *R, int prefix, int64_t *lts, int64_t **map_out) {
  const bn_plan_t *P = R->P;
  int64_t ntl = 1;
  for (int d = P->ndim - 1; d >= 0; d--) {
    lts[d] = (d >= prefix && R->ts[d] != 0) ? ntl : 0;
    if (d >= prefix && R->ts[d] != 0) ntl *= P->dim[d].n;
  }
  int64_t *map = malloc((size_t)ntl * sizeof *map);
  if (!map) return -1;
  int64_t idx[BN_MAX_CANON] = {0};
  for (int64_t l = 0; l < ntl; l++) {
    int64_t gofs = 0;
    for (int d = prefix; d < P->ndim; d++) gofs += idx[d] * R->ts[d];
    map[l] = gofs;
    for (int d = P->ndim - 1; d >= prefix; d--) {
      if (lts[d] == 0) continue;
      if (++idx[d] < P->dim[d].n) break;
      idx[d] = 0;
    }
  }
  *map_out = map;
  return ntl;
}

static bn_status_t run_reduction(const reduction_t *R, int64_t ntargets, double *cnt, double *a, double *b) {
  const bn_plan_t *P = R->P;
  const int last = P->ndim - 1, nthreads = bn_threads();
  const int64_t nrows = row_count(P), L = P->dim[last].n;
  if (R->moments) memset(cnt, 0, (size_t)ntargets * sizeof *cnt);
  memset(a, 0, (size_t)ntargets * sizeof *a);
  memset(b, 0, (size_t)ntargets * sizeof *b);
  if (P->numel == 0) return BN_STATUS_SUCCESS;

  int prefix = 0;
  int64_t nblocks = 1;
  while (prefix < last && R->ts[prefix] != 0) nblocks *= P->dim[prefix++].n;
  const int64_t rpb = nrows / nblocks;
  int64_t nslab = rpb * L / BN_SLAB_ELEMS;
  if (nslab > BN_MAX_SLABS) nslab = BN_MAX_SLABS;
  if (nslab > rpb) nslab = rpb;
  if (nslab < 1) nslab = 1;

  const int64_t tmp_len = 2 * L;
  double *tmp = malloc((size_t)(nthreads * tmp_len) * sizeof *tmp);
  if (!tmp) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "reduction workspace of %lld doubles", (long long)(nthreads * tmp_len));
  const int par = P->numel >= BN_PAR_MIN;

  if (nslab == 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (par && nblocks > 1)
    for (int64_t blk = 0; blk < nblocks; blk++) {
      int tid = 0;
#ifdef _OPENMP
      tid = omp_get_thread_num();
#endif
      reduce_rows(R, blk * rpb, (blk + 1) * rpb, R->ts, R->t0, cnt, a, b, tmp + tid * tmp_len);
    }
    free(tmp);
    return BN_STATUS_SUCCESS;
  }

  int64_t lts[BN_MAX_CANON], *map = NULL;
  const int64_t ntl = local_targets(R, prefix, lts, &map);
  const int nacc = R->moments ? 3 : 2;
  double *ws = ntl < 0 ? NULL : malloc((size_t)(nslab * ntl * nacc) * sizeof *ws);
  if (!ws) {
    free(map), free(tmp);
    return bn_fail(BN_STATUS_OUT_OF_MEMORY, "reduction workspace of %lld slabs", (long long)nslab);
  }
  for (int64_t blk = 0; blk < nblocks; blk++) {
    bn_row_t first;
    const int64_t tblock = R->t0 + row_at(P, blk * rpb, R->ts, &first);
#pragma omp parallel num_threads(nthreads) if (par)
    {
      int tid = 0;
#ifdef _OPENMP
      tid = omp_get_thread_num();
#endif
#pragma omp for schedule(static)
      for (int64_t s = 0; s < nslab; s++) {
        double *sc = ws + s * ntl * nacc, *sa = sc + ntl * (nacc - 2), *sb = sa + ntl;
        memset(sc, 0, (size_t)(ntl * nacc) * sizeof *sc);
        const int64_t r0 = blk * rpb + rpb * s / nslab, r1 = blk * rpb + rpb * (s + 1) / nslab;
        reduce_rows(R, r0, r1, lts, 0, sc, sa, sb, tmp + tid * tmp_len);
      }
#pragma omp for schedule(static)
      for (int64_t l = 0; l < ntl; l++) {
        const int64_t t = tblock + map[l];
        for (int64_t s = 0; s < nslab; s++) {
          const double *sc = ws + s * ntl * nacc, *sa = sc + ntl * (nacc - 2), *sb = sa + ntl;
          if (R->moments) bn_chan_merge(&cnt[t], &a[t], &b[t], sc[l], sa[l], sb[l]);
          else a[t] += sa[l], b[t] += sb[l];
        }
      }
    }
  }
  free(ws), free(map), free(tmp);
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_cpu_moments(const bn_plan_t *plan, double *mean, double *m2) {
  reduction_t R = {.P = plan, .K = bn_cpu_kernels(plan->dtype), .moments = 1, .t0 = plan->g0};
  for (int d = 0; d < plan->ndim; d++) R.ts[d] = plan->dim[d].sg;
  double *cnt = malloc((size_t)(plan->ngroups > 0 ? plan->ngroups : 1) * sizeof *cnt);
  if (!cnt) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "group counts");
  bn_status_t st = run_reduction(&R, plan->ngroups, cnt, mean, m2);
  free(cnt);
  return st;
}

bn_status_t bn_cpu_grad_sums(const bn_plan_t *plan, const bn_coef_t *coef, int target, double *sum_a,
                             double *sum_b) {
  reduction_t R = {.P = plan, .K = bn_cpu_kernels(plan->dtype), .moments = 0, .target = target, .coef = coef,
                   .t0 = target == BN_TARGET_GROUP ? plan->g0 : plan->p0};
  for (int d = 0; d < plan->ndim; d++) R.ts[d] = target == BN_TARGET_GROUP ? plan->dim[d].sg : plan->dim[d].sp;
  return run_reduction(&R, target == BN_TARGET_GROUP ? plan->ngroups : plan->nparams, NULL, sum_a, sum_b);
}

/* ------------------------------------------------------------------ apply passes */

static void apply(const bn_plan_t *P, const bn_coef_t *coef, int backward) {
  if (P->numel == 0) return;
  const bn_kernels_t *K = bn_cpu_kernels(P->dtype);
  const int64_t nrows = row_count(P);
  const int nthreads = bn_threads();
#pragma omp parallel for num_threads(nthreads) schedule(static) if (P->numel >= BN_PAR_MIN && nrows > 1)
  for (int64_t r = 0; r < nrows; r++) {
    bn_row_t row;
    row_at(P, r, NULL, &row);
    if (backward) K->apply_backward(&row, coef);
    else K->apply_forward(&row, coef);
  }
}

void bn_cpu_apply_forward(const bn_plan_t *plan, const bn_coef_t *coef) { apply(plan, coef, 0); }
void bn_cpu_apply_backward(const bn_plan_t *plan, const bn_coef_t *coef) { apply(plan, coef, 1); }
