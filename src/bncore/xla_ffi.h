/*
 * The part of the XLA FFI C ABI (OpenXLA's "typed FFI", custom-call API version 4,
 * FFI API 0.x) that bncore's JAX handlers use, written for bncore from the published
 * specification. Layouts and constant values are fixed by that specification; names
 * carry bncore's own prefix so that this header and jaxlib's
 * xla/ffi/api/c_api.h can be included in one translation unit, which is how
 * tests/test_jax.py checks every offset, size and constant here against the header
 * jaxlib ships. Only the comments are ours.
 *
 * This header is private to the JAX adapter (src/bncore/_jax_ffi.c): it is not
 * installed and is no part of bncore's C ABI.
 *
 * How XLA talks to a handler, in short:
 *  - A handler is one C function, bn_xla_handler, taking a call frame. It returns
 *    NULL on success or an error made by the runtime's Error_Create entry.
 *  - Once, at registration, XLA calls it with a frame whose extension chain holds a
 *    metadata extension: the handler writes the FFI API version it was compiled for
 *    (and its traits) into it and returns, computing nothing.
 *  - Then at each execution, a frame in stage EXECUTE: buffers in args and rets,
 *    attributes (the static parameters of the call) in attrs, sorted by name.
 *  - Every struct starts with struct_size, the size the writer was compiled with,
 *    so either side can tell which trailing fields the other knows.
 */
#ifndef BNCORE_XLA_FFI_H
#define BNCORE_XLA_FFI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The FFI API version bncore's handlers report in their metadata: the oldest
 * version whose layouts every field used here already had. Major changes layouts. */
#define BN_XLA_FFI_API_MAJOR 0
#define BN_XLA_FFI_API_MINOR 1

/* The struct_size a writer puts in a struct: the end of its last field as the
 * writer knows it (trailing padding excluded), as the specification defines it. */
#define BN_XLA_STRUCT_SIZE(type, last_field) (offsetof(type, last_field) + sizeof(((type *)0)->last_field))

/* ------------------------------------------------------------------ extensions */

/* Kinds of node in an extension chain. */
typedef enum {
  BN_XLA_EXTENSION_METADATA = 1,
} bn_xla_extension_type;

/* The head of every extension node: a singly linked list through `next` (NULL ends it). */
typedef struct bn_xla_extension_base {
  size_t struct_size;
  bn_xla_extension_type type;
  struct bn_xla_extension_base *next;
} bn_xla_extension_base;

/* ------------------------------------------------------------------ version */

typedef struct bn_xla_api_version {
  size_t struct_size;
  bn_xla_extension_base *extension_start;
  int major_version; /* out (written by whoever reports its version) */
  int minor_version; /* out */
} bn_xla_api_version;

/* ------------------------------------------------------------------ errors */

/* Opaque, owned by the runtime: a handler returns one and XLA frees it. */
typedef struct bn_xla_error bn_xla_error;

/* Error codes: the values of absl::StatusCode (gRPC's codes). */
typedef enum {
  BN_XLA_ERROR_OK = 0,
  BN_XLA_ERROR_CANCELLED = 1,
  BN_XLA_ERROR_UNKNOWN = 2,
  BN_XLA_ERROR_INVALID_ARGUMENT = 3,
  BN_XLA_ERROR_DEADLINE_EXCEEDED = 4,
  BN_XLA_ERROR_NOT_FOUND = 5,
  BN_XLA_ERROR_ALREADY_EXISTS = 6,
  BN_XLA_ERROR_PERMISSION_DENIED = 7,
  BN_XLA_ERROR_RESOURCE_EXHAUSTED = 8,
  BN_XLA_ERROR_FAILED_PRECONDITION = 9,
  BN_XLA_ERROR_ABORTED = 10,
  BN_XLA_ERROR_OUT_OF_RANGE = 11,
  BN_XLA_ERROR_UNIMPLEMENTED = 12,
  BN_XLA_ERROR_INTERNAL = 13,
  BN_XLA_ERROR_UNAVAILABLE = 14,
  BN_XLA_ERROR_DATA_LOSS = 15,
  BN_XLA_ERROR_UNAUTHENTICATED = 16,
} bn_xla_error_code;

/* Arguments of the runtime's Error_Create: the message is copied, so a
 * thread-local or stack string is fine. */
typedef struct bn_xla_error_create_args {
  size_t struct_size;
  bn_xla_extension_base *extension_start;
  const char *message;
  bn_xla_error_code errc;
} bn_xla_error_create_args;

typedef bn_xla_error *bn_xla_error_create_fn(bn_xla_error_create_args *args);

/* ------------------------------------------------------------------ data types */

/* Element types of buffers and scalar attributes: the values of XLA's
 * PrimitiveType. Only those bncore reads or accepts as attributes are listed. */
typedef enum {
  BN_XLA_DTYPE_INVALID = 0,
  BN_XLA_DTYPE_PRED = 1,
  BN_XLA_DTYPE_S8 = 2,
  BN_XLA_DTYPE_S16 = 3,
  BN_XLA_DTYPE_S32 = 4,
  BN_XLA_DTYPE_S64 = 5,
  BN_XLA_DTYPE_U8 = 6,
  BN_XLA_DTYPE_U16 = 7,
  BN_XLA_DTYPE_U32 = 8,
  BN_XLA_DTYPE_U64 = 9,
  BN_XLA_DTYPE_F16 = 10,
  BN_XLA_DTYPE_F32 = 11,
  BN_XLA_DTYPE_F64 = 12,
  BN_XLA_DTYPE_BF16 = 16,
} bn_xla_dtype;

/* ------------------------------------------------------------------ buffers */

/*
 * A dense array, borrowed for the duration of the call. XLA's CPU client hands
 * buffers in the layout ffi_call asked for; bncore asks for the default, row-major
 * (dims[rank-1] varies fastest), with no padding: element strides follow from dims.
 *  data  the first element (host memory on the CPU platform); may be NULL when empty
 *  dims  rank sizes, in elements
 */
typedef struct bn_xla_buffer {
  size_t struct_size;
  bn_xla_extension_base *extension_start;
  bn_xla_dtype dtype;
  void *data;
  int64_t rank;
  int64_t *dims;
} bn_xla_buffer;

/* What args[i] / rets[i] point to; buffers are the only kind this ABI version has. */
typedef enum { BN_XLA_ARG_BUFFER = 1 } bn_xla_arg_type;
typedef enum { BN_XLA_RET_BUFFER = 1 } bn_xla_ret_type;

/* ------------------------------------------------------------------ attributes */

typedef enum {
  BN_XLA_ATTR_ARRAY = 1,      /* attrs[i] points to a bn_xla_array */
  BN_XLA_ATTR_DICTIONARY = 2, /* attrs[i] points to a nested bn_xla_attrs */
  BN_XLA_ATTR_SCALAR = 3,     /* attrs[i] points to a bn_xla_scalar */
  BN_XLA_ATTR_STRING = 4,     /* attrs[i] points to a bn_xla_byte_span */
} bn_xla_attr_type;

/* A string that is not NUL-terminated. */
typedef struct bn_xla_byte_span {
  const char *ptr;
  size_t len;
} bn_xla_byte_span;

/* One number: `value` points to a dtype-typed value (an int64_t for S64, ...). */
typedef struct bn_xla_scalar {
  bn_xla_dtype dtype;
  void *value;
} bn_xla_scalar;

/* A one-dimensional array of `size` dtype-typed numbers at `data`. */
typedef struct bn_xla_array {
  bn_xla_dtype dtype;
  size_t size;
  void *data;
} bn_xla_array;

/* ------------------------------------------------------------------ the call frame */

/* Stages of a call; bncore's handlers only compute in EXECUTE. */
typedef enum {
  BN_XLA_STAGE_INSTANTIATE = 0,
  BN_XLA_STAGE_PREPARE = 1,
  BN_XLA_STAGE_INITIALIZE = 2,
  BN_XLA_STAGE_EXECUTE = 3,
} bn_xla_stage;

typedef struct bn_xla_args {
  size_t struct_size;
  bn_xla_extension_base *extension_start;
  int64_t size;
  bn_xla_arg_type *types; /* size entries */
  void **args;            /* size entries: bn_xla_buffer* for BN_XLA_ARG_BUFFER */
} bn_xla_args;

typedef struct bn_xla_rets {
  size_t struct_size;
  bn_xla_extension_base *extension_start;
  int64_t size;
  bn_xla_ret_type *types; /* size entries */
  void **rets;            /* size entries: bn_xla_buffer* for BN_XLA_RET_BUFFER */
} bn_xla_rets;

/* Attributes of the call, sorted by name. */
typedef struct bn_xla_attrs {
  size_t struct_size;
  bn_xla_extension_base *extension_start;
  int64_t size;
  bn_xla_attr_type *types;  /* size entries */
  bn_xla_byte_span **names; /* size entries */
  void **attrs;             /* size entries, each as its type says */
} bn_xla_attrs;

/*
 * The runtime's function table. Entries are only ever appended; a handler reads
 * the prefix it knows (here: up to error_create, the one entry bncore calls).
 */
typedef struct bn_xla_api {
  size_t struct_size;
  bn_xla_extension_base *extension_start;
  bn_xla_api_version api_version;
  const void *internal_api; /* XLA's own, for handlers linked into XLA: never used here */
  bn_xla_error_create_fn *error_create;
} bn_xla_api;

/* Opaque: the runtime's per-call context (streams, thread pools, state); unused by bncore. */
typedef struct bn_xla_execution_context bn_xla_execution_context;

/*
 * What a handler receives. Borrowed: valid only during the call.
 * Later FFI versions add trailing fields (an out-pointer for asynchronous
 * completion, for one); a synchronous handler that leaves them alone stays correct.
 */
typedef struct bn_xla_call_frame {
  size_t struct_size;
  bn_xla_extension_base *extension_start; /* non-NULL with a metadata query */
  const bn_xla_api *api;
  bn_xla_execution_context *ctx;
  bn_xla_stage stage;
  bn_xla_args args;
  bn_xla_rets rets;
  bn_xla_attrs attrs;
} bn_xla_call_frame;

typedef bn_xla_error *bn_xla_handler(bn_xla_call_frame *call_frame);

/* ------------------------------------------------------------------ metadata */

/* Handler traits (bits); bncore's handlers declare none. */
typedef uint32_t bn_xla_handler_traits;

/* Of a stateful handler, the type id of its state; 0 for stateless ones. */
typedef struct bn_xla_type_id {
  int64_t type_id;
} bn_xla_type_id;

/* Written by the handler in a metadata query (struct_size is XLA's, read-only). */
typedef struct bn_xla_metadata {
  size_t struct_size;
  bn_xla_api_version api_version; /* out: the version the handler was written for */
  bn_xla_handler_traits traits;   /* out */
  bn_xla_type_id state_type_id;   /* out: 0 (no state) */
} bn_xla_metadata;

/* The chain node of a metadata query (extension_base.type == BN_XLA_EXTENSION_METADATA). */
typedef struct bn_xla_metadata_extension {
  bn_xla_extension_base extension_base;
  bn_xla_metadata *metadata;
} bn_xla_metadata_extension;

#ifdef __cplusplus
}
#endif

#endif /* BNCORE_XLA_FFI_H */
