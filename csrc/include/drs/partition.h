// Index math of the spatial partitions (docs/design.md §2.1) and of the fills that bring a noisy
// sub-image back to full resolution (§2.3). Shared by the CPU and CUDA kernels.
//
// Partition kDiag: branch p keeps pixels (i, j) with (i + j) mod 2 == p (the two diagonals of each
// 2x2 block); its sub-image packs to (C, H, W/2) with sub[c, i, k] = x[c, i, 2k + ((i + p) mod 2)].
// Partition kNone: one branch, the whole image (plain randomized smoothing).
#pragma once

#include <cmath>
#include <cstdint>

#include "drs/philox.h"

namespace drs {

enum class Partition : int { kNone = 0, kDiag = 1 };
enum class Fill : int { kNeighbors = 0, kPair = 1, kBilinear = 2, kZeros = 3 };

DRS_HOST_DEVICE int num_branches(Partition partition) {
  return partition == Partition::kDiag ? 2 : 1;
}

DRS_HOST_DEVICE int64_t sub_width(Partition partition, int64_t width) {
  return partition == Partition::kDiag ? width / 2 : width;
}

// Column of x that packed column k of row i of branch p comes from.
DRS_HOST_DEVICE int64_t kept_column(int64_t i, int64_t k, int branch) {
  return 2 * k + ((i + branch) & 1);
}

DRS_HOST_DEVICE bool is_kept(int64_t i, int64_t j, int branch) {
  return ((i + j) & 1) == branch;
}

// sum / count for count in 1..4, bit for bit the IEEE division, without a division or a branch:
// q = RN(sum * RN(1 / count)) lies within an ulp of sum / count, and one step with the exact
// residual rounds it correctly (Markstein's correction, as in the device's own division before its
// range check). The residual enters negated, count * q - sum, so that a zero quotient keeps the
// sign of sum. Equal to the IEEE division for every finite float and each count, subnormals and
// signed zeros included (checked for all 2^32 bit patterns of sum at each count). On the device a
// division is a call to its slow path at each use, and a kernel's largest register demand.
DRS_HOST_DEVICE float divide_by_count(float sum, int count) {
  const float recip = count == 4 ? 0.25f : count == 3 ? 1.0f / 3.0f : count == 2 ? 0.5f : 1.0f;
  const float q = sum * recip;
  return std::fma(-std::fma(static_cast<float>(count), q, -sum), recip, q);
}

// Value of full-resolution pixel (i, j) of branch p, given `sub`, the noisy packed plane
// (H, W/2) of one channel, row-major. A kept pixel sits at packed column j / 2. Index is int64_t
// on the CPU; the CUDA kernel, whose planes are checked to fit 32-bit indices, passes int32_t.
template <typename Index>
DRS_HOST_DEVICE float fill_pixel(const float* sub, Index height, Index width, Index i, Index j,
                                 int branch, Fill fill) {
  const Index wp = width / 2;
  const float* row = sub + i * wp;
  switch (fill) {
    case Fill::kPair:
      return row[j >> 1];
    case Fill::kBilinear: {
      // F.interpolate(size=(H, W), mode="bilinear", align_corners=False) of the packed plane:
      // rows map to themselves; column j samples packed position j/2 - 1/4, clamped to [0, wp-1].
      const Index t = j >> 1;
      if (j & 1) {
        const Index right = t + 1 < wp ? t + 1 : wp - 1;
        return 0.75f * row[t] + 0.25f * row[right];
      }
      return t == 0 ? row[0] : 0.25f * row[t - 1] + 0.75f * row[t];
    }
    case Fill::kZeros:
      return is_kept(i, j, branch) ? row[j >> 1] : 0.0f;
    case Fill::kNeighbors:
    default: {
      if (is_kept(i, j, branch)) return row[j >> 1];
      // Every 4-neighbour of a dropped pixel is kept: average those inside the image.
      float sum = 0.0f;
      int count = 0;
      if (i > 0) { sum += row[(j >> 1) - wp]; ++count; }
      if (i + 1 < height) { sum += row[(j >> 1) + wp]; ++count; }
      if (j > 0) { sum += row[(j - 1) >> 1]; ++count; }
      if (j + 1 < width) { sum += row[(j + 1) >> 1]; ++count; }
      return divide_by_count(sum, count);
    }
  }
}

}  // namespace drs
