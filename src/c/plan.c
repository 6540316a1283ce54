/*
 * The plan: (shape, strides, reduce axes, parameter axes, split axis) -> the
 * canonical problem of internal.h. Kernels never see the variant: they see
 * dims with operand strides, a group-index stride and a parameter-index stride.
 */
#include <inttypes.h>
#include <stdlib.h>

#include "internal.h"

/* Logical dims before canonicalization: one per axis, two for the split axis. */
typedef struct logical_t {
  int ndim;
  bn_dim_t dim[BN_MAX_CANON];
  int grouped[BN_MAX_CANON]; /* not reduced: separates statistic groups */
  int param[BN_MAX_CANON];   /* indexes the parameters */
} logical_t;

static bn_status_t expand_axes(const bn_norm_desc_t *desc, const DLTensor *x, const DLTensor *ops[BN_NOPS],
                               logical_t *L) {
  L->ndim = 0;
  for (int32_t d = 0; d < x->ndim; d++) {
    int reduced = (int)((desc->reduce_axes >> d) & 1u);
    int param = (int)((desc->param_axes >> d) & 1u);
    int64_t n = x->shape[d];
    int64_t s[BN_NOPS];
    for (int k = 0; k < BN_NOPS; k++) s[k] = ops[k] ? bn_stride(ops[k], d) : 0;
    if (d == 0 && desc->virtual_batch_size > 0) { /* ghost batch norm: (N / v) groups of v reduced samples */
      const int64_t v = desc->virtual_batch_size;
      if (n % v != 0)
        return bn_fail(BN_STATUS_SHAPE_MISMATCH,
                       "virtual_batch_size: the batch of %" PRId64 " samples (axis 0) is not a multiple of the "
                       "virtual batch size %" PRId64, n, v);
      bn_dim_t outer = {.n = n / v}, inner = {.n = v};
      for (int k = 0; k < BN_NOPS; k++) outer.s[k] = s[k] * v, inner.s[k] = s[k];
      L->dim[L->ndim] = outer, L->grouped[L->ndim] = 1, L->param[L->ndim++] = 0;
      L->dim[L->ndim] = inner, L->grouped[L->ndim] = 0, L->param[L->ndim++] = 0;
    } else if (d == desc->split_axis) {
      int64_t G = desc->num_groups;
      if (G <= 0 || n % G != 0)
        return bn_fail(BN_STATUS_SHAPE_MISMATCH,
                       "num_groups: expected a divisor of the %" PRId64 " channels of axis %d, got %" PRId64, n,
                       (int)d, G);
      bn_dim_t outer = {.n = G}, inner = {.n = n / G};
      for (int k = 0; k < BN_NOPS; k++) outer.s[k] = s[k] * (n / G), inner.s[k] = s[k];
      L->dim[L->ndim] = outer, L->grouped[L->ndim] = 1, L->param[L->ndim++] = param;
      L->dim[L->ndim] = inner, L->grouped[L->ndim] = 0, L->param[L->ndim++] = param;
    } else {
      bn_dim_t dim = {.n = n};
      for (int k = 0; k < BN_NOPS; k++) dim.s[k] = s[k];
      L->dim[L->ndim] = dim, L->grouped[L->ndim] = !reduced, L->param[L->ndim++] = param;
    }
  }
  return BN_STATUS_SUCCESS;
}

/* Row-major index strides over the flagged logical dims, in logical order. */
static int64_t index_strides(logical_t *L, const int *flag, int use_param) {
  int64_t count = 1;
  for (int i = L->ndim - 1; i >= 0; i--) {
    int64_t s = flag[i] ? count : 0;
    if (use_param) L->dim[i].sp = s;
    else L->dim[i].sg = s;
    if (flag[i]) count *= L->dim[i].n;
  }
  return count;
}

static int64_t abs64(int64_t v) { return v < 0 ? -v : v; }

/* Two neighbours merge when every stride of the outer one is the inner's times its size. */
static int mergeable(const bn_dim_t *outer, const bn_dim_t *inner) {
  if (outer->n == 0 || inner->n == 0) return 0; /* an empty dim would hide its neighbour's role */
  for (int k = 0; k < BN_NOPS; k++)
    if (outer->s[k] != inner->s[k] * inner->n) return 0;
  return outer->sg == inner->sg * inner->n && outer->sp == inner->sp * inner->n;
}

/* Fused when the row is a statistics dim and one group's `operands` fit in BN_FUSE_BYTES. */
static bn_path_t choose_path(const bn_plan_t *plan, int operands) {
  if (plan->numel == 0) return BN_PATH_EMPTY;
  const int64_t bytes = plan->group_size * (int64_t)bn_dtype_size(plan->dtype) * operands;
  return !plan->row_across_groups && bytes <= BN_FUSE_BYTES ? BN_PATH_FUSED : BN_PATH_TWO_PHASE;
}

bn_status_t bn_plan_build(const bn_norm_desc_t *desc, const DLTensor *x, const DLTensor *dy,
                          const DLTensor *out, bn_dtype_t dtype, bn_plan_t *plan) {
  const DLTensor *ops[BN_NOPS] = {x, dy, out};
  logical_t L;
  bn_status_t st = expand_axes(desc, x, ops, &L);
  if (st) return st;

  int64_t group_size = 1;
  for (int i = 0; i < L.ndim; i++)
    if (!L.grouped[i]) group_size *= L.dim[i].n;
  plan->ngroups = index_strides(&L, L.grouped, 0);
  plan->nparams = index_strides(&L, L.param, 1);
  plan->group_size = group_size;
  plan->numel = bn_numel(x);
  plan->dtype = dtype;
  plan->params_in_groups = 1;
  for (int i = 0; i < L.ndim; i++)
    if (L.param[i] && !L.grouped[i] && L.dim[i].n > 1) plan->params_in_groups = 0;

  for (int k = 0; k < BN_NOPS; k++) plan->base[k] = ops[k] ? bn_base(ops[k]) : NULL;
  plan->g0 = plan->p0 = 0;
  size_t es = bn_dtype_size(dtype);

  /* drop size-1 dims; flip dims whose x stride is negative so that x is walked forwards */
  int nd = 0;
  bn_dim_t dims[BN_MAX_CANON];
  for (int i = 0; i < L.ndim; i++) {
    bn_dim_t d = L.dim[i];
    if (d.n == 1) continue;
    if (d.s[BN_OP_X] < 0) {
      for (int k = 0; k < BN_NOPS; k++) {
        if (plan->base[k]) plan->base[k] += (d.n - 1) * d.s[k] * (int64_t)es;
        d.s[k] = -d.s[k];
      }
      plan->g0 += (d.n - 1) * d.sg, d.sg = -d.sg;
      plan->p0 += (d.n - 1) * d.sp, d.sp = -d.sp;
    }
    dims[nd++] = d;
  }
  /* order outermost first by x's stride (stable insertion sort keeps logical order on ties) */
  for (int i = 1; i < nd; i++) {
    bn_dim_t d = dims[i];
    int j = i - 1;
    while (j >= 0 && abs64(dims[j].s[BN_OP_X]) < abs64(d.s[BN_OP_X])) dims[j + 1] = dims[j], j--;
    dims[j + 1] = d;
  }
  /* merge neighbours */
  plan->ndim = 0;
  for (int i = 0; i < nd; i++) {
    if (plan->ndim > 0 && mergeable(&plan->dim[plan->ndim - 1], &dims[i])) {
      bn_dim_t *o = &plan->dim[plan->ndim - 1];
      o->n *= dims[i].n;
      for (int k = 0; k < BN_NOPS; k++) o->s[k] = dims[i].s[k];
      o->sg = dims[i].sg;
      o->sp = dims[i].sp;
    } else {
      plan->dim[plan->ndim++] = dims[i];
    }
  }
  if (plan->ndim == 0) { /* a single element: one dim of size 1 keeps the loops simple */
    bn_dim_t one = {.n = 1};
    plan->dim[0] = one;
    plan->ndim = 1;
  }
  plan->row_across_groups = plan->dim[plan->ndim - 1].sg != 0;
  plan->forward_path = choose_path(plan, 2);
  plan->backward_path = choose_path(plan, 3);
  return BN_STATUS_SUCCESS;
}

void bn_plan_group_params(const bn_plan_t *plan, int64_t *param_of_group) {
  /* walk the group dims only; every group is reached once */
  int nd = 0;
  const bn_dim_t *gd[BN_MAX_CANON];
  for (int i = 0; i < plan->ndim; i++)
    if (plan->dim[i].sg != 0) gd[nd++] = &plan->dim[i];
  int64_t idx[BN_MAX_CANON] = {0};
  for (int64_t visited = 0; visited < plan->ngroups; visited++) {
    int64_t g = plan->g0, p = plan->p0;
    for (int i = 0; i < nd; i++) g += idx[i] * gd[i]->sg, p += idx[i] * gd[i]->sp;
    param_of_group[g] = p;
    for (int i = nd - 1; i >= 0; i--) {
      if (++idx[i] < gd[i]->n) break;
      idx[i] = 0;
    }
  }
}
