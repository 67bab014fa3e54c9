// vote_counts on CUDA, the same function as csrc/cpu/vote_counts_kernel.cpp: counts[g, k] = number
// of rows s of logits[g] whose argmax (the first maximum) is class k; a row holding a NaN votes
// for no class. A thread (few classes) or a warp (many) scans a row, and the warps add their votes
// with warp-aggregated integer atomics, so the counts are exact and deterministic. The per-thread
// code is votes::count_rows (vote_counts_rows.cuh), run here with the device's warp intrinsics.
#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "vote_counts_args.h"
#include "vote_counts_rows.cuh"

namespace drs_ext {
namespace {

using votes::kThreads;
using votes::kWarp;
constexpr unsigned kFullMask = 0xffffffffu;

// votes::count_rows's warp: the lanes of a CUDA warp, all active.
struct DeviceWarp {
  __device__ __forceinline__ int lane() const { return static_cast<int>(threadIdx.x % kWarp); }
  template <typename T>
  __device__ __forceinline__ T shfl_xor(T value, int delta) const {
    return __shfl_xor_sync(kFullMask, value, delta);
  }
  __device__ __forceinline__ bool any(bool p) const { return __any_sync(kFullMask, p); }
  __device__ __forceinline__ unsigned match_any(int32_t key) const {
    return __match_any_sync(kFullMask, key);
  }
  __device__ __forceinline__ void add(unsigned long long* counter, unsigned long long n) const {
    atomicAdd(counter, n);
  }
};

template <typename scalar_t, int kLanes>
__global__ void __launch_bounds__(kThreads)
    vote_counts_kernel(const scalar_t* __restrict__ logits, int64_t groups, int64_t rows,
                       int32_t classes, unsigned long long* __restrict__ counts) {
  const votes::ThreadIndex t{blockIdx.x, blockIdx.y, gridDim.x, gridDim.y,
                             static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x)};
  votes::count_rows<scalar_t, kLanes>(t, logits, groups, rows, classes, counts, DeviceWarp{});
}

template <typename scalar_t, int kLanes>
void launch(const scalar_t* logits, int64_t groups, int64_t rows, int32_t classes,
            unsigned long long* counts, cudaStream_t stream) {
  const votes::Grid grid = votes::launch_grid(groups, rows, kLanes);
  vote_counts_kernel<scalar_t, kLanes>
      <<<dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y)), kThreads, 0, stream>>>(
          logits, groups, rows, classes, counts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor vote_counts_cuda(const at::Tensor& logits) {
  check_vote_counts_args(logits);
  TORCH_CHECK(logits.is_cuda(), "vote_counts (CUDA kernel): logits must be a CUDA tensor, got ",
              logits.device());
  TORCH_CHECK(logits.size(2) <= std::numeric_limits<int32_t>::max(),
              "vote_counts (CUDA kernel): at most 2^31 - 1 classes, got ", logits.size(2));
  c10::cuda::OptionalCUDAGuard guard(logits.device());
  const at::Tensor l = logits.contiguous();
  const int64_t groups = l.size(0), rows = l.size(1);
  const int32_t classes = static_cast<int32_t>(l.size(2));
  at::Tensor counts = at::zeros({groups, classes}, l.options().dtype(at::kLong));
  if (groups == 0 || rows == 0) return counts;
  auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(
      l.scalar_type(), "vote_counts_cuda", AT_WRAP([&] {
        const scalar_t* ptr = l.data_ptr<scalar_t>();
        if (votes::lanes_for(classes) == kWarp) {
          launch<scalar_t, kWarp>(ptr, groups, rows, classes, counts_ptr, stream);
        } else {
          launch<scalar_t, 1>(ptr, groups, rows, classes, counts_ptr, stream);
        }
      }),
      at::kFloat, at::kDouble, at::kHalf, at::kBFloat16);
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(drs_ext, CUDA, m) { m.impl("vote_counts", &vote_counts_cuda); }

}  // namespace drs_ext
