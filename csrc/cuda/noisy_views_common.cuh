// What the two noisy_views kernels (noisy_views_diag.cuh, noisy_views_none.cuh) share: the
// launch's fields, where each output plane's image and noise come from, and aligned vectors for
// their wide loads and stores.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "drs/philox.h"  // DRS_HOST_DEVICE, PhiloxKeys
#include "noisy_views_args.h"

// Before a loop the device compiler must not unroll: the loops over the samples of a chunk, whose
// iterations, interleaved, would each hold a draw's registers. Nothing on the host.
#if defined(__CUDA_ARCH__)
#define DRS_NO_UNROLL _Pragma("unroll 1")
#else
#define DRS_NO_UNROLL
#endif

namespace drs_ext {

// The noise of one (n, p, s) plane: eps(seed = key, stream, branch p, sample s) scaled by the
// sigma of (n, p).
struct Draw {
  const drs::PhiloxKeys* keys;  // the seed's round keys: Common::keys of the launch
  uint64_t sample;
  uint32_t branch, stream;
  float sigma;
};

// Fields of one launch. A plane is one (n, p, s): C·H·W outputs.
struct Common {
  const float* x;          // (N, C, H, W), contiguous
  const int64_t* stream;   // (N,)
  drs::PhiloxKeys keys;    // round keys of the seed
  float sigma[2];          // per branch, unless sigma_image is set
  const float* sigma_image;  // or per image: sigma of (n, p) at n * stride_n + p * stride_p
  int64_t sigma_stride_n, sigma_stride_p;
  uint64_t offset;         // index of sample 0
  int64_t num;             // samples per (image, branch)
  int64_t branches;
  int64_t planes;          // N * branches * num
  int32_t plane_size;      // C·H·W
};

inline Common make_common(const NoisyViewsArgs& args, const float* x, const int64_t* stream,
                          int64_t images, int32_t plane_size, int64_t num, int64_t offset) {
  const bool per_image = args.sigma_image.defined();
  return Common{x,
                stream,
                drs::philox_keys(args.key0, args.key1),
                {args.sigma[0], args.sigma[1]},
                per_image ? args.sigma_image.data_ptr<float>() : nullptr,
                per_image ? args.sigma_image.stride(0) : 0,
                per_image ? args.sigma_image.stride(1) : 0,
                static_cast<uint64_t>(offset),
                num,
                args.branches,
                images * args.branches * num,
                plane_size};
}

struct Plane {
  int64_t image;
  int branch;
  Draw draw;
};

// Plane (row, s) of the output, row = image * branches + branch: its image and its noise. The
// kernels locate a plane once per chunk of samples, so a per-image sigma costs one load per chunk.
DRS_HOST_DEVICE Plane locate(const Common& c, int64_t row, int64_t s) {
  const int64_t image = row / c.branches;
  const int branch = static_cast<int>(row - image * c.branches);
  const int64_t id = c.stream[image];
  CUDA_KERNEL_ASSERT_MSG(id >= 0 && id <= std::numeric_limits<uint32_t>::max(),
                         "noisy_views: stream ids must lie in [0, 2^32)");
  const Draw d{&c.keys,
               c.offset + static_cast<uint64_t>(s),
               static_cast<uint32_t>(branch),
               static_cast<uint32_t>(id),
               c.sigma_image != nullptr
                   ? c.sigma_image[image * c.sigma_stride_n + branch * c.sigma_stride_p]
                   : (branch == 0 ? c.sigma[0] : c.sigma[1])};
  return Plane{image, branch, d};
}

// Plane `plane` = row * num + s of the output.
DRS_HOST_DEVICE Plane locate(const Common& c, int64_t plane) {
  const int64_t row = plane / c.num;
  return locate(c, row, plane - row * c.num);
}

// Chunks: up to `samples` consecutive samples of one (image, branch) row, a block's unit of work
// (diag: with one tile of each plane). The planes of a chunk share their image, stream id and
// key; only the sample index and the output plane differ. So whatever a thread does once per
// plane besides drawing and writing (locating the plane, reading x, index math) it does once per
// chunk, shared by the chunk's samples.
struct Chunks {
  int32_t samples;  // samples per chunk (the last chunk of a row may hold fewer)
  int64_t per_row;  // chunks per (image, branch) row: ceil(num / samples)
  int64_t count;    // chunks in all: rows * per_row
};

inline Chunks make_chunks(const Common& c, int32_t samples) {
  const int64_t per_row = (c.num + samples - 1) / samples;
  return Chunks{samples, per_row, c.planes / c.num * per_row};
}

// The largest chunk of at most max_samples that still gives the launch `min_blocks` blocks
// (blocks_per_chunk of them per chunk), so that shorter launches keep the device filled; 1 if
// none does. Every size is tried, not only halvings: a CIFAR launch of 24,000 diag planes takes
// chunks of 5, where halving from 8 would stop at 4 (a chunk's set-up, shared by its samples,
// costs tens of instructions per output of one sample).
inline int32_t chunk_samples(const Common& c, int32_t max_samples, int64_t blocks_per_chunk,
                             int64_t min_blocks) {
  int32_t samples = max_samples;
  while (samples > 1 && make_chunks(c, samples).count * blocks_per_chunk < min_blocks) {
    --samples;
  }
  return samples;
}

// Chunk `chunk`: its row (image * branches + branch), its first sample and its sample count.
struct ChunkSpan {
  int64_t row, first;
  int32_t count;
};

DRS_HOST_DEVICE ChunkSpan chunk_span(const Common& c, const Chunks& chunks, int64_t chunk) {
  const int64_t row = chunk / chunks.per_row;
  const int64_t first = (chunk - row * chunks.per_row) * chunks.samples;
  const auto count = static_cast<int32_t>(c.num - first < chunks.samples ? c.num - first
                                                                          : chunks.samples);
  return ChunkSpan{row, first, count};
}

// kVec consecutive elements moved as one aligned vector (one load or store instruction).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// One vector store of v at dst, which must be aligned to sizeof(v): on the device a plain (weak,
// write-back) st.global.v4 / .v2 in inline PTX, volatile and clobbering memory so that the
// compiler neither drops nor moves a statement it cannot see into. Inside the kernels' loops
// nvcc 13.0 splits a store of the Vec struct, or of a uint4 built from it, into scalar stores
// (seen in the PTX), a quarter of the width or less; __stwb keeps the width but becomes a strong
// store (STG.E.128.STRONG.SM in the SASS). scripts/nvcc_check.sh checks the PTX for the vector
// stores.
template <typename T, int kVec>
DRS_HOST_DEVICE void store_vec(T* dst, const Vec<T, kVec>& v) {
  static_assert(sizeof(v) == 16 || sizeof(v) == 8, "vector stores of 8 or 16 bytes");
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(v) == 16) {
    uint4 b;
    memcpy(&b, &v, sizeof(v));
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(b.x), "r"(b.y),
                 "r"(b.z), "r"(b.w)
                 : "memory");
  } else {
    uint2 b;
    memcpy(&b, &v, sizeof(v));
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(dst), "r"(b.x), "r"(b.y) : "memory");
  }
#else
  *reinterpret_cast<Vec<T, kVec>*>(dst) = v;
#endif
}

}  // namespace drs_ext
