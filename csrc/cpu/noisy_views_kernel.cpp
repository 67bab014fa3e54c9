// noisy_views on the CPU: out[n, p, s] = fill_p(sub_p(x[n]) + sigma_{n,p} * eps(seed, stream[n],
// p, offset + s)), for every image n, branch p and sample s, in one pass (sigma_{n,p} = sigma_p
// unless sigma is given per image, read once per plane). Each task owns one (n, p, s) plane. One
// vectorised loop draws the plane's Philox normals and adds them to the packed
// sub-image of x (packed once per (n, p), not per sample); partition "none" writes that straight
// into the output, "diag" writes it to a scratch plane (L1/L2-sized) that the fill expands to full
// resolution.
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "drs/normal.h"
#include "noisy_views_args.h"

namespace drs_ext {
namespace {

// Elements drawn per block: 16 Philox groups, one group per vector lane with AVX-512.
constexpr int64_t kBlockElements = 64;

// dst[e] = base[e] + sigma * z_e for e < m, z_e the standard normal of element e of (sample,
// branch, stream). normal4 over 16 consecutive groups is a loop GCC vectorises across groups
// (structure of arrays: the 32x32->64 Philox multiplies, the log and sincos polynomials all run
// on vectors); the block stays in L1 while it is added to base. The last block draws up to 15
// groups past the sub-image and drops them. Cloned for AVX-512 and AVX2 besides the baseline
// ISA; the loader picks the best clone for the machine.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void add_noise(uint32_t key0, uint32_t key1, uint64_t sample, uint32_t branch, uint32_t stream,
               float sigma, const float* base, int64_t m, float* dst) {
  float z[kBlockElements];
  for (int64_t e0 = 0; e0 < m; e0 += kBlockElements) {
    const uint32_t group0 = static_cast<uint32_t>(e0 / 4);
    for (uint32_t g = 0; g < kBlockElements / 4; ++g) {
      drs::normal4(key0, key1, group0 + g, sample, branch, stream, z + 4 * g);
    }
    const int64_t len = std::min(kBlockElements, m - e0);
    for (int64_t k = 0; k < len; ++k) dst[e0 + k] = base[e0 + k] + sigma * z[k];
  }
}

struct Geometry {
  int64_t channels, height, width, sub_width;
};

// sub_p(x) of one image, packed to (C, H, W/2).
void pack_sub_image(const Geometry& geo, const float* image, int branch, float* sub) {
  for (int64_t c = 0; c < geo.channels; ++c) {
    for (int64_t i = 0; i < geo.height; ++i) {
      const float* x_row = image + (c * geo.height + i) * geo.width;
      float* sub_row = sub + (c * geo.height + i) * geo.sub_width;
      for (int64_t k = 0; k < geo.sub_width; ++k) {
        sub_row[k] = x_row[drs::kept_column(i, k, branch)];
      }
    }
  }
}

// Fill "neighbors" of one row of one channel, whose kept pixel of pair k sits at column
// 2k + parity. The dropped pixel of pair k is the mean of its neighbours above and below
// (`vertical(k)`: packed column k of the rows around, which keep the other parity) and left and
// right in the row, summed in drs::fill_pixel's order so that both give the same value; kCount of
// them exist except in the edge column, which lacks one. The divisor is a compile-time constant
// and the pair loop branch-free, so it vectorises.
template <int kCount, typename out_t, typename Vertical>
void fill_neighbors_row(const float* cur, int64_t sub_width, int parity, Vertical vertical,
                        out_t* __restrict out) {
  constexpr float count = static_cast<float>(kCount);
  const int64_t last = sub_width - 1;
  if (parity == 0) {  // kept at even columns; column W-1 has no right neighbour
    for (int64_t k = 0; k < last; ++k) {
      out[2 * k] = static_cast<out_t>(cur[k]);
      out[2 * k + 1] = static_cast<out_t>((vertical(k) + cur[k] + cur[k + 1]) / count);
    }
    out[2 * last] = static_cast<out_t>(cur[last]);
    out[2 * last + 1] = static_cast<out_t>((vertical(last) + cur[last]) / (count - 1.0f));
  } else {  // kept at odd columns; column 0 has no left neighbour
    out[0] = static_cast<out_t>((vertical(0) + cur[0]) / (count - 1.0f));
    out[1] = static_cast<out_t>(cur[0]);
    for (int64_t k = 1; k <= last; ++k) {
      out[2 * k] = static_cast<out_t>((vertical(k) + cur[k - 1] + cur[k]) / count);
      out[2 * k + 1] = static_cast<out_t>(cur[k]);
    }
  }
}

// Full-resolution plane (C, H, W) of branch p from its noisy packed plane `sub` (C, H, W/2).
// "neighbors" goes row by row through fill_neighbors_row; the other fills pixel by pixel through
// drs::fill_pixel.
template <typename out_t>
void fill_plane(const Geometry& geo, drs::Fill fill, int branch, const float* sub, out_t* out) {
  const int64_t wp = geo.sub_width;
  for (int64_t c = 0; c < geo.channels; ++c) {
    const float* sub_c = sub + c * geo.height * wp;
    out_t* out_c = out + c * geo.height * geo.width;
    for (int64_t i = 0; i < geo.height; ++i) {
      out_t* out_row = out_c + i * geo.width;
      if (fill != drs::Fill::kNeighbors) {
        for (int64_t j = 0; j < geo.width; ++j) {
          out_row[j] = static_cast<out_t>(
              drs::fill_pixel(sub_c, geo.height, geo.width, i, j, branch, fill));
        }
        continue;
      }
      const float* cur = sub_c + i * wp;  // cur[k - wp], cur[k + wp]: the rows above, below
      const int parity = static_cast<int>((i + branch) & 1);
      const bool has_up = i > 0, has_down = i + 1 < geo.height;
      if (has_up && has_down) {
        fill_neighbors_row<4>(
            cur, wp, parity, [=](int64_t k) { return cur[k - wp] + cur[k + wp]; }, out_row);
      } else if (has_up) {
        fill_neighbors_row<3>(cur, wp, parity, [=](int64_t k) { return cur[k - wp]; }, out_row);
      } else if (has_down) {
        fill_neighbors_row<3>(cur, wp, parity, [=](int64_t k) { return cur[k + wp]; }, out_row);
      } else {
        fill_neighbors_row<2>(cur, wp, parity, [](int64_t) { return 0.0f; }, out_row);
      }
    }
  }
}

// Per-thread buffers: the packed sub-image of the current (image, branch), and one noisy plane.
struct Scratch {
  int64_t packed_key = -1;  // n * branches + p of the image and branch held in `packed`
  std::vector<float> packed, noisy;
};

// One (n, p, s) plane, its noise scaled by `sigma`.
template <typename out_t>
void write_plane(const NoisyViewsArgs& args, const Geometry& geo, const float* image,
                 uint32_t stream, float sigma, int64_t image_branch, uint64_t sample,
                 Scratch& scratch, out_t* out) {
  const int branch = static_cast<int>(image_branch % args.branches);
  const int64_t m = geo.channels * geo.height * geo.sub_width;
  const auto noise = [&](const float* base, float* dst) {
    add_noise(args.key0, args.key1, sample, static_cast<uint32_t>(branch), stream, sigma, base,
              m, dst);
  };
  if (args.partition == drs::Partition::kNone) {
    if constexpr (std::is_same_v<out_t, float>) {
      noise(image, out);
    } else {
      noise(image, scratch.noisy.data());
      for (int64_t e = 0; e < m; ++e) out[e] = static_cast<out_t>(scratch.noisy[e]);
    }
    return;
  }
  if (scratch.packed_key != image_branch) {
    pack_sub_image(geo, image, branch, scratch.packed.data());
    scratch.packed_key = image_branch;
  }
  noise(scratch.packed.data(), scratch.noisy.data());
  fill_plane(geo, args.fill, branch, scratch.noisy.data(), out);
}

// Every value of a per-image sigma (given: the argument; values: args.sigma_image, its float32
// (N, P) values) must be finite and > 0 in float32; the error quotes the value as given.
void check_sigma_values(const at::Tensor& given, const at::Tensor& values) {
  const auto v = values.accessor<float, 2>();
  for (int64_t n = 0; n < values.size(0); ++n) {
    for (int64_t p = 0; p < values.size(1); ++p) {
      if (std::isfinite(v[n][p]) && v[n][p] > 0.0f) continue;
      const double bad = (given.dim() == 1 ? given[n] : given[n][p]).item<double>();
      TORCH_CHECK(false, "noisy_views: sigma must be finite and > 0 in float32, got ", bad,
                  " for image ", n,
                  given.dim() == 1 ? std::string() : ", branch " + std::to_string(p));
    }
  }
}

at::Tensor noisy_views_cpu(const at::Tensor& x, at::ArrayRef<double> sigma, int64_t num,
                           int64_t seed, int64_t offset, const at::Tensor& stream,
                           c10::string_view partition, c10::string_view fill,
                           std::optional<at::ScalarType> out_dtype,
                           const std::optional<at::Tensor>& sigma_per_image) {
  const NoisyViewsArgs args = check_noisy_views_args(x, sigma, num, seed, offset, stream,
                                                     partition, fill, out_dtype, sigma_per_image);
  TORCH_CHECK(x.device().is_cpu(), "noisy_views (CPU kernel): x must be a CPU tensor, got ",
              x.device());
  TORCH_CHECK(at::isfinite(x).all().item<bool>(),
              "noisy_views: x must be finite, found NaN or Inf in the input image");
  const at::Tensor x_c = x.contiguous();
  const at::Tensor stream_c = stream.contiguous();
  const int64_t* stream_ptr = stream_c.data_ptr<int64_t>();
  const int64_t images = x.size(0);
  for (int64_t n = 0; n < images; ++n) {
    TORCH_CHECK(stream_ptr[n] >= 0 && stream_ptr[n] <= std::numeric_limits<uint32_t>::max(),
                "noisy_views: stream ids must lie in [0, 2^32), got ", stream_ptr[n],
                " for image ", n);
  }
  // sigma of (image n, branch p): the list's, or the tensor's at n * stride_n + p * stride_p.
  const bool per_image = args.sigma_image.defined();
  const float* sigma_ptr = per_image ? args.sigma_image.data_ptr<float>() : args.sigma.data();
  const int64_t sigma_stride_n = per_image ? args.sigma_image.stride(0) : 0;
  const int64_t sigma_stride_p = per_image ? args.sigma_image.stride(1) : 1;
  if (per_image) check_sigma_values(*sigma_per_image, args.sigma_image);
  const Geometry geo{x.size(1), x.size(2), x.size(3), drs::sub_width(args.partition, x.size(3))};
  const int64_t plane = geo.channels * geo.height * geo.width;
  const int64_t m = geo.channels * geo.height * geo.sub_width;
  at::Tensor out = at::empty({images, args.branches, num, geo.channels, geo.height, geo.width},
                             x.options().dtype(args.out_dtype));
  const float* x_ptr = x_c.data_ptr<float>();
  AT_DISPATCH_V2(
      args.out_dtype, "noisy_views_cpu", AT_WRAP([&] {
        scalar_t* out_ptr = out.data_ptr<scalar_t>();
        const int64_t tasks = images * args.branches * num;
        // Grain: enough planes per task that a tiny plane does not drown in scheduling.
        const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(plane, 1));
        at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
          Scratch scratch;
          scratch.packed.resize(args.partition == drs::Partition::kNone ? 0 : m);
          scratch.noisy.resize(m);
          for (int64_t task = begin; task < end; ++task) {
            const int64_t s = task % num;
            const int64_t image_branch = task / num;  // n * branches + p
            const int64_t n = image_branch / args.branches;
            const int64_t p = image_branch - n * args.branches;
            write_plane(args, geo, x_ptr + n * plane, static_cast<uint32_t>(stream_ptr[n]),
                        sigma_ptr[n * sigma_stride_n + p * sigma_stride_p], image_branch,
                        static_cast<uint64_t>(offset + s), scratch, out_ptr + task * plane);
          }
        });
      }),
      at::kFloat, at::kHalf, at::kBFloat16);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(drs_ext, CPU, m) { m.impl("noisy_views", &noisy_views_cpu); }

}  // namespace drs_ext
