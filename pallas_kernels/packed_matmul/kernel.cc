// y[M, N] = x[M, K] w[K, N] for XLA:CPU with w stored as column panels, through the FFI.
//
// XLA:CPU's dots on the small-M shapes of decoding (M = batch) read the weights at a
// fraction of memory bandwidth. Here w is stored panel-major, [N / 32, K, 32]: one panel
// is a contiguous stream of K rows of 32 columns, so a thread streams it once while the
// outputs of up to 8 rows of x (16 vector registers) stay in registers; with 4 rows or
// fewer a thread streams 2-4 panels side by side.

#include <algorithm>
#include <cstdint>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;  // columns per panel: two 16-float vectors
constexpr int kRows = 8;        // rows of x per register block

using meshserve::Load;
using meshserve::Store;
using meshserve::V16;

// Rows [m0, m0 + R) of x times PN adjacent panels; R and PN are compile-time constants
// so that the 2 * R * PN accumulators are registers. Few rows leave the loads waiting on
// memory, so those blocks read several panels at once: more streams in flight.
template <int R, int PN = 1>
void Block(const float* x, const float* panel, float* y, int64_t m0, int64_t k_dim,
           int64_t n_dim) {
  V16 acc[R][PN][2];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < PN; ++p) acc[r][p][0] = acc[r][p][1] = V16{};
  const int64_t stride = k_dim * kPanel;
  const float* xr = x + m0 * k_dim;
  for (int64_t k = 0; k < k_dim; ++k, panel += kPanel) {
    V16 w[PN][2];
    for (int p = 0; p < PN; ++p) {
      w[p][0] = Load(panel + p * stride);
      w[p][1] = Load(panel + p * stride + 16);
    }
    for (int r = 0; r < R; ++r) {
      const float xv = xr[r * k_dim + k];
      for (int p = 0; p < PN; ++p) {
        acc[r][p][0] += xv * w[p][0];
        acc[r][p][1] += xv * w[p][1];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < PN; ++p) {
      Store(y + (m0 + r) * n_dim + p * kPanel, acc[r][p][0]);
      Store(y + (m0 + r) * n_dim + p * kPanel + 16, acc[r][p][1]);
    }
  }
}

using BlockFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t);
constexpr BlockFn kBlocks[kRows + 1] = {nullptr,   Block<1>, Block<2>, Block<3>, Block<4>,
                                        Block<5>, Block<6>, Block<7>, Block<8>};
// Panels per work item for M <= 4 rows, and the blocks that read that many at once.
constexpr int kGroupFor[5] = {1, 4, 4, 2, 2};
constexpr BlockFn kGroupBlocks[5] = {nullptr, Block<1, 4>, Block<2, 4>, Block<3, 2>,
                                     Block<4, 2>};

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[1] != xd[1]) {
    return ffi::Error::InvalidArgument(
        "packed matmul: want x [M, K] and w [N / 32, K, 32] with the same K");
  }
  const int64_t m_dim = xd[0], k_dim = xd[1], panels = wd[0], n_dim = panels * kPanel;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  // One work item per group of panels: every thread streams whole panels; all row blocks
  // of a panel reuse it from cache.
  const int64_t group = m_dim < 5 ? kGroupFor[m_dim] : 1;
  meshserve::ParallelFor(pool, (panels + group - 1) / group, [=](int64_t i) {
    const int64_t first = i * group, last = std::min(panels, first + group);
    if (last - first == group && group > 1) {
      kGroupBlocks[m_dim](xp, wp + first * k_dim * kPanel, yp + first * kPanel, 0, k_dim,
                          n_dim);
      return;
    }
    for (int64_t p = first; p < last; ++p) {
      for (int64_t m0 = 0; m0 < m_dim; m0 += kRows) {
        kBlocks[std::min<int64_t>(kRows, m_dim - m0)](xp, wp + p * k_dim * kPanel,
                                                      yp + p * kPanel, m0, k_dim, n_dim);
      }
    }
  });
  return ffi::Error::Success();
}

// Mixture of experts: y[tile rows] = x[tile rows] w[tile_expert[j]] for the first
// num_tiles[0] tiles of `rows` rows each, only rows_used[j] of them real. w is
// [E, N / 32, K, 32]: each expert's packed weight, so a tile streams only its expert's
// panels and a decode step reads only the selected experts. Unused tiles and rows are
// neither read nor written (the caller ignores them).
ffi::Error GroupedPackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> tile_expert,
                               ffi::Buffer<ffi::S32> rows_used, ffi::Buffer<ffi::S32> num_tiles,
                               ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  const int64_t max_tiles = tile_expert.element_count();
  if (xd.size() != 2 || wd.size() != 4 || wd[3] != kPanel || wd[2] != xd[1] ||
      max_tiles == 0 || xd[0] % max_tiles || rows_used.element_count() != max_tiles) {
    return ffi::Error::InvalidArgument(
        "grouped packed matmul: want x [tiles * rows, K], w [E, N / 32, K, 32], "
        "tile_expert and rows_used [tiles]");
  }
  const int64_t rows = xd[0] / max_tiles, k_dim = xd[1], experts = wd[0];
  const int64_t panels = wd[1], n_dim = panels * kPanel, chunk = 4;
  const int64_t chunks = (panels + chunk - 1) / chunk;
  const int64_t used = std::clamp<int64_t>(num_tiles.typed_data()[0], 0, max_tiles);
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const int32_t* te = tile_expert.typed_data();
  const int32_t* ru = rows_used.typed_data();
  float* yp = y->typed_data();
  meshserve::ParallelFor(pool, used * chunks, [=](int64_t i) {
    const int64_t j = i / chunks, first = (i % chunks) * chunk;
    const int64_t last = std::min(panels, first + chunk);
    const int64_t e = std::clamp<int64_t>(te[j], 0, experts - 1);
    const int64_t m = std::clamp<int64_t>(ru[j], 0, rows);
    const float* xt = xp + j * rows * k_dim;
    const float* we = wp + e * panels * k_dim * kPanel;
    float* yt = yp + j * rows * n_dim;
    int64_t p = first;
    if (m > 0 && m < 5) {  // few rows: several panels streamed side by side
      const int64_t g = kGroupFor[m];
      for (; g > 1 && p + g <= last; p += g)
        kGroupBlocks[m](xt, we + p * k_dim * kPanel, yt + p * kPanel, 0, k_dim, n_dim);
    }
    for (; p < last; ++p) {
      for (int64_t m0 = 0; m0 < m; m0 += kRows) {
        kBlocks[std::min<int64_t>(kRows, m - m0)](xt, we + p * k_dim * kPanel,
                                                  yt + p * kPanel, m0, k_dim, n_dim);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshserveGroupedPackedMatmul, GroupedPackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshservePackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
