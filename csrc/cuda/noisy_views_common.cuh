// What the two noisy_views kernels (noisy_views_diag.cuh, noisy_views_none.cuh) share: the noise
// parameters of one output plane, and aligned vectors for their wide loads and stores.
#pragma once

#include <cstdint>
#include <cstring>

#include "drs/philox.h"  // DRS_HOST_DEVICE

// Hook called with the address and size of every vector load and store. The host runs of the
// kernels (python_tests/host/*_host.cpp) define it before including the kernel headers, to check
// that each is aligned to its size as the device needs; in the kernels it is empty.
#ifndef DRS_VEC_ACCESS_HOOK
#define DRS_VEC_ACCESS_HOOK(ptr, bytes)
#endif

namespace drs_ext {

// The noise of one (n, p, s) plane: eps(seed = key, stream, branch p, sample s) scaled by sigma_p.
struct Draw {
  uint32_t key0, key1;
  uint64_t sample;
  uint32_t branch, stream;
  float sigma;
};

// kVec consecutive elements moved as one aligned vector (one load or store instruction).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// One vector store of v at dst, which must be aligned to sizeof(v). On the device through
// __stwb (a plain write-back store) of a uint4 / uint2, CUDA's built-in vector types: inside the
// kernels' loops nvcc 13.0 splits a store of the Vec struct itself into scalar stores (seen in
// the PTX), a quarter of the width or less. scripts/nvcc_check.sh checks the PTX for the vector
// stores.
template <typename T, int kVec>
DRS_HOST_DEVICE void store_vec(T* dst, const Vec<T, kVec>& v) {
  static_assert(sizeof(v) == 16 || sizeof(v) == 8, "vector stores of 8 or 16 bytes");
  DRS_VEC_ACCESS_HOOK(dst, sizeof(v));
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(v) == 16) {
    uint4 bits;
    memcpy(&bits, &v, sizeof(v));
    __stwb(reinterpret_cast<uint4*>(dst), bits);
  } else {
    uint2 bits;
    memcpy(&bits, &v, sizeof(v));
    __stwb(reinterpret_cast<uint2*>(dst), bits);
  }
#else
  *reinterpret_cast<Vec<T, kVec>*>(dst) = v;
#endif
}

}  // namespace drs_ext
