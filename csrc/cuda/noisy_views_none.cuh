// Per-thread code of the partition="none" noisy_views kernel (noisy_views_kernel.cu): the
// sub-image is the image, so element e of a plane is output e. A block takes a chunk of up to
// kMaxChunkSamples consecutive samples of one (image, branch) row; a thread takes one Philox
// element group g of the chunk's planes: it locates the row and loads x's 4 elements once, then
// for each sample draws 4 normals (drs::normal4) and writes those 4 consecutive outputs, one
// vector store where the output is aligned. DRS_HOST_DEVICE with no CUDA-only dependency, so it
// also compiles for the host.
#pragma once

#include <cstdint>

#include "drs/normal.h"
#include "noisy_views_common.cuh"

namespace drs_ext {
namespace none {

// A thread's set-up (locate: two 64-bit divisions and the stream id; the load of x) costs about
// as much as one draw, so a chunk shares it between up to 16 draws.
constexpr int32_t kMaxChunkSamples = 16;

// The launcher's chunk size (drs_ext::chunk_samples from kMaxChunkSamples).
inline int32_t chunk_samples(const Common& c, int64_t blocks_per_chunk, int64_t min_blocks) {
  return drs_ext::chunk_samples(c, kMaxChunkSamples, blocks_per_chunk, min_blocks);
}

// Whether a launch may use the vector path: each group's 4 inputs and 4 outputs are aligned
// vectors when every image and plane starts on a 4-element boundary and x itself is 16-byte
// aligned (a view of x may not be). The output comes from the allocator, aligned.
inline bool can_vectorize(const float* x, int32_t plane_size) {
  return plane_size % 4 == 0 && reinterpret_cast<uintptr_t>(x) % alignof(Vec<float, 4>) == 0;
}

// Outputs 4g .. 4g+3 (those below plane_size) of every plane of chunk `chunk`: x of the row's
// image + sigma * eps of the plane's draw, element group g.
template <typename out_t>
DRS_HOST_DEVICE void write_chunk_group(const Common& c, const Chunks& chunks, int64_t chunk,
                                       int32_t g, bool vectorize, out_t* out) {
  const ChunkSpan span = chunk_span(c, chunks, chunk);
  const int64_t row = span.row, s0 = span.first;
  const int32_t count = span.count;
  const Plane q = locate(c, row, s0);
  const Draw& d = q.draw;
  const float* image = c.x + q.image * c.plane_size;
  const int32_t e = 4 * g;
  const bool whole = vectorize && e + 4 <= c.plane_size;
  float xv[4];
  if (whole) {
    const Vec<float, 4> v = *reinterpret_cast<const Vec<float, 4>*>(image + e);
    for (int l = 0; l < 4; ++l) xv[l] = v.v[l];
  } else {
    for (int l = 0; l < 4; ++l) xv[l] = e + l < c.plane_size ? image[e + l] : 0.0f;
  }
  out_t* dst = out + (row * c.num + s0) * c.plane_size + e;
  for (int32_t k = 0; k < count; ++k, dst += c.plane_size) {
    float z[4];
    drs::normal4(*d.keys, static_cast<uint32_t>(g), d.sample + k, d.branch, d.stream, z);
    Vec<out_t, 4> v;
    for (int l = 0; l < 4; ++l) v.v[l] = static_cast<out_t>(xv[l] + d.sigma * z[l]);
    if (whole) {
      store_vec(dst, v);
    } else {
      for (int l = 0; l < 4 && e + l < c.plane_size; ++l) dst[l] = v.v[l];
    }
  }
}

}  // namespace none
}  // namespace drs_ext
