/*
 * A host stand-in for the few CUDA runtime calls and kernel built-ins the CUDA backend uses, so
 * that tools/cuda_emulate.sh can compile src/c/cuda/engine.cu with the host C++ compiler and run
 * its kernels on CPU threads against "device" memory that is host memory.
 *
 * It checks the backend's host logic and kernel arithmetic (indexing, chunking, merges, the
 * formulas, dtype conversions); it says nothing about the GPU itself (memory model, warps,
 * occupancy, the real runtime). Blocks run one after another; the threads of a block that uses
 * __syncthreads run as real threads meeting at a barrier, the others one after another.
 */
#ifndef BNCORE_CUDA_EMULATOR_H
#define BNCORE_CUDA_EMULATOR_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

using std::isfinite;

#include <driver_types.h> /* cudaError_t, cudaStream_t, cudaMemcpyKind: the real types */
#include <vector_types.h> /* dim3 */

#undef __global__
#undef __device__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __launch_bounds__(n)
#define __shared__ static

typedef dim3 bn_emu_dim3;

inline thread_local bn_emu_dim3 threadIdx, blockIdx;
inline bn_emu_dim3 gridDim, blockDim;
inline std::barrier<> *bn_emu_barrier = nullptr;
inline void __syncthreads() { bn_emu_barrier->arrive_and_wait(); }
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof d);
  return d;
}

template <typename K, typename... A>
void bn_emu_launch(bool sync, K kernel, bn_emu_dim3 grid, bn_emu_dim3 block, A... args) {
  gridDim = grid, blockDim = block;
  for (unsigned by = 0; by < grid.y; by++)
    for (unsigned bx = 0; bx < grid.x; bx++) {
      if (!sync) {
        blockIdx = bn_emu_dim3(bx, by);
        for (unsigned t = 0; t < block.x; t++) threadIdx = bn_emu_dim3(t), kernel(args...);
        continue;
      }
      std::barrier<> bar((std::ptrdiff_t)block.x);
      bn_emu_barrier = &bar;
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block.x; t++)
        threads.emplace_back([=] { blockIdx = bn_emu_dim3(bx, by), threadIdx = bn_emu_dim3(t), kernel(args...); });
      for (auto &th : threads) th.join();
    }
}
#define BN_CUDA_LAUNCH(kernel, grid, block, stream, ...) bn_emu_launch(false, kernel, grid, block, __VA_ARGS__)
#define BN_CUDA_LAUNCH_SYNC(kernel, grid, block, stream, ...) bn_emu_launch(true, kernel, grid, block, __VA_ARGS__)

inline const char *cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline const char *cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int *n) { return *n = 1, cudaSuccess; }
inline cudaError_t cudaGetDevice(int *d) { return *d = 0, cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t) {
  std::memset(d, v, n);
  return cudaSuccess;
}
/* poisoned, so that a kernel reading workspace it never wrote shows up as NaN */
inline cudaError_t cudaMallocAsync(void **p, size_t n, cudaStream_t) {
  *p = std::malloc(n);
  if (*p) std::memset(*p, 0xff, n);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFreeAsync(void *p, cudaStream_t) {
  std::free(p);
  return cudaSuccess;
}

#endif /* BNCORE_CUDA_EMULATOR_H */
