// What the two noisy_views kernels (noisy_views_diag.cuh, noisy_views_none.cuh) share: the
// launch's fields, where each output plane's image and noise come from, and aligned vectors for
// their wide loads and stores. The host runs of the kernels (python_tests/host/*_host.cpp) use
// the same Common and locate, so they map planes exactly as the kernels do.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "drs/philox.h"  // DRS_HOST_DEVICE, PhiloxKeys
#include "noisy_views_args.h"

// Hook called with the address and size of every vector load and store. The host runs of the
// kernels (python_tests/host/*_host.cpp) define it before including the kernel headers, to check
// that each is aligned to its size as the device needs; in the kernels it is empty.
#ifndef DRS_VEC_ACCESS_HOOK
#define DRS_VEC_ACCESS_HOOK(ptr, bytes)
#endif

namespace drs_ext {

// The noise of one (n, p, s) plane: eps(seed = key, stream, branch p, sample s) scaled by sigma_p.
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
  float sigma[2];          // per branch
  uint64_t offset;         // index of sample 0
  int64_t num;             // samples per (image, branch)
  int64_t branches;
  int64_t planes;          // N * branches * num
  int32_t plane_size;      // C·H·W
};

inline Common make_common(const NoisyViewsArgs& args, const float* x, const int64_t* stream,
                          int64_t images, int32_t plane_size, int64_t num, int64_t offset) {
  return Common{x,
                stream,
                drs::philox_keys(args.key0, args.key1),
                {args.sigma[0], args.sigma[1]},
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

// Plane (row, s) of the output, row = image * branches + branch: its image and its noise.
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
               branch == 0 ? c.sigma[0] : c.sigma[1]};
  return Plane{image, branch, d};
}

// Plane `plane` = row * num + s of the output.
DRS_HOST_DEVICE Plane locate(const Common& c, int64_t plane) {
  const int64_t row = plane / c.num;
  return locate(c, row, plane - row * c.num);
}

// Makes the compiler keep `values` in registers from here on rather than recompute them. A
// kernel's per-tile or per-plane values (bounds, phases) are cheap functions of the launch
// parameters, and nvcc's rematerialisation may recompute them in every iteration of a loop that
// uses them: in the diag kernel's "neighbors" fill, about 40 of the 230 instructions of each
// phase-2 item (8 outputs), to save no register (seen in the SASS). An empty asm that may change
// each value stops that; it emits no instruction. A no-op on the host.
DRS_HOST_DEVICE void keep_in_register(int32_t& value) {
#ifdef __CUDA_ARCH__
  asm volatile("" : "+r"(value));
#else
  (void)value;
#endif
}

template <typename... Ints>
DRS_HOST_DEVICE void keep_in_registers(Ints&... values) {
  (keep_in_register(values), ...);
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
  DRS_VEC_ACCESS_HOOK(dst, sizeof(v));
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
