// Exhaustive check of drs_ext::diag::divide_by_count (csrc/cuda/noisy_views_diag.cuh), the
// branch-free division of the CUDA "neighbors" fill: for every finite float32 x of both signs and
// each count in 1..4 it must give the bits of the IEEE division x / count that the CPU kernel
// computes. 4 x 2^32 cases, about 2 minutes on 2 cores; the test suite samples the same claim
// (python_tests/test_cuda_tiling_host.py::test_divide_by_count_is_the_ieee_division).
//
//   c++ -O2 -std=c++20 -fopenmp -Icsrc -Icsrc/include -Icsrc/cuda \
//     $(python -c 'from torch.utils.cpp_extension import include_paths as p
//   print(" ".join("-I" + d for d in p()))') \
//     scripts/divide_by_count_exhaustive.cpp -o /tmp/divide_by_count && /tmp/divide_by_count
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "noisy_views_diag.cuh"

int main() {
  int64_t failures = 0;
  for (int count = 1; count <= 4; ++count) {
    int64_t differ = 0;
#pragma omp parallel for reduction(+ : differ) schedule(static, 1 << 20)
    for (int64_t bits = 0; bits <= 0xffffffffll; ++bits) {
      const auto u = static_cast<uint32_t>(bits);
      float x;
      std::memcpy(&x, &u, sizeof x);
      if (!std::isfinite(x)) continue;
      const volatile float want = x / static_cast<float>(count);
      const float got = drs_ext::diag::divide_by_count(x, count);
      const float w = want;
      differ += std::memcmp(&got, &w, sizeof got) != 0;
    }
    std::printf("count %d: %lld of the finite floats differ from x / %d\n", count,
                static_cast<long long>(differ), count);
    failures += differ;
  }
  return failures == 0 ? 0 : 1;
}
