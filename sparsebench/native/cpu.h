// What this CPU runs, shared by the two kernels of the library (bitmask.cpp, gather.cpp).
// Paths: 1 portable (scalar, any CPU), 2 avx2 (+fma), 3 avx512 (f, bw, vl); each kernel
// function is compiled with its own target attribute, so one binary runs everywhere and a test
// can force every path its CPU has.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SB_X86 1
#define SB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,popcnt")))
#define SB_AVX2 __attribute__((target("avx2,fma,popcnt")))
#endif

namespace sparsebench_cpu {

inline bool supported(int64_t path) {
  if (path == 1) return true;
#if SB_X86
  __builtin_cpu_init();
  if (path == 2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("popcnt");
  if (path == 3)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("popcnt");
#endif
  return false;
}

inline int64_t best_path() {
  for (int64_t p = 3; p > 1; --p)
    if (supported(p)) return p;
  return 1;
}

// The path an operator runs (0: the best this CPU has), refused in one line where it cannot.
inline int64_t checked_path(int64_t path, const char* op) {
  if (path == 0) path = best_path();
  TORCH_CHECK(path >= 1 && path <= 3, op, ": path ", path, " is not 0-3");
  TORCH_CHECK(supported(path), op, ": this CPU lacks path ", path);
  return path;
}

inline void check_input(const at::Tensor& x, int64_t in_features, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, op,
              ": x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(x.size(1) == in_features, op, ": x has ", x.size(1), " columns, not ",
              in_features);
}

// rows(V{}, r0, r1) over rows [0, out) split over torch's intra-op pool (torch's thread count),
// V = float for float32 values, uint16_t for bfloat16 ones.
template <typename Rows>
void over_rows(int64_t out, int64_t grain, bool bfloat16, const Rows& rows) {
  at::parallel_for(0, out, grain, [&](int64_t r0, int64_t r1) {
    if (bfloat16)
      rows(uint16_t{}, r0, r1);
    else
      rows(float{}, r0, r1);
  });
}

// The loops that stream a weight (one token's, and the tiles' first pass) ask the second-level
// cache, once a line, for the line AHEAD entries past the one they read, so memory is read
// while the core does the arithmetic of the lines before; without it the two alternate
// (docs/notes/2026-12-07-panels-prefetch.md: 1536 x 576 at 0.5, one token, 250 matrices from
// memory, 2 threads on env C: bitmask 108-111 -> 88-97 us a matrix, dense 138-146).
constexpr int64_t AHEAD = 512;
template <typename T>
inline void prefetch(const T* p) {
#if SB_X86
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
#endif
}

// One token's rows [r0, r1) as STREAMS far-apart streams read at once: the rows split into
// STREAMS contiguous parts of q rows, group(r, q) for rows r, r + q, r + 2q, r + 3q (k-th row
// of each part), then one(r) for the rows left over. A one-token product reads each weight
// once; one stream per core (row after row) kept too few memory reads in flight: on env C, 2
// threads, from memory, the expand kernel took 88-93 us on 1536 x 576 at 0.5 row after row and
// 78-79 as four streams, 3.9-4.1 ms on 4096 x 11008 and 3.1-3.3 (dense 5.7-6.0). Four adjacent
// rows at once are not four streams where rows are short (their prefetches overlap: 110 us in a
// one-off program that gave 65-71 for four streams; docs/notes/2026-12-07-streams.md).
constexpr int64_t STREAMS = 4;

template <int K, typename G, typename One>
void streams(int64_t r0, int64_t r1, const G& group, const One& one) {
  const int64_t q = (r1 - r0) / K;
  for (int64_t k = 0; k < q; ++k) group(r0 + k, q);
  for (int64_t r = r0 + K * q; r < r1; ++r) one(r);
}

// Rows [r0, r1) by tokens [0, tokens) in panels that one core's second-level cache holds:
// f(ra, rb, ta, tb) for each panel, rows outer. `row_bytes` and `token_bytes` are what one row
// of the weight and one token of the input occupy; `rstep` and `tstep` the units a panel's sides
// are whole multiples of (a tile's rows and tokens), so the tiles, and every output's summation
// order, are the same as without panels. Without them a product of many tokens re-read its whole
// input for every tile of rows (env C, 576 x 1536 at 0.5, 512 tokens: gather 7.3x dense's time,
// bitmask 2.9x). PANEL_BYTES a side: half of the smallest second-level cache seen (512 KiB on
// the AVX2-only AMD EPYC), so the two sides fit it together.
constexpr double PANEL_BYTES = 256 * 1024;

template <typename F>
void panels(int64_t r0, int64_t r1, int64_t rstep, double row_bytes, int64_t tokens,
            int64_t tstep, double token_bytes, const F& f) {
  const int64_t prow = rstep * std::max<int64_t>(1, PANEL_BYTES / (row_bytes * rstep + 1));
  const int64_t ptok = tstep * std::max<int64_t>(1, PANEL_BYTES / (token_bytes * tstep + 1));
  for (int64_t ra = r0; ra < r1; ra += prow)
    for (int64_t ta = 0; ta < tokens; ta += ptok)
      f(ra, std::min(ra + prow, r1), ta, std::min(ta + ptok, tokens));
}

}  // namespace sparsebench_cpu
