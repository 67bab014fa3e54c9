// Philox4x32-10 counter-based generator (Salmon et al., SC'11; Random123 definition) and the
// counter layout drs_ext uses for its noise. Plain C++ with DRS_HOST_DEVICE functions and no torch
// headers, so the CPU kernels, the CUDA kernels and the known-answer tests share one definition.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DRS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DRS_HOST_DEVICE inline
#endif

namespace drs {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Uint4 {
  uint32_t x, y, z, w;
};

DRS_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

DRS_HOST_DEVICE Uint4 philox_round(Uint4 ctr, uint32_t key0, uint32_t key1) {
  const uint32_t hi0 = mulhi32(kPhiloxM0, ctr.x);
  const uint32_t lo0 = kPhiloxM0 * ctr.x;
  const uint32_t hi1 = mulhi32(kPhiloxM1, ctr.z);
  const uint32_t lo1 = kPhiloxM1 * ctr.z;
  return Uint4{hi1 ^ ctr.y ^ key0, lo1, hi0 ^ ctr.w ^ key1, lo0};
}

// Ten rounds, the key bumped between rounds (Random123's philox4x32_R(10, ...)).
DRS_HOST_DEVICE Uint4 philox4x32_10(Uint4 ctr, uint32_t key0, uint32_t key1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    ctr = philox_round(ctr, key0, key1);
    key0 += kPhiloxW0;
    key1 += kPhiloxW1;
  }
  return ctr;
}

// The keys of the ten rounds for one seed, computed once. The CUDA kernels take them as a launch
// parameter: each round then XORs in an operand read from the constant bank, where bumping the
// key costs every thread two additions per round (about 10% of a normal4 in the none kernel).
struct PhiloxKeys {
  uint32_t key0[10], key1[10];
};

inline PhiloxKeys philox_keys(uint32_t key0, uint32_t key1) {
  PhiloxKeys keys;
  for (int round = 0; round < 10; ++round) {
    keys.key0[round] = key0 + static_cast<uint32_t>(round) * kPhiloxW0;
    keys.key1[round] = key1 + static_cast<uint32_t>(round) * kPhiloxW1;
  }
  return keys;
}

// The same function as philox4x32_10(ctr, key0, key1) with keys = philox_keys(key0, key1).
DRS_HOST_DEVICE Uint4 philox4x32_10(Uint4 ctr, const PhiloxKeys& keys) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    ctr = philox_round(ctr, keys.key0[round], keys.key1[round]);
  }
  return ctr;
}

// Counter layout. The noise of element e of branch p of sample s of image stream t is lane e % 4
// of philox(ctr, key = seed) with
//   ctr.x = e / 4                       element group
//   ctr.y = s mod 2^32                  sample index, low word
//   ctr.z = (s >> 32) | (p << 24)       sample index bits 32..55, branch in the top byte
//   ctr.w = t                           per-image stream id
// Every (seed, stream, branch, sample, element) tuple gets its own counter, so noise does not
// depend on batching, chunking or device, and disjoint sample ranges never share a counter.
constexpr int kSampleBits = 56;
constexpr int kBranchShift = 24;
constexpr int kMaxBranches = 256;

DRS_HOST_DEVICE Uint4 noise_counter(uint32_t group, uint64_t sample, uint32_t branch,
                                    uint32_t stream) {
  return Uint4{group, static_cast<uint32_t>(sample),
               static_cast<uint32_t>(sample >> 32) | (branch << kBranchShift), stream};
}

}  // namespace drs
