/* The cache of large host buffers behind the outputs bncore allocates; the contract is in _pool.h. */
#define _GNU_SOURCE
#include "_pool.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HUGE_PAGE ((size_t)2 << 20)

typedef struct {
  void *data;
  size_t capacity;
  uint64_t last_use; /* the release's tick: the smallest is evicted first */
} slot_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static slot_t slots[BNPOOL_MAX_SLOTS];
static size_t held_buffers, held_bytes, live_buffers, live_bytes;
static uint64_t tick, hits, misses;
/* read without the lock by bnpool_wants */
static int enabled = 1;
static size_t min_bytes = (size_t)1 << 20;
static size_t max_bytes = (size_t)256 << 20;
static size_t max_buffers = 16;

static void lock_for_fork(void) { pthread_mutex_lock(&lock); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&lock); }
static void install_fork_handlers(void) { pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork); }

static void take_lock(void) {
  pthread_once(&fork_once, install_fork_handlers);
  pthread_mutex_lock(&lock);
}

static size_t page_size(void) {
  long p = sysconf(_SC_PAGESIZE);
  return p > 0 ? (size_t)p : 4096;
}

/* What a request of nbytes is served with: whole huge pages from 2 MiB on, whole pages below. */
static size_t capacity_for(size_t nbytes) {
  size_t unit = nbytes >= HUGE_PAGE ? HUGE_PAGE : page_size();
  if (nbytes == 0) return unit;
  if (nbytes > SIZE_MAX - unit) return 0;
  return (nbytes + unit - 1) / unit * unit;
}

/* An anonymous mapping of `capacity` bytes, 2 MiB aligned (and advised for huge pages) when it
 * is made of huge pages, so that the kernel can back all of it with them. */
static void *map_buffer(size_t capacity) {
  size_t align = capacity % HUGE_PAGE == 0 ? HUGE_PAGE : 0;
  size_t len = capacity + align;
  if (len < capacity) return NULL;
  char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
  if (align) {
    char *start = (char *)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
    size_t head = (size_t)(start - p), tail = len - head - capacity;
    if (head) munmap(p, head);
    if (tail) munmap(start + capacity, tail);
    p = start;
#ifdef MADV_HUGEPAGE
    madvise(p, capacity, MADV_HUGEPAGE); /* advice only: without THP it fails and nothing changes */
#endif
  }
  return p;
}

int bnpool_wants(size_t nbytes) {
  return __atomic_load_n(&enabled, __ATOMIC_RELAXED) && nbytes >= __atomic_load_n(&min_bytes, __ATOMIC_RELAXED);
}

void *bnpool_acquire(size_t nbytes, size_t *capacity) {
  size_t need = capacity_for(nbytes);
  if (need == 0) return NULL;
  /* a held buffer serves a request up to a quarter smaller than itself: the smallest that fits */
  size_t most = need + need / 4;
  take_lock();
  size_t best = BNPOOL_MAX_SLOTS;
  for (size_t i = 0; i < held_buffers; i++) {
    size_t c = slots[i].capacity;
    if (c >= need && c <= most && (best == BNPOOL_MAX_SLOTS || c < slots[best].capacity)) best = i;
  }
  void *data = NULL;
  if (best != BNPOOL_MAX_SLOTS) {
    data = slots[best].data;
    need = slots[best].capacity;
    slots[best] = slots[--held_buffers];
    held_bytes -= need;
    hits++;
  } else if (enabled) {
    misses++;
  }
  live_buffers++;
  live_bytes += need;
  pthread_mutex_unlock(&lock);
  if (data == NULL && (data = map_buffer(need)) == NULL) {
    take_lock();
    live_buffers--;
    live_bytes -= need;
    pthread_mutex_unlock(&lock);
    return NULL;
  }
  *capacity = need;
  return data;
}

/* Takes the oldest held buffer out of the cache (the lock held); its memory goes to `out`. */
static slot_t evict_oldest(void) {
  size_t oldest = 0;
  for (size_t i = 1; i < held_buffers; i++)
    if (slots[i].last_use < slots[oldest].last_use) oldest = i;
  slot_t s = slots[oldest];
  slots[oldest] = slots[--held_buffers];
  held_bytes -= s.capacity;
  return s;
}

void bnpool_release(void *data, size_t capacity) {
  slot_t evicted[BNPOOL_MAX_SLOTS];
  size_t n_evicted = 0;
  int keep;
  take_lock();
  live_buffers--;
  live_bytes -= capacity;
  keep = enabled && capacity <= max_bytes && max_buffers > 0;
  if (keep) {
    while (held_buffers >= max_buffers || held_bytes + capacity > max_bytes) evicted[n_evicted++] = evict_oldest();
    slots[held_buffers++] = (slot_t){data, capacity, ++tick};
    held_bytes += capacity;
  }
  pthread_mutex_unlock(&lock);
  if (!keep) munmap(data, capacity);
  for (size_t i = 0; i < n_evicted; i++) munmap(evicted[i].data, evicted[i].capacity);
}

/* Evicts until the limits hold (the lock held); returns how many went to `out`. */
static size_t evict_to_limits(slot_t *out) {
  size_t n = 0;
  while (held_buffers > 0 && (!enabled || held_buffers > max_buffers || held_bytes > max_bytes))
    out[n++] = evict_oldest();
  return n;
}

void bnpool_configure(int enable, int64_t new_max_bytes, int64_t new_max_buffers, int64_t new_min_bytes) {
  slot_t evicted[BNPOOL_MAX_SLOTS];
  take_lock();
  if (enable >= 0) __atomic_store_n(&enabled, enable ? 1 : 0, __ATOMIC_RELAXED);
  if (new_max_bytes >= 0) max_bytes = (size_t)new_max_bytes;
  if (new_max_buffers >= 0) max_buffers = new_max_buffers > BNPOOL_MAX_SLOTS ? BNPOOL_MAX_SLOTS : (size_t)new_max_buffers;
  if (new_min_bytes >= 0) __atomic_store_n(&min_bytes, (size_t)new_min_bytes, __ATOMIC_RELAXED);
  size_t n = evict_to_limits(evicted);
  pthread_mutex_unlock(&lock);
  for (size_t i = 0; i < n; i++) munmap(evicted[i].data, evicted[i].capacity);
}

void bnpool_empty(void) {
  slot_t evicted[BNPOOL_MAX_SLOTS];
  size_t n = 0;
  take_lock();
  while (held_buffers > 0) evicted[n++] = evict_oldest();
  pthread_mutex_unlock(&lock);
  for (size_t i = 0; i < n; i++) munmap(evicted[i].data, evicted[i].capacity);
}

void bnpool_get_stats(bnpool_stats_t *out) {
  take_lock();
  *out = (bnpool_stats_t){enabled, max_bytes, max_buffers, min_bytes, held_bytes, held_buffers,
                          live_bytes, live_buffers, hits, misses};
  pthread_mutex_unlock(&lock);
}

/* ------------------------------------------------------------------ DLPack tensors over buffers */

static void delete_versioned(DLManagedTensorVersioned *self) { bnpool_tensor_free(self->manager_ctx); }
static void delete_unversioned(DLManagedTensor *self) { bnpool_tensor_free(self->manager_ctx); }

bnpool_tensor_t *bnpool_tensor_new(int32_t ndim, const int64_t *shape, const int64_t *strides, DLDataType dtype,
                                   size_t nbytes) {
  if (ndim < 0 || ndim > BNPOOL_MAX_NDIM) return NULL;
  bnpool_tensor_t *t = calloc(1, sizeof *t);
  if (t == NULL) return NULL;
  t->data = bnpool_acquire(nbytes, &t->capacity);
  if (t->data == NULL) {
    free(t);
    return NULL;
  }
  int64_t step = 1;
  for (int32_t i = ndim - 1; i >= 0; i--) {
    t->shape[i] = shape[i];
    t->strides[i] = strides ? strides[i] : step;
    step *= shape[i];
  }
  DLTensor dl = {t->data, {kDLCPU, 0}, ndim, dtype, t->shape, t->strides, 0};
  t->versioned.dl_tensor = dl;
  t->versioned.manager_ctx = t;
  t->versioned.deleter = delete_versioned;
  t->versioned.version.major = DLPACK_MAJOR_VERSION;
  t->versioned.version.minor = DLPACK_MINOR_VERSION;
  t->versioned.flags = 0;
  t->unversioned.dl_tensor = dl;
  t->unversioned.manager_ctx = t;
  t->unversioned.deleter = delete_unversioned;
  return t;
}

void bnpool_tensor_free(bnpool_tensor_t *t) {
  if (t == NULL) return;
  bnpool_release(t->data, t->capacity);
  free(t);
}
