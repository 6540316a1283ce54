/*
 * DLPack tensor-exchange structures, written for bncore from the published
 * DLPack specification (ABI version 1.1). Layouts and constant values are
 * fixed by that specification; only the comments are ours.
 *
 * Ownership in one line: a producer hands out a DLManagedTensor(Versioned);
 * the consumer that takes it calls its `deleter` exactly once when done.
 */
#ifndef DLPACK_DLPACK_H_
#define DLPACK_DLPACK_H_

#include <stdint.h>
#include <stddef.h>

/* Major changes the layout of DLManagedTensorVersioned; minor only adds. */
#define DLPACK_MAJOR_VERSION 1
#define DLPACK_MINOR_VERSION 1

#ifdef __cplusplus
extern "C" {
#endif

/* The version a producer wrote into a DLManagedTensorVersioned. */
typedef struct {
  uint32_t major;
  uint32_t minor;
} DLPackVersion;

/* Where the memory lives. Values are part of the ABI. */
typedef enum {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLOpenCL = 4,
  kDLVulkan = 7,
  kDLMetal = 8,
  kDLVPI = 9,
  kDLROCM = 10,
  kDLROCMHost = 11,
  kDLExtDev = 12,
  kDLCUDAManaged = 13,
  kDLOneAPI = 14,
  kDLWebGPU = 15,
  kDLHexagon = 16,
  kDLMAIA = 17,
} DLDeviceType;

/* A device: its type and, for multi-device types, its ordinal (0 for CPU). */
typedef struct {
  DLDeviceType device_type;
  int32_t device_id;
} DLDevice;

/* The kind of number an element holds. Values are part of the ABI. */
typedef enum {
  kDLInt = 0U,
  kDLUInt = 1U,
  kDLFloat = 2U,
  kDLOpaqueHandle = 3U,
  kDLBfloat = 4U,
  kDLComplex = 5U,
  kDLBool = 6U,
} DLDataTypeCode;

/* Element type: code, width in bits of one lane, and lanes per element
 * (1 for the scalar types bncore reads). float32 is {kDLFloat, 32, 1}. */
typedef struct {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
} DLDataType;

/*
 * A strided view of memory. Borrowed: it owns nothing.
 *  data        base pointer (for CPU, a host address); may be NULL for empty tensors
 *  device      where `data` lives
 *  ndim        number of dimensions, 0 for a scalar
 *  dtype       element type
 *  shape       ndim sizes (elements)
 *  strides     ndim strides in ELEMENTS, or NULL for a compact row-major tensor
 *  byte_offset bytes to add to `data` to reach element 0
 */
typedef struct {
  void *data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t *shape;
  int64_t *strides;
  uint64_t byte_offset;
} DLTensor;

/*
 * The unversioned managed tensor (DLPack < 1.0, capsule name "dltensor").
 * The consumer calls deleter(self) once; deleter may be NULL.
 */
typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void *manager_ctx;
  void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

/* Flag bits of DLManagedTensorVersioned.flags. */
#define DLPACK_FLAG_BITMASK_READ_ONLY (1UL << 0UL)  /* the consumer must not write */
#define DLPACK_FLAG_BITMASK_IS_COPIED (1UL << 1UL)  /* producer made a copy for this export */
#define DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED (1UL << 2UL)

/*
 * The versioned managed tensor (DLPack >= 1.0, capsule name
 * "dltensor_versioned"). Note that `version` comes first and `dl_tensor`
 * last, so that later minor versions may not move the fields before it.
 */
typedef struct DLManagedTensorVersioned {
  DLPackVersion version;
  void *manager_ctx;
  void (*deleter)(struct DLManagedTensorVersioned *self);
  uint64_t flags;
  DLTensor dl_tensor;
} DLManagedTensorVersioned;

/*
 * The C exchange API (DLPack 1.3): a framework publishes one static table of
 * functions, in Python as the PyCapsule "dlpack_exchange_api" held by the tensor
 * type's __dlpack_c_exchange_api__ attribute, so that a consumer can convert
 * tensors without a Python call or a capsule per tensor. "no_sync" functions do
 * not synchronize streams. Each returns 0 on success, -1 with a Python error set.
 */
typedef int (*DLPackManagedTensorAllocator)(DLTensor *prototype, DLManagedTensorVersioned **out, void *error_ctx,
                                            void (*SetError)(void *error_ctx, const char *kind, const char *message));
/* a new owned reference to the tensor's memory: the consumer calls its deleter */
typedef int (*DLPackManagedTensorFromPyObjectNoSync)(void *py_object, DLManagedTensorVersioned **out);
typedef int (*DLPackManagedTensorToPyObjectNoSync)(DLManagedTensorVersioned *tensor, void **out_py_object);
/* a borrowed view: *out (its shape and strides too) stays valid while py_object lives */
typedef int (*DLPackDLTensorFromPyObjectNoSync)(void *py_object, DLTensor *out);
typedef int (*DLPackCurrentWorkStream)(DLDeviceType device_type, int32_t device_id, void **out_current_stream);

typedef struct DLPackExchangeAPIHeader {
  DLPackVersion version;
  struct DLPackExchangeAPIHeader *prev_api; /* an older table the framework also offers, or NULL */
} DLPackExchangeAPIHeader;

typedef struct DLPackExchangeAPI {
  DLPackExchangeAPIHeader header;
  DLPackManagedTensorAllocator managed_tensor_allocator;
  DLPackManagedTensorFromPyObjectNoSync managed_tensor_from_py_object_no_sync;
  DLPackManagedTensorToPyObjectNoSync managed_tensor_to_py_object_no_sync;
  DLPackDLTensorFromPyObjectNoSync dltensor_from_py_object_no_sync;
  DLPackCurrentWorkStream current_work_stream;
} DLPackExchangeAPI;

#ifdef __cplusplus
}
#endif

#endif /* DLPACK_DLPACK_H_ */
