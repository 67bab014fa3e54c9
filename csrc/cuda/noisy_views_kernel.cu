// noisy_views on CUDA, the same function as csrc/cpu/noisy_views_kernel.cpp:
// out[n, p, s] = fill_p(sub_p(x[n]) + sigma_{n,p} * eps(seed, stream[n], p, offset + s)), in one
// pass that reads x (an L2-resident image) and writes each output element once.
//
// partition "none": a block takes a chunk of consecutive samples of one (image, branch); a thread
// takes one Philox element group of the chunk's planes and, for each sample, draws 4 normals
// (drs::normal4) and writes those 4 consecutive outputs, one vector store where the output is
// aligned (none::write_chunk_group).
// partition "diag": a block owns one tile of the planes of a chunk of consecutive samples of one
// (image, branch) row (noisy_views_diag.cuh). It draws the noisy sub-image of the tile and the
// one-pixel halo its fill reads into shared memory, a window per sample, so each normal is drawn
// once (up to halos), then writes the tile's full-resolution pixels, 8 per thread, item and
// sample (diag::fill_slot, or drs::fill_pixel where an item straddles rows or the tile's edge),
// 16 bytes per store where aligned (diag::run_tile).
// Index math inside a plane is 32-bit (checked below), plane offsets are 64-bit.
//
// x must be finite, and a per-image sigma finite and > 0; checking that on the host would cost a
// synchronisation, so a small kernel checks both on the device first (assert_inputs_kernel): a
// bad value stops it with a device-side assertion, as stream ids outside [0, 2^32) stop the views
// kernels.
#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "drs/partition.h"
#include "noisy_views_args.h"
#include "noisy_views_diag.cuh"
#include "noisy_views_none.cuh"

namespace drs_ext {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;

// ---------------------------------------------------------------------------------------------
// x must be finite, and sigma per image finite and > 0: checked by a kernel of its own, on the
// views kernel's stream before it. It reads x once (an image is L2-sized: a few microseconds).
// Checking inside the views kernels, in the planes of sample 0, cost the diag kernels 6 to 12
// registers per thread (a block fewer per multiprocessor for some fills); asserting costs a
// launch from C++, not the three launches of an isfinite/all/_assert_async check from Python (40
// to 60 us of host time per call on an H100 host, measured).

// sigma of (n, p) = sigma[n * stride_n + p * stride_p] for n < images and p < branches, or none
// (sigma null, images 0).
struct SigmaImage {
  const float* sigma;
  int64_t images, branches, stride_n, stride_p;
};

__global__ void __launch_bounds__(kThreads)
    assert_inputs_kernel(const float* __restrict__ x, int64_t numel, SigmaImage s) {
  const int64_t first = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  bool finite = true;
  for (int64_t i = first; i < numel; i += stride) finite = finite && isfinite(x[i]);
  CUDA_KERNEL_ASSERT_MSG(finite, "noisy_views: x must be finite, found NaN or Inf in x");
  bool positive = true;
  for (int64_t i = first; i < s.images * s.branches; i += stride) {
    const int64_t n = i / s.branches;
    const float v = s.sigma[n * s.stride_n + (i - n * s.branches) * s.stride_p];
    positive = positive && isfinite(v) && v > 0.0f;
  }
  CUDA_KERNEL_ASSERT_MSG(positive,
                         "noisy_views: sigma must be finite and > 0 in float32, found a value "
                         "in sigma_per_image that is not");
}

void launch_assert_inputs(const at::Tensor& x, const at::Tensor& sigma_image,
                          cudaStream_t stream) {
  SigmaImage s{nullptr, 0, 0, 0, 0};
  if (sigma_image.defined()) {
    s = SigmaImage{sigma_image.data_ptr<float>(), sigma_image.size(0), sigma_image.size(1),
                   sigma_image.stride(0), sigma_image.stride(1)};
  }
  constexpr int64_t kMaxBlocks = 1024;  // a grid-stride loop: enough blocks to fill the device
  const int64_t work = std::max(x.numel(), s.images * s.branches);
  const int64_t blocks = std::min((work + kThreads - 1) / kThreads, kMaxBlocks);
  assert_inputs_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      x.data_ptr<float>(), x.numel(), s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// partition "none": a thread per element group of a chunk of planes (noisy_views_none.cuh).

template <typename out_t>
__global__ void __launch_bounds__(kThreads)
    noisy_views_none_kernel(Common c, Chunks chunks, int32_t num_groups, bool vectorize,
                            out_t* __restrict__ out) {
  for (int64_t chunk = blockIdx.x; chunk < chunks.count; chunk += gridDim.x) {
    for (int32_t g = blockIdx.y * blockDim.x + threadIdx.x; g < num_groups;
         g += gridDim.y * blockDim.x) {
      none::write_chunk_group(c, chunks, chunk, g, vectorize, out);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// partition "diag": tiles of the packed (C·H, W/2) plane staged in shared memory
// (noisy_views_diag.cuh).

// Blocks of a diag kernel per multiprocessor: four, which caps its registers at 64 per thread
// (65536 / (4 * 256)); the windows of a chunk fit four blocks too (diag::kMaxWindowsBytes). Every
// fill fits without spilling (56-64 registers with nvcc 13.0; scripts/nvcc_check.sh rejects a
// spill) because nothing wide stays live across the items: no division (drs::divide_by_count),
// 32-bit indices in the pixel-by-pixel fill, and no loop over chunks (launch_diag). At three
// blocks, where "neighbors" used 77 registers, 24 of the 64 warp slots were filled instead of 32.
constexpr int kDiagBlocksPerSm = 4;

// run_items of diag::run_tile on the device: the block's threads stride over the items, then a
// barrier.
struct BlockItems {
  template <class Fn>
  __device__ __forceinline__ void operator()(int32_t count, Fn&& fn) const {
    for (int32_t item = threadIdx.x; item < count; item += blockDim.x) fn(item);
    __syncthreads();
  }
};

// The diag kernel of fill kFill: block (x, y) runs chunk first_chunk + x on tiles y,
// y + gridDim.y, ..., with chunks.samples * diag::window_bytes(geo) of dynamic shared memory.
template <drs::Fill kFill, typename out_t>
__global__ void __launch_bounds__(kThreads, kDiagBlocksPerSm)
    noisy_views_diag_kernel(Common c, diag::Geometry geo, Chunks chunks, int64_t first_chunk,
                            out_t* __restrict__ out) {
  extern __shared__ float window[];
  for (int32_t tile = blockIdx.y; tile < geo.tiles; tile += gridDim.y) {
    // Located per tile (a block runs one tile but for more than 65535 of them), so that what only
    // phase 1 reads (the image, the draw and its sigma, a load with sigma per image) is not held
    // through phase 2 for the next tile: "neighbors" at 64 registers has none to spare.
    const diag::ChunkPlanes<out_t> planes =
        diag::chunk_planes(c, chunks, first_chunk + blockIdx.x, out);
    diag::run_tile<kFill, out_t>(geo, tile, planes, window, BlockItems{});
  }
}

// Blocks a launch should have at least, so chunks stay short enough to fill the device: 32 per
// multiprocessor, five waves or more (the none kernel's 40 registers per thread fit 6 blocks of
// 256, the diag kernels kDiagBlocksPerSm).
int64_t min_launch_blocks() {
  int device = 0, multiprocessors = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  return int64_t{32} * multiprocessors;
}

// The diag kernel of `fill`.
template <typename out_t>
auto diag_kernel(drs::Fill fill) {
  switch (fill) {
    case drs::Fill::kPair:
      return &noisy_views_diag_kernel<drs::Fill::kPair, out_t>;
    case drs::Fill::kBilinear:
      return &noisy_views_diag_kernel<drs::Fill::kBilinear, out_t>;
    case drs::Fill::kZeros:
      return &noisy_views_diag_kernel<drs::Fill::kZeros, out_t>;
    case drs::Fill::kNeighbors:
    default:
      return &noisy_views_diag_kernel<drs::Fill::kNeighbors, out_t>;
  }
}

template <typename out_t>
void launch_diag(const Common& c, const diag::Geometry& geo, drs::Fill fill, out_t* out,
                 cudaStream_t stream) {
  const int64_t blocks_per_chunk = std::min<int64_t>(geo.tiles, kMaxGridY);
  const Chunks chunks = make_chunks(
      c, chunk_samples(c, diag::max_chunk_samples(geo, c.plane_size), blocks_per_chunk,
                       min_launch_blocks()));
  const size_t smem = chunks.samples * diag::window_bytes(geo);
  const auto kernel = diag_kernel<out_t>(fill);
  // A block per (chunk, tile), in one launch unless there are more chunks than grid.x allows:
  // the kernel then holds no 64-bit loop counter over chunks, two registers through all its
  // work that the "neighbors" fill cannot spare at 64.
  for (int64_t first = 0; first < chunks.count; first += kMaxGridX) {
    const dim3 grid(static_cast<unsigned>(std::min(chunks.count - first, kMaxGridX)),
                    static_cast<unsigned>(blocks_per_chunk));
    kernel<<<grid, kThreads, smem, stream>>>(c, geo, chunks, first, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename out_t>
void launch_none(const Common& c, int64_t num_groups, out_t* out, cudaStream_t stream) {
  const int64_t blocks_per_chunk =
      std::min((num_groups + kThreads - 1) / kThreads, kMaxGridY);
  const Chunks chunks =
      make_chunks(c, none::chunk_samples(c, blocks_per_chunk, min_launch_blocks()));
  const dim3 grid(static_cast<unsigned>(std::min(chunks.count, kMaxGridX)),
                  static_cast<unsigned>(blocks_per_chunk));
  const bool vectorize = none::can_vectorize(c.x, c.plane_size);
  noisy_views_none_kernel<out_t><<<grid, kThreads, 0, stream>>>(
      c, chunks, static_cast<int32_t>(num_groups), vectorize, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor noisy_views_cuda(const at::Tensor& x, at::ArrayRef<double> sigma, int64_t num,
                            int64_t seed, int64_t offset, const at::Tensor& stream,
                            c10::string_view partition, c10::string_view fill,
                            std::optional<at::ScalarType> out_dtype,
                            const std::optional<at::Tensor>& sigma_per_image) {
  const NoisyViewsArgs args = check_noisy_views_args(x, sigma, num, seed, offset, stream,
                                                     partition, fill, out_dtype, sigma_per_image);
  TORCH_CHECK(x.is_cuda(), "noisy_views (CUDA kernel): x must be a CUDA tensor, got ",
              x.device());
  const int64_t images = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t plane_size = channels * height * width;
  TORCH_CHECK(plane_size <= std::numeric_limits<int32_t>::max() - 64,
              "noisy_views (CUDA kernel): an image may hold at most 2^31 - 65 elements, got ",
              plane_size, " (shape ", x.sizes(), ")");
  c10::cuda::OptionalCUDAGuard guard(x.device());
  const at::Tensor x_c = x.contiguous();
  const at::Tensor stream_c = stream.contiguous();
  at::Tensor out = at::empty({images, args.branches, num, channels, height, width},
                             x.options().dtype(args.out_dtype));
  if (out.numel() == 0) return out;

  const Common c = make_common(args, x_c.data_ptr<float>(), stream_c.data_ptr<int64_t>(), images,
                                static_cast<int32_t>(plane_size), num, offset);
  const cudaStream_t cuda_stream = c10::cuda::getCurrentCUDAStream();
  launch_assert_inputs(x_c, args.sigma_image, cuda_stream);
  AT_DISPATCH_V2(
      args.out_dtype, "noisy_views_cuda", AT_WRAP([&] {
        scalar_t* out_ptr = out.data_ptr<scalar_t>();
        if (args.partition == drs::Partition::kNone) {
          launch_none(c, args.num_groups, out_ptr, cuda_stream);
        } else {
          const diag::Geometry geo = diag::make_geometry(channels, height, width);
          launch_diag(c, geo, args.fill, out_ptr, cuda_stream);
        }
      }),
      at::kFloat, at::kHalf, at::kBFloat16);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(drs_ext, CUDA, m) { m.impl("noisy_views", &noisy_views_cuda); }

}  // namespace drs_ext
