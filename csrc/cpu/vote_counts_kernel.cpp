// vote_counts on the CPU: counts[g, k] = number of rows s of logits[g] whose argmax (the first
// maximum) is class k. A row holding a NaN votes for no class, which can only lower the counts of
// the predicted class and so keeps a certificate conservative.
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

#include "vote_counts_args.h"

namespace drs_ext {
namespace {

at::Tensor vote_counts_cpu(const at::Tensor& logits) {
  check_vote_counts_args(logits);
  TORCH_CHECK(logits.device().is_cpu(),
              "vote_counts (CPU kernel): logits must be a CPU tensor, got ", logits.device());
  const at::Tensor l = logits.contiguous();
  const int64_t groups = l.size(0), rows = l.size(1), classes = l.size(2);
  at::Tensor counts = at::zeros({groups, classes}, l.options().dtype(at::kLong));
  int64_t* counts_ptr = counts.data_ptr<int64_t>();
  AT_DISPATCH_V2(
      l.scalar_type(), "vote_counts_cpu", AT_WRAP([&] {
        const scalar_t* ptr = l.data_ptr<scalar_t>();
        at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
          for (int64_t g = begin; g < end; ++g) {
            for (int64_t s = 0; s < rows; ++s) {
              const scalar_t* row = ptr + (g * rows + s) * classes;
              const int64_t winner = first_argmax(row, classes);
              if (winner >= 0) ++counts_ptr[g * classes + winner];
            }
          }
        });
      }),
      at::kFloat, at::kDouble, at::kHalf, at::kBFloat16);
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(drs_ext, CPU, m) { m.impl("vote_counts", &vote_counts_cpu); }

}  // namespace drs_ext
