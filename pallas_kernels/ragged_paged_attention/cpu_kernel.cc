// Ragged paged attention for XLA:CPU, called through the XLA FFI.
//
// XLA:CPU runs the pure-JAX reference as many small gathers and batched dots per key
// block; this reads each sequence's pages in place instead, one (token, kv head) work
// item at a time, spread over XLA's intra-op thread pool. Same contract as reference.py
// except that the step's K/V are already in the pages (the caller scatters them first).
//
// Layouts (f32): q [T, Hq, D]; pages [N, page_size, 2 * Hkv, D] with K of kv head h at
// channel 2h and V at 2h + 1; kv_lens [S]; page_indices [S, P]; cu_q_lens [S + 1];
// num_seqs [1]; out [T, Hq, D].

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxGroup = 32;    // query heads per kv head
constexpr int kMaxHeadDim = 256;
constexpr int kChunk = 64;       // keys scored per softmax update
// Finite, as in the reference: built with -ffast-math, so no infinities anywhere.
constexpr float kMaskValue = -0.7f * std::numeric_limits<float>::max();

struct Problem {
  const float* q;
  const float* pages;
  const int32_t* kv_lens;
  const int32_t* page_indices;
  float* out;
  int64_t num_pages, page_size, num_kv_heads, group, head_dim, pages_per_seq;
  float sm_scale, soft_cap;
  int32_t window;
  std::vector<int32_t> token_seq;  // sequence of each valid token
  std::vector<int32_t> token_pos;  // absolute position of each valid token
};

// GCC vector extensions: AVX-512 registers where the CPU has them, pairs of AVX2 ones
// otherwise.
typedef float V16 __attribute__((vector_size(64)));
typedef float V16Unaligned __attribute__((vector_size(64), aligned(4)));
typedef float V8 __attribute__((vector_size(32)));
typedef float V4 __attribute__((vector_size(16)));

inline V16 Load(const float* x) { return *reinterpret_cast<const V16Unaligned*>(x); }

inline float Sum(V16 x) {
  V8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
  V8 b = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  V8 c = a + b;
  V4 d = __builtin_shufflevector(c, c, 0, 1, 2, 3) + __builtin_shufflevector(c, c, 4, 5, 6, 7);
  return (d[0] + d[1]) + (d[2] + d[3]);
}

// Online-softmax state of one kv head's G query rows.
struct HeadState {
  float m[kMaxGroup], l[kMaxGroup];
  alignas(64) float acc[kMaxGroup][kMaxHeadDim];
};

template <int GT, int DT>
inline float QueryDotKey(const float* q, const float* k, int64_t dim) {
  if constexpr (DT > 0 && DT % 16 == 0) {
    V16 x = Load(q) * Load(k);
    for (int c = 1; c < DT / 16; ++c) x += Load(q + 16 * c) * Load(k + 16 * c);
    return Sum(x);
  } else {
    float x = 0.0f;
    for (int64_t d = 0; d < dim; ++d) x += q[d] * k[d];
    return x;
  }
}

// Kv heads [h0, h1) of token t. Pages are read front to back, row by row (a slot row
// holds every head's K and V), which the hardware prefetcher follows; a head-by-head
// walk strides through each page and runs at a third of the speed.
// GT/DT > 0 fix the group size and head dim at compile time (the common shapes).
template <int GT, int DT>
void AttendOne(const Problem& p, int64_t t, int64_t h0, int64_t h1) {
  const int64_t G = GT > 0 ? GT : p.group, D = DT > 0 ? DT : p.head_dim;
  const int64_t PS = p.page_size, hq = p.num_kv_heads * G, heads = h1 - h0;
  float* out = p.out + (t * hq + h0 * G) * D;
  std::memset(out, 0, sizeof(float) * heads * G * D);
  const int32_t seq = p.token_seq[t], pos = p.token_pos[t];
  if (seq < 0 || pos < 0) return;
  const int64_t last = std::min<int64_t>(pos, p.pages_per_seq * PS - 1);
  const int64_t first = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
  if (first > last) return;

  thread_local std::vector<HeadState> states;
  thread_local std::vector<float> scores;  // [heads, G, kChunk]
  if (static_cast<int64_t>(states.size()) < heads) states.resize(heads);
  scores.resize(heads * G * kChunk);
  for (int64_t i = 0; i < heads; ++i) {
    for (int64_t g = 0; g < G; ++g) {
      states[i].m[g] = kMaskValue;
      states[i].l[g] = 0.0f;
      for (int64_t d = 0; d < D; ++d) states[i].acc[g][d] = 0.0f;
    }
  }
  const float* q = p.q + (t * hq + h0 * G) * D;
  const int32_t* table = p.page_indices + seq * p.pages_per_seq;
  const int64_t stride = 2 * p.num_kv_heads * D;
  for (int64_t start = first; start <= last;) {
    const int64_t col = start / PS, slot0 = start % PS;
    const int64_t n = std::min<int64_t>({PS - slot0, last - start + 1, kChunk});
    const int64_t page = std::clamp<int64_t>(table[col], 0, p.num_pages - 1);
    const float* rows = p.pages + (page * PS + slot0) * stride + 2 * h0 * D;
    // Pages sit anywhere in the pool: fetch the next one while this one is computed.
    const char* ahead = nullptr;
    if (col + 1 < p.pages_per_seq && start + n <= last) {
      const int64_t next = std::clamp<int64_t>(table[col + 1], 0, p.num_pages - 1);
      ahead = reinterpret_cast<const char*>(p.pages + next * PS * stride + 2 * h0 * D);
    }
    const int64_t row_bytes = 2 * heads * D * sizeof(float);
    for (int64_t j = 0; j < n; ++j) {
      const float* row = rows + j * stride;
      if (ahead != nullptr) {
        const char* r = ahead + (slot0 + j) * stride * sizeof(float);
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(r + b);
      }
      for (int64_t i = 0; i < heads; ++i) {
        for (int64_t g = 0; g < G; ++g) {
          scores[(i * G + g) * kChunk + j] =
              QueryDotKey<GT, DT>(q + (i * G + g) * D, row + 2 * i * D, D) * p.sm_scale;
        }
      }
    }
    for (int64_t i = 0; i < heads; ++i) {
      HeadState& st = states[i];
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + (i * G + g) * kChunk;
        float mx = st.m[g];
        for (int64_t j = 0; j < n; ++j) {
          if (p.soft_cap > 0.0f) s[j] = p.soft_cap * std::tanh(s[j] / p.soft_cap);
          mx = std::max(mx, s[j]);
        }
        const float alpha = std::exp(st.m[g] - mx);  // underflows to 0 on the first keys
        float sum = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
          s[j] = std::exp(s[j] - mx);
          sum += s[j];
        }
        st.l[g] = st.l[g] * alpha + sum;
        st.m[g] = mx;
        for (int64_t d = 0; d < D; ++d) st.acc[g][d] *= alpha;
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* row = rows + j * stride;
      for (int64_t i = 0; i < heads; ++i) {
        const float* v = row + (2 * i + 1) * D;
        HeadState& st = states[i];
        for (int64_t g = 0; g < G; ++g) {
          const float w = scores[(i * G + g) * kChunk + j];
          for (int64_t d = 0; d < D; ++d) st.acc[g][d] += w * v[d];
        }
      }
    }
    start += n;
  }
  for (int64_t i = 0; i < heads; ++i) {
    for (int64_t g = 0; g < G; ++g) {
      const HeadState& st = states[i];
      const float inv = st.l[g] > 0.0f ? 1.0f / st.l[g] : 0.0f;
      for (int64_t d = 0; d < D; ++d) out[(i * G + g) * D + d] = st.acc[g][d] * inv;
    }
  }
}

using AttendFn = void (*)(const Problem&, int64_t, int64_t, int64_t);

template <int DT>
AttendFn ForGroup(int64_t group) {
  switch (group) {
    case 1: return AttendOne<1, DT>;
    case 2: return AttendOne<2, DT>;
    case 3: return AttendOne<3, DT>;
    case 4: return AttendOne<4, DT>;
    case 5: return AttendOne<5, DT>;
    case 6: return AttendOne<6, DT>;
    case 7: return AttendOne<7, DT>;
    case 8: return AttendOne<8, DT>;
    default: return AttendOne<0, DT>;
  }
}

AttendFn Specialised(int64_t group, int64_t head_dim) {
  if (head_dim == 64) return ForGroup<64>(group);
  if (head_dim == 128) return ForGroup<128>(group);
  return AttendOne<0, 0>;
}

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> pages,
                  ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_indices,
                  ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
                  ffi::ResultBuffer<ffi::F32> out, float sm_scale, float soft_cap,
                  int32_t window) {
  const auto qd = q.dimensions(), pd = pages.dimensions(), td = page_indices.dimensions();
  if (qd.size() != 3 || pd.size() != 4 || td.size() != 2) {
    return ffi::Error::InvalidArgument("ragged paged attention: unexpected ranks");
  }
  const int64_t num_tokens = qd[0], hq = qd[1], D = qd[2];
  const int64_t hkv = pd[2] / 2, max_seqs = td[0];
  if (pd[3] != D || hkv < 1 || hq % hkv != 0 || hq / hkv > kMaxGroup || D > kMaxHeadDim) {
    return ffi::Error::InvalidArgument("ragged paged attention: unsupported head layout");
  }
  Problem p;
  p.q = q.typed_data();
  p.pages = pages.typed_data();
  p.kv_lens = kv_lens.typed_data();
  p.page_indices = page_indices.typed_data();
  p.out = out->typed_data();
  p.num_pages = pd[0];
  p.page_size = pd[1];
  p.num_kv_heads = hkv;
  p.group = hq / hkv;
  p.head_dim = D;
  p.pages_per_seq = td[1];
  p.sm_scale = sm_scale;
  p.soft_cap = soft_cap;
  p.window = window;

  // Token -> (sequence, position), clamping corrupt metadata instead of reading past it.
  const int32_t* cu = cu_q_lens.typed_data();
  const int64_t n_seqs = std::clamp<int64_t>(num_seqs.typed_data()[0], 0, max_seqs);
  p.token_seq.assign(num_tokens, -1);
  p.token_pos.assign(num_tokens, -1);
  for (int64_t s = 0; s < n_seqs; ++s) {
    const int64_t lo = std::clamp<int64_t>(cu[s], 0, num_tokens);
    const int64_t hi = std::clamp<int64_t>(cu[s + 1], lo, num_tokens);
    for (int64_t t = lo; t < hi; ++t) {
      p.token_seq[t] = static_cast<int32_t>(s);
      p.token_pos[t] = static_cast<int32_t>(p.kv_lens[s] - (hi - lo) + (t - lo));
    }
  }
  // Whole tokens per item when there are enough of them to keep every thread busy.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t valid_tokens = 0;
  for (int64_t t = 0; t < num_tokens; ++t) valid_tokens += p.token_seq[t] >= 0;
  const int64_t per = valid_tokens >= 4 * threads ? hkv : 1, items_per_token = hkv / per;
  const AttendFn attend = Specialised(p.group, p.head_dim);
  meshserve::ParallelFor(pool, num_tokens * items_per_token, [&p, attend, per, items_per_token](int64_t i) {
    const int64_t h0 = (i % items_per_token) * per;
    attend(p, i / items_per_token, h0, h0 + per);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshserveRaggedPagedAttention, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int32_t>("window"));
