// y[M, N] = x[M, K] w[K, N] for XLA:CPU with w stored as column panels, through the FFI.
//
// XLA:CPU's dots on the small-M shapes of decoding (M = batch) read the weights at a
// fraction of memory bandwidth. Here w is stored panel-major, [N / 32, K, 32]: one panel
// is a contiguous stream of K rows of 32 columns, so a thread streams it once while the
// outputs of up to 8 rows of x (16 vector registers) stay in registers.

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

// Rows [m0, m0 + R) of x times one panel; R is a compile-time constant so the 2R
// accumulators are registers.
template <int R>
void Block(const float* x, const float* panel, float* y, int64_t m0, int64_t k_dim,
           int64_t n_dim) {
  V16 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = V16{};
  const float* xr = x + m0 * k_dim;
  for (int64_t k = 0; k < k_dim; ++k, panel += kPanel) {
    const V16 w0 = Load(panel), w1 = Load(panel + 16);
    for (int r = 0; r < R; ++r) {
      const float xv = xr[r * k_dim + k];
      acc[r][0] += xv * w0;
      acc[r][1] += xv * w1;
    }
  }
  for (int r = 0; r < R; ++r) {
    Store(y + (m0 + r) * n_dim, acc[r][0]);
    Store(y + (m0 + r) * n_dim + 16, acc[r][1]);
  }
}

using BlockFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t);
constexpr BlockFn kBlocks[kRows + 1] = {nullptr,   Block<1>, Block<2>, Block<3>, Block<4>,
                                        Block<5>, Block<6>, Block<7>, Block<8>};

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
  // One work item per panel: every thread streams whole panels; all row blocks of a
  // panel reuse it from cache.
  meshserve::ParallelFor(pool, panels, [=](int64_t p) {
    const float* panel = wp + p * k_dim * kPanel;
    float* out = yp + p * kPanel;
    for (int64_t m0 = 0; m0 < m_dim; m0 += kRows) {
      kBlocks[std::min<int64_t>(kRows, m_dim - m0)](xp, panel, out, m0, k_dim, n_dim);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshservePackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
