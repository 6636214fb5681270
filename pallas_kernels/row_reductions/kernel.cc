// First index of the maximum and log-sum-exp of each row of logits, for XLA:CPU.
//
// A greedy batch needs both from the same [rows, vocab] logits: XLA:CPU runs them as
// four passes over the vocabulary (max, sum of exp, max again, index of the max); this is
// one pass for the maximum and one for the rest, a row per work item. Same results as the
// reference in ops.py, non-finite logits included; sums in another order, so log-sum-exp
// may differ from XLA's in the last bits.
//
// Layouts: logits [R, V] f32; index [R] s32; log_norm [R] f32.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Non-finite values are recognised and produced through their bits: one integer test
// per element picks the rows that need the reference's special rules.
inline uint32_t Bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
inline float FromBits(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
constexpr uint32_t kExponent = 0x7f800000u, kPlusInf = 0x7f800000u, kMinusInf = 0xff800000u;
inline bool Finite(uint32_t b) { return (b & kExponent) != kExponent; }

// The row has inf or NaN: the reference's rules, element by element.
void NonFiniteRow(const float* x, int64_t v, int32_t* index, float* log_norm) {
  int64_t first_plus_inf = -1, best = -1;
  bool nan = false;
  for (int64_t i = 0; i < v; ++i) {
    const uint32_t b = Bits(x[i]);
    if (Finite(b)) {
      if (best < 0 || x[i] > x[best]) best = i;
    } else if (b == kPlusInf) {
      if (first_plus_inf < 0) first_plus_inf = i;
    } else if (b != kMinusInf) {
      nan = true;
    }
  }
  if (nan) {  // no maximum: the last id keeps the token inside the vocabulary
    *index = static_cast<int32_t>(v - 1);
    *log_norm = FromBits(0x7fc00000u);
  } else if (first_plus_inf >= 0) {
    *index = static_cast<int32_t>(first_plus_inf);
    *log_norm = FromBits(kPlusInf);
  } else if (best < 0) {  // all -inf
    *index = 0;
    *log_norm = FromBits(kMinusInf);
  } else {
    const float m = x[best];
    double sum = 0.0;
    for (int64_t i = 0; i < v; ++i) {
      if (Finite(Bits(x[i]))) sum += std::exp(x[i] - m);
    }
    *index = static_cast<int32_t>(best);
    *log_norm = m + static_cast<float>(std::log(sum));
  }
}

void Row(const float* x, int64_t v, int32_t* index, float* log_norm) {
  uint32_t special = 0;
  float m = x[0];
  for (int64_t i = 0; i < v; ++i) {
    special |= static_cast<uint32_t>(!Finite(Bits(x[i])));
    m = std::max(m, x[i]);
  }
  if (special) return NonFiniteRow(x, v, index, log_norm);
  int64_t at = 0;
  while (x[at] != m) ++at;  // m is one of the row's values
  float sum = 0.0f;
  for (int64_t i = 0; i < v; ++i) sum += std::exp(x[i] - m);
  *index = static_cast<int32_t>(at);
  *log_norm = m + std::log(sum);
}

ffi::Error ArgmaxLogNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                         ffi::ResultBuffer<ffi::S32> index, ffi::ResultBuffer<ffi::F32> log_norm) {
  const auto d = logits.dimensions();
  if (d.size() != 2 || d[1] < 1) {
    return ffi::Error::InvalidArgument("argmax/log-norm: logits must be [rows, vocab >= 1]");
  }
  const int64_t rows = d[0], v = d[1];
  const float* x = logits.typed_data();
  int32_t* idx = index->typed_data();
  float* norm = log_norm->typed_data();
  meshserve::ParallelFor(pool, rows, [&](int64_t r) { Row(x + r * v, v, idx + r, norm + r); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshserveArgmaxLogNorm, ArgmaxLogNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
