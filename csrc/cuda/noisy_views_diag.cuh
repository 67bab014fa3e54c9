// Tiling of the partition="diag" noisy_views kernel (noisy_views_kernel.cu). A block owns one tile
// of one (n, p, s) plane: packed rows [r0, r1) of the plane's C·H rows (a tile may span channels)
// by packed columns [k0, k1) (whole rows unless W/2 > kMaxTileCols). run_tile is a block's whole
// work on one tile, in two phases separated by barriers:
//   Phase 1 (draw_item): draw the Philox element groups of the tile and of the halo its fill
//   reads, add the kept pixels of x, and keep that noisy sub-image window in shared memory.
//   Phase 2 (store_item): write the tile's full-resolution pixels with drs::fill_pixel on the
//   window, one aligned vector per item where the output allows.
// An item is one thread's unit of work; items of a phase write disjoint locations, so the kernel
// runs them in any order between two barriers. The per-block functions are DRS_HOST_DEVICE with
// no CUDA-only dependency: the kernel runs run_tile with a functor that strides the items of a
// phase over the block's threads and ends with __syncthreads(). CI has no GPU, so
// python_tests/test_cuda_tiling_host.py runs the same run_tile on the host (harness
// python_tests/host/diag_tiling_host.cpp), the items of each phase in a shuffled order, and
// compares the result with the CPU kernel.
#pragma once

// IntegerDivider.cuh uses C10_HOST_DEVICE without including its definition: Macros.h first.
#include <c10/macros/Macros.h>

#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "drs/normal.h"
#include "drs/partition.h"
#include "noisy_views_common.cuh"

namespace drs_ext {
namespace diag {

using Divider = at::cuda::detail::IntDivider<uint32_t>;

constexpr int32_t kTileElems = 4096;   // packed elements a tile aims at (16 KB of floats)
constexpr int32_t kMaxTileCols = 128;  // wider sub-images are split into column tiles

struct Geometry {
  int32_t height, width, sub_width, plane_rows;  // H, W, W/2, C·H
  int32_t tile_rows, tile_cols, col_tiles, tiles;
  // Phase 1 walks (segment, group) items and phase 2 (segment, vector slot) items; a segment is
  // the whole window (whole-row tiles) or one of its rows (column tiles). The per-segment counts
  // are bounds over all tiles, so every divisor is fixed on the host.
  int32_t draw_items_per_segment, store_items_per_segment;
  Divider sub_width_div, height_div, width_div, col_tiles_div;
  Divider draw_items_div, store_items_div;
};

// `vec`: outputs per vector store (16 bytes of the output dtype).
inline Geometry make_geometry(int64_t channels, int64_t height, int64_t width, int vec) {
  Geometry geo;
  geo.height = static_cast<int32_t>(height);
  geo.width = static_cast<int32_t>(width);
  geo.sub_width = static_cast<int32_t>(width / 2);
  geo.plane_rows = static_cast<int32_t>(channels * height);
  geo.col_tiles = (geo.sub_width + kMaxTileCols - 1) / kMaxTileCols;
  geo.tile_cols = (geo.sub_width + geo.col_tiles - 1) / geo.col_tiles;
  geo.tile_rows = std::min(geo.plane_rows, std::max(1, kTileElems / geo.tile_cols));
  geo.tiles = (geo.plane_rows + geo.tile_rows - 1) / geo.tile_rows * geo.col_tiles;
  // Longest segment of a window (phase 1, halo included) and of a tile's output (phase 2); a
  // range of L elements touches at most (L + 3) / 4 + 1 groups and (L + vec - 1) / vec + 1 slots.
  const bool whole_rows = geo.col_tiles == 1;
  const int32_t draw_len = whole_rows ? (geo.tile_rows + 2) * geo.sub_width : geo.tile_cols + 2;
  const int32_t store_len = whole_rows ? geo.tile_rows * geo.width : 2 * geo.tile_cols;
  geo.draw_items_per_segment = (draw_len + 3) / 4 + 1;
  geo.store_items_per_segment = (store_len + vec - 1) / vec + 1;
  geo.sub_width_div = Divider(geo.sub_width);
  geo.height_div = Divider(geo.height);
  geo.width_div = Divider(geo.width);
  geo.col_tiles_div = Divider(geo.col_tiles);
  geo.draw_items_div = Divider(geo.draw_items_per_segment);
  geo.store_items_div = Divider(geo.store_items_per_segment);
  return geo;
}

// Shared memory a window can need: (tile rows + halo) x (tile columns + halo) floats.
inline size_t window_bytes(const Geometry& geo) {
  const int32_t cols = geo.col_tiles == 1 ? geo.sub_width : geo.tile_cols + 2;
  return sizeof(float) * static_cast<size_t>(geo.tile_rows + 2) * cols;
}

// Every fill reads at most one packed row or column away from the pixel it fills.
DRS_HOST_DEVICE constexpr bool needs_row_halo(drs::Fill fill) {
  return fill == drs::Fill::kNeighbors;
}
DRS_HOST_DEVICE constexpr bool needs_col_halo(drs::Fill fill) {
  return fill == drs::Fill::kNeighbors || fill == drs::Fill::kBilinear;
}

// Tile rows [r0, r1) x packed columns [k0, k1); its window rows [lo, hi) x columns [kl, kh),
// stored row-major with row stride kh - kl. A halo row is taken only inside a channel: fill_pixel
// never reads across channels.
struct Tile {
  int32_t r0, r1, k0, k1, lo, hi, kl, kh;
  int32_t segments, seg_len;          // phase 1
  int32_t out_segments, out_len;      // phase 2
};

template <drs::Fill kFill>
DRS_HOST_DEVICE Tile make_tile(const Geometry& geo, int32_t tile) {
  Tile t;
  const auto rc = geo.col_tiles_div.divmod(static_cast<uint32_t>(tile));
  t.r0 = static_cast<int32_t>(rc.div) * geo.tile_rows;
  t.r1 = std::min(t.r0 + geo.tile_rows, geo.plane_rows);
  t.k0 = static_cast<int32_t>(rc.mod) * geo.tile_cols;
  t.k1 = std::min(t.k0 + geo.tile_cols, geo.sub_width);
  const bool row_halo = needs_row_halo(kFill), col_halo = needs_col_halo(kFill);
  t.lo = row_halo && geo.height_div.mod(t.r0) != 0 ? t.r0 - 1 : t.r0;
  t.hi = row_halo && geo.height_div.mod(t.r1) != 0 ? t.r1 + 1 : t.r1;
  t.kl = col_halo && t.k0 > 0 ? t.k0 - 1 : t.k0;
  t.kh = col_halo && t.k1 < geo.sub_width ? t.k1 + 1 : t.k1;
  // Whole-row windows are one contiguous range of packed elements and their tile's output one
  // contiguous range of pixels; column windows have one segment per row.
  const bool whole_rows = geo.col_tiles == 1;
  t.segments = whole_rows ? 1 : t.hi - t.lo;
  t.seg_len = whole_rows ? (t.hi - t.lo) * geo.sub_width : t.kh - t.kl;
  t.out_segments = whole_rows ? 1 : t.r1 - t.r0;
  t.out_len = whole_rows ? (t.r1 - t.r0) * geo.width : 2 * (t.k1 - t.k0);
  return t;
}

DRS_HOST_DEVICE int32_t draw_items(const Geometry& geo, const Tile& t) {
  return t.segments * geo.draw_items_per_segment;
}

DRS_HOST_DEVICE int32_t store_items(const Geometry& geo, const Tile& t) {
  return t.out_segments * geo.store_items_per_segment;
}

// Phase 1, one item: an element group of one segment. Sets
// window[(r - lo) * (kh - kl) + (k - kl)] = x[c, i, kept(i, k)] + sigma * eps[e] for the elements
// e = r * W/2 + k of the group inside the segment (a group cut by a segment edge is drawn by both
// sides, each keeping its part).
DRS_HOST_DEVICE void draw_item(const Geometry& geo, const Tile& t, int32_t item, const Draw& d,
                               const float* image, float* window) {
  const auto seg_g = geo.draw_items_div.divmod(static_cast<uint32_t>(item));
  const int32_t seg = static_cast<int32_t>(seg_g.div);
  const int32_t e0 = (t.lo + seg) * geo.sub_width + t.kl;  // first element of the segment
  const int32_t e = 4 * ((e0 >> 2) + static_cast<int32_t>(seg_g.mod));
  if (e >= e0 + t.seg_len) return;
  float z[4];
  drs::normal4(d.key0, d.key1, static_cast<uint32_t>(e >> 2), d.sample, d.branch, d.stream, z);
  const auto rk = geo.sub_width_div.divmod(static_cast<uint32_t>(e));
  int32_t r = static_cast<int32_t>(rk.div), k = static_cast<int32_t>(rk.mod);
  int32_t i = static_cast<int32_t>(geo.height_div.mod(static_cast<uint32_t>(r)));
  for (int l = 0; l < 4; ++l) {
    if (e + l >= e0 && e + l < e0 + t.seg_len) {
      const int32_t col = static_cast<int32_t>(drs::kept_column(i, k, static_cast<int>(d.branch)));
      window[seg * t.seg_len + (e + l - e0)] = image[r * geo.width + col] + d.sigma * z[l];
    }
    if (++k == geo.sub_width) {
      k = 0;
      ++r;
      i = i + 1 == geo.height ? 0 : i + 1;
    }
  }
}

// Offset, in outputs, of plane `plane` (of plane_size outputs) from the previous kVec-aligned
// output: 0 when the plane starts a vector slot of an output whose first element is aligned.
template <int kVec>
DRS_HOST_DEVICE int32_t plane_phase(int64_t plane, int32_t plane_size) {
  return static_cast<int32_t>((plane * plane_size) % kVec);
}

// Phase 2, one item: a vector slot of kVec outputs of one output segment (rows [r0, r1) x columns
// [2 k0, 2 k1)). Slots are aligned to the whole output: output o of the plane starts a slot when
// (phase + o) % kVec == 0, phase = plane_phase(plane index, C·H·W). A slot cut by the tile edge is
// written element by element.
template <drs::Fill kFill, typename out_t, int kVec>
DRS_HOST_DEVICE void store_item(const Geometry& geo, const Tile& t, int32_t item, int32_t phase,
                                int branch, const float* window, out_t* dst) {
  const auto seg_v = geo.store_items_div.divmod(static_cast<uint32_t>(item));
  const int32_t o0 = (t.r0 + static_cast<int32_t>(seg_v.div)) * geo.width + 2 * t.k0;
  const int32_t end = o0 + t.out_len;
  const int32_t base = o0 - (phase + o0) % kVec + kVec * static_cast<int32_t>(seg_v.mod);
  if (base >= end) return;
  const int32_t first = std::max(base, o0);
  const auto rj = geo.width_div.divmod(static_cast<uint32_t>(first));
  const auto ci = geo.height_div.divmod(rj.div);
  int32_t j = static_cast<int32_t>(rj.mod);
  int32_t ch = static_cast<int32_t>(ci.div), i = static_cast<int32_t>(ci.mod);
  const int32_t win_cols = t.kh - t.kl;
  Vec<out_t, kVec> v;
  for (int l = 0; l < kVec; ++l) {
    if (base + l < first || base + l >= end) continue;
    // fill_pixel on the window rows of channel ch, re-indexed from the first of them (row i_base
    // of the channel) and from window column kl: shifting the rows by i_base flips the
    // checkerboard parity when i_base is odd; shifting the columns by kl (2 kl pixels) does not.
    const int32_t i_base = std::max(t.lo - ch * geo.height, 0);
    const float* sub = window + (ch * geo.height + i_base - t.lo) * win_cols;
    v.v[l] = static_cast<out_t>(drs::fill_pixel(sub, geo.height - i_base, 2 * win_cols,
                                                i - i_base, j - 2 * t.kl, branch ^ (i_base & 1),
                                                kFill));
    if (++j == geo.width) {
      j = 0;
      if (++i == geo.height) {
        i = 0;
        ++ch;
      }
    }
  }
  if (base >= o0 && base + kVec <= end) {
    store_vec(dst + base, v);
  } else {
    for (int l = 0; l < kVec; ++l) {
      if (base + l >= first && base + l < end) dst[base + l] = v.v[l];
    }
  }
}

// A block's work on tile `tile` of one plane: x of the plane's image at `image`, the plane's
// output at `dst` with phase = plane_phase(plane index, C·H·W), `window` of window_bytes(geo).
// run_items(count, fn) must call fn(item) once for every item in [0, count), in any order, and
// then be a barrier: fn's writes are visible to the items of the next call, and the window is
// free again when run_tile returns.
template <drs::Fill kFill, typename out_t, int kVec, class RunItems>
DRS_HOST_DEVICE void run_tile(const Geometry& geo, int32_t tile, const Draw& d, const float* image,
                              int32_t phase, int branch, float* window, out_t* dst,
                              RunItems&& run_items) {
  const Tile t = make_tile<kFill>(geo, tile);
  run_items(draw_items(geo, t), [&](int32_t item) { draw_item(geo, t, item, d, image, window); });
  run_items(store_items(geo, t), [&](int32_t item) {
    store_item<kFill, out_t, kVec>(geo, t, item, phase, branch, window, dst);
  });
}

}  // namespace diag
}  // namespace drs_ext
