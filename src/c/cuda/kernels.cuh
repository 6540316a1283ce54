/*
 * Device kernels of the CUDA backend: one strided reduction family and one strided apply
 * family, templated over the element type, plus the small-tensor gather and scatter.
 *
 * Every kernel walks the plan's canonical dims (bn_cuda_dims_t) with 64-bit indices and
 * grid-stride loops, so any strides the plan accepts work and no launch shape is assumed.
 *
 * Determinism: a reduction splits each target's elements into a number of chunks fixed
 * by the shape (never by the GPU); within a chunk thread t takes elements t, t + blockDim,
 * ... in order, the block merges its threads in a fixed tree, and the finish kernel merges
 * the chunks of a target in chunk order. No atomics: a run repeats bit for bit.
 */
#ifndef BNCORE_CUDA_KERNELS_CUH
#define BNCORE_CUDA_KERNELS_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#ifndef BN_CUDA_THREADS /* the host emulator (tools/cuda_emulate.sh) runs smaller blocks */
#define BN_CUDA_THREADS 256 /* threads per block of every kernel (a power of two) */
#endif
#define BN_CUDA_DIMS 18     /* BN_MAX_CANON */

/* A list of dims with the strides every operand, the group and the parameter index take. */
typedef struct bn_cuda_dims_t {
  int nd;
  int64_t n[BN_CUDA_DIMS];
  int64_t s[3][BN_CUDA_DIMS]; /* element strides of X, DY, OUT */
  int64_t sg[BN_CUDA_DIMS], sp[BN_CUDA_DIMS];
} bn_cuda_dims_t;

/* Offsets of one index of a dims list (row-major, last dim fastest). */
typedef struct bn_cuda_pos_t {
  int64_t o[3], g, p;
} bn_cuda_pos_t;

__device__ inline bn_cuda_pos_t bn_cuda_locate(const bn_cuda_dims_t &D, int64_t i) {
  bn_cuda_pos_t q = {{0, 0, 0}, 0, 0};
  for (int d = D.nd - 1; d >= 0; d--) {
    const int64_t k = i % D.n[d];
    i /= D.n[d];
    q.o[0] += k * D.s[0][d], q.o[1] += k * D.s[1][d], q.o[2] += k * D.s[2][d];
    q.g += k * D.sg[d], q.p += k * D.sp[d];
  }
  return q;
}

/* ---- element types: loads to and stores from the accumulation type (float for half types) */
template <typename T> struct bn_acc { typedef float type; };
template <> struct bn_acc<double> { typedef double type; };

__device__ inline float bn_load(const float *p) { return *p; }
__device__ inline double bn_load(const double *p) { return *p; }
__device__ inline float bn_load(const __half *p) { return __half2float(*p); }
__device__ inline float bn_load(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
__device__ inline void bn_store(float *p, float v) { *p = v; }
__device__ inline void bn_store(double *p, double v) { *p = v; }
__device__ inline void bn_store(__half *p, float v) { *p = __float2half_rn(v); }
__device__ inline void bn_store(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }

/* ---- reductions */

/* A partial of a reduction: moments (cnt, a = mean, b = m2) or sums (a, b; cnt unused). */
typedef struct bn_cuda_part_t {
  double cnt, a, b;
} bn_cuda_part_t;

/* Chan et al., as bn_chan_merge on the host (internal.h): an empty side gives the other exactly;
 * an infinite difference keeps the weighted mean and makes m2 NaN. */
__device__ inline void bn_cuda_merge(bn_cuda_part_t *x, const bn_cuda_part_t &y) {
  if (y.cnt == 0.0) return;
  if (x->cnt == 0.0) {
    *x = y;
    return;
  }
  const double na = x->cnt, n = na + y.cnt, d = y.a - x->a;
  if (!isfinite(d)) {
    x->a = (x->a * na + y.a * y.cnt) / n, x->b = __longlong_as_double(0x7ff8000000000000ll), x->cnt = n;
    return;
  }
  x->a += d * (y.cnt / n);
  x->b += y.b + d * d * (na * y.cnt / n);
  x->cnt = n;
}

/* What a reduction computes per element. */
enum { BN_RED_MOMENTS = 0, BN_RED_GROUP_SUMS = 1, BN_RED_PARAM_SUMS = 2 };

/* Per-group and per-parameter numbers on the device (doubles; NULL: absent). */
typedef struct bn_cuda_coef_t {
  const double *mean, *rstd, *weight, *bias, *sum_dy, *sum_dyx;
  double inv_n;
  int relu;
} bn_cuda_coef_t;

/* Block-wide fixed-order tree merge of each thread's partial; thread 0 ends with the block's. */
__device__ inline bn_cuda_part_t bn_cuda_block_merge(bn_cuda_part_t v, int moments) {
  __shared__ bn_cuda_part_t sh[BN_CUDA_THREADS];
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int half = BN_CUDA_THREADS / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      bn_cuda_part_t a = sh[threadIdx.x];
      const bn_cuda_part_t &b = sh[threadIdx.x + half];
      if (moments) bn_cuda_merge(&a, b);
      else a.a += b.a, a.b += b.b;
      sh[threadIdx.x] = a;
    }
    __syncthreads();
  }
  return sh[0];
}

/*
 * Pass 1 of a reduction: the partial of chunk blockIdx.x of each target (outer index q,
 * grid-stride over blockIdx.y) into part[q * nchunks + chunk]. `outer` lists the target's
 * dims, `inner` the reduced ones (inner_n elements, chunk elements per chunk).
 */
template <typename T>
__global__ void __launch_bounds__(BN_CUDA_THREADS)
    bn_cuda_reduce_partials(const bn_cuda_dims_t outer, const bn_cuda_dims_t inner, int64_t ntargets,
                            int64_t inner_n, int64_t chunk, const char *__restrict__ xb, const char *__restrict__ dyb,
                            int64_t g0, int64_t p0, const bn_cuda_coef_t c, int kind,
                            bn_cuda_part_t *__restrict__ part) {
  const T *X = (const T *)xb, *DY = (const T *)dyb;
  const int64_t nchunks = gridDim.x, j0 = (int64_t)blockIdx.x * chunk;
  const int64_t j1 = j0 + chunk < inner_n ? j0 + chunk : inner_n;
  for (int64_t q = blockIdx.y; q < ntargets; q += gridDim.y) {
    const bn_cuda_pos_t t = bn_cuda_locate(outer, q);
    bn_cuda_part_t acc = {0.0, 0.0, 0.0};
    for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
      const bn_cuda_pos_t e = bn_cuda_locate(inner, j);
      const double x = (double)bn_load(&X[t.o[0] + e.o[0]]);
      if (kind == BN_RED_MOMENTS) { /* Welford */
        acc.cnt += 1.0;
        const double d = x - acc.a;
        acc.a += d / acc.cnt;
        acc.b += d * (x - acc.a);
        continue;
      }
      const int64_t g = g0 + t.g + e.g, p = p0 + t.p + e.p;
      const double dy = (double)bn_load(&DY[t.o[1] + e.o[1]]), xhat = (x - c.mean[g]) * c.rstd[g];
      const double gw = kind == BN_RED_GROUP_SUMS && c.weight ? dy * c.weight[p] : dy;
      acc.a += gw, acc.b += gw * xhat;
    }
    const bn_cuda_part_t blk = bn_cuda_block_merge(acc, kind == BN_RED_MOMENTS);
    if (threadIdx.x == 0) part[q * nchunks + blockIdx.x] = blk;
    __syncthreads(); /* the shared tree is reused by the next target */
  }
}

/* Pass 2: each target's chunks merged in chunk order, into a[t], b[t] (t: its group or
 * parameter index, base + the outer dims' target strides). */
__global__ void __launch_bounds__(BN_CUDA_THREADS)
    bn_cuda_reduce_finish(const bn_cuda_dims_t outer, int64_t ntargets, int64_t nchunks, int kind, int by_param,
                          int64_t base, const bn_cuda_part_t *__restrict__ part, double *__restrict__ a,
                          double *__restrict__ b) {
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < ntargets; q += (int64_t)gridDim.x * blockDim.x) {
    bn_cuda_part_t acc = {0.0, 0.0, 0.0};
    for (int64_t k = 0; k < nchunks; k++) {
      const bn_cuda_part_t &v = part[q * nchunks + k];
      if (kind == BN_RED_MOMENTS) bn_cuda_merge(&acc, v);
      else acc.a += v.a, acc.b += v.b;
    }
    const bn_cuda_pos_t t = bn_cuda_locate(outer, q);
    const int64_t i = base + (by_param ? t.p : t.g);
    a[i] = acc.a, b[i] = acc.b;
  }
}

/* ---- apply: every element once */

enum { BN_APPLY_FORWARD = 0, BN_APPLY_BACKWARD = 1, BN_APPLY_MASK = 2, BN_APPLY_MASK_RELU = 3 };

/* forward:  y = (x - mean) * rstd * w + b (+ residual, the DY operand) (then ReLU)
 * backward: dx = dy*w*rstd - c1 - (x - mean)*k2, c1 = rstd*sum_dy*inv_n, k2 = rstd^2*sum_dyx*inv_n
 *           (constant statistics: sum_dy = sum_dyx = NULL)
 * mask:     out = dy (where the forward's y, the X operand, is > 0 with relu; else 0) */
template <typename T>
__global__ void __launch_bounds__(BN_CUDA_THREADS)
    bn_cuda_apply(const bn_cuda_dims_t D, int64_t numel, const char *__restrict__ xb, const char *__restrict__ dyb,
                  char *__restrict__ outb, int64_t g0, int64_t p0, const bn_cuda_coef_t c, int mode) {
  typedef typename bn_acc<T>::type A;
  const T *X = (const T *)xb, *DY = (const T *)dyb;
  T *OUT = (T *)outb;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel; i += (int64_t)gridDim.x * blockDim.x) {
    const bn_cuda_pos_t e = bn_cuda_locate(D, i);
    if (mode == BN_APPLY_MASK || mode == BN_APPLY_MASK_RELU) {
      const bool keep = mode == BN_APPLY_MASK || bn_load(&X[e.o[0]]) > (A)0;
      OUT[e.o[2]] = keep ? DY[e.o[1]] : (T)0.0f;
      continue;
    }
    const int64_t g = g0 + e.g, p = p0 + e.p;
    const double r = c.rstd[g], w = c.weight ? c.weight[p] : 1.0;
    const A m = (A)c.mean[g], x = bn_load(&X[e.o[0]]);
    if (mode == BN_APPLY_FORWARD) {
      A v = (x - m) * (A)(r * w) + (A)(c.bias ? c.bias[p] : 0.0);
      if (DY) v += bn_load(&DY[e.o[1]]);
      bn_store(&OUT[e.o[2]], c.relu && v < (A)0 ? (A)0 : v);
    } else {
      const A c1 = (A)(c.sum_dy ? r * c.sum_dy[g] * c.inv_n : 0.0);
      const A k2 = (A)(c.sum_dyx ? r * r * c.sum_dyx[g] * c.inv_n : 0.0);
      bn_store(&OUT[e.o[2]], bn_load(&DY[e.o[1]]) * (A)(w * r) - c1 - (x - m) * k2);
    }
  }
}

/* ---- small per-channel tensors to and from doubles, in row-major order of their own shape */
typedef struct bn_cuda_small_t {
  int nd;
  int64_t n[16], s[16];
} bn_cuda_small_t;

__device__ inline int64_t bn_cuda_small_offset(const bn_cuda_small_t &S, int64_t i) {
  int64_t o = 0;
  for (int d = S.nd - 1; d >= 0; d--) o += (i % S.n[d]) * S.s[d], i /= S.n[d];
  return o;
}

template <typename T>
__global__ void __launch_bounds__(BN_CUDA_THREADS)
    bn_cuda_gather(const bn_cuda_small_t S, int64_t numel, const char *__restrict__ src, double *__restrict__ dst) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = (double)bn_load(&((const T *)src)[bn_cuda_small_offset(S, i)]);
}

/* doubles round to float first for the half types, as bn_scatter_f64 does on the host */
template <typename T>
__global__ void __launch_bounds__(BN_CUDA_THREADS)
    bn_cuda_scatter(const bn_cuda_small_t S, int64_t numel, const double *__restrict__ src, char *__restrict__ dst) {
  typedef typename bn_acc<T>::type A;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel; i += (int64_t)gridDim.x * blockDim.x)
    bn_store(&((T *)dst)[bn_cuda_small_offset(S, i)], (A)src[i]);
}

#endif /* BNCORE_CUDA_KERNELS_CUH */
