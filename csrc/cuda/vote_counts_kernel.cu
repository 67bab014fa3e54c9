// vote_counts on CUDA, the same function as csrc/cpu/vote_counts_kernel.cpp: counts[g, k] = number
// of rows s of logits[g] whose argmax (the first maximum) is class k; a row holding a NaN votes
// for no class.
//
// kLanes threads scan one row. With few classes a thread owns a row and calls first_argmax on it.
// With many, a warp owns a row: each lane calls first_argmax on a contiguous slice, and a warp
// reduction keeps the largest value (the lowest index among equal ones), which is the first
// maximum of the whole row; any NaN in the row makes it vote for nothing. Votes go straight into
// the int64 output with warp-aggregated atomics: lanes voting for the same class elect one lane
// that adds their number. Integer atomics make the counts exact and deterministic.
#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "vote_counts_args.h"

namespace drs_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kWarpPerRowClasses = 64;  // more classes than this: one warp per row
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;
constexpr unsigned kFullMask = 0xffffffffu;

// First maximum of row[0 .. classes) as seen by lane `lane` of the kLanes scanning it, or -1 for
// a row with a NaN. Every lane of the team gets the result.
template <typename scalar_t, int kLanes>
__device__ __forceinline__ int32_t row_argmax(const scalar_t* row, int32_t classes, int lane) {
  if constexpr (kLanes == 1) {
    return static_cast<int32_t>(first_argmax(row, classes));
  } else {
    using cmp_t = typename CompareType<scalar_t>::type;
    const int32_t chunk = (classes + kLanes - 1) / kLanes;
    const int32_t begin = min(lane * chunk, classes);
    const int32_t end = min(begin + chunk, classes);
    // An empty slice or a slice with a NaN offers (-inf, INT32_MAX), which loses every
    // comparison below against a real entry, -inf included.
    cmp_t best = -std::numeric_limits<cmp_t>::infinity();
    int32_t index = std::numeric_limits<int32_t>::max();
    bool nan = false;
    if (begin < end) {
      const int64_t local = first_argmax(row + begin, end - begin);
      nan = local < 0;
      if (!nan) {
        index = begin + static_cast<int32_t>(local);
        best = static_cast<cmp_t>(row[index]);
      }
    }
#pragma unroll
    for (int delta = kLanes / 2; delta > 0; delta /= 2) {
      const cmp_t other_best = __shfl_xor_sync(kFullMask, best, delta);
      const int32_t other_index = __shfl_xor_sync(kFullMask, index, delta);
      if (other_best > best || (other_best == best && other_index < index)) {
        best = other_best;
        index = other_index;
      }
    }
    return __any_sync(kFullMask, nan) ? -1 : index;
  }
}

// Adds the votes of the reporting lanes of a warp (one per row) to counts. All 32 lanes call it.
__device__ __forceinline__ void add_votes(unsigned long long* counts, int32_t winner,
                                          bool reports) {
  const bool votes = reports && winner >= 0;
  const unsigned voters = __ballot_sync(kFullMask, votes);
  if (votes) {
    const unsigned peers = __match_any_sync(voters, winner);
    if (static_cast<int>(threadIdx.x % kWarp) == __ffs(peers) - 1) {
      atomicAdd(counts + winner, static_cast<unsigned long long>(__popc(peers)));
    }
  }
}

template <typename scalar_t, int kLanes>
__global__ void __launch_bounds__(kThreads)
    vote_counts_kernel(const scalar_t* __restrict__ logits, int64_t groups, int64_t rows,
                       int32_t classes, unsigned long long* __restrict__ counts) {
  const int lane = static_cast<int>(threadIdx.x % kLanes);
  const int64_t rows_per_block = blockDim.x / kLanes;
  // Both loops are uniform across the block, so every warp reaches the warp-wide intrinsics.
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    for (int64_t first = blockIdx.x * rows_per_block; first < rows;
         first += gridDim.x * rows_per_block) {
      const int64_t s = first + threadIdx.x / kLanes;
      int32_t winner = -1;
      if (s < rows) {  // uniform across the team of a row
        winner = row_argmax<scalar_t, kLanes>(logits + (g * rows + s) * classes, classes, lane);
      }
      add_votes(counts + g * classes, winner, lane == 0);
    }
  }
}

template <typename scalar_t, int kLanes>
void launch(const scalar_t* logits, int64_t groups, int64_t rows, int32_t classes,
            unsigned long long* counts, cudaStream_t stream) {
  const int64_t rows_per_block = kThreads / kLanes;
  const dim3 grid(
      static_cast<unsigned>(std::min((rows + rows_per_block - 1) / rows_per_block, kMaxGridX)),
      static_cast<unsigned>(std::min(groups, kMaxGridY)));
  vote_counts_kernel<scalar_t, kLanes>
      <<<grid, kThreads, 0, stream>>>(logits, groups, rows, classes, counts);
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
        if (classes > kWarpPerRowClasses) {
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
