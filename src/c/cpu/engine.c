/*
 * The CPU backend: drivers that walk the canonical problem and call the row kernels,
 * and the backend table (bn_cpu_backend) at the end.
 *
 * Two strategies, chosen by the plan from the shape alone (bn_path_t):
 *  - fused: when the row is a statistics dim and one group's data fits in L2,
 *    each group is reduced and then normalized (or differentiated) while it is
 *    still in cache, one group per thread at a time: one read of x from memory.
 *  - two-phase: a reduction over the whole tensor, then an apply pass.
 *
 * Determinism: a group's reduction always runs in one fixed order. The
 * two-phase reduction splits rows into blocks (an outer prefix of dims whose
 * every index is a separate target, so blocks never share a target) and each
 * block into a number of slabs fixed by the shape; slab partials merge in slab
 * order. No split depends on the thread count, so results are bitwise identical
 * for any number of threads.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu.h"

#define BN_SLAB_ELEMS (1 << 16) /* elements per slab of a reduction, at least */
#define BN_MAX_SLABS 64         /* slabs per block, at most */
#define BN_COL_CHUNK 16384      /* elements per chunk of a column reduction, about */
#define BN_COL_ROWS_MIN 8       /* rows per chunk, at least: fewer Chan merges per column */
#define BN_COL_ROWS_MAX 128     /* rows per chunk, at most: compute-type column sums stay short */
#define BN_TILE_ELEMS 16384     /* elements per tile of rows handed to a kernel, about */
#define BN_PAR_MIN (1 << 15)    /* below this many elements a pass runs on one thread */
#define BN_LINE 64              /* bytes of a cache line */
#define BN_ROWS_PER_TILE 16     /* one-row groups per call of the fused row kernels */
#define BN_LINE_ROUND(n) (((n) + BN_LINE - 1) / BN_LINE * BN_LINE)

static int thread_id(void) {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/* `for (int64_t i = 0; i < n; i++) body` on a team of `nthreads` threads (static schedule) when
 * `par` holds and more than one thread and one iteration would run, else as a plain loop on the
 * calling thread. Not OpenMP's if clause: a region that clause turns off still starts a team of
 * one, and that team's closing barrier makes a futex system call (0.9 us a region on the 2-core
 * development machine, more than all the arithmetic of a (16, 32) batch norm). */
#define BN_FOR(par, nthreads, i, n, ...)                                \
  do {                                                                   \
    const int bn_for_nt = (nthreads);                                    \
    const int64_t bn_for_n = (n);                                        \
    if ((par) && bn_for_nt > 1 && bn_for_n > 1) {                        \
      _Pragma("omp parallel for num_threads(bn_for_nt) schedule(static)") \
      for (int64_t i = 0; i < bn_for_n; i++) __VA_ARGS__                 \
    } else {                                                             \
      for (int64_t i = 0; i < bn_for_n; i++) __VA_ARGS__                 \
    }                                                                    \
  } while (0)

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
  const bn_dim_t *in = &P->dim[last], *outer = last > 0 ? &P->dim[last - 1] : NULL;
  row->m = 1;
  row->rx = outer ? outer->s[BN_OP_X] : 0, row->rdy = outer ? outer->s[BN_OP_DY] : 0;
  row->ro = outer ? outer->s[BN_OP_OUT] : 0;
  row->rg = outer ? outer->sg : 0, row->rp = outer ? outer->sp : 0;
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

/* How many rows from row r (at most `limit`, and `cap` by size) stay in one run of the
 * next-to-last dim, so that a tile can step through them with that dim's strides. */
static int64_t tile_rows(const bn_plan_t *P, int64_t r, int64_t limit) {
  if (P->ndim < 2) return 1;
  const int64_t run = P->dim[P->ndim - 2].n, left = run - r % run;
  const int64_t L = P->dim[P->ndim - 1].n, cap = L >= BN_TILE_ELEMS ? 1 : BN_TILE_ELEMS / L;
  int64_t k = left < limit ? left : limit;
  return k < cap ? k : cap;
}

static int64_t row_count(const bn_plan_t *P) {
  int64_t rows = 1;
  for (int d = 0; d < P->ndim - 1; d++) rows *= P->dim[d].n;
  return rows;
}

/* ------------------------------------------------------------------ reductions */

typedef struct reduction_t {
  const bn_exec_t *ex;
  const bn_plan_t *P;
  const bn_kernels_t *K;
  int moments;              /* 1: moments of x into (cnt, a=mean, b=m2); 0: backward sums into (a, b) */
  int target;               /* backward sums: BN_TARGET_GROUP or BN_TARGET_PARAM */
  const bn_cpu_coef_t *coef;
  int64_t ts[BN_MAX_CANON]; /* target-index stride per dim */
  int64_t t0;               /* target index of element 0 */
} reduction_t;

/* bn_chan_merge of nb[i * snb] elements with moments (mb[i], m2b[i]) into the unit-stride columns
 * (cnt, mean, m2)[i], i < ncols (snb 0: one count for all): the same operations column by column,
 * so the same bits. Where every column has elements on both sides and a finite difference of
 * means (a column reduction's chunks after the first), in a loop without branches that the
 * compiler vectorizes: a branchy merge per column per chunk, each with two divisions, had been a
 * fifth of (256, 1024) batch norm's training forward. */
static void chan_merge_cols(double *restrict cnt, double *restrict mean, double *restrict m2, int64_t ncols,
                            const double *restrict nb, int64_t snb, const double *restrict mb,
                            const double *restrict m2b) {
  int plain = 1;
  for (int64_t i = 0; i < ncols; i++)
    plain &= (cnt[i] != 0.0) & (nb[i * snb] != 0.0) & (fabs(mb[i] - mean[i]) <= DBL_MAX);
  if (!plain) {
    for (int64_t i = 0; i < ncols; i++) bn_chan_merge(&cnt[i], &mean[i], &m2[i], nb[i * snb], mb[i], m2b[i]);
    return;
  }
  for (int64_t i = 0; i < ncols; i++) {
    const double na = cnt[i], b = nb[i * snb], n = na + b, d = mb[i] - mean[i];
    mean[i] += d * (b / n);
    m2[i] += m2b[i] + d * d * (na * b / n);
    cnt[i] = n;
  }
}

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
      row.m = tile_rows(P, r, r1 - r);
      R->K->grad_sums(&row, R->coef, R->target, t, t_in, last > 0 ? ts_idx[last - 1] : 0, a, b);
      r += row.m;
    } else if (t_in == 0) {
      double mean, m2;
      R->K->moments_row(&row, &mean, &m2);
      bn_chan_merge(&cnt[t], &a[t], &b[t], (double)row.n, mean, m2);
      r++;
    } else {
      int64_t k = 1;
      if (col_runs) {
        const int64_t n_prev = P->dim[last - 1].n, left_in_run = n_prev - r % n_prev;
        k = BN_COL_CHUNK / row.n;
        k = k < BN_COL_ROWS_MIN ? BN_COL_ROWS_MIN : k > BN_COL_ROWS_MAX ? BN_COL_ROWS_MAX : k;
        if (k > left_in_run) k = left_in_run;
        if (k > r1 - r) k = r1 - r;
      }
      double *tmean = tmp, *tm2 = tmp + row.n;
      R->K->moments_cols(&row, k, P->dim[last - 1 >= 0 ? last - 1 : 0].s[BN_OP_X], tmean, tm2, tmp + 2 * row.n);
      if (t_in == 1) {
        const double kd = (double)k;
        chan_merge_cols(&cnt[t], &a[t], &b[t], row.n, &kd, 0, tmean, tm2);
      } else {
        for (int64_t i = 0; i < row.n; i++)
          bn_chan_merge(&cnt[t + i * t_in], &a[t + i * t_in], &b[t + i * t_in], (double)k, tmean[i], tm2[i]);
      }
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
  int64_t *map = bn_ws_alloc(R->ex, (size_t)ntl * sizeof *map);
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

/* One block of a reduction in slabs: each slab's partials, then every target's slabs merged in
 * slab order. Run by every thread of a team, which share out its loops, or by one thread alone. */
typedef struct slab_block_t {
  const reduction_t *R;
  int64_t r0, rpb, nslab, ntl, tblock, tmp_len; /* r0: the block's first row */
  int nacc, contiguous;
  const int64_t *lts, *map;
  double *ws, *tmp, *cnt, *a, *b;
} slab_block_t;

static void slab_block(const slab_block_t *S) {
  const int64_t nslab = S->nslab, ntl = S->ntl, nacc = S->nacc, rpb = S->rpb;
  double *ws = S->ws, *cnt = S->cnt, *a = S->a, *b = S->b;
  const int tid = thread_id();
#pragma omp for schedule(static)
  for (int64_t s = 0; s < nslab; s++) {
    double *sc = ws + s * ntl * nacc, *sa = sc + ntl * (nacc - 2), *sb = sa + ntl;
    memset(sc, 0, (size_t)(ntl * nacc) * sizeof *sc);
    const int64_t r0 = S->r0 + rpb * s / nslab, r1 = S->r0 + rpb * (s + 1) / nslab;
    reduce_rows(S->R, r0, r1, S->lts, 0, sc, sa, sb, S->tmp + tid * S->tmp_len);
  }
  if (S->R->moments && S->contiguous) { /* every target's slabs in slab order, as below, by columns */
#pragma omp for schedule(static)
    for (int64_t l0 = 0; l0 < ntl; l0 += 256) {
      const int64_t nl = ntl - l0 < 256 ? ntl - l0 : 256, t = S->tblock + S->map[0] + l0;
      for (int64_t s = 0; s < nslab; s++) {
        const double *sc = ws + s * ntl * nacc + l0, *sa = sc + ntl, *sb = sa + ntl;
        chan_merge_cols(&cnt[t], &a[t], &b[t], nl, sc, 1, sa, sb);
      }
    }
  } else {
#pragma omp for schedule(static)
    for (int64_t l = 0; l < ntl; l++) {
      const int64_t t = S->tblock + S->map[l];
      for (int64_t s = 0; s < nslab; s++) {
        const double *sc = ws + s * ntl * nacc, *sa = sc + ntl * (nacc - 2), *sb = sa + ntl;
        if (S->R->moments) bn_chan_merge(&cnt[t], &a[t], &b[t], sc[l], sa[l], sb[l]);
        else a[t] += sa[l], b[t] += sb[l];
      }
    }
  }
}

static bn_status_t run_reduction(const reduction_t *R, int64_t ntargets, double *cnt, double *a, double *b) {
  const bn_plan_t *P = R->P;
  const int last = P->ndim - 1, nthreads = R->ex->nthreads;
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

  if (L > (INT64_C(1) << 40)) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "a row of %lld elements", (long long)L);
  const int64_t tmp_len = 5 * L; /* column means, m2, and 3 compute-type scratch columns */
  double *tmp = bn_ws_alloc(R->ex, (size_t)(nthreads * tmp_len) * sizeof *tmp);
  if (!tmp) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "reduction workspace of %lld doubles", (long long)(nthreads * tmp_len));
  const int par = P->numel >= BN_PAR_MIN;

  if (nslab == 1) {
    BN_FOR(par, nthreads, blk, nblocks,
           { reduce_rows(R, blk * rpb, (blk + 1) * rpb, R->ts, R->t0, cnt, a, b, tmp + thread_id() * tmp_len); });
    bn_ws_free(R->ex, tmp);
    return BN_STATUS_SUCCESS;
  }

  int64_t lts[BN_MAX_CANON], *map = NULL;
  const int64_t ntl = local_targets(R, prefix, lts, &map);
  const int nacc = R->moments ? 3 : 2;
  double *ws = ntl < 0 ? NULL : bn_ws_alloc(R->ex, (size_t)(nslab * ntl * nacc) * sizeof *ws);
  if (!ws) {
    bn_ws_free(R->ex, map), bn_ws_free(R->ex, tmp);
    return bn_fail(BN_STATUS_OUT_OF_MEMORY, "reduction workspace of %lld slabs", (long long)nslab);
  }
  int contiguous = 1; /* the local targets are consecutive global ones */
  for (int64_t l = 1; l < ntl && contiguous; l++) contiguous = map[l] == map[0] + l;
  slab_block_t S = {R, 0, rpb, nslab, ntl, 0, tmp_len, nacc, contiguous, lts, map, ws, tmp, cnt, a, b};
  for (int64_t blk = 0; blk < nblocks; blk++) {
    bn_row_t first;
    S.r0 = blk * rpb;
    S.tblock = R->t0 + row_at(P, S.r0, R->ts, &first);
    if (par && nthreads > 1) { /* not an if clause: see BN_FOR */
#pragma omp parallel num_threads(nthreads)
      slab_block(&S);
    } else {
      slab_block(&S);
    }
  }
  bn_ws_free(R->ex, ws), bn_ws_free(R->ex, map), bn_ws_free(R->ex, tmp);
  return BN_STATUS_SUCCESS;
}

/* ------------------------------------------------------------------ shared steps */

/* What apply_rows runs on each tile. */
typedef enum apply_kind_t { APPLY_FORWARD, APPLY_BACKWARD, APPLY_MASK, APPLY_MASK_RELU } apply_kind_t;

static void apply_rows(const bn_exec_t *ex, const bn_plan_t *P, const bn_cpu_coef_t *c, apply_kind_t kind) {
  const bn_kernels_t *K = bn_cpu_kernels(P->dtype);
  const int64_t nrows = row_count(P), run = P->ndim >= 2 ? P->dim[P->ndim - 2].n : 1;
  /* tiles: runs of the next-to-last dim cut into pieces of at most tile_rows() rows */
  const int64_t per_run = (run + tile_rows(P, 0, run) - 1) / tile_rows(P, 0, run), ntiles = nrows / run * per_run;
  const int64_t step = tile_rows(P, 0, run);
  const int nthreads = ex->nthreads;
  BN_FOR(P->numel >= BN_PAR_MIN, nthreads, i, ntiles, {
    const int64_t r = (i / per_run) * run + (i % per_run) * step;
    bn_row_t tile;
    row_at(P, r, NULL, &tile);
    tile.m = run - (r % run) < step ? run - (r % run) : step;
    if (kind == APPLY_BACKWARD) K->apply_backward(&tile, c);
    else if (kind == APPLY_FORWARD) K->apply_forward(&tile, c);
    else K->mask_grad(&tile, kind == APPLY_MASK_RELU);
  });
}

/* The kernels' view of `c`: compute-type copies of weight and bias and, for rows across
 * groups, per-group coefficients, in one workspace block (*block; free with bn_ws_free). */
static bn_status_t prepare_ct(const bn_exec_t *ex, const bn_plan_t *P, const bn_coef_t *c, int backward,
                              bn_cpu_coef_t *k, void **block) {
  const bn_kernels_t *K = bn_cpu_kernels(P->dtype);
  const int groups_along_row = P->row_across_groups && c->param_of_group != NULL;
  const size_t cs = K->ct_size, np = (size_t)P->nparams, ng = groups_along_row ? (size_t)P->ngroups : 0;
  *k = (bn_cpu_coef_t){.c = *c};
  /* each array starts on a cache line: the kernels read them beside x in vector loads, and a
   * vector load that crosses a line costs two (measured: layer norm's apply, 20% slower) */
  const size_t np_pad = BN_LINE_ROUND(np * cs), ng_pad = BN_LINE_ROUND(ng * cs);
  *block = bn_ws_alloc(ex, 2 * np_pad + 4 * ng_pad + BN_LINE);
  if (!*block) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "compute-type coefficients");
  char *p = (char *)BN_LINE_ROUND((uintptr_t)*block);
  if (c->weight) K->to_compute(c->weight, P->nparams, p), k->weight_ct = p;
  p += np_pad;
  if (c->bias) K->to_compute(c->bias, P->nparams, p), k->bias_ct = p;
  p += np_pad;
  if (ng) {
    void *m = p, *a = p + ng_pad, *b = p + 2 * ng_pad, *s = p + 3 * ng_pad;
    K->group_coefs(c, P->ngroups, backward, m, a, b, s);
    k->gmean_ct = m, k->gscale_ct = a, k->gshift_ct = b, k->gslope_ct = s;
  }
  return BN_STATUS_SUCCESS;
}

/* ------------------------------------------------------------------ fused: one group at a time */

/* The canonical dims but the row, split into group dims and statistic dims. */
typedef struct group_walk_t {
  int ngd, nrd;
  const bn_dim_t *gd[BN_MAX_CANON], *rd[BN_MAX_CANON];
  int64_t rows; /* rows per group */
} group_walk_t;

static void group_walk_init(const bn_plan_t *P, group_walk_t *W) {
  W->ngd = W->nrd = 0;
  W->rows = 1;
  for (int d = 0; d < P->ndim - 1; d++) {
    if (P->dim[d].sg != 0) W->gd[W->ngd++] = &P->dim[d];
    else W->rd[W->nrd++] = &P->dim[d], W->rows *= P->dim[d].n;
  }
}

/* Row r of the j-th group (both row-major over their dims). */
static void group_row(const bn_plan_t *P, const group_walk_t *W, int64_t j, int64_t r, bn_row_t *row) {
  const size_t es = bn_dtype_size(P->dtype);
  int64_t off[BN_NOPS] = {0, 0, 0}, g = P->g0, p = P->p0;
  for (int d = W->ngd - 1; d >= 0; d--) {
    const int64_t i = j % W->gd[d]->n;
    j /= W->gd[d]->n;
    for (int k = 0; k < BN_NOPS; k++) off[k] += i * W->gd[d]->s[k];
    g += i * W->gd[d]->sg, p += i * W->gd[d]->sp;
  }
  for (int d = W->nrd - 1; d >= 0; d--) {
    const int64_t i = r % W->rd[d]->n;
    r /= W->rd[d]->n;
    for (int k = 0; k < BN_NOPS; k++) off[k] += i * W->rd[d]->s[k];
    p += i * W->rd[d]->sp;
  }
  const bn_dim_t *in = &P->dim[P->ndim - 1];
  row->n = in->n;
  row->x = P->base[BN_OP_X] + off[BN_OP_X] * (int64_t)es;
  row->dy = P->base[BN_OP_DY] ? P->base[BN_OP_DY] + off[BN_OP_DY] * (int64_t)es : NULL;
  row->out = P->base[BN_OP_OUT] ? P->base[BN_OP_OUT] + off[BN_OP_OUT] * (int64_t)es : NULL;
  row->sx = in->s[BN_OP_X], row->sdy = in->s[BN_OP_DY], row->so = in->s[BN_OP_OUT];
  row->g = g, row->sg = 0;
  row->p = p, row->sp = in->sp;
  row->m = 1, row->rx = row->rdy = row->ro = row->rg = row->rp = 0;
}

static int64_t slab_count(const bn_plan_t *P, int64_t units) {
  int64_t n = P->numel / BN_SLAB_ELEMS;
  if (n > BN_MAX_SLABS) n = BN_MAX_SLABS;
  if (n > units) n = units;
  return n < 1 ? 1 : n;
}

/* Moments of the j-th group, row after row in a fixed order (the fused path's reduction);
 * returns the group's index. `row` is left at the group's last row. */
static int64_t group_moments(const bn_plan_t *P, const bn_kernels_t *K, const group_walk_t *W, int64_t j,
                             bn_row_t *row, double *mean_out, double *m2_out) {
  double cnt = 0, mean = 0, m2 = 0;
  group_row(P, W, j, 0, row);
  for (int64_t r = 0; r < W->rows; r++) {
    double rm, rm2;
    if (r > 0) group_row(P, W, j, r, row);
    K->moments_row(row, &rm, &rm2);
    bn_chan_merge(&cnt, &mean, &m2, (double)row->n, rm, rm2);
  }
  *mean_out = mean, *m2_out = m2;
  return row->g;
}

/* Forward, one group at a time: reduce, finish the statistics, apply from cache. */
static void fused_forward(const bn_exec_t *ex, const bn_plan_t *P, const bn_cpu_coef_t *k) {
  const bn_kernels_t *K = bn_cpu_kernels(P->dtype);
  bn_coef_t c = k->c; /* a copy of the pointers: the arrays receive the statistics */
  group_walk_t W;
  group_walk_init(P, &W);
  if (W.rows == 1 && W.ngd == 1) { /* one-row groups along one dim: tiles of rows, one kernel call each */
    const bn_dim_t *gd = W.gd[0];
    const int64_t ntiles = (P->ngroups + BN_ROWS_PER_TILE - 1) / BN_ROWS_PER_TILE;
    BN_FOR(P->numel >= BN_PAR_MIN, ex->nthreads, t, ntiles, {
      const int64_t j0 = t * BN_ROWS_PER_TILE;
      bn_row_t tile;
      group_row(P, &W, j0, 0, &tile);
      tile.m = P->ngroups - j0 < BN_ROWS_PER_TILE ? P->ngroups - j0 : BN_ROWS_PER_TILE;
      tile.rx = gd->s[BN_OP_X], tile.rdy = gd->s[BN_OP_DY], tile.ro = gd->s[BN_OP_OUT];
      tile.rg = gd->sg, tile.rp = gd->sp;
      K->forward_rows(&tile, k, &c, (double)P->group_size);
    });
    return;
  }
  if (W.nrd == 1) { /* a group's rows run along one dim: the group is a tile, one kernel call */
    const bn_dim_t *rd = W.rd[0];
    BN_FOR(P->numel >= BN_PAR_MIN, ex->nthreads, j, P->ngroups, {
      bn_row_t tile;
      group_row(P, &W, j, 0, &tile);
      tile.m = W.rows;
      tile.rx = rd->s[BN_OP_X], tile.rdy = rd->s[BN_OP_DY], tile.ro = rd->s[BN_OP_OUT];
      tile.rg = 0, tile.rp = rd->sp;
      K->forward_group(&tile, k, &c, (double)P->group_size);
    });
    return;
  }
  BN_FOR(P->numel >= BN_PAR_MIN, ex->nthreads, j, P->ngroups, {
    bn_row_t row;
    double mean, m2;
    const int64_t g = group_moments(P, K, &W, j, &row, &mean, &m2); /* reduce */
    c.mean[g] = mean, c.var[g] = m2;
    bn_finish_stats(&c, g, (double)P->group_size);
    for (int64_t r = 0; r < W.rows; r++) { /* apply, from cache */
      group_row(P, &W, j, r, &row);
      K->apply_forward(&row, k);
    }
  });
}

/* Backward, one group at a time (the apply from cache when the plan has dx). Parameter sums
 * that cross groups (parameters along the row) accumulate per slab of groups and merge in
 * slab order. */
static bn_status_t fused_backward(const bn_exec_t *ex, const bn_plan_t *P, const bn_cpu_coef_t *k, int training,
                                  double *dweight, double *dbias) {
  const bn_kernels_t *K = bn_cpu_kernels(P->dtype);
  const bn_coef_t *c = &k->c;
  group_walk_t W;
  group_walk_init(P, &W);
  const int want_params = dweight || dbias, by_group = c->param_of_group != NULL;
  const int64_t ng = P->ngroups, np = P->nparams, nslab = slab_count(P, ng);
  /* by_group: raw sums of dy and dy*xhat per group (double); else per-slab parameter partials:
   * compute-type partials where parameters run along the row (a slab holds at most 1/64 of the
   * rows; slabs then add in double); where a row adds into one parameter (the row is spatial),
   * the double dot products of grad_sums */
  const int ct_partials = P->dim[P->ndim - 1].sp == 1;
  const size_t pbytes = ct_partials ? K->ct_size : sizeof(double);
  const size_t extra = by_group ? 2 * (size_t)ng : 0;
  const size_t partial_bytes = (!by_group && want_params) ? 2 * (size_t)(nslab * np) * pbytes : 0;
  double *ws = bn_ws_calloc(ex, extra + 1, sizeof *ws);
  char *partials = bn_ws_calloc(ex, partial_bytes + 1, 1);
  if (!ws || !partials) {
    bn_ws_free(ex, ws), bn_ws_free(ex, partials);
    return bn_fail(BN_STATUS_OUT_OF_MEMORY, "backward workspace");
  }
  bn_cpu_coef_t plain = *k;
  plain.c.weight = NULL;
  bn_cpu_coef_t apply = *k;
  if (!training) apply.c.sum_dy = apply.c.sum_dyx = NULL;
  else if (c->rms) apply.c.sum_dy = NULL;
  /* one-row groups along one dim, parameters along the row (layer and RMS norm): tiles of rows */
  const int rows_tiles = W.rows == 1 && W.ngd == 1 && !by_group && (ct_partials || !want_params);
  BN_FOR(P->numel >= BN_PAR_MIN, ex->nthreads, s, nslab, {
    char *pa = partials + (size_t)(s * 2 * np) * pbytes, *pb = pa + (size_t)np * pbytes;
    if (rows_tiles) { /* the slab's one-row groups as one tile, one kernel call */
      const int64_t j0 = ng * s / nslab, j1 = ng * (s + 1) / nslab;
      if (j1 <= j0) continue;
      bn_row_t tile;
      group_row(P, &W, j0, 0, &tile);
      tile.m = j1 - j0;
      tile.rx = W.gd[0]->s[BN_OP_X], tile.rdy = W.gd[0]->s[BN_OP_DY], tile.ro = W.gd[0]->s[BN_OP_OUT];
      tile.rg = W.gd[0]->sg, tile.rp = W.gd[0]->sp;
      K->backward_rows(&tile, k, P->base[BN_OP_OUT] ? &apply : NULL, training, want_params ? pa : NULL,
                       want_params ? pb : NULL);
      continue;
    }
    for (int64_t j = ng * s / nslab; j < ng * (s + 1) / nslab; j++) {
      bn_row_t row;
      group_row(P, &W, j, 0, &row);
      const int64_t g = row.g;
      if (by_group) {
        double *ra = ws, *rb = ws + ng;
        for (int64_t r = 0; r < W.rows; r++) {
          group_row(P, &W, j, r, &row);
          K->grad_sums(&row, &plain, BN_TARGET_GROUP, g, 0, 0, ra, rb);
        }
        const double w = c->weight ? c->weight[c->param_of_group[g]] : 1.0;
        c->sum_dy[g] = w * ra[g], c->sum_dyx[g] = w * rb[g];
      } else {
        c->sum_dy[g] = c->sum_dyx[g] = 0.0;
        for (int64_t r = 0; r < W.rows; r++) {
          group_row(P, &W, j, r, &row);
          if (training) K->grad_sums(&row, k, BN_TARGET_GROUP, g, 0, 0, c->sum_dy, c->sum_dyx);
          if (want_params && ct_partials) K->param_sums_ct(&row, k, pa, pb);
          else if (want_params) K->grad_sums(&row, &plain, BN_TARGET_PARAM, row.p, row.sp, 0, (double *)pa, (double *)pb);
        }
      }
      if (P->base[BN_OP_OUT])
        for (int64_t r = 0; r < W.rows; r++) { /* apply, from cache */
          group_row(P, &W, j, r, &row);
          K->apply_backward(&row, &apply);
        }
    }
  });
  if (want_params && by_group) {
    for (int64_t g = 0; g < ng; g++) {
      const int64_t p = c->param_of_group[g];
      if (dbias) dbias[p] += ws[g];
      if (dweight) dweight[p] += ws[ng + g];
    }
  } else if (want_params) {
    for (int64_t s = 0; s < nslab; s++) {
      const char *pa = partials + (size_t)(s * 2 * np) * pbytes, *pb = pa + (size_t)np * pbytes;
      for (int64_t p = 0; p < np && !ct_partials; p++) {
        if (dbias) dbias[p] += ((const double *)pa)[p];
        if (dweight) dweight[p] += ((const double *)pb)[p];
      }
      if (dbias && ct_partials) K->add_to_double(pa, np, dbias);
      if (dweight && ct_partials) K->add_to_double(pb, np, dweight);
    }
  }
  bn_ws_free(ex, ws);
  bn_ws_free(ex, partials);
  return BN_STATUS_SUCCESS;
}

/* ------------------------------------------------------------------ two-phase */

static bn_status_t reduce_moments(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c) {
  reduction_t R = {.ex = ex, .P = P, .K = bn_cpu_kernels(P->dtype), .moments = 1, .t0 = P->g0};
  for (int d = 0; d < P->ndim; d++) R.ts[d] = P->dim[d].sg;
  double *cnt = bn_ws_alloc(ex, (size_t)(P->ngroups > 0 ? P->ngroups : 1) * sizeof *cnt);
  if (!cnt) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "group counts");
  bn_status_t st = run_reduction(&R, P->ngroups, cnt, c->mean, c->var);
  bn_ws_free(ex, cnt);
  return st;
}

static bn_status_t reduce_grads(const bn_exec_t *ex, const bn_plan_t *P, const bn_cpu_coef_t *k, int target,
                                double *a, double *b) {
  reduction_t R = {.ex = ex, .P = P, .K = bn_cpu_kernels(P->dtype), .moments = 0, .target = target, .coef = k,
                   .t0 = target == BN_TARGET_GROUP ? P->g0 : P->p0};
  for (int d = 0; d < P->ndim; d++) R.ts[d] = target == BN_TARGET_GROUP ? P->dim[d].sg : P->dim[d].sp;
  return run_reduction(&R, target == BN_TARGET_GROUP ? P->ngroups : P->nparams, NULL, a, b);
}

/* ------------------------------------------------------------------ the backend's steps */

static bn_status_t cpu_stats(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c) {
  if (P->forward_path == BN_PATH_EMPTY) {
    for (int64_t g = 0; g < P->ngroups; g++) c->mean[g] = c->var[g] = 0.0;
    return BN_STATUS_SUCCESS;
  }
  if (P->forward_path == BN_PATH_TWO_PHASE) return reduce_moments(ex, P, c);
  const bn_kernels_t *K = bn_cpu_kernels(P->dtype);
  group_walk_t W;
  group_walk_init(P, &W);
  BN_FOR(P->numel >= BN_PAR_MIN, ex->nthreads, j, P->ngroups, {
    bn_row_t row;
    double mean, m2;
    const int64_t g = group_moments(P, K, &W, j, &row, &mean, &m2);
    c->mean[g] = mean, c->var[g] = m2;
  });
  return BN_STATUS_SUCCESS;
}

static bn_status_t cpu_forward(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c, int compute_stats) {
  bn_status_t st;
  const int64_t n = P->group_size;
  if (P->forward_path == BN_PATH_EMPTY) {
    for (int64_t g = 0; compute_stats && g < P->ngroups; g++) c->mean[g] = c->var[g] = 0.0, bn_finish_stats(c, g, 0);
    return BN_STATUS_SUCCESS;
  }
  bn_cpu_coef_t k;
  void *block = NULL;
  if (compute_stats && P->forward_path == BN_PATH_FUSED) {
    /* with renorm the effective weight and bias are written group by group in the loop: the fused
     * path's rows (one group, one parameter index) read them as doubles, not the copies made here */
    if ((st = prepare_ct(ex, P, c, 0, &k, &block))) return st;
    fused_forward(ex, P, &k);
  } else {
    if (compute_stats) {
      if ((st = reduce_moments(ex, P, c))) return st;
      for (int64_t g = 0; g < P->ngroups; g++) bn_finish_stats(c, g, (double)n);
    }
    if ((st = prepare_ct(ex, P, c, 0, &k, &block))) return st;
    apply_rows(ex, P, &k, APPLY_FORWARD);
  }
  bn_ws_free(ex, block);
  return BN_STATUS_SUCCESS;
}

/* The two-phase reduce: group sums (training) and parameter sums in full passes. */
static bn_status_t two_phase_reduce(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c, int training,
                                    double *dweight, double *dbias) {
  const int64_t ng = P->ngroups, np = P->nparams;
  const int want_params = dweight || dbias, by_group = c->param_of_group != NULL;
  bn_cpu_coef_t k = {.c = *c}, plain = {.c = *c};
  plain.c.weight = NULL;
  bn_status_t st = BN_STATUS_SUCCESS;
  if (by_group && (training || want_params)) { /* one reduction per group gives both; weight factors out */
    double *raw = bn_ws_calloc(ex, 2 * (size_t)ng + 1, sizeof *raw);
    if (!raw) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "backward workspace");
    if (!(st = reduce_grads(ex, P, &plain, BN_TARGET_GROUP, raw, raw + ng)))
      for (int64_t g = 0; g < ng; g++) {
        const int64_t p = c->param_of_group[g];
        const double w = c->weight ? c->weight[p] : 1.0;
        c->sum_dy[g] = w * raw[g], c->sum_dyx[g] = w * raw[ng + g];
        if (dbias) dbias[p] += raw[g];
        if (dweight) dweight[p] += raw[ng + g];
      }
    bn_ws_free(ex, raw);
    return st;
  }
  if (training && (st = reduce_grads(ex, P, &k, BN_TARGET_GROUP, c->sum_dy, c->sum_dyx))) return st;
  if (!want_params) return BN_STATUS_SUCCESS;
  double *tmp = bn_ws_calloc(ex, 2 * (size_t)np + 1, sizeof *tmp);
  if (!tmp) return bn_fail(BN_STATUS_OUT_OF_MEMORY, "backward workspace");
  st = reduce_grads(ex, P, &plain, BN_TARGET_PARAM, tmp, tmp + np);
  for (int64_t p = 0; p < np && !st; p++) {
    if (dbias) dbias[p] = tmp[p];
    if (dweight) dweight[p] = tmp[np + p];
  }
  bn_ws_free(ex, tmp);
  return st;
}

static void zero_sums(const bn_plan_t *P, bn_coef_t *c, double *dweight, double *dbias) {
  for (int64_t p = 0; p < P->nparams; p++) {
    if (dweight) dweight[p] = 0.0;
    if (dbias) dbias[p] = 0.0;
  }
  for (int64_t g = 0; c->sum_dy && g < P->ngroups; g++) c->sum_dy[g] = c->sum_dyx[g] = 0.0;
}

static bn_status_t cpu_backward_reduce(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c, int training,
                                       double *dweight, double *dbias) {
  zero_sums(P, c, dweight, dbias);
  if (P->backward_path == BN_PATH_EMPTY) return BN_STATUS_SUCCESS;
  if (P->backward_path == BN_PATH_TWO_PHASE) return two_phase_reduce(ex, P, c, training, dweight, dbias);
  bn_plan_t reduce_only = *P; /* the fused walk without its apply */
  reduce_only.base[BN_OP_OUT] = NULL;
  bn_cpu_coef_t k;
  void *block = NULL;
  bn_status_t st = prepare_ct(ex, P, c, 1, &k, &block);
  if (!st) st = fused_backward(ex, &reduce_only, &k, training, dweight, dbias);
  bn_ws_free(ex, block);
  return st;
}

static bn_status_t cpu_backward_apply(const bn_exec_t *ex, const bn_plan_t *P, const bn_coef_t *c, int training) {
  if (P->backward_path == BN_PATH_EMPTY || !P->base[BN_OP_OUT]) return BN_STATUS_SUCCESS;
  bn_coef_t apply = *c;
  if (!training) apply.sum_dy = apply.sum_dyx = NULL;
  else if (c->rms) apply.sum_dy = NULL;
  bn_cpu_coef_t k;
  void *block = NULL;
  bn_status_t st = prepare_ct(ex, P, &apply, 1, &k, &block);
  if (!st) apply_rows(ex, P, &k, APPLY_BACKWARD);
  bn_ws_free(ex, block);
  return st;
}

static bn_status_t cpu_backward(const bn_exec_t *ex, const bn_plan_t *P, bn_coef_t *c, int training,
                                double *dweight, double *dbias) {
  if (P->backward_path != BN_PATH_FUSED) {
    bn_status_t st = cpu_backward_reduce(ex, P, c, training, dweight, dbias);
    return st ? st : cpu_backward_apply(ex, P, c, training);
  }
  zero_sums(P, c, dweight, dbias);
  bn_cpu_coef_t k;
  void *block = NULL;
  bn_status_t st = prepare_ct(ex, P, c, 1, &k, &block);
  if (!st) st = fused_backward(ex, P, &k, training, dweight, dbias);
  bn_ws_free(ex, block);
  return st;
}

static bn_status_t cpu_mask_grad(const bn_exec_t *ex, const bn_plan_t *P, int relu) {
  if (P->numel > 0) apply_rows(ex, P, NULL, relu ? APPLY_MASK_RELU : APPLY_MASK);
  return BN_STATUS_SUCCESS;
}

static bn_status_t cpu_gather(const bn_exec_t *ex, const DLTensor *t, double *dst) {
  (void)ex;
  bn_gather_f64(t, dst);
  return BN_STATUS_SUCCESS;
}

static bn_status_t cpu_scatter(const bn_exec_t *ex, DLTensor *t, const double *src) {
  (void)ex;
  bn_scatter_f64(t, src);
  return BN_STATUS_SUCCESS;
}

static int cpu_accepts(DLDevice home, DLDevice device) {
  (void)home;
  return bn_is_host(device);
}

const bn_backend_t bn_cpu_backend = {
    .name = "cpu",
    .accepts = cpu_accepts,
    .stats = cpu_stats,
    .forward = cpu_forward,
    .backward_reduce = cpu_backward_reduce,
    .backward_apply = cpu_backward_apply,
    .backward = cpu_backward,
    .mask_grad = cpu_mask_grad,
    .gather = cpu_gather,
    .scatter = cpu_scatter,
};
