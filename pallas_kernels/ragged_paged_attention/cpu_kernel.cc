// Ragged paged attention for XLA:CPU, called through the XLA FFI.
//
// XLA:CPU runs the pure-JAX reference as many small gathers and batched dots per key
// block; this reads each sequence's pages in place instead, a token's kv heads (or one of
// them, for small batches) per work item, spread over XLA's intra-op thread pool. Keys go
// in blocks across page boundaries (one softmax update per block), and the rows ahead are
// prefetched while a block is scored. Same contract as reference.py except that the
// step's K/V are already in the pages (the caller scatters them first).
//
// Layouts (f32): q [T, Hq, D]; pages [N, page_size, 2 * Hkv, D] with K of kv head h at
// channel 2h and V at 2h + 1; kv_lens [S]; page_indices [S, P]; cu_q_lens [S + 1];
// num_seqs [1]; out [T, Hq, D].
//
// The "local" handler (context parallelism) also takes page_mask [S, P] (int32, nonzero:
// this device holds the page) and returns lse [T, Hq]: only keys on held pages count,
// walked as runs of consecutive held pages, and a row that sees no key gets out 0 and
// lse kMaskValue.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxGroup = 32;    // query heads per kv head
constexpr int kMaxHeadDim = 256;
// Keys per softmax update (across page boundaries) and prefetch distance, in keys. Keys
// that several query tokens of a prefill read are mostly in cache: long blocks amortise
// the per-block work (1.3x faster than blocks of 16 on one layer's KV in L3). A decode
// token's keys stream from DRAM once: short blocks with the rows 32 keys ahead keep the
// requests in address order close to their use (long blocks streamed 5-8% slower).
constexpr int kMaxBlock = 64;
constexpr int kStreamBlock = 16, kStreamAhead = 32;
// Finite, as in the reference: a masked score is a number, never -inf.
constexpr float kMaskValue = -0.7f * std::numeric_limits<float>::max();

struct Problem {
  const float* q;
  const float* pages;
  const int32_t* kv_lens;
  const int32_t* page_indices;
  const int32_t* page_mask = nullptr;  // local handler only
  float* out;
  float* lse = nullptr;  // local handler only
  int64_t num_pages, page_size, num_kv_heads, group, head_dim, pages_per_seq;
  float sm_scale, soft_cap;
  int32_t window;
  std::vector<int32_t> token_seq;  // sequence of each valid token
  std::vector<int32_t> token_pos;  // absolute position of each valid token
  std::vector<int32_t> token_queries;  // query tokens of its sequence in this call
};

using meshserve::Load;
using meshserve::Store;
using meshserve::V16;

// Where the rows (all kv heads) of a block of consecutive keys start: found once per
// block, so the hot loops cross page boundaries without index arithmetic.
struct BlockRows {
  const float* row[kMaxBlock];
  int64_t n = 0;
};

// Start of the row (all kv heads) of the key in slot `slot` of the sequence's page `col`,
// clamping a corrupt page id instead of reading outside the pages.
inline const float* KeyRow(const Problem& p, const int32_t* table, int64_t col,
                           int64_t slot) {
  const int64_t page = std::clamp<int64_t>(table[col], 0, p.num_pages - 1);
  return p.pages + (page * p.page_size + slot) * 2 * p.num_kv_heads * p.head_dim;
}

void LocateKeys(const Problem& p, const int32_t* table, int64_t start, int64_t n,
                BlockRows& b) {
  const int64_t stride = 2 * p.num_kv_heads * p.head_dim, PS = p.page_size;
  int64_t col = start / PS, slot = start % PS;
  const float* rows = KeyRow(p, table, col, 0);
  for (int64_t j = 0; j < n; ++j, ++slot) {
    if (slot == PS) rows = KeyRow(p, table, ++col, 0), slot = 0;
    b.row[j] = rows + slot * stride;
  }
  b.n = n;
}

// Requests the rows (the kv heads [h0, h1) part of each) of the keys a fixed distance
// ahead, a few lines per call from the hot loops, in address order: pages are scattered,
// so the hardware prefetchers cannot see them coming, and spread out the requests
// overlap the arithmetic (in one burst per page they stalled it).
class Prefetcher {
 public:
  Prefetcher(const Problem& p, const int32_t* table, int64_t key, int64_t last,
             int64_t offset, int64_t lines_per_row, int64_t per_call)
      : p_(p), table_(table), key_(key), last_(last), offset_(offset),
        lines_per_row_(lines_per_row), per_call_(per_call) {
    col_ = key / p.page_size;
    slot_ = key % p.page_size;
    if (key_ <= last_) Locate();
  }
  inline void Step() {
    if (key_ > last_) return;
    for (int64_t i = 0; i < per_call_; ++i) __builtin_prefetch(row_ + 64 * (line_ + i), 0, 1);
    if ((line_ += per_call_) < lines_per_row_) return;
    line_ = 0;
    if (++key_ > last_) return;
    if (++slot_ == p_.page_size) slot_ = 0, ++col_;
    Locate();
  }

 private:
  void Locate() {
    row_ = reinterpret_cast<const char*>(KeyRow(p_, table_, col_, slot_) + offset_);
  }
  const Problem& p_;
  const int32_t* table_;
  int64_t key_, last_, offset_, lines_per_row_, per_call_;
  int64_t col_ = 0, slot_ = 0, line_ = 0;
  const char* row_ = nullptr;
};

// Online-softmax state of one kv head's G query rows.
struct HeadState {
  float m[kMaxGroup], l[kMaxGroup];
  alignas(64) float acc[kMaxGroup][kMaxHeadDim];
};

// Lane j of the result is the sum of all lanes of x[j]: a transpose-and-add tree, about
// a quarter of the shuffles of 16 separate horizontal sums.
inline V16 TransposeSum(const V16 (&x)[16]) {
  V16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {  // lanes 0-7: x[2i]'s partial sums, 8-15: x[2i+1]'s
    a[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                   25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {  // 4 lanes per key, keys 4i .. 4i+3
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17,
                                   18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {  // 2 lanes per key, keys 8i .. 8i+7
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17,
                                   20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                   22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24,
                                 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25,
                                 27, 29, 31);
}

// Scaled scores s[g][j] of the block's keys (at `offset` in each row) against G query
// rows.
template <int GT, int DT>
void Scores(const float* q, const BlockRows& keys, int64_t offset, int64_t group,
            int64_t dim, float scale, float* s, Prefetcher& pf) {
  const int64_t n = keys.n;
  if constexpr (GT > 0 && DT > 0 && DT % 16 == 0) {
    constexpr int DV = DT / 16;
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
      V16 part[GT][16];
      const int64_t tile = std::min<int64_t>(16, n - t0);
      for (int64_t j = 0; j < 16; ++j) {
        if (j >= tile) {
          for (int g = 0; g < GT; ++g) part[g][j] = V16{};
          continue;
        }
        pf.Step();
        const float* k = keys.row[t0 + j] + offset;
        V16 kv[DV];
        for (int c = 0; c < DV; ++c) kv[c] = Load(k + 16 * c);
        for (int g = 0; g < GT; ++g) {
          V16 x = Load(q + g * DT) * kv[0];
          for (int c = 1; c < DV; ++c) x += Load(q + g * DT + 16 * c) * kv[c];
          part[g][j] = x;
        }
      }
      for (int g = 0; g < GT; ++g) {
        const V16 sums = TransposeSum(part[g]) * scale;
        if (tile == 16) {
          Store(s + g * kMaxBlock + t0, sums);
        } else {
          for (int64_t j = 0; j < tile; ++j) s[g * kMaxBlock + t0 + j] = sums[j];
        }
      }
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      pf.Step();
      const float* k = keys.row[j] + offset;
      for (int64_t g = 0; g < group; ++g) {
        float x = 0.0f;
        for (int64_t d = 0; d < dim; ++d) x += q[g * dim + d] * k[d];
        s[g * kMaxBlock + j] = x * scale;
      }
    }
  }
}

// Turns scores into probabilities against the running maximum of each query row, and
// returns in alpha how much the earlier keys' weights shrink.
void Softmax(HeadState& st, float* s, int64_t n, int64_t group, float soft_cap,
             float* alpha) {
  for (int64_t g = 0; g < group; ++g) {
    float* sg = s + g * kMaxBlock;
    if (soft_cap > 0.0f) {
      for (int64_t j = 0; j < n; ++j) sg[j] = soft_cap * std::tanh(sg[j] / soft_cap);
    }
    float mx = st.m[g];
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sg[j]);
    alpha[g] = std::exp(st.m[g] - mx);  // underflows to 0 on the first keys
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      sg[j] = std::exp(sg[j] - mx);
      sum += sg[j];
    }
    st.l[g] = st.l[g] * alpha[g] + sum;
    st.m[g] = mx;
  }
}

// acc[g] = acc[g] * alpha[g] + sum_j p[g][j] * v_j, accumulating in registers where the
// shape is fixed at compile time.
template <int GT, int DT>
void Accumulate(HeadState& st, const float* alpha, const float* p, const BlockRows& rows,
                int64_t offset, int64_t group, int64_t dim, Prefetcher& pf) {
  const int64_t n = rows.n;
  if constexpr (GT > 0 && DT > 0 && DT % 16 == 0) {
    constexpr int DV = DT / 16;
    V16 a[GT][DV];
    for (int g = 0; g < GT; ++g)
      for (int c = 0; c < DV; ++c) a[g][c] = Load(st.acc[g] + 16 * c) * alpha[g];
    for (int64_t j = 0; j < n; ++j) {
      pf.Step();
      const float* v = rows.row[j] + offset;
      V16 vv[DV];
      for (int c = 0; c < DV; ++c) vv[c] = Load(v + 16 * c);
      for (int g = 0; g < GT; ++g) {
        const float w = p[g * kMaxBlock + j];
        for (int c = 0; c < DV; ++c) a[g][c] += w * vv[c];
      }
    }
    for (int g = 0; g < GT; ++g)
      for (int c = 0; c < DV; ++c) Store(st.acc[g] + 16 * c, a[g][c]);
  } else {
    for (int64_t g = 0; g < group; ++g)
      for (int64_t d = 0; d < dim; ++d) st.acc[g][d] *= alpha[g];
    for (int64_t j = 0; j < n; ++j) {
      pf.Step();
      const float* v = rows.row[j] + offset;
      for (int64_t g = 0; g < group; ++g) {
        const float w = p[g * kMaxBlock + j];
        for (int64_t d = 0; d < dim; ++d) st.acc[g][d] += w * v[d];
      }
    }
  }
}

// Kv heads [h0, h1) of token t, a block of keys at a time (all heads of a block before
// the next block, so the rows a block brings in serve every head). GT/DT > 0 fix the
// group size and head dim at compile time (the common shapes) so that the hot loops run
// in vector registers.
template <int GT, int DT>
void AttendOne(const Problem& p, int64_t t, int64_t h0, int64_t h1) {
  const int64_t G = GT > 0 ? GT : p.group, D = DT > 0 ? DT : p.head_dim;
  const int64_t hq = p.num_kv_heads * G, heads = h1 - h0;
  float* out = p.out + (t * hq + h0 * G) * D;
  std::memset(out, 0, sizeof(float) * heads * G * D);
  if (p.lse != nullptr) std::fill_n(p.lse + t * hq + h0 * G, heads * G, kMaskValue);
  const int32_t seq = p.token_seq[t], pos = p.token_pos[t];
  if (seq < 0 || pos < 0) return;
  const int64_t last = std::min<int64_t>(pos, p.pages_per_seq * p.page_size - 1);
  const int64_t first = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
  if (first > last) return;

  thread_local std::vector<HeadState> states;
  if (static_cast<int64_t>(states.size()) < heads) states.resize(heads);
  for (int64_t i = 0; i < heads; ++i) {
    for (int64_t g = 0; g < G; ++g) {
      states[i].m[g] = kMaskValue;
      states[i].l[g] = 0.0f;
      for (int64_t d = 0; d < D; ++d) states[i].acc[g][d] = 0.0f;
    }
  }
  const float* q = p.q + (t * hq + h0 * G) * D;
  const int32_t* table = p.page_indices + seq * p.pages_per_seq;
  const int64_t lines = (2 * D * 4 + 63) / 64;  // one kv head's K and V in a row
  alignas(64) float s[kMaxGroup * kMaxBlock];
  float alpha[kMaxGroup];
  const int64_t block = p.token_queries[t] > 1 ? kMaxBlock : kStreamBlock;
  const int64_t ahead = std::max<int64_t>(block, kStreamAhead);
  // Scores and Accumulate step the prefetcher once per key each, for every head: it
  // moves one row per key, staying `ahead` keys in front.
  const int64_t row_lines = heads * lines, per_call = (row_lines + 2 * heads - 1) / (2 * heads);
  if (p.page_mask == nullptr) {  // nothing runs before the first keys to spread requests over
    Prefetcher burst(p, table, first, std::min(last, first + ahead - 1), 2 * h0 * D,
                     row_lines, row_lines);
    for (int64_t j = 0; j < ahead; ++j) burst.Step();
  }
  // Keys [lo, hi]: all of [first, last], or one run of held pages of it.
  auto walk = [&](int64_t lo, int64_t hi) {
    Prefetcher pf(p, table, lo + ahead, hi, 2 * h0 * D, row_lines, per_call);
    BlockRows rows;
    for (int64_t start = lo; start <= hi; start += rows.n) {
      LocateKeys(p, table, start, std::min<int64_t>(block, hi - start + 1), rows);
      for (int64_t i = 0; i < heads; ++i) {
        HeadState& st = states[i];
        const int64_t offset = 2 * (h0 + i) * D;
        Scores<GT, DT>(q + i * G * D, rows, offset, G, D, p.sm_scale, s, pf);
        Softmax(st, s, rows.n, G, p.soft_cap, alpha);
        Accumulate<GT, DT>(st, alpha, s, rows, offset + D, G, D, pf);
      }
    }
  };
  if (p.page_mask == nullptr) {
    walk(first, last);
  } else {
    const int32_t* held = p.page_mask + seq * p.pages_per_seq;
    const int64_t PS = p.page_size, col_hi = last / PS;
    for (int64_t c = first / PS; c <= col_hi; ++c) {
      if (!held[c]) continue;
      int64_t run_end = c;  // the run's last held column
      while (run_end < col_hi && held[run_end + 1]) ++run_end;
      const int64_t lo = std::max<int64_t>(first, c * PS);
      const int64_t hi = std::min<int64_t>(last, (run_end + 1) * PS - 1);
      // The walk's first keys have not been prefetched like [first, ...] above.
      Prefetcher burst(p, table, lo, std::min(hi, lo + ahead - 1), 2 * h0 * D, row_lines,
                       row_lines);
      for (int64_t j = 0; j < ahead; ++j) burst.Step();
      walk(lo, hi);
      c = run_end;
    }
  }
  for (int64_t i = 0; i < heads; ++i) {
    for (int64_t g = 0; g < G; ++g) {
      const HeadState& st = states[i];
      const float inv = st.l[g] > 0.0f ? 1.0f / st.l[g] : 0.0f;
      for (int64_t d = 0; d < D; ++d) out[(i * G + g) * D + d] = st.acc[g][d] * inv;
      if (p.lse != nullptr && st.l[g] > 0.0f) {
        p.lse[t * hq + (h0 + i) * G + g] = st.m[g] + std::log(st.l[g]);
      }
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

ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> pages,
               ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_indices,
               ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
               const int32_t* page_mask, float* out_data, float* lse, float sm_scale,
               float soft_cap, int32_t window) {
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
  p.page_mask = page_mask;
  p.out = out_data;
  p.lse = lse;
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
  p.token_queries.assign(num_tokens, 0);
  int64_t valid_tokens = 0;
  for (int64_t s = 0; s < n_seqs; ++s) {
    const int64_t lo = std::clamp<int64_t>(cu[s], 0, num_tokens);
    const int64_t hi = std::clamp<int64_t>(cu[s + 1], lo, num_tokens);
    valid_tokens += hi - lo;
    for (int64_t t = lo; t < hi; ++t) {
      p.token_seq[t] = static_cast<int32_t>(s);
      p.token_pos[t] = static_cast<int32_t>(p.kv_lens[s] - (hi - lo) + (t - lo));
      p.token_queries[t] = static_cast<int32_t>(hi - lo);
    }
  }
  // Whole tokens per item when there are enough of them to keep every thread busy.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per = valid_tokens >= 4 * threads ? hkv : 1, items_per_token = hkv / per;
  const AttendFn attend = Specialised(p.group, p.head_dim);
  meshserve::ParallelFor(pool, num_tokens * items_per_token, [&](int64_t i) {
    const int64_t h0 = (i % items_per_token) * per;
    attend(p, i / items_per_token, h0, h0 + per);
  });
  return ffi::Error::Success();
}

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> pages,
                  ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_indices,
                  ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
                  ffi::ResultBuffer<ffi::F32> out, float sm_scale, float soft_cap,
                  int32_t window) {
  return Run(pool, q, pages, kv_lens, page_indices, cu_q_lens, num_seqs, nullptr,
             out->typed_data(), nullptr, sm_scale, soft_cap, window);
}

ffi::Error AttendLocal(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                       ffi::Buffer<ffi::F32> pages, ffi::Buffer<ffi::S32> kv_lens,
                       ffi::Buffer<ffi::S32> page_indices, ffi::Buffer<ffi::S32> cu_q_lens,
                       ffi::Buffer<ffi::S32> num_seqs, ffi::Buffer<ffi::S32> page_mask,
                       ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                       float sm_scale, float soft_cap, int32_t window) {
  if (q.dimensions().size() != 3 || page_mask.element_count() != page_indices.element_count() ||
      lse->element_count() != q.dimensions()[0] * q.dimensions()[1]) {
    return ffi::Error::InvalidArgument("ragged paged attention: page_mask/lse shapes");
  }
  return Run(pool, q, pages, kv_lens, page_indices, cu_q_lens, num_seqs,
             page_mask.typed_data(), out->typed_data(), lse->typed_data(), sm_scale,
             soft_cap, window);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshserveRaggedPagedAttentionLocal, AttendLocal,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int32_t>("window"));
