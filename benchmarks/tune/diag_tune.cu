// Launch shapes of the diag noisy_views kernel, for benchmarks/tune_diag.py to time side by side
// on a GPU: torch.ops.drs_tune.diag_views runs the library's own kernel
// (diag::noisy_views_diag_kernel, fill "neighbors", float32 output, stream ids 0 .. N-1, offset 0)
// with a block size, a chunk size and a tile size chosen by the caller instead of by the
// launcher's rules (noisy_views_kernel.cu: 256 threads, 4 blocks per multiprocessor,
// chunk_samples, kTileElems). The views are the same numbers whatever the shape, so the script
// checks each against drs_ext.noisy_views. Not part of the package: tune_diag.py builds it with
// torch.utils.cpp_extension.load, and scripts/nvcc_check.sh compile-checks it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "noisy_views_args.h"
#include "noisy_views_diag.cuh"

namespace drs_tune {
namespace {

using drs_ext::Chunks;
using drs_ext::diag::noisy_views_diag_kernel;

// Block shapes with the library kernel's register cap, 64 per thread (65536 / (threads * blocks)).
template <int kThreads, int kBlocksPerSm>
void launch(const drs_ext::Common& c, const drs_ext::diag::Geometry& geo, const Chunks& chunks,
            float* out, cudaStream_t stream) {
  const auto kernel =
      &noisy_views_diag_kernel<drs::Fill::kNeighbors, float, kThreads, kBlocksPerSm>;
  const dim3 grid(static_cast<unsigned>(chunks.count), static_cast<unsigned>(geo.tiles));
  const size_t smem = chunks.samples * drs_ext::diag::window_bytes(geo);
  kernel<<<grid, kThreads, smem, stream>>>(c, geo, chunks, 0, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The largest chunk for this geometry: the launcher's rule (diag::max_chunk_samples) without its
// cap of kMaxChunkSamples, so as many windows as fit in 48 KiB.
int64_t largest_chunk(const drs_ext::diag::Geometry& geo, int64_t plane_size) {
  return drs_ext::diag::max_chunk_samples(geo, plane_size, std::numeric_limits<int32_t>::max());
}

drs_ext::diag::Geometry geometry(int64_t channels, int64_t height, int64_t width,
                                 int64_t tile_elems) {
  TORCH_CHECK(tile_elems >= 1 && tile_elems <= (1 << 20),
              "drs_tune: tile_elems must lie in 1 .. 2^20, got ", tile_elems);
  const auto geo =
      drs_ext::diag::make_geometry(channels, height, width, static_cast<int32_t>(tile_elems));
  TORCH_CHECK(drs_ext::diag::window_bytes(geo) <= drs_ext::diag::kMaxWindowsBytes,
              "drs_tune: a window of ", drs_ext::diag::window_bytes(geo), " bytes at tile_elems ",
              tile_elems, " exceeds the 48 KiB of shared memory a launch gets");
  return geo;
}

// [tile rows, tiles, window bytes, largest chunk] of images (C, H, W) at tile_elems.
std::vector<int64_t> diag_geometry(int64_t channels, int64_t height, int64_t width,
                                   int64_t tile_elems) {
  TORCH_CHECK(channels >= 1 && height >= 1 && width >= 2 && width % 2 == 0,
              "diag_geometry: need C, H >= 1 and an even W >= 2");
  const auto geo = geometry(channels, height, width, tile_elems);
  return {geo.tile_rows, geo.tiles, static_cast<int64_t>(drs_ext::diag::window_bytes(geo)),
          largest_chunk(geo, channels * height * width)};
}

at::Tensor diag_views(const at::Tensor& x, double sigma, int64_t num, int64_t seed,
                      int64_t threads, int64_t chunk, int64_t tile_elems) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "diag_views: x must be a contiguous CUDA tensor");
  TORCH_CHECK(threads == 128 || threads == 256, "diag_views: threads must be 128 or 256, got ",
              threads);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor stream_ids = at::arange(x.size(0), x.options().dtype(at::kLong));
  const drs_ext::NoisyViewsArgs args = drs_ext::check_noisy_views_args(
      x, {sigma}, num, seed, 0, stream_ids, "diag", "neighbors", std::nullopt);
  const int64_t images = x.size(0), plane_size = x.size(1) * x.size(2) * x.size(3);
  TORCH_CHECK(plane_size <= std::numeric_limits<int32_t>::max() - 64,
              "diag_views: an image may hold at most 2^31 - 65 elements");
  const auto geo = geometry(x.size(1), x.size(2), x.size(3), tile_elems);
  const int64_t largest = largest_chunk(geo, plane_size);
  TORCH_CHECK(chunk >= 1 && chunk <= largest, "diag_views: chunk must lie in 1 .. ", largest,
              " for this shape and tile, got ", chunk);
  TORCH_CHECK(geo.tiles <= 65535, "diag_views: ", geo.tiles, " tiles, more than grid.y allows");
  at::Tensor out = at::empty({images, args.branches, num, x.size(1), x.size(2), x.size(3)},
                             x.options());
  const drs_ext::Common c =
      drs_ext::make_common(args, x.data_ptr<float>(), stream_ids.data_ptr<int64_t>(), images,
                           static_cast<int32_t>(plane_size), num, 0);
  const Chunks chunks = drs_ext::make_chunks(c, static_cast<int32_t>(chunk));
  TORCH_CHECK(chunks.count <= std::numeric_limits<int32_t>::max(), "diag_views: too many chunks");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (threads == 128) {
    launch<128, 8>(c, geo, chunks, out.data_ptr<float>(), stream);
  } else {
    launch<256, 4>(c, geo, chunks, out.data_ptr<float>(), stream);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(drs_tune, m) {
  m.def("diag_geometry(int channels, int height, int width, int tile_elems) -> int[]",
        &diag_geometry);
  m.def("diag_views(Tensor x, float sigma, int num, int seed, int threads, int chunk, "
        "int tile_elems) -> Tensor");
}

TORCH_LIBRARY_IMPL(drs_tune, CUDA, m) { m.impl("diag_views", &diag_views); }

}  // namespace drs_tune
