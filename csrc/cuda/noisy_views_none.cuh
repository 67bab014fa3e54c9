// Per-thread code of the partition="none" noisy_views kernel (noisy_views_kernel.cu): the
// sub-image is the image, so element e of a plane is output e. A thread draws one Philox element
// group (4 normals, drs::normal4) and writes those 4 consecutive outputs, with one vector load of
// x and one vector store where both are aligned. DRS_HOST_DEVICE with no CUDA-only dependency:
// python_tests/test_cuda_none_host.py runs it on the host against the CPU kernel.
#pragma once

#include <cstdint>

#include "drs/normal.h"
#include "noisy_views_common.cuh"

namespace drs_ext {
namespace none {

// Whether a launch may use the vector path: each group's 4 inputs and 4 outputs are aligned
// vectors when every image and plane starts on a 4-element boundary and x itself is 16-byte
// aligned (a view of x may not be). The output comes from the allocator, aligned.
inline bool can_vectorize(const float* x, int32_t plane_size) {
  return plane_size % 4 == 0 && reinterpret_cast<uintptr_t>(x) % alignof(Vec<float, 4>) == 0;
}

// Outputs 4g .. 4g+3 of one plane (those below plane_size): image + sigma * eps of the plane's
// draw d, element group g.
template <typename out_t>
DRS_HOST_DEVICE void write_group(const Draw& d, const float* image, int32_t g, int32_t plane_size,
                                 bool vectorize, out_t* dst) {
  float z[4];
  drs::normal4(d.key0, d.key1, static_cast<uint32_t>(g), d.sample, d.branch, d.stream, z);
  const int32_t e = 4 * g;
  if (vectorize && e + 4 <= plane_size) {
    DRS_VEC_ACCESS_HOOK(image + e, sizeof(Vec<float, 4>));
    const Vec<float, 4> xv = *reinterpret_cast<const Vec<float, 4>*>(image + e);
    Vec<out_t, 4> v;
    for (int l = 0; l < 4; ++l) v.v[l] = static_cast<out_t>(xv.v[l] + d.sigma * z[l]);
    store_vec(dst + e, v);
  } else {
    for (int l = 0; l < 4 && e + l < plane_size; ++l) {
      dst[e + l] = static_cast<out_t>(image[e + l] + d.sigma * z[l]);
    }
  }
}

}  // namespace none
}  // namespace drs_ext
