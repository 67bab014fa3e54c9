// The per-thread code of the CUDA kernel vote_counts (vote_counts_kernel.cu), written against a
// Warp interface (below) rather than the warp intrinsics themselves, so that it is plain C++ that
// also compiles for the host.
//
// kLanes threads scan one row. With few classes a thread owns a row and calls first_argmax on it.
// With many, a warp owns a row: each lane calls first_argmax on a contiguous slice, and a
// butterfly reduction keeps the largest value (the lowest index among equal ones), which is the
// first maximum of the whole row; any NaN in the row makes it vote for nothing. Votes go straight
// into the int64 output with warp-aggregated atomics: the lanes voting for the same class elect
// their lowest lane, which adds their number. Integer atomics make the counts exact and
// deterministic.
//
// A Warp provides, for the 32 lanes of a warp, all of which call each function together:
//   int lane() const;                          this thread's lane, 0..31
//   T shfl_xor(T value, int delta) const;      value of lane ^ delta (T: float, double, int32_t)
//   bool any(bool p) const;                    p of any lane
//   unsigned match_any(int32_t key) const;     mask of the lanes whose key equals this lane's
//   void add(unsigned long long* counter, unsigned long long n) const;   atomic add
#pragma once

#include <cstdint>
#include <limits>

#include "vote_counts_args.h"  // first_argmax, CompareType, DRS_HOST_DEVICE

namespace drs_ext {
namespace votes {

constexpr int kWarp = 32;
constexpr int kThreads = 256;                       // threads per block
constexpr int64_t kWarpPerRowClasses = 64;          // more classes than this: one warp per row
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;

// The indices a thread runs with (CUDA's blockIdx, gridDim, threadIdx, blockDim).
struct ThreadIndex {
  int64_t block_x, block_y, grid_x, grid_y;
  int thread, threads;
};

struct Grid {
  int64_t x, y;
};

// Threads per row: one for few classes, a warp for many.
inline int lanes_for(int64_t classes) { return classes > kWarpPerRowClasses ? kWarp : 1; }

// The launch grid: enough blocks in x for every row (kThreads / kLanes rows per block), one
// block row per group, both capped at the hardware limits (the kernel strides past them).
inline Grid launch_grid(int64_t groups, int64_t rows, int lanes) {
  const int64_t rows_per_block = kThreads / lanes;
  const int64_t x = (rows + rows_per_block - 1) / rows_per_block;
  return {x < kMaxGridX ? x : kMaxGridX, groups < kMaxGridY ? groups : kMaxGridY};
}

DRS_HOST_DEVICE int lowest_lane(unsigned mask) {
#ifdef __CUDA_ARCH__
  return __ffs(mask) - 1;
#else
  return __builtin_ctz(mask);
#endif
}

DRS_HOST_DEVICE unsigned lane_count(unsigned mask) {
#ifdef __CUDA_ARCH__
  return __popc(mask);
#else
  return static_cast<unsigned>(__builtin_popcount(mask));
#endif
}

// First maximum of row[0 .. classes) as seen by lane `lane` of the kLanes scanning it, or -1 for
// a row with a NaN. Every lane of the team gets the result.
template <typename scalar_t, int kLanes, class Warp>
DRS_HOST_DEVICE int32_t row_argmax(const scalar_t* row, int32_t classes, int lane,
                                   const Warp& warp) {
  if constexpr (kLanes == 1) {
    return static_cast<int32_t>(first_argmax(row, classes));
  } else {
    static_assert(kLanes == kWarp, "a team of several lanes is a whole warp");
    using cmp_t = typename CompareType<scalar_t>::type;
    const int32_t chunk = (classes + kLanes - 1) / kLanes;
    const int32_t begin = lane * chunk < classes ? lane * chunk : classes;
    const int32_t end = begin + chunk < classes ? begin + chunk : classes;
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
    for (int delta = kLanes / 2; delta > 0; delta /= 2) {
      const cmp_t other_best = warp.shfl_xor(best, delta);
      const int32_t other_index = warp.shfl_xor(index, delta);
      if (other_best > best || (other_best == best && other_index < index)) {
        best = other_best;
        index = other_index;
      }
    }
    return warp.any(nan) ? -1 : index;
  }
}

// Adds the votes of the reporting lanes of a warp to counts (all 32 lanes call it): the lanes
// voting for one class elect the lowest of them, which adds their number.
template <class Warp>
DRS_HOST_DEVICE void add_votes(unsigned long long* counts, int32_t winner, bool reports,
                               const Warp& warp) {
  const bool votes = reports && winner >= 0;
  const unsigned peers = warp.match_any(votes ? winner : -1);  // -1: the lanes not voting
  if (votes && warp.lane() == lowest_lane(peers)) warp.add(counts + winner, lane_count(peers));
}

// What a thread of the kernel does: the block rows stride over the groups, the blocks over the
// rows of a group, kThreads / kLanes rows per block.
template <typename scalar_t, int kLanes, class Warp>
DRS_HOST_DEVICE void count_rows(const ThreadIndex& t, const scalar_t* logits, int64_t groups,
                                int64_t rows, int32_t classes, unsigned long long* counts,
                                const Warp& warp) {
  const int lane = t.thread % kLanes;
  const int64_t rows_per_block = t.threads / kLanes;
  // Both loops are uniform across the block, so every warp reaches the warp-wide calls.
  for (int64_t g = t.block_y; g < groups; g += t.grid_y) {
    for (int64_t first = t.block_x * rows_per_block; first < rows;
         first += t.grid_x * rows_per_block) {
      const int64_t s = first + t.thread / kLanes;
      int32_t winner = -1;
      if (s < rows) {  // uniform across the team of a row
        winner = row_argmax<scalar_t, kLanes>(logits + (g * rows + s) * classes, classes, lane,
                                              warp);
      }
      add_votes(counts + g * classes, winner, lane == 0, warp);
    }
  }
}

}  // namespace votes
}  // namespace drs_ext
