/* The variants: each is a mapping onto bn_norm_desc_t, with no loop over data. */
#include <math.h>

#include "internal.h"

static bn_status_t start(bn_norm_desc_t *desc, int32_t ndim, int32_t min_ndim, double eps, const char *variant) {
  bn_clear_error();
  if (!desc) return bn_fail(BN_STATUS_INVALID_ARGUMENT, "desc: expected a description to fill, got NULL");
  if (ndim < min_ndim || ndim > BN_MAX_NDIM)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "ndim: expected an input of %d to %d dimensions for %s, got %d",
                   (int)min_ndim, BN_MAX_NDIM, variant, (int)ndim);
  if (!isfinite(eps) || eps < 0)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "eps: expected a finite value >= 0, got %g", eps);
  bn_norm_desc_t zero = {.struct_size = sizeof zero, .split_axis = -1, .eps = eps};
  *desc = zero;
  return BN_STATUS_SUCCESS;
}

static uint64_t axis_bit(int32_t axis) { return 1ull << axis; }
static uint64_t all_axes(int32_t ndim) { return (1ull << ndim) - 1; }

bn_status_t bn_norm_desc_init_batch(bn_norm_desc_t *desc, int32_t ndim, int32_t channel_axis, double eps) {
  bn_status_t st = start(desc, ndim, 2, eps, "batch norm");
  if (st) return st;
  const int32_t c = channel_axis < 0 ? channel_axis + ndim : channel_axis;
  if (c < 0 || c >= ndim)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "axis: expected a channel axis in [%d, %d), got %d", (int)-ndim,
                   (int)ndim, (int)channel_axis);
  desc->reduce_axes = all_axes(ndim) & ~axis_bit(c);
  desc->param_axes = axis_bit(c);
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_norm_desc_init_layer(bn_norm_desc_t *desc, int32_t ndim, int32_t normalized_ndim, double eps) {
  bn_status_t st = start(desc, ndim, 1, eps, "layer norm");
  if (st) return st;
  if (normalized_ndim < 1 || normalized_ndim > ndim)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "normalized_shape: expected 1 to %d trailing dimensions, got %d",
                   (int)ndim, (int)normalized_ndim);
  desc->reduce_axes = all_axes(ndim) & ~all_axes(ndim - normalized_ndim);
  desc->param_axes = desc->reduce_axes;
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_norm_desc_init_rms(bn_norm_desc_t *desc, int32_t ndim, int32_t normalized_ndim, double eps) {
  bn_status_t st = bn_norm_desc_init_layer(desc, ndim, normalized_ndim, eps);
  if (st) return st;
  desc->flags = BN_FLAG_RMS;
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_norm_desc_init_instance(bn_norm_desc_t *desc, int32_t ndim, double eps) {
  bn_status_t st = start(desc, ndim, 3, eps, "instance norm");
  if (st) return st;
  desc->reduce_axes = all_axes(ndim) & ~all_axes(2);
  desc->param_axes = axis_bit(1);
  return BN_STATUS_SUCCESS;
}

bn_status_t bn_norm_desc_init_group(bn_norm_desc_t *desc, int32_t ndim, int64_t num_groups, double eps) {
  bn_status_t st = start(desc, ndim, 2, eps, "group norm");
  if (st) return st;
  if (num_groups < 1)
    return bn_fail(BN_STATUS_INVALID_ARGUMENT, "num_groups: expected a positive count, got %lld",
                   (long long)num_groups);
  desc->reduce_axes = all_axes(ndim) & ~all_axes(2);
  desc->param_axes = axis_bit(1);
  desc->split_axis = 1;
  desc->num_groups = num_groups;
  return BN_STATUS_SUCCESS;
}
