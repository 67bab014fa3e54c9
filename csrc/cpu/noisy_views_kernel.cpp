// noisy_views on the CPU: out[n, p, s] = fill_p(sub_p(x[n]) + sigma_p * eps(seed, stream[n], p,
// offset + s)), for every image n, branch p and sample s, in one pass. Each task owns one
// (n, p, s) plane: it draws the plane's Philox normals into a thread-local buffer (the loop the
// compiler vectorises), adds the kept pixels of x, then writes the full-resolution plane.
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "drs/normal.h"
#include "noisy_views_args.h"

namespace drs_ext {
namespace {

// Standard normals of element groups [0, num_groups) of one (sample, branch, stream). Cloned for
// AVX-512 and AVX2 besides the baseline ISA; the loader picks the best clone for the machine.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void draw_normals(uint32_t key0, uint32_t key1, uint64_t sample, uint32_t branch,
                  uint32_t stream, int64_t num_groups, float* z) {
  for (int64_t g = 0; g < num_groups; ++g) {
    drs::normal4(key0, key1, static_cast<uint32_t>(g), sample, branch, stream, z + 4 * g);
  }
}

struct Geometry {
  int64_t channels, height, width, sub_width;
};

// One (n, p, s) plane. `noisy` is scratch of 4 * num_groups floats.
template <typename out_t>
void write_plane(const NoisyViewsArgs& args, const Geometry& geo, const float* image,
                 uint32_t stream, int branch, uint64_t sample, float* noisy, out_t* out) {
  const int64_t m = geo.channels * geo.height * geo.sub_width;
  draw_normals(args.key0, args.key1, sample, static_cast<uint32_t>(branch), stream,
               args.num_groups, noisy);
  const float sigma = args.sigma[branch];
  if (args.partition == drs::Partition::kNone) {
    for (int64_t e = 0; e < m; ++e) out[e] = static_cast<out_t>(image[e] + sigma * noisy[e]);
    return;
  }
  // noisy <- sub_p(x) + sigma * eps, in packed (C, H, W/2) layout.
  for (int64_t c = 0; c < geo.channels; ++c) {
    for (int64_t i = 0; i < geo.height; ++i) {
      const float* x_row = image + (c * geo.height + i) * geo.width;
      float* sub_row = noisy + (c * geo.height + i) * geo.sub_width;
      for (int64_t k = 0; k < geo.sub_width; ++k) {
        sub_row[k] = x_row[drs::kept_column(i, k, branch)] + sigma * sub_row[k];
      }
    }
  }
  for (int64_t c = 0; c < geo.channels; ++c) {
    const float* sub = noisy + c * geo.height * geo.sub_width;
    out_t* out_c = out + c * geo.height * geo.width;
    for (int64_t i = 0; i < geo.height; ++i) {
      for (int64_t j = 0; j < geo.width; ++j) {
        out_c[i * geo.width + j] = static_cast<out_t>(
            drs::fill_pixel(sub, geo.height, geo.width, i, j, branch, args.fill));
      }
    }
  }
}

at::Tensor noisy_views_cpu(const at::Tensor& x, at::ArrayRef<double> sigma, int64_t num,
                           int64_t seed, int64_t offset, const at::Tensor& stream,
                           c10::string_view partition, c10::string_view fill,
                           std::optional<at::ScalarType> out_dtype) {
  const NoisyViewsArgs args =
      check_noisy_views_args(x, sigma, num, seed, offset, stream, partition, fill, out_dtype);
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
  const Geometry geo{x.size(1), x.size(2), x.size(3), drs::sub_width(args.partition, x.size(3))};
  const int64_t plane = geo.channels * geo.height * geo.width;
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
          std::vector<float> noisy(4 * args.num_groups);
          for (int64_t task = begin; task < end; ++task) {
            const int64_t s = task % num;
            const int branch = static_cast<int>((task / num) % args.branches);
            const int64_t n = task / (num * args.branches);
            write_plane(args, geo, x_ptr + n * plane, static_cast<uint32_t>(stream_ptr[n]),
                        branch, static_cast<uint64_t>(offset + s), noisy.data(),
                        out_ptr + task * plane);
          }
        });
      }),
      at::kFloat, at::kHalf, at::kBFloat16);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(drs_ext, CPU, m) { m.impl("noisy_views", &noisy_views_cpu); }

}  // namespace drs_ext
