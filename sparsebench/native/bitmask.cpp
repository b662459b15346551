// y = x @ W^T for a pruned weight W stored as its bitmask and its kept values: the form that
// `save.format=bitmask` writes (sparsebench/formats.py), read by an expand-style kernel.
//
// Layout (built by sparsebench/native/__init__.py from a weight or an export):
//   bits    int64 (out, words): row r's mask, little-endian, column c is bit c % 64 of word
//           c / 64; words = ceil(in / 64); bits past `in` are zero.
//   values  float32 or bfloat16 (nnz + PAD): the kept values in row-major order, then PAD
//           zeros, so a vector load at any row's last kept value stays inside the tensor.
//   rowptr  int64 (out + 1): where each row's values start.
//   x       float32 (tokens, in); y float32 (tokens, out).
//
// Why expand: a 16-lane group of kept values is read with one load and spread to the lanes its
// mask bits name (AVX-512 `vexpandps`; AVX2 has no expand, so a permutation per mask byte from a
// 256-entry table, then the unset lanes zeroed), then one fused multiply-add with 16 contiguous
// inputs: the arithmetic per weight of a dense product, while memory traffic is 1/8 byte of mask
// plus the kept values. An index-gather form (csr16) pays a gather per kept weight instead.
//
// Paths (cpu.h): 1 portable, 2 avx2, 3 avx512, chosen at run time from the CPU's flags (0 = the
// best this CPU has).
//
// Threads: rows split over torch's intra-op pool (at::parallel_for, torch's thread count). Every
// output is computed by one thread in a fixed order (lanes, then the lanes' sum), so the result
// does not depend on the thread count.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu.h"

namespace {

constexpr int64_t PAD = 16;    // values past nnz (one vector of 16 floats)
constexpr int64_t GRAIN = 16;  // rows per parallel task at least
constexpr double AVX2_STREAMS_DENSITY = 0.2;  // kept / all weights from which AVX2 streams

std::array<std::atomic<int64_t>, 4> calls{};  // per path: products run (tests read them)

struct Problem {
  const float* x;  // (tokens, xs): x padded to whole words
  int64_t tokens, xs;
  const uint64_t* bits;
  int64_t words;
  const void* values;
  const int64_t* rowptr;
  float* y;  // (tokens, out)
  int64_t out;
};

inline float bf16(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float value(const float* v, int64_t i) { return v[i]; }

// Where each of RB rows r, r + stride, ... starts: its kept values and its mask words.
template <typename V, int RB>
struct Cursor {
  const V* p[RB];
  const uint64_t* b[RB];
  Cursor(const Problem& P, int64_t r, int64_t stride = 1) {
    for (int i = 0; i < RB; ++i) {
      p[i] = static_cast<const V*>(P.values) + P.rowptr[r + i * stride];
      b[i] = P.bits + (r + i * stride) * P.words;
    }
  }
};
inline float value(const uint16_t* v, int64_t i) { return bf16(v[i]); }

// A distance ahead (cpu.h): the one or two lines of values that a mask word's 64 weights use
// from p, and, once a line of mask words (every 8th), the mask words from `bits`.
template <typename V>
inline void prefetch_word(const V* p, const uint64_t* bits) {
  sparsebench_cpu::prefetch(p + sparsebench_cpu::AHEAD);
  sparsebench_cpu::prefetch(p + sparsebench_cpu::AHEAD + 16);
  if (bits && (reinterpret_cast<uintptr_t>(bits) & 63) == 0)
    sparsebench_cpu::prefetch(bits + sparsebench_cpu::AHEAD);
}

// ----------------------------------------------------------------------------- portable

template <typename V, int NT>
void tile_portable(const Problem& P, int64_t r, int64_t t0) {
  const V* vals = static_cast<const V*>(P.values);
  const uint64_t* b = P.bits + r * P.words;
  float acc[NT] = {};
  int64_t p = P.rowptr[r];
  for (int64_t w = 0; w < P.words; ++w) {
    for (uint64_t m = b[w]; m; m &= m - 1) {
      const int64_t c = w * 64 + __builtin_ctzll(m);
      const float v = value(vals, p++);
      for (int t = 0; t < NT; ++t) acc[t] += v * P.x[(t0 + t) * P.xs + c];
    }
  }
  for (int t = 0; t < NT; ++t) P.y[(t0 + t) * P.out + r] = acc[t];
}

#if SB_X86
// ----------------------------------------------------------------------------- avx512

// 16 kept values from p, spread to the lanes set in m (the others 0).
// (A full load, then the expand from the register: the memory form, vexpandps zmm{k}, m512,
// was no faster on env C: 1536 x 576 at 0.5, one thread, 110-115 us against 107.)
SB_AVX512 inline __m512 expand16(const float* p, __mmask16 m) {
  return _mm512_maskz_expand_ps(m, _mm512_loadu_ps(p));
}
SB_AVX512 inline __m512 expand16(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i f = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);  // bfloat16 -> float32
  return _mm512_maskz_expand_ps(m, _mm512_castsi512_ps(f));
}

// One token, RB rows r, r + stride, ... (cpu.h `streams`: RB far-apart streams read at once),
// each with four accumulators, one per 16-bit quarter of a mask word, whose value offsets come
// from four popcounts at once. A row's sums are the same whatever RB, so rows run in a group or
// alone give the same bits.
// MOVES: how a mask word's four 16-bit quarters reach the mask registers (`masks_mode`).
template <typename V, int RB, bool MOVES>
SB_AVX512 void rows1_avx512(const Problem& P, int64_t r, int64_t stride) {
  Cursor<V, RB> c(P, r, stride);
  __m512 a[RB][4];
  for (int i = 0; i < RB; ++i) a[i][0] = a[i][1] = a[i][2] = a[i][3] = _mm512_setzero_ps();
  for (int64_t w = 0; w < P.words; ++w) {
    const float* x = P.x + w * 64;
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16),
                 x2 = _mm512_loadu_ps(x + 32), x3 = _mm512_loadu_ps(x + 48);
    for (int i = 0; i < RB; ++i) {
      const V* p = c.p[i];
      const uint64_t m = c.b[i][w];
      // the quarters into mask registers: moved from the word, or loaded (`masks_mode`)
      __mmask16 m0, m1, m2, m3;
      if constexpr (MOVES) {
        m0 = _cvtu32_mask16(uint32_t(m)), m1 = _cvtu32_mask16(uint32_t(m >> 16));
        m2 = _cvtu32_mask16(uint32_t(m >> 32)), m3 = _cvtu32_mask16(uint32_t(m >> 48));
      } else {
        __mmask16* q = reinterpret_cast<__mmask16*>(const_cast<uint64_t*>(c.b[i] + w));
        m0 = _load_mask16(q), m1 = _load_mask16(q + 1), m2 = _load_mask16(q + 2);
        m3 = _load_mask16(q + 3);
      }
      const V* p1 = p + _mm_popcnt_u32(uint16_t(m));
      const V* p2 = p1 + _mm_popcnt_u32(uint16_t(m >> 16));
      const V* p3 = p2 + _mm_popcnt_u32(uint16_t(m >> 32));
      prefetch_word(p, c.b[i] + w);
      a[i][0] = _mm512_fmadd_ps(expand16(p, m0), x0, a[i][0]);
      a[i][1] = _mm512_fmadd_ps(expand16(p1, m1), x1, a[i][1]);
      a[i][2] = _mm512_fmadd_ps(expand16(p2, m2), x2, a[i][2]);
      a[i][3] = _mm512_fmadd_ps(expand16(p3, m3), x3, a[i][3]);
      c.p[i] = p3 + _mm_popcnt_u32(uint32_t(m >> 48));
    }
  }
  for (int i = 0; i < RB; ++i)
    P.y[r + i * stride] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(a[i][0], a[i][1]), _mm512_add_ps(a[i][2], a[i][3])));
}

// RB rows x NT tokens: each group of 16 kept values of a row is expanded once and multiplied
// into NT accumulators, and each 16 inputs of a token are loaded once for RB rows; RB x NT
// accumulators stay in registers (24 of AVX-512's 32), so the product is bound by the
// multiply-adds, not by loads.
template <typename V, int RB, int NT>
SB_AVX512 void tile_avx512(const Problem& P, int64_t r, int64_t t0) {
  Cursor<V, RB> c(P, r);
  const V** p = c.p;
  const uint64_t** b = c.b;
  const float* x = P.x + t0 * P.xs;
  __m512 acc[RB][NT];
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < P.words * 4; ++g) {
    __m512 v[RB];
    for (int i = 0; i < RB; ++i) {
      if ((g & 3) == 0) prefetch_word(p[i], nullptr);  // once a mask word
      const __mmask16 m = b[i][g >> 2] >> ((g & 3) * 16);
      v[i] = expand16(p[i], m);
      p[i] += _mm_popcnt_u32(m);
    }
    for (int t = 0; t < NT; ++t) {
      const __m512 xv = _mm512_loadu_ps(x + t * P.xs + g * 16);
      for (int i = 0; i < RB; ++i) acc[i][t] = _mm512_fmadd_ps(v[i], xv, acc[i][t]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < NT; ++t) P.y[(t0 + t) * P.out + r + i] = _mm512_reduce_add_ps(acc[i][t]);
}

// ----------------------------------------------------------------------------- avx2

// For a mask byte: the source lane of each of the 8 lanes (the k-th set bit takes value k),
// and an all-ones lane where the bit is set (the others are zeroed after the permutation).
struct Avx2Tables {
  alignas(32) int32_t perm[256][8];
  alignas(32) int32_t keep[256][8];
  Avx2Tables() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool set = (m >> lane) & 1;
        perm[m][lane] = set ? k++ : 0;
        keep[m][lane] = set ? -1 : 0;
      }
    }
  }
};
const Avx2Tables& avx2_tables() {
  static const Avx2Tables t;
  return t;
}

SB_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
SB_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <typename V>
SB_AVX2 inline __m256 expand8(const V* p, unsigned m, const Avx2Tables& T) {
  const __m256 v = _mm256_permutevar8x32_ps(
      load8(p), _mm256_load_si256(reinterpret_cast<const __m256i*>(T.perm[m])));
  return _mm256_and_ps(v, _mm256_load_ps(reinterpret_cast<const float*>(T.keep[m])));
}

// Where each byte's values start within a mask word, all eight at once: the bytes' popcounts
// (SWAR), their running sum by one multiply, shifted by a byte (exclusive sums; at most 56).
SB_AVX2 inline uint64_t byte_offsets(uint64_t m) {
  uint64_t c = m - ((m >> 1) & 0x5555555555555555ULL);
  c = (c & 0x3333333333333333ULL) + ((c >> 2) & 0x3333333333333333ULL);
  c = (c + (c >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  return (c * 0x0101010101010101ULL) << 8;
}

// One token, RB rows at a stride, as rows1_avx512: each mask byte's 8 values permuted to
// their lanes, two accumulators a row (even and odd bytes; 4 rows x 2 of AVX2's 16 registers).
template <typename V, int RB>
SB_AVX2 void rows1_avx2(const Problem& P, int64_t r, int64_t stride) {
  const Avx2Tables& T = avx2_tables();
  Cursor<V, RB> c(P, r, stride);
  __m256 a[RB][2];
  for (int i = 0; i < RB; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
  for (int64_t w = 0; w < P.words; ++w) {
    const float* x = P.x + w * 64;
    for (int i = 0; i < RB; ++i) {
      const V* p = c.p[i];
      const uint64_t m = c.b[i][w];
      const uint64_t off = byte_offsets(m);
      prefetch_word(p, c.b[i] + w);
#define SB_BYTE(k)                                                                              \
  a[i][k & 1] = _mm256_fmadd_ps(expand8(p + ((off >> (8 * k)) & 0xFF), (m >> (8 * k)) & 0xFF, T), \
                                _mm256_loadu_ps(x + 8 * k), a[i][k & 1])
      SB_BYTE(0); SB_BYTE(1); SB_BYTE(2); SB_BYTE(3);
      SB_BYTE(4); SB_BYTE(5); SB_BYTE(6); SB_BYTE(7);
#undef SB_BYTE
      c.p[i] = p + _mm_popcnt_u64(m);
    }
  }
  for (int i = 0; i < RB; ++i) {
    const __m256 s = _mm256_add_ps(a[i][0], a[i][1]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    P.y[r + i * stride] = _mm_cvtss_f32(h);
  }
}

// RB rows x NT tokens, as tile_avx512 (8 of AVX2's 16 registers hold accumulators).
template <typename V, int RB, int NT>
SB_AVX2 void tile_avx2(const Problem& P, int64_t r, int64_t t0) {
  const Avx2Tables& T = avx2_tables();
  Cursor<V, RB> c(P, r);
  const V** p = c.p;
  const uint64_t** b = c.b;
  const float* x = P.x + t0 * P.xs;
  __m256 acc[RB][NT];
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < P.words * 8; ++g) {
    __m256 v[RB];
    for (int i = 0; i < RB; ++i) {
      const unsigned m = (b[i][g >> 3] >> ((g & 7) * 8)) & 0xFF;
      v[i] = expand8(p[i], m, T);
      p[i] += _mm_popcnt_u32(m);
    }
    for (int t = 0; t < NT; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * P.xs + g * 8);
      for (int i = 0; i < RB; ++i) acc[i][t] = _mm256_fmadd_ps(v[i], xv, acc[i][t]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < NT; ++t) {
      __m128 h =
          _mm_add_ps(_mm256_castps256_ps128(acc[i][t]), _mm256_extractf128_ps(acc[i][t], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      P.y[(t0 + t) * P.out + r + i] = _mm_cvtss_f32(h);
    }
}
#endif  // SB_X86

// ----------------------------------------------------------------------------- dispatch

using sparsebench_cpu::best_path;
using sparsebench_cpu::supported;

// A tile function per (rows, tokens) count, so accumulators stay in registers: F<V, RB, NT>.
template <typename V, int RB, template <typename, int, int> class F>
void tile(const Problem& P, int64_t r, int64_t t0, int nt) {
  switch (nt) {
    case 1: F<V, RB, 1>::call(P, r, t0); break;
    case 2: F<V, RB, 2>::call(P, r, t0); break;
    case 3: F<V, RB, 3>::call(P, r, t0); break;
    case 4: F<V, RB, 4>::call(P, r, t0); break;
    case 5: F<V, RB, 5>::call(P, r, t0); break;
    default: F<V, RB, 6>::call(P, r, t0); break;
  }
}

// Rows [r0, r1) of y over all tokens: in cache-sized panels (cpu.h), blocks of RB rows x
// `tile_tokens` tokens, then the rows left over one at a time. The blocking is fixed by the
// shape and the path, never by the thread count, so every output's summation order is too.
template <typename V, int RB, template <typename, int, int> class F>
void blocks(const Problem& P, int64_t r0, int64_t r1, int tile_tokens) {
  const double row_bytes = P.words * 8.0 + sizeof(V) * double(P.rowptr[P.out]) / P.out;
  auto panel = [&](int64_t ra, int64_t rb, int64_t ta, int64_t tb) {
    auto tiles = [&](auto rows_at_once, int64_t r) {
      for (int64_t t0 = ta; t0 < tb; t0 += tile_tokens)
        tile<V, decltype(rows_at_once)::value, F>(
            P, r, t0, static_cast<int>(std::min<int64_t>(tile_tokens, tb - t0)));
    };
    int64_t r = ra;
    for (; r + RB <= rb; r += RB) tiles(std::integral_constant<int, RB>{}, r);
    for (; r < rb; ++r) tiles(std::integral_constant<int, 1>{}, r);
  };
  sparsebench_cpu::panels(r0, r1, RB, row_bytes, P.tokens, tile_tokens, P.xs * 4.0, panel);
}

template <typename V, int RB, int NT>
struct PortableTile {
  static void call(const Problem& P, int64_t r, int64_t t0) {
    for (int i = 0; i < RB; ++i) tile_portable<V, NT>(P, r + i, t0);
  }
};
#if SB_X86
template <typename V, int RB, int NT>
struct Avx512Tile {
  static void call(const Problem& P, int64_t r, int64_t t0) { tile_avx512<V, RB, NT>(P, r, t0); }
};
template <typename V, int RB, int NT>
struct Avx2Tile {
  static void call(const Problem& P, int64_t r, int64_t t0) { tile_avx2<V, RB, NT>(P, r, t0); }
};
#endif

template <typename V>
void rows(const Problem& P, int64_t path, bool moves, int64_t r0, int64_t r1) {
#if SB_X86
  using sparsebench_cpu::STREAMS;
  if (path == 3 && P.tokens == 1) {
    auto one_token = [&](auto how) {  // how: std::bool_constant<moves>
      constexpr bool M = decltype(how)::value;
      sparsebench_cpu::streams<STREAMS>(
          r0, r1, [&](int64_t r, int64_t q) { rows1_avx512<V, STREAMS, M>(P, r, q); },
          [&](int64_t r) { rows1_avx512<V, 1, M>(P, r, 1); });
    };
    if (moves)
      one_token(std::true_type{});
    else
      one_token(std::false_type{});
  } else if (path == 2 && P.tokens == 1) {
    // Streams where memory bounds the loop; at 0.9 the AVX2 expands bound it, and four rows at
    // once ran slower (1536 x 576 from memory, 2 threads, env C: 0.9 51-54 -> 63 us; 0.5
    // 103-107 -> 85-87)
    auto one = [&](int64_t r) { rows1_avx2<V, 1>(P, r, 1); };
    if (P.rowptr[P.out] >= AVX2_STREAMS_DENSITY * double(P.out) * P.words * 64)
      sparsebench_cpu::streams<STREAMS>(
          r0, r1, [&](int64_t r, int64_t q) { rows1_avx2<V, STREAMS>(P, r, q); }, one);
    else
      for (int64_t r = r0; r < r1; ++r) one(r);
  } else if (path == 3) {
    blocks<V, 4, Avx512Tile>(P, r0, r1, 6);
  } else if (path == 2) {
    blocks<V, 2, Avx2Tile>(P, r0, r1, 4);
  } else
#endif
    blocks<V, 1, PortableTile>(P, r0, r1, 6);
}

// ----------------------------------------------------------------------------- masks mode

// How the one-token AVX-512 loop puts a mask word's quarters into mask registers: 0 loads each
// from memory (kmovw k, m16), 1 moves each from the word (kmovd k, r32 after a shift). Which is
// faster depends on the core: on Intel a move takes the port the expands need (env C chose
// loads), on AMD's Zen 4 a load into a mask register is slow (env B, one thread, SmolLM2's
// shapes in cache: 66-77 us with moves against 88-98 with loads; docs/notes/2026-12-07-env-b.md).
// SPARSEBENCH_EXPAND_MASKS (loads | moves) forces one; else it is measured once a process: a
// 256 x 576 weight at 0.5 (in the second-level cache), one thread, both ways seven times in turn,
// the faster by its best time. Either gives the same bits.
std::atomic<int> masks{-1};

#if SB_X86
double seconds_of(const Problem& P, bool moves) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int k = 0; k < 4; ++k) rows<float>(P, 3, moves, 0, P.out);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int measured_masks() {
  const int64_t out = 256, words = 9;  // 576 columns
  std::vector<float> x(words * 64, 1.0f), values, y(out);
  std::vector<uint64_t> bits(out * words, 0);
  std::vector<int64_t> rowptr{0};
  uint64_t state = 0;  // splitmix64: each weight kept with probability 1/2
  for (int64_t i = 0; i < out * words; ++i) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    bits[i] = z ^ (z >> 31);
  }
  for (int64_t r = 0; r < out; ++r) {
    int64_t n = 0;
    for (int64_t w = 0; w < words; ++w) n += __builtin_popcountll(bits[r * words + w]);
    values.resize(values.size() + n, 0.5f);
    rowptr.push_back(static_cast<int64_t>(values.size()));
  }
  values.resize(values.size() + PAD, 0.0f);
  const Problem P{x.data(), 1, words * 64, bits.data(), words, values.data(), rowptr.data(),
                  y.data(), out};
  double loads = 1e30, moves = 1e30;
  for (int k = 0; k < 7; ++k) {
    loads = std::min(loads, seconds_of(P, false));
    moves = std::min(moves, seconds_of(P, true));
  }
  return moves < loads ? 1 : 0;
}
#endif

// Decided on first use: the forced mode, else the measured one (0 where AVX-512 is missing).
int masks_mode() {
  int mode = masks.load();
  if (mode >= 0) return mode;
  const char* asked = std::getenv("SPARSEBENCH_EXPAND_MASKS");
  const std::string a = asked ? asked : "";
  TORCH_CHECK(a.empty() || a == "auto" || a == "loads" || a == "moves",
              "SPARSEBENCH_EXPAND_MASKS=", a, " is not one of auto, loads, moves");
  mode = a == "moves" ? 1 : 0;
#if SB_X86
  if ((a.empty() || a == "auto") && sparsebench_cpu::supported(3)) mode = measured_masks();
#endif
  masks.store(mode);
  return mode;
}

// -1: the mode (deciding it first if not yet); 0 or 1: set it (tests); 2: decide again now.
int64_t bitmask_masks(int64_t set) {
  TORCH_CHECK(set >= -1 && set <= 2, "bitmask_masks: ", set, " is not -1, 0, 1 or 2");
  if (set == 0 || set == 1) masks.store(static_cast<int>(set));
  if (set == 2) masks.store(-1);
  return masks_mode();
}

at::Tensor bitmask_linear(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& values,
                          const at::Tensor& rowptr, int64_t in_features, int64_t path) {
  path = sparsebench_cpu::checked_path(path, "bitmask_linear");
  sparsebench_cpu::check_input(x, in_features, "bitmask_linear");
  TORCH_CHECK(bits.scalar_type() == at::kLong && bits.dim() == 2 && bits.is_contiguous(),
              "bitmask_linear: bits must be a contiguous int64 (out, words) tensor");
  TORCH_CHECK(rowptr.scalar_type() == at::kLong && rowptr.is_contiguous() &&
                  rowptr.numel() == bits.size(0) + 1,
              "bitmask_linear: rowptr must be int64 of out + 1");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
              "bitmask_linear: values must be float32 or bfloat16");
  const int64_t words = bits.size(1), out = bits.size(0), tokens = x.size(0);
  TORCH_CHECK(words == (in_features + 63) / 64, "bitmask_linear: ", words,
              " mask words per row for ", in_features, " columns");
  TORCH_CHECK(values.is_contiguous() && values.numel() >= rowptr.data_ptr<int64_t>()[out] + PAD,
              "bitmask_linear: values must hold nnz + ", PAD, " entries");
  // x padded with zeros to whole mask words: a vector load never leaves a row of x
  at::Tensor xp = x.contiguous();
  if (in_features % 64) {
    xp = at::zeros({tokens, words * 64}, x.options());
    xp.narrow(1, 0, in_features).copy_(x);
  }
  at::Tensor y = at::empty({tokens, out}, x.options());
  const bool moves = path == 3 && tokens == 1 && masks_mode() == 1;
  const Problem P{xp.data_ptr<float>(), tokens, xp.size(1),
                  reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>()), words,
                  values.data_ptr(), rowptr.data_ptr<int64_t>(), y.data_ptr<float>(), out};
  sparsebench_cpu::over_rows(out, GRAIN, values.scalar_type() == at::kBFloat16,
                             [&](auto v, int64_t r0, int64_t r1) {
                               rows<decltype(v)>(P, path, moves, r0, r1);
                             });
  calls[path].fetch_add(1, std::memory_order_relaxed);
  return y;
}

int64_t bitmask_calls(int64_t path) {
  TORCH_CHECK(path >= 1 && path <= 3, "bitmask_calls: path ", path, " is not 1-3");
  return calls[path].load();
}

bool bitmask_supported(int64_t path) { return supported(path); }

}  // namespace

TORCH_LIBRARY(sparsebench, m) {
  m.def("bitmask_linear(Tensor x, Tensor bits, Tensor values, Tensor rowptr, int in_features, "
        "int path) -> Tensor",
        &bitmask_linear);
  m.def("bitmask_calls(int path) -> int", &bitmask_calls);
  m.def("bitmask_supported(int path) -> bool", &bitmask_supported);
  m.def("bitmask_best_path() -> int", &best_path);
  m.def("bitmask_masks(int set) -> int", &bitmask_masks);
}
