// The CUDA kernel vote_counts (csrc/cuda/vote_counts_kernel.cu) run on the host, for
// python_tests/lab/test_cuda_votes_host.py: without a GPU, this runs the kernel's per-thread code,
// votes::count_rows of csrc/cuda/vote_counts_rows.cuh, for every thread of a launch grid. The 32
// lanes of a warp are 32 std::threads that meet at a barrier in each warp-wide call (shuffle,
// any, match), which is how a warp executes them; the warps of the grid run one after another.
// Built by torch.utils.cpp_extension.load; registers torch.ops.drs_host_votes.
//
// Besides the counts it reports what a comparison of counts cannot see: warp-wide calls that the
// 32 lanes do not all make together, or not with the same arguments (a divergent branch around
// one, which is undefined behaviour with a full mask on the device).
#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <barrier>
#include <cstdint>
#include <thread>
#include <tuple>
#include <vector>

#include "vote_counts_args.h"
#include "vote_counts_rows.cuh"

namespace drs_host_votes {
namespace {

using drs_ext::votes::kWarp;

// What the lanes of a warp share: a barrier, one slot per lane for the values exchanged, and
// the call each lane is making (checked to be the same call for all 32).
struct WarpState {
  std::barrier<> barrier{kWarp};
  double value[kWarp] = {};
  int64_t call[kWarp] = {};
  std::atomic<bool> done[kWarp] = {};
  std::atomic<int64_t> divergent{0};  // warp-wide calls not made by all 32 lanes alike
  std::atomic<int64_t> calls{0};      // warp-wide calls, counted once per warp
};

// Codes of the warp-wide calls: shfl_xor with each delta, any, match_any.
constexpr int64_t kShfl = 100, kAny = 1, kMatch = 2;

// The Warp of votes::count_rows for one lane.
class HostWarp {
 public:
  HostWarp(WarpState* state, int lane) : s_(state), lane_(lane) {}

  int lane() const { return lane_; }

  template <typename T>
  T shfl_xor(T value, int delta) const {
    // float, double and int32_t all convert to double and back exactly.
    const double other = exchange(kShfl + delta, static_cast<double>(value),
                                  [&](const double* all) { return all[lane_ ^ delta]; });
    return static_cast<T>(other);
  }

  bool any(bool p) const {
    return exchange(kAny, p ? 1.0 : 0.0, [](const double* all) {
             for (int l = 0; l < kWarp; ++l)
               if (all[l] != 0.0) return 1.0;
             return 0.0;
           }) != 0.0;
  }

  unsigned match_any(int32_t key) const {
    const double mask = exchange(kMatch, static_cast<double>(key), [&](const double* all) {
      unsigned m = 0;
      for (int l = 0; l < kWarp; ++l)
        if (all[l] == all[lane_]) m |= 1u << l;
      return static_cast<double>(m);
    });
    return static_cast<unsigned>(mask);
  }

  void add(unsigned long long* counter, unsigned long long n) const {
    std::atomic_ref<unsigned long long>(*counter).fetch_add(n);
  }

 private:
  // Every lane writes its value, all meet, each reads what it needs, all meet again (so no lane
  // overwrites a slot another has yet to read).
  template <class Read>
  double exchange(int64_t call, double value, Read read) const {
    s_->value[lane_] = value;
    s_->call[lane_] = call;
    s_->barrier.arrive_and_wait();
    bool same = true;
    for (int l = 0; l < kWarp; ++l) same &= s_->call[l] == call && !s_->done[l].load();
    if (lane_ == 0) {
      s_->calls.fetch_add(1);
      if (!same) s_->divergent.fetch_add(1);
    }
    const double result = read(s_->value);
    s_->barrier.arrive_and_wait();
    return result;
  }

  WarpState* s_;
  int lane_;
};

// Runs every thread of a (grid_x, grid_y) grid of kThreads-thread blocks, warp by warp.
template <typename scalar_t, int kLanes>
std::tuple<int64_t, int64_t> run_grid(const scalar_t* logits, int64_t groups, int64_t rows,
                                      int32_t classes, unsigned long long* counts,
                                      int64_t grid_x, int64_t grid_y) {
  WarpState state;
  std::vector<std::thread> lanes;
  for (int lane = 0; lane < kWarp; ++lane) {
    lanes.emplace_back([&, lane] {
      const HostWarp warp(&state, lane);
      for (int64_t by = 0; by < grid_y; ++by) {
        for (int64_t bx = 0; bx < grid_x; ++bx) {
          for (int w = 0; w < drs_ext::votes::kThreads / kWarp; ++w) {
            const drs_ext::votes::ThreadIndex t{bx, by, grid_x, grid_y, w * kWarp + lane,
                                                drs_ext::votes::kThreads};
            drs_ext::votes::count_rows<scalar_t, kLanes>(t, logits, groups, rows, classes, counts,
                                                         warp);
          }
        }
      }
      // A lane that is through while others still make warp-wide calls made fewer of them: the
      // others see it done (divergent) and carry on without it instead of waiting forever.
      state.done[lane].store(true);
      state.barrier.arrive_and_drop();
    });
  }
  for (std::thread& t : lanes) t.join();
  return {state.divergent.load(), state.calls.load()};
}

// counts (G, K) int64 and stats [divergent calls, warp-wide calls, grid x, grid y, lanes].
// grid_x, grid_y <= 0: the launch grid of the CUDA launcher; lanes 0: its choice (1 or 32).
std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& logits, int64_t grid_x, int64_t grid_y,
                                       int64_t lanes) {
  drs_ext::check_vote_counts_args(logits);  // the real op's checks
  TORCH_CHECK(logits.device().is_cpu(), "vote_counts host run: CPU tensors only");
  TORCH_CHECK(lanes == 0 || lanes == 1 || lanes == kWarp, "lanes must be 0, 1 or 32");
  const at::Tensor l = logits.contiguous();
  const int64_t groups = l.size(0), rows = l.size(1);
  const int32_t classes = static_cast<int32_t>(l.size(2));
  if (lanes == 0) lanes = drs_ext::votes::lanes_for(classes);
  const drs_ext::votes::Grid launch =
      drs_ext::votes::launch_grid(groups, rows, static_cast<int>(lanes));
  if (grid_x <= 0) grid_x = launch.x;
  if (grid_y <= 0) grid_y = launch.y;
  at::Tensor counts = at::zeros({groups, classes}, l.options().dtype(at::kLong));
  auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  int64_t divergent = 0, calls = 0;
  if (groups > 0 && rows > 0) {  // the launcher returns before launching otherwise
    AT_DISPATCH_V2(
        l.scalar_type(), "vote_counts_host", AT_WRAP([&] {
          const scalar_t* ptr = l.data_ptr<scalar_t>();
          std::tie(divergent, calls) =
              lanes == kWarp
                  ? run_grid<scalar_t, kWarp>(ptr, groups, rows, classes, counts_ptr, grid_x,
                                              grid_y)
                  : run_grid<scalar_t, 1>(ptr, groups, rows, classes, counts_ptr, grid_x, grid_y);
        }),
        at::kFloat, at::kDouble, at::kHalf, at::kBFloat16);
  }
  const at::Tensor stats = at::tensor({divergent, calls, grid_x, grid_y, lanes}, at::kLong);
  return {counts, stats};
}

// The CUDA launcher's grid and lanes per row for a (groups, rows, classes) input.
std::vector<int64_t> launch_config(int64_t groups, int64_t rows, int64_t classes) {
  const int lanes = drs_ext::votes::lanes_for(classes);
  const drs_ext::votes::Grid g = drs_ext::votes::launch_grid(groups, rows, lanes);
  return {g.x, g.y, lanes};
}

}  // namespace

TORCH_LIBRARY(drs_host_votes, m) {
  m.def("run(Tensor logits, int grid_x, int grid_y, int lanes) -> (Tensor, Tensor)", &run);
  m.def("launch_config(int groups, int rows, int classes) -> int[]", &launch_config);
}

}  // namespace drs_host_votes
