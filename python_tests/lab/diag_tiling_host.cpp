// The tiling of the CUDA kernel noisy_views, partition "diag" (csrc/cuda/noisy_views_kernel.cu),
// run on the host, for python_tests/lab/test_cuda_tiling_host.py: without a GPU, this runs the
// kernel's per-block code, diag::run_tile of csrc/cuda/noisy_views_diag.cuh, chunk by chunk (of
// `samples` consecutive samples of a row, drs_ext::make_chunks) and tile by tile, with the items of
// each phase in a shuffled order (the threads of a block run them in any order between two
// barriers). Built by torch.utils.cpp_extension.load; registers torch.ops.drs_host_tiling.run and
// torch.ops.drs_host_tiling.max_chunk_samples (diag::max_chunk_samples).
//
// Besides the output it checks what a comparison of values cannot see:
// - the output sits between two guard regions and starts filled with a NaN sentinel: a write
//   outside the output fails here, an output the tiling never writes stays NaN;
// - the shared-memory windows (samples x window_bytes(geo)) lie between two guard regions and are
//   NaN-filled before every tile: a write outside them fails here, a phase-2 read of an element
//   phase 1 did not write (or wrote for another tile or sample) gives a NaN output;
// - every vector store of store_item (drs_ext::store_vec, specialised below for the output
//   types) is 16-byte aligned, as the device needs, given an output that starts 16-byte aligned
//   (as the CUDA allocator's do);
// - the windows fit the 48 KiB of dynamic shared memory a launch gets without opting in.
#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#include "noisy_views_args.h"
#include "noisy_views_diag.cuh"
#include "sentinel.h"

namespace drs_host_tiling {

// Vector stores of store_item (the diag kernel's only vector accesses). A misaligned one is an
// error here, before the store: the host compiler emits an aligned store for the 16-byte-aligned
// Vec too, which would crash the test process instead of failing the test.
inline int64_t vec_stores = 0;

inline void record_vec_store(const void* ptr, size_t bytes) {
  ++vec_stores;
  TORCH_CHECK(bytes == 16, "diag tiling: a vector store of ", bytes, " bytes, not 16");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0,
              "diag tiling: a vector store to an address that is not 16-byte aligned (", ptr, ")");
}

}  // namespace drs_host_tiling

// The kernel's vector stores of each output type (16 bytes each), checked and counted first.
namespace drs_ext {
template <>
inline void store_vec<float, 4>(float* dst, const Vec<float, 4>& v) {
  drs_host_tiling::record_vec_store(dst, sizeof(v));
  std::memcpy(dst, &v, sizeof(v));
}
template <>
inline void store_vec<c10::Half, 8>(c10::Half* dst, const Vec<c10::Half, 8>& v) {
  drs_host_tiling::record_vec_store(dst, sizeof(v));
  std::memcpy(dst, &v, sizeof(v));
}
template <>
inline void store_vec<c10::BFloat16, 8>(c10::BFloat16* dst, const Vec<c10::BFloat16, 8>& v) {
  drs_host_tiling::record_vec_store(dst, sizeof(v));
  std::memcpy(dst, &v, sizeof(v));
}
}  // namespace drs_ext

namespace drs_host_tiling {
namespace {

using drs_ext::diag::Geometry;
using drs_ext::diag::Tile;
using drs_host::all_sentinel;
using drs_host::kSentinelByte;

// Guards on each side of the output and of the window: longer than what they guard (a stray
// write a row or a plane away lands in them rather than in the heap), and a multiple of 64
// elements, 16 bytes for every output dtype, so the output keeps the 16-byte alignment of its
// allocation.
int64_t guard_len(int64_t len) { return (len + 127) / 64 * 64; }
// Dynamic shared memory a launch gets without raising the kernel's
// cudaFuncAttributeMaxDynamicSharedMemorySize (launch_diag does not).
constexpr size_t kMaxWindowBytes = 48 * 1024;

// run_items of diag::run_tile on the host: every item once, in a fresh random order per phase.
// Returning is the barrier.
struct ShuffledItems {
  std::mt19937_64* rng;
  std::vector<int32_t>* order;

  template <class Fn>
  void operator()(int32_t count, Fn&& fn) const {
    order->resize(static_cast<size_t>(count));
    std::iota(order->begin(), order->end(), 0);
    std::shuffle(order->begin(), order->end(), *rng);
    for (const int32_t item : *order) fn(item);
  }
};

// Tiling cases reached by a run, counted over planes and tiles (returned to the test so it can
// check that its shapes reach each case).
enum Stat : int {
  kVecStores,        // vector stores (16 bytes)
  kWindowBytes,      // diag::window_bytes(geo), one sample's window
  kTilesPerPlane,    // geo.tiles
  kColTiles,         // geo.col_tiles
  kSpanChannels,     // tiles whose rows span two or more channels
  kRowHalo,          // tiles with a halo row above or below (a tile edge inside a channel)
  kChannelEdge,      // tiles starting on a channel boundary other than row 0
  kColHalo,          // tiles with a halo column
  kPhasedPlanes,     // chunks whose first output is not on a vector boundary (phase != 0)
  kNumStats
};

template <drs::Fill kFill, typename out_t>
void run_chunks(const drs_ext::Common& c, const Geometry& geo, const drs_ext::Chunks& chunks,
                uint64_t shuffle_seed, out_t* out, int64_t* stats) {
  const size_t window_floats = static_cast<size_t>(chunks.samples) * geo.window_floats;
  const size_t guard = static_cast<size_t>(guard_len(static_cast<int64_t>(window_floats)));
  std::vector<float> window_buf(window_floats + 2 * guard);
  std::memset(window_buf.data(), kSentinelByte, window_buf.size() * sizeof(float));
  float* window = window_buf.data() + guard;
  std::mt19937_64 rng(shuffle_seed);
  std::vector<int32_t> order, tiles(static_cast<size_t>(geo.tiles));
  const ShuffledItems run_items{&rng, &order};
  for (int64_t chunk = 0; chunk < chunks.count; ++chunk) {
    // The kernel's loop body (noisy_views_diag_kernel).
    const auto planes = drs_ext::diag::chunk_planes(c, chunks, chunk, out);
    stats[kPhasedPlanes] += planes.phase != 0;
    // Blocks run their tiles in any order too.
    std::iota(tiles.begin(), tiles.end(), 0);
    std::shuffle(tiles.begin(), tiles.end(), rng);
    for (const int32_t tile : tiles) {
      std::fill(window, window + window_floats, std::numeric_limits<float>::quiet_NaN());
      drs_ext::diag::run_tile<kFill, out_t>(geo, tile, planes, window, run_items);
      TORCH_CHECK(all_sentinel(window_buf.data(), guard * sizeof(float)) &&
                      all_sentinel(window + window_floats, guard * sizeof(float)),
                  "diag tiling: a write outside the shared-memory windows (tile ", tile,
                  " of chunk ", chunk, ")");
      if (chunk == 0) {
        const Tile t = drs_ext::diag::make_tile<kFill>(geo, tile);
        stats[kSpanChannels] += t.r0 / geo.height != (t.r1 - 1) / geo.height;
        stats[kRowHalo] += t.lo < t.r0 || t.hi > t.r1;
        stats[kChannelEdge] += t.r0 > 0 && t.r0 % geo.height == 0;
        stats[kColHalo] += t.kl < t.k0 || t.kh > t.k1;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& x, at::ArrayRef<double> sigma,
                                       int64_t num, int64_t seed, int64_t offset,
                                       const at::Tensor& stream, c10::string_view fill,
                                       std::optional<at::ScalarType> out_dtype,
                                       int64_t samples, int64_t shuffle_seed,
                                       const std::optional<at::Tensor>& sigma_per_image) {
  // The real op's argument checks, seed split (key0, key1) and float32 sigma per image.
  const drs_ext::NoisyViewsArgs args = drs_ext::check_noisy_views_args(
      x, sigma, num, seed, offset, stream, "diag", fill, out_dtype, sigma_per_image);
  TORCH_CHECK(x.device().is_cpu() && stream.device().is_cpu(), "diag tiling: CPU tensors only");
  TORCH_CHECK(samples >= 1 && samples <= drs_ext::diag::kMaxChunkSamples,
              "diag tiling: samples per chunk must lie in 1..", drs_ext::diag::kMaxChunkSamples,
              ", got ", samples);
  const int64_t images = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t plane_size = channels * height * width;
  TORCH_CHECK(plane_size <= std::numeric_limits<int32_t>::max() - 64,
              "diag tiling: an image may hold at most 2^31 - 65 elements");
  const at::Tensor x_c = x.contiguous();
  const at::Tensor stream_c = stream.contiguous();
  const drs_ext::Common c =
      drs_ext::make_common(args, x_c.data_ptr<float>(), stream_c.data_ptr<int64_t>(), images,
                           static_cast<int32_t>(plane_size), num, offset);
  const drs_ext::Chunks chunks = drs_ext::make_chunks(c, static_cast<int32_t>(samples));
  const int64_t numel = c.planes * plane_size;
  const int64_t guard = guard_len(plane_size);
  at::Tensor buffer = at::empty({numel + 2 * guard}, x.options().dtype(args.out_dtype));
  at::Tensor stats = at::zeros({kNumStats}, x.options().dtype(at::kLong));
  int64_t* st = stats.data_ptr<int64_t>();
  AT_DISPATCH_V2(
      args.out_dtype, "diag_tiling_host", AT_WRAP([&] {
        scalar_t* base = buffer.data_ptr<scalar_t>();
        std::memset(base, kSentinelByte, buffer.nbytes());
        scalar_t* out = base + guard;
        TORCH_CHECK(reinterpret_cast<uintptr_t>(out) % 16 == 0,
                    "diag tiling: the output must start 16-byte aligned");
        const Geometry geo = drs_ext::diag::make_geometry(channels, height, width);
        st[kWindowBytes] = static_cast<int64_t>(drs_ext::diag::window_bytes(geo));
        st[kTilesPerPlane] = geo.tiles;
        st[kColTiles] = geo.col_tiles;
        TORCH_CHECK(samples == 1 || plane_size % drs_ext::diag::kItemOutputs == 0,
                    "diag tiling: chunks of ", samples, " samples need C·H·W to be a multiple "
                    "of ", drs_ext::diag::kItemOutputs, " (the planes of a chunk share a phase)");
        const size_t bytes = static_cast<size_t>(samples) * drs_ext::diag::window_bytes(geo);
        TORCH_CHECK(bytes <= kMaxWindowBytes, "diag tiling: the windows of ", samples,
                    " samples need ", bytes, " bytes of shared memory, more than a launch gets");
        vec_stores = 0;
        const auto seed_u = static_cast<uint64_t>(shuffle_seed);
        switch (args.fill) {
          case drs::Fill::kNeighbors:
            run_chunks<drs::Fill::kNeighbors, scalar_t>(c, geo, chunks, seed_u, out, st);
            break;
          case drs::Fill::kPair:
            run_chunks<drs::Fill::kPair, scalar_t>(c, geo, chunks, seed_u, out, st);
            break;
          case drs::Fill::kBilinear:
            run_chunks<drs::Fill::kBilinear, scalar_t>(c, geo, chunks, seed_u, out, st);
            break;
          case drs::Fill::kZeros:
            run_chunks<drs::Fill::kZeros, scalar_t>(c, geo, chunks, seed_u, out, st);
            break;
        }
        st[kVecStores] = vec_stores;
        const size_t guard_bytes = static_cast<size_t>(guard) * sizeof(scalar_t);
        TORCH_CHECK(all_sentinel(base, guard_bytes) && all_sentinel(out + numel, guard_bytes),
                    "diag tiling: a write outside the output");
      }),
      at::kFloat, at::kHalf, at::kBFloat16);
  at::Tensor out = buffer.narrow(0, guard, numel)
                       .view({images, args.branches, num, channels, height, width});
  return {out, stats};
}

// The launcher's largest chunk for images of shape (C, H, W): diag::max_chunk_samples.
int64_t max_chunk_samples(int64_t channels, int64_t height, int64_t width) {
  TORCH_CHECK(channels >= 1 && height >= 1 && width >= 2 && width % 2 == 0,
              "max_chunk_samples: need C >= 1, H >= 1 and an even W >= 2, got (", channels, ", ",
              height, ", ", width, ")");
  const Geometry geo = drs_ext::diag::make_geometry(channels, height, width);
  return drs_ext::diag::max_chunk_samples(geo, channels * height * width);
}

// drs::divide_by_count of each element of `sum` (float32), for the test against torch's division.
at::Tensor divide_by_count(const at::Tensor& sum, int64_t count) {
  TORCH_CHECK(sum.device().is_cpu() && sum.scalar_type() == at::kFloat,
              "divide_by_count: sum must be a float32 CPU tensor");
  TORCH_CHECK(count >= 1 && count <= 4, "divide_by_count: count must lie in 1..4, got ", count);
  const at::Tensor sum_c = sum.contiguous();
  at::Tensor out = at::empty_like(sum_c);
  const float* in = sum_c.data_ptr<float>();
  float* quotient = out.data_ptr<float>();
  for (int64_t k = 0; k < sum_c.numel(); ++k) {
    quotient[k] = drs::divide_by_count(in[k], static_cast<int>(count));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(drs_host_tiling, m) {
  m.def("divide_by_count(Tensor sum, int count) -> Tensor", &divide_by_count);
  m.def(
      "run(Tensor x, float[] sigma, int num, int seed, int offset, Tensor stream, str fill, "
      "ScalarType? out_dtype, int samples, int shuffle_seed, Tensor? sigma_per_image=None) -> "
      "(Tensor, Tensor)",
      &run);
  m.def("max_chunk_samples(int channels, int height, int width) -> int", &max_chunk_samples);
}

}  // namespace drs_host_tiling
