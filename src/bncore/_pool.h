/* The Python package's cache of large host buffers: the memory of the outputs bncore allocates
 * (NumPy arrays, PyTorch tensors) when the caller passes no out=.
 *
 * Why: above glibc's mmap threshold (at most 32 MiB) every malloc is a fresh mmap, so each call
 * that allocates its output page-faults all of it in again (about 10 ms for 32 MiB), which costs
 * more than the memory-bound kernel that writes it. Buffers freed here are kept (up to a byte and
 * a count limit) and handed to the next request of about their size, already faulted in.
 *
 * Contract:
 *  - A buffer is in the cache only between the release of its last user and its next acquire: the
 *    cache never hands out memory that is still referenced, because only bnpool_release (called by
 *    the DLPack deleter of the tensor that owns the buffer) puts it back.
 *  - Every function is thread-safe (one mutex; no call holds it while it maps or unmaps memory) and
 *    none needs the Python GIL, so a framework may free its tensor from any thread.
 *  - Buffers are anonymous private mappings, 4096-byte aligned at least (2 MiB aligned and advised
 *    for transparent huge pages from 2 MiB on). Their contents are unspecified, as for empty().
 *  - After fork() the child has its own copy of the cache (the mutex is taken around fork, so it is
 *    never copied locked); buffers live in either process are that process's own.
 * This is not part of the C library's ABI (bncore.h): it is compiled into the Python extension. */
#ifndef BNCORE_POOL_H
#define BNCORE_POOL_H

#include <stddef.h>
#include <stdint.h>

#include "dlpack/dlpack.h"

#define BNPOOL_MAX_NDIM 16
#define BNPOOL_MAX_SLOTS 64 /* the most buffers the cache can hold, whatever max_buffers says */

typedef struct {
  int enabled;           /* 0: every release unmaps; acquire always maps */
  size_t max_bytes;      /* the most bytes of capacity the cache holds */
  size_t max_buffers;    /* the most buffers it holds (at most BNPOOL_MAX_SLOTS) */
  size_t min_bytes;      /* smaller requests are not the cache's (bnpool_wants says no) */
  size_t held_bytes;     /* capacity of the buffers held now */
  size_t held_buffers;
  size_t live_bytes;     /* capacity of the buffers acquired and not yet released */
  size_t live_buffers;
  uint64_t hits;         /* acquires served from the cache */
  uint64_t misses;       /* acquires that mapped new memory */
} bnpool_stats_t;

/* Whether a request of `nbytes` goes to the cache (enabled and at least min_bytes). */
int bnpool_wants(size_t nbytes);

/* A buffer of at least `nbytes` (out: its capacity), from the cache or newly mapped; NULL when the
 * system has no memory. Give it back with bnpool_release(data, *capacity). */
void *bnpool_acquire(size_t nbytes, size_t *capacity);

/* Gives a buffer back (the cache keeps it or unmaps it). The caller must not touch it again. */
void bnpool_release(void *data, size_t capacity);

/* Unmaps every buffer the cache holds (buffers in use are not affected). */
void bnpool_empty(void);

/* Sets the limits (a negative value keeps the current one) and evicts, oldest first, what no
 * longer fits; enabled = 0 also empties the cache. */
void bnpool_configure(int enabled, int64_t max_bytes, int64_t max_buffers, int64_t min_bytes);

void bnpool_get_stats(bnpool_stats_t *out);

/* A DLPack tensor over a buffer of the cache: both managed-tensor forms are filled in, the
 * consumer takes one, and either one's deleter (or bnpool_tensor_free if none was taken)
 * frees the struct and releases the buffer. */
typedef struct {
  DLManagedTensorVersioned versioned;
  DLManagedTensor unversioned;
  int64_t shape[BNPOOL_MAX_NDIM];
  int64_t strides[BNPOOL_MAX_NDIM];
  void *data;
  size_t capacity;
} bnpool_tensor_t;

/* ndim <= BNPOOL_MAX_NDIM sizes and strides (in elements; strides NULL: compact row-major) over
 * `nbytes` of memory, which the caller computed from them; NULL when out of memory. */
bnpool_tensor_t *bnpool_tensor_new(int32_t ndim, const int64_t *shape, const int64_t *strides, DLDataType dtype,
                                   size_t nbytes);
void bnpool_tensor_free(bnpool_tensor_t *t);

#endif
