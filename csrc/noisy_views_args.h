// The argument checks of drs_ext::noisy_views, run by both the CPU and the CUDA kernel before
// anything else (docs/design.md §4). They are the op's only validation layer: the Python wrapper
// converts Python values to the schema's types and checks nothing these checks cover. Each bad
// input is a TORCH_CHECK naming the argument, what was expected and what was given. Three checks
// read the tensors' values and so live with the kernels: x finite, stream ids in [0, 2^32) and a
// per-image sigma finite and > 0 are TORCH_CHECKs of the CPU kernel, and on CUDA, where reading
// values would cost a host synchronisation, device-side asserts of the kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <array>
#include <cmath>
#include <optional>
#include <string>

#include "drs/partition.h"

namespace drs_ext {

struct NoisyViewsArgs {
  drs::Partition partition;
  drs::Fill fill;
  int branches;
  std::array<float, 2> sigma;  // per branch, when sigma is the list
  // sigma per image, when given as the tensor sigma_per_image: its values in float32 as an (N, P)
  // tensor (an (N,) one expanded over the branches, stride 0), on x's device; undefined
  // otherwise. The kernels read sigma of (n, p) at data[n * stride(0) + p * stride(1)].
  at::Tensor sigma_image;
  at::ScalarType out_dtype;
  uint32_t key0, key1;         // the 64-bit seed
  int64_t num_groups;          // Philox calls per (image, branch, sample): ceil(m / 4)
};

inline drs::Partition parse_partition(c10::string_view name) {
  if (name == "diag") return drs::Partition::kDiag;
  if (name == "none") return drs::Partition::kNone;
  TORCH_CHECK(false, "noisy_views: partition must be \"diag\" or \"none\", got \"",
              std::string(name), "\"");
}

inline drs::Fill parse_fill(c10::string_view name) {
  if (name == "neighbors") return drs::Fill::kNeighbors;
  if (name == "pair") return drs::Fill::kPair;
  if (name == "bilinear") return drs::Fill::kBilinear;
  if (name == "zeros") return drs::Fill::kZeros;
  TORCH_CHECK(false,
              "noisy_views: fill must be one of \"neighbors\", \"pair\", \"bilinear\", "
              "\"zeros\", got \"",
              std::string(name), "\"");
}

// sigma given per image: `sigma_per_image` of shape (N,) (one value for every branch) or (N, P),
// float32 or float64, on x's device, with the list `sigma` empty. Its values are checked by the
// kernels (finite and > 0 in float32), as reading them here would synchronise a CUDA host.
inline void check_sigma_per_image(const at::Tensor& x, at::ArrayRef<double> sigma,
                                  const at::Tensor& per_image, int branches) {
  TORCH_CHECK(sigma.empty(),
              "noisy_views: sigma must be empty when sigma_per_image is given (one or the other), "
              "got ",
              sigma.size(), " values");
  const int64_t images = x.size(0);
  const bool per_branch = per_image.dim() == 2;
  TORCH_CHECK((per_image.dim() == 1 || per_branch) && per_image.size(0) == images &&
                  (!per_branch || per_image.size(1) == branches),
              "noisy_views: sigma as a tensor (sigma_per_image) must have shape (N,) = (", images,
              ",) or (N, P) = (", images, ", ", branches, "), got ", per_image.sizes());
  TORCH_CHECK(per_image.scalar_type() == at::kFloat || per_image.scalar_type() == at::kDouble,
              "noisy_views: sigma as a tensor (sigma_per_image) must be float32 or float64, got ",
              per_image.scalar_type());
  TORCH_CHECK(per_image.device() == x.device(),
              "noisy_views: sigma as a tensor (sigma_per_image) must be on x's device ",
              x.device(), ", got ", per_image.device());
}

inline NoisyViewsArgs check_noisy_views_args(const at::Tensor& x, at::ArrayRef<double> sigma,
                                             int64_t num, int64_t seed, int64_t offset,
                                             const at::Tensor& stream,
                                             c10::string_view partition, c10::string_view fill,
                                             std::optional<at::ScalarType> out_dtype,
                                             const std::optional<at::Tensor>& sigma_per_image =
                                                 std::nullopt) {
  NoisyViewsArgs args{};
  // x: its rank first, since every later check reads its sizes.
  TORCH_CHECK(x.dim() == 4, "noisy_views: x must have shape (N, C, H, W), got ", x.dim(),
              " dimensions with shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "noisy_views: x must be float32, got ",
              x.scalar_type());
  args.partition = parse_partition(partition);
  args.fill = parse_fill(fill);  // also for "none", which ignores it: no misspelling passes
  args.branches = drs::num_branches(args.partition);
  const int64_t height = x.size(2), width = x.size(3);
  TORCH_CHECK(x.size(1) >= 1 && height >= 1 && width >= 1,
              "noisy_views: x must have C, H, W >= 1, got shape ", x.sizes());
  if (args.partition == drs::Partition::kDiag) {
    TORCH_CHECK(width % 2 == 0,
                "noisy_views: x must have an even image width W for partition=\"diag\", got W=",
                width, " (shape ", x.sizes(), ")");
  }
  // sigma: one value for every branch, or one per branch; each checked as the float32 the
  // kernels compute with, so that a value rounding to 0 or inf is caught. Or, instead, one per
  // image (and branch) in the tensor sigma_per_image.
  if (sigma_per_image.has_value()) {
    check_sigma_per_image(x, sigma, *sigma_per_image, args.branches);
  } else {
    TORCH_CHECK(sigma.size() == 1 || static_cast<int>(sigma.size()) == args.branches,
                "noisy_views: sigma must hold 1 value or one per branch (", args.branches,
                " for partition=\"", std::string(partition), "\"), got ", sigma.size(),
                " values");
    for (int p = 0; p < args.branches; ++p) {
      const double s = sigma.size() == 1 ? sigma[0] : sigma[p];
      args.sigma[p] = static_cast<float>(s);
      TORCH_CHECK(std::isfinite(args.sigma[p]) && args.sigma[p] > 0.0f,
                  "noisy_views: sigma must be finite and > 0 in float32, got ", s, " for branch ",
                  p);
    }
  }
  // num, seed, offset: the samples offset .. offset+num-1 index the Philox counter's 56 sample
  // bits (drs/philox.h); any int64 seed >= 0 is a key.
  TORCH_CHECK(num >= 1, "noisy_views: num must be >= 1, got ", num);
  TORCH_CHECK(seed >= 0, "noisy_views: seed must be >= 0 (and < 2^63), got ", seed);
  TORCH_CHECK(offset >= 0 && offset <= (int64_t{1} << drs::kSampleBits) - num,
              "noisy_views: offset and num must keep the samples offset .. offset+num-1 in [0, 2^",
              drs::kSampleBits, "), got offset=", offset, " num=", num);
  TORCH_CHECK(stream.dim() == 1 && stream.size(0) == x.size(0),
              "noisy_views: stream must have shape (N,) = (", x.size(0), ",), got ",
              stream.sizes());
  TORCH_CHECK(stream.scalar_type() == at::kLong, "noisy_views: stream must be int64, got ",
              stream.scalar_type());
  TORCH_CHECK(stream.device() == x.device(), "noisy_views: stream must be on x's device ",
              x.device(), ", got ", stream.device());
  args.out_dtype = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(args.out_dtype == at::kFloat || args.out_dtype == at::kHalf ||
                  args.out_dtype == at::kBFloat16,
              "noisy_views: out_dtype must be None, float32, float16 or bfloat16, got ",
              args.out_dtype);
  // The element index within a sub-image is 4 * (32-bit Philox group) + lane.
  const int64_t m = x.size(1) * height * drs::sub_width(args.partition, width);
  args.num_groups = (m + 3) / 4;
  TORCH_CHECK(args.num_groups <= (int64_t{1} << 32),
              "noisy_views: x is too large: a sub-image (C*H*W, or C*H*W/2 for "
              "partition=\"diag\") may hold at most 2^34 elements, got ",
              m, " (shape ", x.sizes(), ")");
  if (sigma_per_image.has_value()) {
    // Rounded to float32 as a listed sigma is (static_cast<float> above), so a tensor holding
    // the list's values draws the same views bit for bit. After every check: nothing is
    // converted for a call that fails.
    const at::Tensor values = sigma_per_image->to(at::kFloat);  // the tensor itself if float32
    args.sigma_image = values.dim() == 2
                           ? values
                           : values.unsqueeze(1).expand({values.size(0), args.branches});
  }
  args.key0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  args.key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  return args;
}

}  // namespace drs_ext
