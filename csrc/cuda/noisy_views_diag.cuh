// Tiling of the partition="diag" noisy_views kernel (noisy_views_kernel.cu). A block owns one tile
// of the planes of one chunk (up to kMaxChunkSamples consecutive samples of one (image, branch)
// row, drs_ext::Chunks): packed rows [r0, r1) of a plane's C·H rows (a tile may span channels)
// by packed columns [k0, k1) (whole rows unless W/2 > kMaxTileCols). run_tile is a block's whole
// work on one tile, in two phases separated by barriers:
//   Phase 1 (draw_item): draw the Philox element groups of the tile and of the halo its fill
//   reads, add the kept pixels of x, and keep that noisy sub-image window in shared memory, one
//   window per sample of the chunk.
//   Phase 2 (store_item): write the tile's full-resolution pixels, the fill applied to the window
//   (fill_slot, or drs::fill_pixel at the items that straddle rows or the tile's edge), 16
//   bytes per store where the output allows.
// An item is one thread's unit of work, done for every sample of the chunk, so its index math is
// shared by the samples; items of a phase write disjoint locations, so the kernel
// runs them in any order between two barriers. The per-block functions are DRS_HOST_DEVICE with
// no CUDA-only dependency: the kernel (noisy_views_kernel.cu) runs run_tile with a functor that
// strides the items of a phase over the block's threads and ends with __syncthreads().
#pragma once

// IntegerDivider.cuh uses C10_HOST_DEVICE without including its definition: Macros.h first.
#include <c10/macros/Macros.h>

#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <algorithm>
#include <cmath>
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
constexpr int32_t kMaxChunkSamples = 8;
// The windows of a chunk's samples share the dynamic shared memory a launch gets without opting
// in (48 KiB); four such blocks fit in an H100's multiprocessor, three in an A100's.
constexpr size_t kMaxWindowsBytes = 48 * 1024;

// Outputs per phase-2 item, aligned to the whole output: two 16-byte vector stores of float32
// outputs, one of 16-bit outputs. Eight rather than one store's worth of float32, because an
// item's index math costs as much as filling four outputs.
constexpr int kItemOutputs = 8;

struct Geometry {
  int32_t height, width, sub_width, plane_rows;  // H, W, W/2, C·H
  int32_t tile_rows, tile_cols, col_tiles, tiles;
  int32_t window_floats;  // a sample's window: (tile rows + halo) x (tile columns + halo)
  // Phase 1 walks (segment, group) items and phase 2 (segment, output item) items; a segment is
  // the whole window (whole-row tiles) or one of its rows (column tiles). The per-segment counts
  // are bounds over all tiles, so every divisor is fixed on the host.
  int32_t draw_items_per_segment, store_items_per_segment;
  Divider sub_width_div, height_div, width_div, col_tiles_div;
  Divider draw_items_div, store_items_div;
};

inline Geometry make_geometry(int64_t channels, int64_t height, int64_t width) {
  Geometry geo;
  geo.height = static_cast<int32_t>(height);
  geo.width = static_cast<int32_t>(width);
  geo.sub_width = static_cast<int32_t>(width / 2);
  geo.plane_rows = static_cast<int32_t>(channels * height);
  geo.col_tiles = (geo.sub_width + kMaxTileCols - 1) / kMaxTileCols;
  geo.tile_cols = (geo.sub_width + geo.col_tiles - 1) / geo.col_tiles;
  geo.tile_rows = std::min(geo.plane_rows, std::max(1, kTileElems / geo.tile_cols));
  geo.tiles = (geo.plane_rows + geo.tile_rows - 1) / geo.tile_rows * geo.col_tiles;
  // Halo rows are taken only inside a channel (make_tile), so tiles of whole channels have none:
  // a CIFAR plane (96 rows of 16) is one tile whose window is 6 KB, and eight samples' windows
  // fit the 48 KiB of kMaxWindowsBytes instead of seven.
  const int32_t halo_rows = geo.tile_rows % geo.height == 0 ? 0 : 2;
  // Longest segment of a window (phase 1, halo included) and of a tile's output (phase 2); a
  // range of L elements touches at most (L + 3) / 4 + 1 groups and (L + 7) / 8 + 1 output items.
  const bool whole_rows = geo.col_tiles == 1;
  const int32_t window_rows = geo.tile_rows + halo_rows;
  const int32_t draw_len = whole_rows ? window_rows * geo.sub_width : geo.tile_cols + 2;
  const int32_t store_len = whole_rows ? geo.tile_rows * geo.width : 2 * geo.tile_cols;
  geo.window_floats = window_rows * (whole_rows ? geo.sub_width : geo.tile_cols + 2);
  geo.draw_items_per_segment = (draw_len + 3) / 4 + 1;
  geo.store_items_per_segment = (store_len + kItemOutputs - 1) / kItemOutputs + 1;
  geo.sub_width_div = Divider(geo.sub_width);
  geo.height_div = Divider(geo.height);
  geo.width_div = Divider(geo.width);
  geo.col_tiles_div = Divider(geo.col_tiles);
  geo.draw_items_div = Divider(geo.draw_items_per_segment);
  geo.store_items_div = Divider(geo.store_items_per_segment);
  return geo;
}

// Shared memory a sample's window can need.
inline size_t window_bytes(const Geometry& geo) {
  return sizeof(float) * static_cast<size_t>(geo.window_floats);
}

// Samples per chunk the launch may take: as many windows as fit in kMaxWindowsBytes, up to
// kMaxChunkSamples; 1 where C·H·W is not a multiple of kItemOutputs, as the planes of a chunk
// must share their phase (plane_phase) to share phase 2's items.
inline int32_t max_chunk_samples(const Geometry& geo, int64_t plane_size) {
  if (plane_size % kItemOutputs != 0) return 1;
  const auto fit = static_cast<int32_t>(kMaxWindowsBytes / window_bytes(geo));
  return std::max(1, std::min(fit, kMaxChunkSamples));
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

// The items of a phase: per segment the bound of make_geometry (items past a segment's end
// return at once), or for a whole-row tile (one segment) exactly the groups and output items it
// touches, so that no warp runs for a single leftover item.
DRS_HOST_DEVICE int32_t draw_items(const Geometry& geo, const Tile& t) {
  if (t.segments > 1) return t.segments * geo.draw_items_per_segment;
  const int32_t e0 = t.lo * geo.sub_width + t.kl;
  return ((e0 + t.seg_len - 1) >> 2) - (e0 >> 2) + 1;
}

DRS_HOST_DEVICE int32_t store_items(const Geometry& geo, const Tile& t, int32_t phase) {
  if (t.out_segments > 1) return t.out_segments * geo.store_items_per_segment;
  const int32_t o0 = t.r0 * geo.width + 2 * t.k0;
  return ((phase + o0) % kItemOutputs + t.out_len + kItemOutputs - 1) / kItemOutputs;
}

// The planes of one chunk as a block sees them: sample k (k < samples) has the noise of `draw`
// at sample draw.sample + k, its output plane at dst + k * plane_size and its window at
// window + k * geo.window_floats. All share the image and the phase (max_chunk_samples).
template <typename out_t>
struct ChunkPlanes {
  Draw draw;
  int32_t samples;
  const float* image;
  out_t* dst;
  int32_t plane_size;
  int32_t phase;  // plane_phase of every plane of the chunk
};

// The draws of element group `group` for each sample s of a chunk: w[l] = kept[l] + sigma *
// eps_s[4 group + l] for the elements l inside the segment (all four when kWhole), at w in the
// window of sample 0 and `stride` floats further for each next sample.
template <bool kWhole>
DRS_HOST_DEVICE void draw_samples(const Draw& d, uint32_t group, int32_t samples, int32_t stride,
                                  const float (&kept)[4], const bool (&inside)[4], float* w) {
  DRS_NO_UNROLL
  for (int32_t s = 0; s < samples; ++s, w += stride) {
    float z[4];
    drs::normal4(*d.keys, group, d.sample + s, d.branch, d.stream, z);
    for (int l = 0; l < 4; ++l) {
      if (kWhole || inside[l]) w[l] = kept[l] + d.sigma * z[l];
    }
  }
}

// Phase 1, one item: an element group of one segment, for each sample s of the chunk. Sets
// window_s[(r - lo) * (kh - kl) + (k - kl)] = x[c, i, kept(i, k)] + sigma * eps_s[e] for the
// elements e = r * W/2 + k of the group inside the segment (a group cut by a segment edge is
// drawn by both sides, each keeping its part). The group's pixels of x are read once, for all
// samples.
DRS_HOST_DEVICE void draw_item(const Geometry& geo, const Tile& t, int32_t item, const Draw& d,
                               int32_t samples, const float* image, float* window) {
  const auto seg_g = geo.draw_items_div.divmod(static_cast<uint32_t>(item));
  const int32_t seg = static_cast<int32_t>(seg_g.div);
  const int32_t e0 = (t.lo + seg) * geo.sub_width + t.kl;  // first element of the segment
  const int32_t e = 4 * ((e0 >> 2) + static_cast<int32_t>(seg_g.mod));
  if (e >= e0 + t.seg_len) return;
  const auto group = static_cast<uint32_t>(e >> 2);
  const auto rk = geo.sub_width_div.divmod(static_cast<uint32_t>(e));
  int32_t r = static_cast<int32_t>(rk.div), k = static_cast<int32_t>(rk.mod);
  int32_t i = static_cast<int32_t>(geo.height_div.mod(static_cast<uint32_t>(r)));
  float* w = window + seg * t.seg_len + (e - e0);  // the window element of e, sample 0
  float kept[4];
  bool inside[4] = {true, true, true, true};
  if (e >= e0 && e + 4 <= e0 + t.seg_len && k + 4 <= geo.sub_width) {
    // The whole group inside the segment and one row: its kept pixels are every other column.
    const float* row = image + r * geo.width + drs::kept_column(i, k, static_cast<int>(d.branch));
    for (int l = 0; l < 4; ++l) kept[l] = row[2 * l];
    draw_samples<true>(d, group, samples, geo.window_floats, kept, inside, w);
    return;
  }
  for (int l = 0; l < 4; ++l) {
    inside[l] = e + l >= e0 && e + l < e0 + t.seg_len;
    const int32_t col = static_cast<int32_t>(drs::kept_column(i, k, static_cast<int>(d.branch)));
    kept[l] = inside[l] ? image[r * geo.width + col] : 0.0f;
    if (++k == geo.sub_width) {
      k = 0;
      ++r;
      i = i + 1 == geo.height ? 0 : i + 1;
    }
  }
  draw_samples<false>(d, group, samples, geo.window_floats, kept, inside, w);
}

// Offset, in outputs, of plane `plane` (of plane_size outputs) from the previous item boundary:
// 0 when the plane starts an item.
DRS_HOST_DEVICE int32_t plane_phase(int64_t plane, int32_t plane_size) {
  return static_cast<int32_t>((plane * plane_size) % kItemOutputs);
}

// The planes of chunk `chunk` of a launch writing `out`: what a block takes for the chunk.
template <typename out_t>
DRS_HOST_DEVICE ChunkPlanes<out_t> chunk_planes(const Common& c, const Chunks& chunks,
                                                int64_t chunk, out_t* out) {
  const ChunkSpan span = chunk_span(c, chunks, chunk);
  const Plane q = locate(c, span.row, span.first);
  const int64_t plane = span.row * c.num + span.first;
  return ChunkPlanes<out_t>{q.draw,
                            span.count,
                            c.x + q.image * c.plane_size,
                            out + plane * c.plane_size,
                            c.plane_size,
                            plane_phase(plane, c.plane_size)};
}

// kN outputs j0 .. j0 + kN - 1 of one row, j0 even, j0 + kN <= 2 wp: fill_pixel(sub, height, 2 wp,
// i, j, branch, kFill) for each j, pair by pair (columns 2t and 2t + 1 share packed column t),
// with the row's index math and neighbour tests shared by the pairs, 32-bit indices, and no branch
// on the row's parity: the threads of a warp fill items of rows of both parities, so each output
// is a select between the kept value and the filled one. "neighbors" sums as the CPU kernel's
// fill_neighbors_row does (above + below, then left, then right) and divides as exactly
// (drs::divide_by_count), so it fills a window exactly as the CPU kernel fills the same values.
template <drs::Fill kFill, int kN>
DRS_HOST_DEVICE void fill_slot(const float* sub, int32_t height, int32_t wp, int32_t i, int32_t j0,
                               int branch, float out[kN]) {
  static_assert(kN % 2 == 0, "whole pairs");
  constexpr int kPairs = kN / 2;
  const float* row = sub + i * wp;
  const int32_t t0 = j0 >> 1, last = wp - 1;
  // Packed columns t0 - 1 .. t0 + kPairs: the pairs' own and one on each side, clamped into the
  // row (read or not).
  const bool has_prev = t0 > 0, has_next = t0 + kPairs - 1 < last;
  float r[kPairs + 2];
  r[0] = row[has_prev ? t0 - 1 : t0];
  for (int q = 0; q < kPairs; ++q) r[q + 1] = row[t0 + q];
  r[kPairs + 1] = row[has_next ? t0 + kPairs : t0 + kPairs - 1];
  // Kept columns are the odd ones (the pair's dropped pixel is its left one) or the even ones.
  const bool odd_kept = ((i + branch) & 1) != 0;
  const bool has_up = i > 0, has_down = i + 1 < height;
  for (int p = 0; p < kPairs; ++p) {
    const float prev = r[p], self = r[p + 1], next = r[p + 2];
    float even = self, odd = self;  // kFill::kPair
    if constexpr (kFill == drs::Fill::kZeros) {
      even = odd_kept ? 0.0f : self;
      odd = odd_kept ? self : 0.0f;
    } else if constexpr (kFill == drs::Fill::kBilinear) {
      // Even columns lean on the previous packed column (none at t = 0), odd ones on the next
      // (the last one itself at the row's end).
      const float blend = 0.25f * prev + 0.75f * self;
      even = p > 0 || has_prev ? blend : self;
      odd = 0.75f * self + 0.25f * (p < kPairs - 1 || has_next ? next : self);
    } else if constexpr (kFill == drs::Fill::kNeighbors) {
      // The rows above and below, or this row where there is none (read, not used).
      const float above = row[(has_up ? t0 - wp : t0) + p];
      const float below = row[(has_down ? t0 + wp : t0) + p];
      const float both = above + below;
      const float vertical = has_up ? (has_down ? both : above) : (has_down ? below : 0.0f);
      // The dropped pixel's kept neighbour in the row other than this pair's: packed column
      // t - 1 on its left (an even dropped pixel) or t + 1 on its right (an odd one).
      const bool has_other = odd_kept ? p > 0 || has_prev : p < kPairs - 1 || has_next;
      const float left = odd_kept ? prev : self, right = odd_kept ? self : next;
      const bool has_left = !odd_kept || has_other, has_right = odd_kept || has_other;
      float sum = has_left ? vertical + left : vertical;
      sum = has_right ? sum + right : sum;
      const float filled = drs::divide_by_count(sum, has_up + has_down + 1 + has_other);
      even = odd_kept ? filled : self;
      odd = odd_kept ? self : filled;
    }
    out[2 * p] = even;
    out[2 * p + 1] = odd;
  }
}

// Outputs [begin, end) of `v`, whose output 0 is dst[0]: kN outputs, 16 bytes per store, one
// vector store per whole 16 bytes, element by element at the ends.
template <typename out_t, int kN>
DRS_HOST_DEVICE void store_outputs(const out_t (&v)[kN], int32_t begin, int32_t end, out_t* dst) {
  constexpr int kStore = 16 / static_cast<int>(sizeof(out_t));
  static_assert(kN % kStore == 0, "whole stores");
  for (int s = 0; s < kN; s += kStore) {
    if (s >= begin && s + kStore <= end) {
      Vec<out_t, kStore> vec;
      for (int l = 0; l < kStore; ++l) vec.v[l] = v[s + l];
      store_vec(dst + s, vec);
    } else {
      for (int l = s; l < s + kStore; ++l) {
        if (l >= begin && l < end) dst[l] = v[l];
      }
    }
  }
}

// Phase 2, one item: kItemOutputs outputs of one output segment (rows [r0, r1) x columns
// [2 k0, 2 k1)) in each plane of the chunk. Items are aligned to the whole output: output o of a
// plane starts an item when (phase + o) % kItemOutputs == 0, phase = plane_phase(plane index,
// C·H·W). An item inside one row of the tile is filled by fill_slot; one cut by the tile's edge or
// spanning rows pixel by pixel.
template <drs::Fill kFill, typename out_t>
DRS_HOST_DEVICE void store_item(const Geometry& geo, const Tile& t, int32_t item,
                                const ChunkPlanes<out_t>& planes, const float* window) {
  constexpr int kN = kItemOutputs;
  const int32_t phase = planes.phase;
  const int branch = static_cast<int>(planes.draw.branch);
  const auto seg_v = geo.store_items_div.divmod(static_cast<uint32_t>(item));
  const int32_t o0 = (t.r0 + static_cast<int32_t>(seg_v.div)) * geo.width + 2 * t.k0;
  const int32_t end = o0 + t.out_len;
  // Offset of the item from o0, checked before base is formed: base may not fit in an int32
  // past the plane's end.
  const int32_t rel = kN * static_cast<int32_t>(seg_v.mod) - (phase + o0) % kN;
  if (rel >= t.out_len) return;
  const int32_t base = o0 + rel;
  const int32_t first = std::max(base, o0);
  const auto rj = geo.width_div.divmod(static_cast<uint32_t>(first));
  const auto ci = geo.height_div.divmod(rj.div);
  int32_t j = static_cast<int32_t>(rj.mod);
  int32_t ch = static_cast<int32_t>(ci.div), i = static_cast<int32_t>(ci.mod);
  const int32_t win_cols = t.kh - t.kl;
  // Pixel (ch, i, j) in the arguments of the fills: the window rows of channel ch, re-indexed
  // from the first of them (row i_base of the channel) and from window column kl. Shifting the
  // rows by i_base flips the checkerboard parity when i_base is odd; shifting the columns by kl
  // (2 kl pixels) does not.
  struct InWindow {
    const float* sub;
    int32_t height, i, j;
    int branch;
  };
  const auto in_window = [&](int32_t c, int32_t row, int32_t col) {
    const int32_t i_base = std::max(t.lo - c * geo.height, 0);
    return InWindow{window + (c * geo.height + i_base - t.lo) * win_cols, geo.height - i_base,
                    row - i_base, col - 2 * t.kl, branch ^ (i_base & 1)};
  };
  out_t v[kN];
  out_t* dst = planes.dst + base;
  if (base >= o0 && base + kN <= end && j + kN <= geo.width) {
    // A whole item inside one row (j is even: W and every item start are).
    const InWindow w = in_window(ch, i, j);
    const float* sub = w.sub;
    DRS_NO_UNROLL
    for (int32_t s = 0; s < planes.samples; ++s) {
      float f[kN];
      fill_slot<kFill, kN>(sub, w.height, win_cols, w.i, w.j, w.branch, f);
      for (int l = 0; l < kN; ++l) v[l] = static_cast<out_t>(f[l]);
      store_outputs(v, 0, kN, dst);
      sub += geo.window_floats;
      dst += planes.plane_size;
    }
    return;
  }
  // An item spanning rows or cut by the tile's edge: pixel by pixel.
  DRS_NO_UNROLL
  for (int32_t s = 0; s < planes.samples; ++s) {
    int32_t pj = j, pi = i, pch = ch;
    for (int l = 0; l < kN; ++l) {
      if (base + l < first || base + l >= end) continue;
      const InWindow w = in_window(pch, pi, pj);
      v[l] = static_cast<out_t>(drs::fill_pixel<int32_t>(w.sub + s * geo.window_floats,
                                                         w.height, 2 * win_cols, w.i, w.j,
                                                         w.branch, kFill));
      if (++pj == geo.width) {
        pj = 0;
        if (++pi == geo.height) {
          pi = 0;
          ++pch;
        }
      }
    }
    store_outputs(v, first - base, std::min(end - base, kN), dst);
    dst += planes.plane_size;
  }
}

// A block's work on tile `tile` of the planes of one chunk, `window` of planes.samples times
// window_bytes(geo). run_items(count, fn) must call fn(item) once for every item in [0, count),
// in any order, and then be a barrier: fn's writes are visible to the items of the next call, and
// the window is free again when run_tile returns.
template <drs::Fill kFill, typename out_t, class RunItems>
DRS_HOST_DEVICE void run_tile(const Geometry& geo, int32_t tile, ChunkPlanes<out_t> planes,
                              float* window, RunItems&& run_items) {
  const Tile t = make_tile<kFill>(geo, tile);
  run_items(draw_items(geo, t), [&](int32_t item) {
    draw_item(geo, t, item, planes.draw, planes.samples, planes.image, window);
  });
  run_items(store_items(geo, t, planes.phase), [&](int32_t item) {
    store_item<kFill, out_t>(geo, t, item, planes, window);
  });
}

}  // namespace diag
}  // namespace drs_ext
