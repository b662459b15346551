// y = x @ W^T for a pruned weight stored by its kept values and their 16-bit column indices
// (CSR): the index-gather form beside bitmask.cpp's expand form. Per kept weight it reads its
// value and two bytes of index, and does one multiply-add per token, so its work falls with
// the sparsity where the expand form's does not (bitmask.cpp multiplies every zero of a group).
//
// Layout (built by sparsebench/native/__init__.py, `gather_layout`):
//   cols    int16 (nnz + PAD), read as uint16: each kept weight's column, row-major order
//   values  float32 or bfloat16 (nnz + PAD): the kept values in the same order, then PAD zeros
//   rowptr  int64 (out + 1): where each row's kept weights start
//   x       float32 (tokens, in); y float32 (tokens, out)
// PAD entries after the last row let a vector load at any row's end stay inside the tensors;
// the lanes past a row's end are masked out (their indices are never gathered).
//
// One to GATHER_TOKENS tokens: per row and token, 8 kept values and their columns at a time,
// the inputs gathered (vgatherdps), one fused multiply-add; a row's values are re-read for each
// token from L1 (a row of 4096 inputs at 0.5 is 12 KB). One token reads four rows at once, far
// apart (cpu.h `streams`).
// More tokens: x transposed into tiles of 8 or 16 tokens, (in, width) each, so a kept weight's
// inputs for the whole tile are one contiguous vector: one broadcast, one load and one
// multiply-add per kept weight and tile, with no gather (`tile_width` says which, and why).
//
// Threads: rows split over torch's intra-op pool; every output is computed by one thread in a
// fixed order, so the result does not depend on the thread count.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "cpu.h"

namespace {

constexpr int64_t PAD = 16;           // entries past nnz in cols and values
constexpr int64_t GRAIN = 16;         // rows per parallel task at least
// up to this many tokens: gathers; more: transposed tiles (a first choice, not yet measured
// between 2 and 7 tokens: a gather per token against one load per kept weight and tile)
constexpr int64_t GATHER_TOKENS = 3;

std::array<std::atomic<int64_t>, 4> calls{};  // per path: products run (tests read them)

struct Problem {
  const float* x;   // (tokens, in)
  const float* xt;  // tiles of x transposed: (tiles, in, width); null for gathers
  int64_t tokens, in, width;
  const uint16_t* cols;
  const void* values;
  const int64_t* rowptr;
  float* y;  // (tokens, out)
  int64_t out;
};

inline float value(const float* v, int64_t i) { return v[i]; }
inline float value(const uint16_t* v, int64_t i) {
  uint32_t u = static_cast<uint32_t>(v[i]) << 16;  // bfloat16 -> float32
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ----------------------------------------------------------------------------- portable

template <typename V>
void row_portable(const Problem& P, int64_t r) {
  const V* vals = static_cast<const V*>(P.values);
  for (int64_t t = 0; t < P.tokens; ++t) {
    const float* x = P.x + t * P.in;
    float acc = 0.f;
    for (int64_t j = P.rowptr[r]; j < P.rowptr[r + 1]; ++j) acc += value(vals, j) * x[P.cols[j]];
    P.y[t * P.out + r] = acc;
  }
}

#if SB_X86
// ----------------------------------------------------------------------------- avx512


// One row, the tile of up to 16 tokens (lanes) from t0: per kept weight, its value broadcast
// times the tile's 16 inputs of its column. Four accumulators (kept weight j goes to j % 4):
// with one or two the loop waits on the multiply-add's latency (measured 2.3 cycles per kept
// weight with two on env C).
template <typename V>
SB_AVX512 void row_tiles_avx512(const Problem& P, int64_t r, int64_t t0) {
  const V* vals = static_cast<const V*>(P.values);
  const int64_t start = P.rowptr[r], end = P.rowptr[r + 1];
  const float* xt = P.xt + (t0 / 16) * P.in * 16;
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = start;
  for (; j + 4 <= end; j += 4) {
    if ((j & 15) < 4) {  // once a line of values: the line a distance ahead, and its columns
      sparsebench_cpu::prefetch(vals + j + sparsebench_cpu::AHEAD);
      sparsebench_cpu::prefetch(P.cols + j + sparsebench_cpu::AHEAD);
    }
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(value(vals, j)),
                         _mm512_loadu_ps(xt + int64_t{P.cols[j]} * 16), a0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(value(vals, j + 1)),
                         _mm512_loadu_ps(xt + int64_t{P.cols[j + 1]} * 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_set1_ps(value(vals, j + 2)),
                         _mm512_loadu_ps(xt + int64_t{P.cols[j + 2]} * 16), a2);
    a3 = _mm512_fmadd_ps(_mm512_set1_ps(value(vals, j + 3)),
                         _mm512_loadu_ps(xt + int64_t{P.cols[j + 3]} * 16), a3);
  }
  for (; j < end; ++j)
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(value(vals, j)),
                         _mm512_loadu_ps(xt + int64_t{P.cols[j]} * 16), a0);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  const int64_t nt = std::min<int64_t>(16, P.tokens - t0);
  for (int64_t t = 0; t < nt; ++t) P.y[(t0 + t) * P.out + r] = lanes[t];
}

// ----------------------------------------------------------------------------- avx2

SB_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
SB_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
SB_AVX2 inline __m256i index8(const uint16_t* c) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
}
SB_AVX2 inline float sum8(__m256 s) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// Kept weights [j, j + 16) of one row for one token: the first 8 into a0, the next into a1.
template <typename V>
SB_AVX2 inline void gather16(const Problem& P, const float* x, int64_t j, __m256& a0,
                             __m256& a1) {
  const V* vals = static_cast<const V*>(P.values);
  sparsebench_cpu::prefetch(vals + j + sparsebench_cpu::AHEAD);
  sparsebench_cpu::prefetch(P.cols + j + sparsebench_cpu::AHEAD);
  a0 = _mm256_fmadd_ps(load8(vals + j), _mm256_i32gather_ps(x, index8(P.cols + j), 4), a0);
  a1 = _mm256_fmadd_ps(load8(vals + j + 8), _mm256_i32gather_ps(x, index8(P.cols + j + 8), 4),
                       a1);
}

// Kept weights [j, end) of one row into a0 (the tail of fewer than 8 masked), for one token.
template <typename V>
SB_AVX2 __m256 gather_tail(const Problem& P, const float* x, int64_t j, int64_t end, __m256 a0) {
  const V* vals = static_cast<const V*>(P.values);
  for (; j < end; j += 8) {
    const int64_t n = std::min<int64_t>(8, end - j);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 m = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
    const __m256 xv = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, index8(P.cols + j), m, 4);
    a0 = _mm256_fmadd_ps(_mm256_and_ps(m, load8(vals + j)), xv, a0);
  }
  return a0;
}

// RB rows r, r + stride, ... (cpu.h `streams`), one to GATHER_TOKENS tokens: per token, the
// rows' kept weights 16 at a time in lockstep while every row has 16 left, then each row's
// rest alone. A row's sums (blocks of 16 into a0 and a1 alternately, the rest into a0) are the
// same whatever RB.
template <typename V, int RB>
SB_AVX2 void rows_gather_avx2(const Problem& P, int64_t r, int64_t stride) {
  int64_t start[RB], end[RB], common = INT64_MAX;
  for (int i = 0; i < RB; ++i) {
    start[i] = P.rowptr[r + i * stride];
    end[i] = P.rowptr[r + i * stride + 1];
    common = std::min(common, (end[i] - start[i]) / 16 * 16);
  }
  for (int64_t t = 0; t < P.tokens; ++t) {
    const float* x = P.x + t * P.in;
    __m256 a0[RB], a1[RB];
    for (int i = 0; i < RB; ++i) a0[i] = a1[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < common; k += 16)
      for (int i = 0; i < RB; ++i) gather16<V>(P, x, start[i] + k, a0[i], a1[i]);
    for (int i = 0; i < RB; ++i) {
      int64_t j = start[i] + common;
      for (; j + 16 <= end[i]; j += 16) gather16<V>(P, x, j, a0[i], a1[i]);
      a0[i] = gather_tail<V>(P, x, j, end[i], a0[i]);
      P.y[t * P.out + r + i * stride] = sum8(_mm256_add_ps(a0[i], a1[i]));
    }
  }
}

// row_tiles_avx512 in 8 lanes (its own target: a template cannot carry one).
template <typename V>
SB_AVX2 void row_tiles_avx2(const Problem& P, int64_t r, int64_t t0) {
  const V* vals = static_cast<const V*>(P.values);
  const int64_t start = P.rowptr[r], end = P.rowptr[r + 1];
  const float* xt = P.xt + (t0 / 8) * P.in * 8;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = start;
  for (; j + 4 <= end; j += 4) {
    if ((j & 15) < 4) {  // once a line of values: the line a distance ahead, and its columns
      sparsebench_cpu::prefetch(vals + j + sparsebench_cpu::AHEAD);
      sparsebench_cpu::prefetch(P.cols + j + sparsebench_cpu::AHEAD);
    }
    a0 = _mm256_fmadd_ps(_mm256_set1_ps(value(vals, j)),
                         _mm256_loadu_ps(xt + int64_t{P.cols[j]} * 8), a0);
    a1 = _mm256_fmadd_ps(_mm256_set1_ps(value(vals, j + 1)),
                         _mm256_loadu_ps(xt + int64_t{P.cols[j + 1]} * 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_set1_ps(value(vals, j + 2)),
                         _mm256_loadu_ps(xt + int64_t{P.cols[j + 2]} * 8), a2);
    a3 = _mm256_fmadd_ps(_mm256_set1_ps(value(vals, j + 3)),
                         _mm256_loadu_ps(xt + int64_t{P.cols[j + 3]} * 8), a3);
  }
  for (; j < end; ++j)
    a0 = _mm256_fmadd_ps(_mm256_set1_ps(value(vals, j)),
                         _mm256_loadu_ps(xt + int64_t{P.cols[j]} * 8), a0);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  const int64_t nt = std::min<int64_t>(8, P.tokens - t0);
  for (int64_t t = 0; t < nt; ++t) P.y[(t0 + t) * P.out + r] = lanes[t];
}
#endif  // SB_X86

// ----------------------------------------------------------------------------- dispatch

// Path 3 (AVX-512) runs the 8-lane gathers of path 2, and 8-token tiles up to 8 tokens: on env
// C (Intel Xeon, 2 threads, SmolLM2's shapes at 0.9) the 16-lane gather took 19-23 us where
// the 8-lane one took 17-20, and a 16-lane tile half empty at 8 tokens 53-81 us against 42-54.
// From 9 tokens its 16-token tiles win (231 against 299 us at 64 tokens on 1536 x 576).
int64_t tile_width(int64_t path, int64_t tokens) {
  if (tokens <= GATHER_TOKENS || path == 1) return 0;  // gathers (or the portable loop)
  return path == 3 && tokens > 8 ? 16 : 8;
}

template <typename V>
void rows(const Problem& P, int64_t path, int64_t r0, int64_t r1) {
#if SB_X86
  if (path >= 2 && !P.xt) {  // one token: streams; two or three: row after row (two tokens
    // of 1536 x 576 at 0.9 took 42 us as streams against 38 row after row, env C)
    using sparsebench_cpu::STREAMS;
    auto one = [&](int64_t r) { rows_gather_avx2<V, 1>(P, r, 1); };
    if (P.tokens == 1)
      sparsebench_cpu::streams<STREAMS>(
          r0, r1, [&](int64_t r, int64_t q) { rows_gather_avx2<V, STREAMS>(P, r, q); }, one);
    else
      for (int64_t r = r0; r < r1; ++r) one(r);
    return;
  }
  if (path >= 2) {  // tiles, in cache-sized panels of rows x tiles (cpu.h)
    const double row_bytes = (2.0 + sizeof(V)) * double(P.rowptr[P.out]) / P.out;
    sparsebench_cpu::panels(
        r0, r1, 1, row_bytes, P.tokens, P.width, P.in * 4.0,
        [&](int64_t ra, int64_t rb, int64_t ta, int64_t tb) {
          for (int64_t r = ra; r < rb; ++r)
            for (int64_t t0 = ta; t0 < tb; t0 += P.width) {
              if (P.width == 16)
                row_tiles_avx512<V>(P, r, t0);
              else
                row_tiles_avx2<V>(P, r, t0);
            }
        });
    return;
  }
#endif
  for (int64_t r = r0; r < r1; ++r) row_portable<V>(P, r);
}

// x (tokens, in) as tiles of `width` tokens, each (in, width), zeros past the last token.
// Plain loops: torch's strided copies of a transposed view cost about 100 us for 64 tokens of
// 576 inputs, as much as the product.
at::Tensor tiles_of(const at::Tensor& x, int64_t width) {
  const int64_t tokens = x.size(0), in = x.size(1), n = (tokens + width - 1) / width;
  at::Tensor xt = at::zeros({n, in, width}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = xt.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    float* tile = dst + (t / width) * in * width + t % width;
    for (int64_t c = 0; c < in; ++c) tile[c * width] = src[t * in + c];
  }
  return xt;
}

at::Tensor gather_linear(const at::Tensor& x, const at::Tensor& cols, const at::Tensor& values,
                         const at::Tensor& rowptr, int64_t in_features, int64_t path) {
  path = sparsebench_cpu::checked_path(path, "gather_linear");
  sparsebench_cpu::check_input(x, in_features, "gather_linear");
  TORCH_CHECK(in_features <= 65536, "gather_linear: ", in_features,
              " columns do not fit 16-bit indices");
  TORCH_CHECK(rowptr.scalar_type() == at::kLong && rowptr.is_contiguous() && rowptr.dim() == 1,
              "gather_linear: rowptr must be a contiguous int64 vector");
  const int64_t out = rowptr.numel() - 1, tokens = x.size(0);
  const int64_t nnz = rowptr.data_ptr<int64_t>()[out];
  TORCH_CHECK(cols.scalar_type() == at::kShort && cols.is_contiguous() &&
                  cols.numel() >= nnz + PAD,
              "gather_linear: cols must be contiguous int16 of nnz + ", PAD);
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
              "gather_linear: values must be float32 or bfloat16");
  TORCH_CHECK(values.is_contiguous() && values.numel() >= nnz + PAD,
              "gather_linear: values must hold nnz + ", PAD, " entries");
  const at::Tensor xc = x.contiguous();
  const int64_t width = tile_width(path, tokens);
  at::Tensor xt;  // undefined: gathers (or the portable loop)
  if (width) xt = tiles_of(xc, width);
  at::Tensor y = at::empty({tokens, out}, x.options());
  const Problem P{xc.data_ptr<float>(),
                  xt.defined() ? xt.data_ptr<float>() : nullptr,
                  tokens,
                  in_features,
                  width,
                  reinterpret_cast<const uint16_t*>(cols.data_ptr<int16_t>()),
                  values.data_ptr(),
                  rowptr.data_ptr<int64_t>(),
                  y.data_ptr<float>(),
                  out};
  sparsebench_cpu::over_rows(out, GRAIN, values.scalar_type() == at::kBFloat16,
                             [&](auto v, int64_t r0, int64_t r1) {
                               rows<decltype(v)>(P, path, r0, r1);
                             });
  calls[path].fetch_add(1, std::memory_order_relaxed);
  return y;
}

int64_t gather_calls(int64_t path) {
  TORCH_CHECK(path >= 1 && path <= 3, "gather_calls: path ", path, " is not 1-3");
  return calls[path].load();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsebench, m) {
  m.def("gather_linear(Tensor x, Tensor cols, Tensor values, Tensor rowptr, int in_features, "
        "int path) -> Tensor",
        &gather_linear);
  m.def("gather_calls(int path) -> int", &gather_calls);
}
