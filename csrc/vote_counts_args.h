// The argument checks and the per-row rule of drs_ext::vote_counts, shared by the CPU and CUDA
// kernels. The checks are the op's only validation layer (docs/design.md §4): the Python wrapper
// adds none, and each bad input is a TORCH_CHECK naming the argument, what was expected and what
// was given.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "drs/philox.h"  // DRS_HOST_DEVICE

namespace drs_ext {

inline void check_vote_counts_args(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 3, "vote_counts: logits must have shape (G, S, K), got ",
              logits.dim(), " dimensions with shape ", logits.sizes());
  // G = 0 or S = 0 is fine (no votes); a row needs a class to vote for.
  TORCH_CHECK(logits.size(2) >= 1, "vote_counts: logits must have K >= 1 classes, got shape ",
              logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "vote_counts: logits must be float32, float64, float16 or bfloat16, got ", dtype);
}

// Comparisons in float for the 16-bit types (exact), in double for double.
template <typename scalar_t>
struct CompareType {
  using type = float;
};
template <>
struct CompareType<double> {
  using type = double;
};

// Index of the first maximum of row[0 .. classes), or -1 when the row holds a NaN.
template <typename scalar_t>
DRS_HOST_DEVICE int64_t first_argmax(const scalar_t* row, int64_t classes) {
  using cmp_t = typename CompareType<scalar_t>::type;
  int64_t best = 0;
  cmp_t best_value = static_cast<cmp_t>(row[0]);
  bool has_nan = best_value != best_value;
  for (int64_t k = 1; k < classes; ++k) {
    const cmp_t v = static_cast<cmp_t>(row[k]);
    has_nan |= v != v;
    if (v > best_value) {
      best_value = v;
      best = k;
    }
  }
  return has_nan ? -1 : best;
}

}  // namespace drs_ext
