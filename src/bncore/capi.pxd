# Cython declarations of bncore's C ABI: a mirror of bncore/bncore.h and the DLPack
# structures it uses. Installed with the package so that other Cython projects can
# `from bncore cimport capi` and link against the same library (bncore.get_library()).
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "dlpack/dlpack.h" nogil:
    ctypedef struct DLPackVersion:
        uint32_t major
        uint32_t minor

    ctypedef enum DLDeviceType:
        kDLCPU
        kDLCUDA
        kDLCUDAManaged
        kDLCUDAHost

    ctypedef struct DLDevice:
        DLDeviceType device_type
        int32_t device_id

    ctypedef struct DLDataType:
        uint8_t code
        uint8_t bits
        uint16_t lanes

    ctypedef struct DLTensor:
        void *data
        DLDevice device
        int32_t ndim
        DLDataType dtype
        int64_t *shape
        int64_t *strides
        uint64_t byte_offset

    ctypedef struct DLManagedTensor:
        DLTensor dl_tensor
        void *manager_ctx
        void (*deleter)(DLManagedTensor *)

    ctypedef struct DLManagedTensorVersioned:
        DLPackVersion version
        void *manager_ctx
        void (*deleter)(DLManagedTensorVersioned *)
        uint64_t flags
        DLTensor dl_tensor

    ctypedef int (*DLPackDLTensorFromPyObjectNoSync)(void *py_object, DLTensor *out)

    ctypedef struct DLPackExchangeAPIHeader:
        DLPackVersion version
        DLPackExchangeAPIHeader *prev_api

    ctypedef struct DLPackExchangeAPI:
        DLPackExchangeAPIHeader header
        DLPackDLTensorFromPyObjectNoSync dltensor_from_py_object_no_sync

    uint64_t DLPACK_FLAG_BITMASK_READ_ONLY
    int DLPACK_MAJOR_VERSION
    int DLPACK_MINOR_VERSION

cdef extern from "bncore/bncore.h" nogil:
    ctypedef enum bn_status_t:
        BN_STATUS_SUCCESS
        BN_STATUS_INVALID_ARGUMENT
        BN_STATUS_SHAPE_MISMATCH
        BN_STATUS_UNSUPPORTED_DTYPE
        BN_STATUS_UNSUPPORTED_DEVICE
        BN_STATUS_OVERLAP
        BN_STATUS_OUT_OF_MEMORY
        BN_STATUS_INTERNAL
        BN_STATUS_COUNT

    const char *bn_status_string(bn_status_t status)
    const char *bn_last_error()
    uint32_t bn_version()
    const char *bn_version_string()
    uint32_t BN_BUILD_CUDA
    uint32_t BN_BUILD_OPENMP
    bn_status_t bn_build_features(uint32_t *features, const char **cuda_architectures)
    const char *bn_cpu_kernel_level()
    bn_status_t bn_cuda_device_count(int32_t *count)
    bn_status_t bn_set_num_threads(int32_t n)
    int32_t bn_get_num_threads()

    ctypedef struct bn_context_t:
        pass
    ctypedef void *(*bn_alloc_fn)(void *user, size_t nbytes)
    ctypedef void (*bn_free_fn)(void *user, void *ptr)
    bn_status_t bn_context_create(DLDevice device, bn_context_t **out)
    bn_status_t bn_context_destroy(bn_context_t *ctx)
    bn_status_t bn_context_device(const bn_context_t *ctx, DLDevice *device)
    bn_status_t bn_context_set_stream(bn_context_t *ctx, void *stream)
    bn_status_t bn_context_set_num_threads(bn_context_t *ctx, int32_t n)
    bn_status_t bn_context_get_num_threads(const bn_context_t *ctx, int32_t *n)
    bn_status_t bn_context_set_allocator(bn_context_t *ctx, bn_alloc_fn alloc, bn_free_fn free, void *user)

    int BN_MAX_NDIM
    uint32_t BN_FLAG_RMS
    uint32_t BN_FLAG_USE_RUNNING_STATS
    uint32_t BN_FLAG_UPDATE_RUNNING_STATS
    uint32_t BN_FLAG_RUNNING_VAR_BIASED
    uint32_t BN_FLAG_SKIP_NONFINITE
    uint32_t BN_FLAG_GIVEN_STATS
    uint32_t BN_FLAG_RENORM
    uint32_t BN_FLAG_ALL

    ctypedef struct bn_norm_desc_t:
        uint64_t struct_size
        uint64_t reduce_axes
        uint64_t param_axes
        int32_t split_axis
        int32_t reserved
        int64_t num_groups
        double eps
        double momentum
        uint32_t flags
        uint32_t reserved2
        int64_t virtual_batch_size
        double rmax
        double dmax
        uint32_t activation
        uint32_t reserved3

    bn_status_t bn_norm_desc_init_batch(bn_norm_desc_t *desc, int32_t ndim, int32_t channel_axis, double eps)
    bn_status_t bn_norm_desc_init_layer(bn_norm_desc_t *desc, int32_t ndim, int32_t normalized_ndim, double eps)
    bn_status_t bn_norm_desc_init_rms(bn_norm_desc_t *desc, int32_t ndim, int32_t normalized_ndim, double eps)
    bn_status_t bn_norm_desc_init_instance(bn_norm_desc_t *desc, int32_t ndim, double eps)
    bn_status_t bn_norm_desc_init_group(bn_norm_desc_t *desc, int32_t ndim, int64_t num_groups, double eps)

    bn_status_t bn_norm_forward(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                const DLTensor *weight, const DLTensor *bias, const DLTensor *stats_mean,
                                const DLTensor *stats_m2, int64_t stats_count, DLTensor *running_mean,
                                DLTensor *running_var, DLTensor *y, DLTensor *save_mean, DLTensor *save_rstd)
    ctypedef enum bn_activation_t:
        BN_ACTIVATION_NONE
        BN_ACTIVATION_RELU
        BN_ACTIVATION_COUNT
    uint64_t BN_NORM_DESC_SIZE_V1
    bn_status_t bn_norm_forward_ex(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                   const DLTensor *weight, const DLTensor *bias, const DLTensor *residual,
                                   const DLTensor *stats_mean, const DLTensor *stats_m2, int64_t stats_count,
                                   DLTensor *running_mean, DLTensor *running_var, DLTensor *y,
                                   DLTensor *save_mean, DLTensor *save_rstd, DLTensor *save_r, DLTensor *save_d)
    bn_status_t bn_norm_backward_ex(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                    const DLTensor *dy, const DLTensor *weight, const DLTensor *save_mean,
                                    const DLTensor *save_rstd, const DLTensor *y, const DLTensor *save_r,
                                    const DLTensor *save_d, DLTensor *dx, DLTensor *dweight, DLTensor *dbias,
                                    DLTensor *dresidual)
    bn_status_t bn_norm_stats(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x, DLTensor *mean,
                              DLTensor *m2, int64_t *count)
    bn_status_t bn_moments_merge(bn_context_t *ctx, const DLTensor *count_a, const DLTensor *mean_a,
                                 const DLTensor *m2_a, const DLTensor *count_b, const DLTensor *mean_b,
                                 const DLTensor *m2_b, DLTensor *count, DLTensor *mean, DLTensor *m2)
    bn_status_t bn_norm_backward(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                 const DLTensor *dy, const DLTensor *weight, const DLTensor *save_mean,
                                 const DLTensor *save_rstd, DLTensor *dx, DLTensor *dweight, DLTensor *dbias)
    bn_status_t bn_norm_backward_reduce(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                        const DLTensor *dy, const DLTensor *save_mean, const DLTensor *save_rstd,
                                        DLTensor *sum_dy, DLTensor *sum_dy_xhat)
    bn_status_t bn_norm_backward_apply(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                       const DLTensor *dy, const DLTensor *weight, const DLTensor *save_mean,
                                       const DLTensor *save_rstd, const DLTensor *sum_dy,
                                       const DLTensor *sum_dy_xhat, int64_t count, DLTensor *dx)

    ctypedef struct bn_running_stats_t:
        pass

    uint32_t BN_STATS_BIASED_VAR
    uint32_t BN_STATS_CUMULATIVE
    uint32_t BN_STATS_SKIP_NONFINITE
    uint32_t BN_STATS_ALL

    bn_status_t bn_running_stats_create(int64_t num_features, DLDataType dtype, double factor, uint32_t flags,
                                        bn_running_stats_t **out)
    bn_status_t bn_running_stats_destroy(bn_running_stats_t *stats)
    bn_status_t bn_running_stats_tensors(bn_running_stats_t *stats, DLTensor *mean, DLTensor *var)
    bn_status_t bn_running_stats_counts(const bn_running_stats_t *stats, int64_t *updates, int64_t *skipped)
    bn_status_t bn_running_stats_set_counts(bn_running_stats_t *stats, int64_t updates, int64_t skipped)
    bn_status_t bn_running_stats_set_factor(bn_running_stats_t *stats, double factor)
    bn_status_t bn_running_stats_load(bn_running_stats_t *stats, const DLTensor *mean, const DLTensor *var,
                                      int64_t updates, int64_t skipped)
    bn_status_t bn_running_stats_update(bn_running_stats_t *stats, const DLTensor *batch_mean,
                                        const DLTensor *batch_var, int64_t n)
    bn_status_t bn_norm_forward_stats(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                      const DLTensor *weight, const DLTensor *bias, const DLTensor *stats_mean,
                                      const DLTensor *stats_m2, int64_t stats_count, bn_running_stats_t *stats,
                                      DLTensor *y, DLTensor *save_mean, DLTensor *save_rstd)
    bn_status_t bn_norm_forward_stats_ex(bn_context_t *ctx, const bn_norm_desc_t *desc, const DLTensor *x,
                                         const DLTensor *weight, const DLTensor *bias, const DLTensor *residual,
                                         const DLTensor *stats_mean, const DLTensor *stats_m2,
                                         int64_t stats_count, bn_running_stats_t *stats, DLTensor *y,
                                         DLTensor *save_mean, DLTensor *save_rstd, DLTensor *save_r,
                                         DLTensor *save_d)
