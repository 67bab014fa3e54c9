// The CUDA kernel noisy_views for partition "none" (csrc/cuda/noisy_views_kernel.cu) run on the
// host, for python_tests/lab/test_cuda_none_host.py: without a GPU, this runs the kernel's loop,
// none::write_chunk_group of csrc/cuda/noisy_views_none.cuh for every element group of every
// chunk of `samples` consecutive samples of a row (drs_ext::make_chunks), with the launcher's
// choice of the vector path (none::can_vectorize). Built by torch.utils.cpp_extension.load; registers
// torch.ops.drs_host_none.run and torch.ops.drs_host_none.chunk_samples (the launcher's chunk
// size, none::chunk_samples).
//
// Besides the output it checks what a comparison of values cannot see: the output sits between
// two guard regions and starts filled with a NaN sentinel (a write outside it fails here, an
// output never written stays NaN), and every vector store (drs_ext::store_vec, specialised below
// for the output types) lies inside the output and is aligned to its size, given an output that
// starts 16-byte aligned (as the CUDA allocator's do).
#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "noisy_views_args.h"
#include "noisy_views_none.cuh"
#include "sentinel.h"

namespace drs_host_none {

// The output's bytes [begin, end) and the vector stores seen. A store that lies outside it or is
// not aligned to its size is an error here, before the store: the host compiler emits aligned
// stores for the aligned Vec too, which would crash the test process instead of failing the test.
struct VecStores {
  uintptr_t begin = 0, end = 0;
  int64_t count = 0;
};

inline VecStores vec_stores;

inline void record_vec_store(const void* ptr, size_t bytes) {
  const auto p = reinterpret_cast<uintptr_t>(ptr);
  TORCH_CHECK(p % bytes == 0, "none kernel: a vector store of ", bytes,
              " bytes to an address not aligned to it (", ptr, ")");
  const VecStores& v = vec_stores;
  TORCH_CHECK(p >= v.begin && p <= v.end && bytes <= v.end - p, "none kernel: a vector store of ",
              bytes, " bytes at ", ptr, " outside the output");
  ++vec_stores.count;
}

}  // namespace drs_host_none

// The kernel's vector stores of each output type, checked and counted before they are made.
namespace drs_ext {
template <>
inline void store_vec<float, 4>(float* dst, const Vec<float, 4>& v) {
  drs_host_none::record_vec_store(dst, sizeof(v));
  std::memcpy(dst, &v, sizeof(v));
}
template <>
inline void store_vec<c10::Half, 4>(c10::Half* dst, const Vec<c10::Half, 4>& v) {
  drs_host_none::record_vec_store(dst, sizeof(v));
  std::memcpy(dst, &v, sizeof(v));
}
template <>
inline void store_vec<c10::BFloat16, 4>(c10::BFloat16* dst, const Vec<c10::BFloat16, 4>& v) {
  drs_host_none::record_vec_store(dst, sizeof(v));
  std::memcpy(dst, &v, sizeof(v));
}
}  // namespace drs_ext

namespace drs_host_none {
namespace {

using drs_host::all_sentinel;
using drs_host::kSentinelByte;

// Guards of 64 elements on each side of the output: 16 bytes for every output dtype, so the
// output keeps the 16-byte alignment of its allocation.
constexpr int64_t kGuard = 64;

// (out, stats [vector stores, vector path chosen]) of the kernel's loop with chunks of `samples`
// samples.
std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& x, at::ArrayRef<double> sigma,
                                       int64_t num, int64_t seed, int64_t offset,
                                       const at::Tensor& stream,
                                       std::optional<at::ScalarType> out_dtype, int64_t samples,
                                       const std::optional<at::Tensor>& sigma_per_image) {
  // The real op's argument checks, seed split (key0, key1) and float32 sigma per image.
  const drs_ext::NoisyViewsArgs args = drs_ext::check_noisy_views_args(
      x, sigma, num, seed, offset, stream, "none", "neighbors", out_dtype, sigma_per_image);
  TORCH_CHECK(samples >= 1 && samples <= std::numeric_limits<int32_t>::max(),
              "none kernel: samples per chunk must be >= 1 (and fit in int32), got ", samples);
  TORCH_CHECK(x.device().is_cpu() && stream.device().is_cpu(), "none kernel: CPU tensors only");
  const int64_t images = x.size(0), plane_size = x.numel() / std::max<int64_t>(images, 1);
  TORCH_CHECK(plane_size <= std::numeric_limits<int32_t>::max() - 64,
              "none kernel: an image may hold at most 2^31 - 65 elements");
  const at::Tensor x_c = x.contiguous();  // keeps the offset of a contiguous view, as the op does
  const at::Tensor stream_c = stream.contiguous();
  const drs_ext::Common c =
      drs_ext::make_common(args, x_c.data_ptr<float>(), stream_c.data_ptr<int64_t>(), images,
                           static_cast<int32_t>(plane_size), num, offset);
  const drs_ext::Chunks chunks = drs_ext::make_chunks(c, static_cast<int32_t>(samples));
  const int64_t numel = c.planes * plane_size;
  const bool vectorize = drs_ext::none::can_vectorize(c.x, c.plane_size);
  at::Tensor buffer = at::empty({numel + 2 * kGuard}, x.options().dtype(args.out_dtype));
  AT_DISPATCH_V2(
      args.out_dtype, "none_host", AT_WRAP([&] {
        scalar_t* base = buffer.data_ptr<scalar_t>();
        std::memset(base, kSentinelByte, buffer.nbytes());
        scalar_t* out = base + kGuard;
        TORCH_CHECK(reinterpret_cast<uintptr_t>(out) % 16 == 0,
                    "none kernel: the output must start 16-byte aligned");
        const auto begin = reinterpret_cast<uintptr_t>(out);
        vec_stores = VecStores{begin, begin + numel * sizeof(scalar_t), 0};
        // The kernel's loop: blocks stride over the chunks, threads over the element groups.
        for (int64_t chunk = 0; chunk < chunks.count; ++chunk) {
          for (int64_t g = 0; g < args.num_groups; ++g) {
            drs_ext::none::write_chunk_group(c, chunks, chunk, static_cast<int32_t>(g), vectorize,
                                             out);
          }
        }
        const size_t guard_bytes = kGuard * sizeof(scalar_t);
        TORCH_CHECK(all_sentinel(base, guard_bytes) && all_sentinel(out + numel, guard_bytes),
                    "none kernel: a write outside the output");
      }),
      at::kFloat, at::kHalf, at::kBFloat16);
  std::vector<int64_t> shape = {images, 1, num};
  for (int64_t d = 1; d < x.dim(); ++d) shape.push_back(x.size(d));
  const at::Tensor stats =
      at::tensor({vec_stores.count, static_cast<int64_t>(vectorize)}, at::kLong);
  return {buffer.narrow(0, kGuard, numel).view(shape), stats};
}

// The launcher's samples per chunk (none::chunk_samples) for `images` images of one branch
// (partition "none") and `num` samples each.
int64_t chunk_samples(int64_t images, int64_t num, int64_t blocks_per_chunk, int64_t min_blocks) {
  TORCH_CHECK(images >= 0, "chunk_samples: images must be >= 0, got ", images);
  TORCH_CHECK(num >= 1, "chunk_samples: num must be >= 1, got ", num);
  TORCH_CHECK(blocks_per_chunk >= 1, "chunk_samples: blocks_per_chunk must be >= 1, got ",
              blocks_per_chunk);
  drs_ext::NoisyViewsArgs args{};
  args.branches = 1;
  // Only num and planes matter to chunk_samples: no x, stream or plane size.
  const drs_ext::Common c = drs_ext::make_common(args, nullptr, nullptr, images, 1, num, 0);
  return drs_ext::none::chunk_samples(c, blocks_per_chunk, min_blocks);
}

}  // namespace

TORCH_LIBRARY(drs_host_none, m) {
  m.def(
      "run(Tensor x, float[] sigma, int num, int seed, int offset, Tensor stream, "
      "ScalarType? out_dtype, int samples, Tensor? sigma_per_image=None) -> (Tensor, Tensor)",
      &run);
  m.def("chunk_samples(int images, int num, int blocks_per_chunk, int min_blocks) -> int",
        &chunk_samples);
}

}  // namespace drs_host_none
