// Shared by the C++ FFI kernels for CPU: vector types and work sharing over XLA:CPU's
// intra-op thread pool.
#ifndef MESHSERVE_PALLAS_KERNELS_CPU_COMMON_H_
#define MESHSERVE_PALLAS_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

// The kernels keep IEEE float semantics (no -ffast-math: NaN and inf propagate as in the
// references). glibc declares its vector expf (libmvec) only under -ffast-math; declared
// here, loops of expf still vectorise. libmvec's variants treat inf and NaN as expf does.
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__)
extern "C" float expf(float) noexcept __attribute__((__simd__("notinbranch")));
#endif

namespace meshserve {

// GCC vector extensions: AVX-512 registers where the CPU has them, pairs of AVX2 ones
// otherwise.
typedef float V16 __attribute__((vector_size(64)));
typedef float V16Unaligned __attribute__((vector_size(64), aligned(4)));

inline V16 Load(const float* p) { return *reinterpret_cast<const V16Unaligned*>(p); }
inline void Store(float* p, V16 v) { *reinterpret_cast<V16Unaligned*>(p) = v; }

// Runs fn(i) for i in [0, n) on the calling thread and up to pool.num_threads() - 1
// pool tasks, handing out items one at a time. The caller waits for all items, never for
// the tasks: one that starts late finds nothing left and only drops its reference to the
// shared state, so a busy or single-threaded pool cannot deadlock the call.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct Shared {
    explicit Shared(Fn f) : fn(std::move(f)) {}
    Fn fn;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  if (n <= 0) return;
  auto shared = std::make_shared<Shared>(std::move(fn));
  auto drain = [shared, n] {
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) {
      shared->fn(i);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(drain)(drain));  // a copy each
  drain();
  while (shared->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace meshserve

#endif  // MESHSERVE_PALLAS_KERNELS_CPU_COMMON_H_
