// Exhaustive check of drs::divide_by_count (csrc/include/drs/partition.h), the branch-free
// division of the "neighbors" fill on the device (diag::fill_slot, drs::fill_pixel): for every
// finite float32 x of both signs and each count in 1..4 it must give the bits of the IEEE division
// x / count that the CPU kernel computes. 4 x 2^32 cases, about 2 minutes on 2 cores; the lab
// tests sample the same claim
// (python_tests/lab/test_cuda_tiling_host.py::test_divide_by_count_is_the_ieee_division).
//
//   c++ -O2 -std=c++20 -fopenmp -Icsrc/include benchmarks/lab/divide_by_count_exhaustive.cpp \
//     -o /tmp/divide_by_count && /tmp/divide_by_count
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "drs/partition.h"

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
      const float got = drs::divide_by_count(x, count);
      const float w = want;
      differ += std::memcmp(&got, &w, sizeof got) != 0;
    }
    std::printf("count %d: %lld of the finite floats differ from x / %d\n", count,
                static_cast<long long>(differ), count);
    failures += differ;
  }
  return failures == 0 ? 0 : 1;
}
