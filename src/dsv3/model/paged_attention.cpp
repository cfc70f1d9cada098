// Absorbed MLA decode attention over a paged latent cache, one sequence's queries at a time.
// What it computes, and why, is told in paged_attention.py; cpu_kernels.py builds this file.
//
// For sequence b, its T x H queries (q_lat ; q_pe) attend to the positions s <= start_pos[b] + t
// held in its blocks (table[b, s / bs], row s % bs of the kv and pe pools):
//   scores[s][j] = (kv[s] . q_lat[j] + pe[s] . q_pe[j]) * scale      (FP32)
//   p[s][j]      = softmax over s, rounded to the cache dtype
//   out[j]       = sum_s p[s][j] kv[s]                                (FP32, rounded)
// The queries of a group of 16 are packed like a panel-GEMM weight ([K/2][16][2] BF16, [K][16]
// FP32), so each cache row is read once and scored against 16 queries in FP32 lanes, with no
// horizontal sum; the softmax runs on those 16 lanes; the weighted sum broadcasts p[s][j] against
// 16 columns of the row.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_vectors.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t LANES = 16;  // queries of a group, columns of an output chunk
constexpr int ROWS = 16;       // most cache rows scored together (independent accumulator chains)
constexpr int QUERIES = 8;     // queries accumulated together in the weighted sum
constexpr int64_t FEW_HEADS = 8;  // heads up to which BF16 queries take `attend_few`'s layout

using namespace dsv3_cpu;

// 16 consecutive values as FP32
inline f32x16 widen(const float* p) { return load<f32x16>(p); }
inline f32x16 widen(const c10::BFloat16* p) {
  return (f32x16)(__builtin_convertvector(load<u16x16>(p), u32x16) << 16);
}

// e^x on 16 lanes for x <= 0 (scores minus their maximum): x = n ln2 + r, |r| <= ln2 / 2,
// e^r by its degree-6 Taylor polynomial (relative error < 2e-7), 2^n by the exponent bits
inline f32x16 exp_nonpositive(f32x16 x) {
  x = x < -87.0f ? -87.0f : x;  // below, e^x underflows FP32's normal range; those lanes round to 0 later
  const f32x16 magic = f32x16{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const f32x16 n = (x * 1.44269504088896341f + magic) - magic;
  const f32x16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts
  f32x16 p = f32x16{} + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
  return p * (f32x16)bits;
}

// scores of ROWS_ cache rows against 16 packed queries: out[i][j] (unscaled); `half`: only the
// first 8 queries are real (BF16 with AVX512-BF16 then scores them on 8 lanes, half the work)
template <int ROWS_>
inline void score_rows(const float* kv, int64_t r, const float* pe, int64_t dr, const float* q, float* out, bool) {
  f32x16 acc[ROWS_] = {};
  for (int64_t k = 0; k < r; ++k) {
    const f32x16 w = load<f32x16>(q + k * LANES);
    for (int i = 0; i < ROWS_; ++i) acc[i] += kv[i * r + k] * w;
  }
  for (int64_t k = 0; k < dr; ++k) {
    const f32x16 w = load<f32x16>(q + (r + k) * LANES);
    for (int i = 0; i < ROWS_; ++i) acc[i] += pe[i * dr + k] * w;
  }
  for (int i = 0; i < ROWS_; ++i) std::memcpy(out + i * LANES, &acc[i], sizeof(f32x16));
}

#if defined(__AVX512BF16__)
template <int ROWS_>
inline void score_rows_half(const uint32_t* kv, int64_t rk, const uint32_t* pe, int64_t dk, const uint32_t* q,
                            float* out) {
  __m256 acc[ROWS_];
  for (int i = 0; i < ROWS_; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < rk; ++k) {
    const __m256bh w = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k * LANES));
    for (int i = 0; i < ROWS_; ++i) acc[i] = _mm256_dpbf16_ps(acc[i], (__m256bh)_mm256_set1_epi32(kv[i * rk + k]), w);
  }
  for (int64_t k = 0; k < dk; ++k) {
    const __m256bh w = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (rk + k) * LANES));
    for (int i = 0; i < ROWS_; ++i) acc[i] = _mm256_dpbf16_ps(acc[i], (__m256bh)_mm256_set1_epi32(pe[i * dk + k]), w);
  }
  for (int i = 0; i < ROWS_; ++i) _mm256_storeu_ps(out + i * LANES, acc[i]);  // lanes 8-15 stay 0
}
#endif

template <int ROWS_>
inline void score_rows(const c10::BFloat16* kv16, int64_t r, const c10::BFloat16* pe16, int64_t dr,
                       const c10::BFloat16* q16, float* out, bool half) {
  // in pairs: row i's inputs 2k, 2k + 1 as one uint32; the queries' as [K/2][16][2]
  const uint32_t* kv = reinterpret_cast<const uint32_t*>(kv16);
  const uint32_t* pe = reinterpret_cast<const uint32_t*>(pe16);
  const uint32_t* q = reinterpret_cast<const uint32_t*>(q16);
  const int64_t rk = r / 2, dk = dr / 2;
#if defined(__AVX512BF16__)
  if (half) return score_rows_half<ROWS_>(kv, rk, pe, dk, q, out);
  __m512 acc[ROWS_];
  for (int i = 0; i < ROWS_; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < rk; ++k) {
    const __m512bh w = (__m512bh)_mm512_loadu_si512(q + k * LANES);
    for (int i = 0; i < ROWS_; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(kv[i * rk + k]), w);
  }
  for (int64_t k = 0; k < dk; ++k) {
    const __m512bh w = (__m512bh)_mm512_loadu_si512(q + (rk + k) * LANES);
    for (int i = 0; i < ROWS_; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(pe[i * dk + k]), w);
  }
  for (int i = 0; i < ROWS_; ++i) _mm512_storeu_ps(out + i * LANES, acc[i]);
#else
  f32x16 acc[ROWS_] = {};
  auto step = [&](const uint32_t* rows, int64_t ld, int64_t k, const uint32_t* qk) {
    const u32x16 pairs = load<u32x16>(qk);
    const f32x16 even = (f32x16)(pairs << 16), odd = (f32x16)(pairs & 0xFFFF0000u);
    for (int i = 0; i < ROWS_; ++i) {
      const uint32_t x = rows[i * ld + k];
      acc[i] += bits_to_float(x << 16) * even + bits_to_float(x & 0xFFFF0000u) * odd;
    }
  };
  for (int64_t k = 0; k < rk; ++k) step(kv, rk, k, q + k * LANES);
  for (int64_t k = 0; k < dk; ++k) step(pe, dk, k, q + (rk + k) * LANES);
  for (int i = 0; i < ROWS_; ++i) std::memcpy(out + i * LANES, &acc[i], sizeof(f32x16));
#endif
}

// acc[j][c .. c + 16 * NC) = sum over the n positions s of p[s][j0 + j] kv[s][c ..], for QN queries
template <typename T, int QN, int NC>
inline void weighted_columns(const T* kv, const int64_t* blocks, int64_t bs, int64_t r, int64_t n, const float* p,
                             int j0, int64_t c, float* acc_out) {
  f32x16 acc[QN][NC] = {};
  for (int64_t s0 = 0; s0 < n; s0 += bs) {
    const T* block = kv + blocks[s0 / bs] * bs * r + c;
    const int64_t rows = std::min(bs, n - s0);
    for (int64_t i = 0; i < rows; ++i) {
      f32x16 v[NC];
      for (int h = 0; h < NC; ++h) v[h] = widen(block + i * r + h * LANES);
      const float* ps = p + (s0 + i) * LANES + j0;
      for (int j = 0; j < QN; ++j)
        for (int h = 0; h < NC; ++h) acc[j][h] += ps[j] * v[h];
    }
  }
  for (int j = 0; j < QN; ++j)
    for (int h = 0; h < NC; ++h) std::memcpy(acc_out + j * r + c + h * LANES, &acc[j][h], sizeof(f32x16));
}

// the weighted sum for qn <= QUERIES queries starting at j0, all r columns, into acc [qn][r]
template <typename T>
void weighted(int qn, const T* kv, const int64_t* blocks, int64_t bs, int64_t r, int64_t n, const float* p, int j0,
              float* acc) {
  for (int64_t c = 0; c < r; c += 2 * LANES) {
    const bool two = c + 2 * LANES <= r;
#define DSV3_WEIGHTED(Q)                                                              \
  case Q:                                                                             \
    if (two)                                                                          \
      weighted_columns<T, Q, 2>(kv, blocks, bs, r, n, p, j0, c, acc);                 \
    else                                                                              \
      weighted_columns<T, Q, 1>(kv, blocks, bs, r, n, p, j0, c, acc);                 \
    break;
    switch (qn) { DSV3_WEIGHTED(1) DSV3_WEIGHTED(2) DSV3_WEIGHTED(3) DSV3_WEIGHTED(4) DSV3_WEIGHTED(5)
                  DSV3_WEIGHTED(6) DSV3_WEIGHTED(7) DSV3_WEIGHTED(8) }
#undef DSV3_WEIGHTED
  }
}

#if defined(__AVX512BF16__)
// A model with few heads (at most 8) would leave most of the 16 query lanes of `attend` empty at
// one token per sequence, so it takes another layout, in groups of at most 8 queries: each cache
// row is scored against one query at a time along the row's r + dr values (32 BF16 per
// dot-product instruction, 16 rows summed across lanes at once by a transpose tree), and the
// weighted sum takes two rows at a time, their values interleaved as BF16 pairs (row s, row s + 1)
// against each query's pair of probabilities. Same products, FP32 sums in another order, about a
// third of the instructions per row. The layout follows the heads, never the step's tokens, so a
// token gets the same bits alone and in MTP's verify (paged_attention.py says why that matters).

// 32 BF16 values from p, zeros past the first `len` (<= 32)
inline __m512i load32(const uint16_t* p, int64_t len) {
  return _mm512_maskz_loadu_epi16(len >= 32 ? ~__mmask32(0) : (__mmask32(1) << len) - 1, p);
}

// lane i = the sum of v[i]'s 16 lanes
inline __m512 transpose_sum(const __m512 v[16]) {
  __m512 a[8], b[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: x0+x2, y0+y2, x1+x3, y1+y3
    a[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k)  // per 128-bit lane: the lane's sums of v[4k .. 4k + 3]
    b[k] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * k], a[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(a[2 * k], a[2 * k + 1], 0xEE));
  const __m512 d01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x44), _mm512_shuffle_f32x4(b[0], b[1], 0xEE));
  const __m512 d23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x44), _mm512_shuffle_f32x4(b[2], b[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d01, d23, 0x88), _mm512_shuffle_f32x4(d01, d23, 0xDD));
}

// acc[i] += rows[i][0 .. len) . q[0 .. len), 16 rows, in chunks of 32
inline void dot_rows(__m512 acc[16], const uint16_t* const* rows, int64_t offset, const uint16_t* q, int64_t len) {
  for (int64_t c = 0; c < len; c += 32) {
    const __m512bh qv = (__m512bh)load32(q + c, len - c);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)load32(rows[i] + offset + c, len - c), qv);
  }
}

// out_j[c] = sum_s p_j[s] row_s[c] over n positions (rows[s], pairs[j][s / 2]: (p_j[s], p_j[s + 1])
// as BF16), for JN queries, all r columns, rounded to BF16 into out + j * r
template <int JN>
void weighted_pairs(const uint16_t* const* rows, int64_t n, int64_t r, const uint32_t* pairs, int64_t pairs_ld,
                    c10::BFloat16* out) {
  for (int64_t c = 0; c < r; c += 32) {
    __m512 lo[JN], hi[JN];
#pragma GCC unroll 8
    for (int j = 0; j < JN; ++j) lo[j] = hi[j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s += 2) {
      const __m512i a = load32(rows[s] + c, r - c), b = load32(rows[s + 1] + c, r - c);
      const __m512bh l = (__m512bh)_mm512_unpacklo_epi16(a, b), h = (__m512bh)_mm512_unpackhi_epi16(a, b);
#pragma GCC unroll 8
      for (int j = 0; j < JN; ++j) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(pairs[j * pairs_ld + s / 2]);
        lo[j] = _mm512_dpbf16_ps(lo[j], l, w);
        hi[j] = _mm512_dpbf16_ps(hi[j], h, w);
      }
    }
    // lane k of lo holds column 8 (k / 4) + k % 4 of the chunk, of hi column 8 (k / 4) + 4 + k % 4
    const int64_t cols = std::min<int64_t>(32, r - c);
#pragma GCC unroll 8
    for (int j = 0; j < JN; ++j) {
      alignas(64) float l[16], h[16];
      _mm512_store_ps(l, lo[j]);
      _mm512_store_ps(h, hi[j]);
      for (int k = 0; k < 16; ++k) {
        const int64_t col = 8 * (k / 4) + k % 4;
        if (col < cols) out[j * r + c + col] = c10::BFloat16(l[k]);
        if (col + 4 < cols) out[j * r + c + col + 4] = c10::BFloat16(h[k]);
      }
    }
  }
}

void attend_few(const c10::BFloat16* q16, const c10::BFloat16* q_pe16, int64_t r, int64_t dr, int64_t heads,
                int64_t j_first, int jn, const c10::BFloat16* kv16, const c10::BFloat16* pe16, int64_t bs,
                const int64_t* blocks, int64_t start, int64_t positions, float scale, c10::BFloat16* out) {
  const auto* q = reinterpret_cast<const uint16_t*>(q16);
  const auto* q_pe = reinterpret_cast<const uint16_t*>(q_pe16);
  const auto* kv = reinterpret_cast<const uint16_t*>(kv16);
  const auto* pe = reinterpret_cast<const uint16_t*>(pe16);
  int64_t last[8];  // query j (t = (j_first + j) / heads) sees positions s <= start + t
  for (int j = 0; j < jn; ++j) last[j] = std::min(start + (j_first + j) / heads, positions - 1);
  const int64_t n = *std::max_element(last, last + jn) + 1, padded = (n + 15) / 16 * 16;
  // each position's rows; positions past n read a row of zeros (scored 0, weighted 0)
  const std::vector<uint16_t> zeros(std::max(r, dr) + 32, 0);
  std::vector<const uint16_t*> kv_rows(padded, zeros.data()), pe_rows(padded, zeros.data());
  for (int64_t s0 = 0; s0 < n; s0 += bs)
    for (int64_t s = s0, row = blocks[s0 / bs] * bs; s < std::min(s0 + bs, n); ++s, ++row) {
      kv_rows[s] = kv + row * r;
      pe_rows[s] = pe + row * dr;
    }
  // scores, query-major: p[j * padded + s]; 16 rows at a time are scored against every query
  // while they are in cache, and the next 16 are fetched meanwhile
  std::vector<float> p(jn * padded);
  for (int64_t s0 = 0; s0 < n; s0 += 16) {
    for (int64_t s = s0 + 16; s < std::min(s0 + 32, n); ++s) {
      for (int64_t b = 0; b < r * 2; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(kv_rows[s]) + b);
      for (int64_t b = 0; b < dr * 2; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(pe_rows[s]) + b);
    }
    for (int j = 0; j < jn; ++j) {
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      dot_rows(acc, kv_rows.data() + s0, 0, q + (j_first + j) * r, r);
      dot_rows(acc, pe_rows.data() + s0, 0, q_pe + (j_first + j) * dr, dr);
      _mm512_storeu_ps(&p[j * padded + s0], _mm512_mul_ps(transpose_sum(acc), _mm512_set1_ps(scale)));
    }
  }
  // softmax of each query over its positions, rounded to BF16, then as (s, s + 1) pairs
  const int64_t half = padded / 2;
  std::vector<uint32_t> pairs(jn * half);
  for (int j = 0; j < jn; ++j) {
    float* pj = &p[j * padded];
    const int64_t seen = last[j] + 1;
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    f32x16 tops = f32x16{} - std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < seen; s += 16) {
      const f32x16 x = load<f32x16>(pj + s);
      tops = lane + (int32_t)s < (int32_t)seen && x > tops ? x : tops;
    }
    float top = tops[0];
    for (int k = 1; k < 16; ++k) top = std::max(top, tops[k]);
    f32x16 sum = {};
    for (int64_t s = 0; s < padded; s += 16) {
      f32x16 e = exp_nonpositive(load<f32x16>(pj + s) - top);
      e = lane + (int32_t)s < (int32_t)seen ? e : f32x16{};
      sum += e;
      std::memcpy(pj + s, &e, sizeof(f32x16));
    }
    float total = 0;
    for (int k = 0; k < 16; ++k) total += sum[k];
    for (int64_t s = 0; s < padded; s += 16) {
      const u32x16 bits = (u32x16)(load<f32x16>(pj + s) / total);  // rounded to BF16, as torch rounds
      std::memcpy(pj + s, &bits, sizeof(u32x16));
    }
    const uint32_t* b = reinterpret_cast<const uint32_t*>(pj);
    for (int64_t t = 0; t < half; ++t) {
      const uint32_t even = b[2 * t] + 0x7FFFu + ((b[2 * t] >> 16) & 1u), odd = b[2 * t + 1] + 0x7FFFu + ((b[2 * t + 1] >> 16) & 1u);
      pairs[j * half + t] = (even >> 16) | (odd & 0xFFFF0000u);
    }
  }
  c10::BFloat16* o = out + j_first * r;
  switch (jn) {
#define DSV3_PAIRS(JN) \
  case JN: weighted_pairs<JN>(kv_rows.data(), n, r, pairs.data(), half, o); break;
    DSV3_PAIRS(1) DSV3_PAIRS(2) DSV3_PAIRS(3) DSV3_PAIRS(4) DSV3_PAIRS(5) DSV3_PAIRS(6) DSV3_PAIRS(7) DSV3_PAIRS(8)
#undef DSV3_PAIRS
  }
}
#endif

// Whether queries of this dtype, with this many heads, take `attend_few`'s layout (groups of 8).
template <typename T>
constexpr bool takes_few(int64_t heads) {
#if defined(__AVX512BF16__)
  return std::is_same_v<T, c10::BFloat16> && heads <= FEW_HEADS;
#else
  return false;
#endif
}

// One sequence's queries [jn of a group starting at query j_first] over its cache.
template <typename T>
void attend(const T* q, const T* q_pe, int64_t r, int64_t dr, int64_t heads, int64_t j_first, int jn,
            const T* kv, const T* pe, int64_t bs, const int64_t* blocks, int64_t start, int64_t positions, float scale,
            T* out) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    if (takes_few<T>(heads))
      return attend_few(q, q_pe, r, dr, heads, j_first, jn, kv, pe, bs, blocks, start, positions, scale, out);
#endif
  // the group's queries packed as a panel: [K/2][16][2] (BF16) or [K][16] (FP32), K = r + dr
  const int64_t K = r + dr;
  const bool pairs = std::is_same_v<T, c10::BFloat16>;
  std::vector<T> packed(K * LANES, T(0.0f));
  for (int j = 0; j < jn; ++j)
    for (int64_t k = 0; k < K; ++k) {
      const T v = k < r ? q[(j_first + j) * r + k] : q_pe[(j_first + j) * dr + k - r];
      packed[pairs ? ((k / 2) * LANES + j) * 2 + k % 2 : k * LANES + j] = v;
    }
  // query j (t = (j_first + j) / heads) sees positions s <= start + t
  int64_t last[LANES];
  for (int j = 0; j < LANES; ++j) last[j] = j < jn ? std::min(start + (j_first + j) / heads, positions - 1) : -1;
  const int64_t n = *std::max_element(last, last + LANES) + 1;

  std::vector<float> p(n * LANES);  // zeros: lanes past the queries stay 0
  const bool half = jn <= LANES / 2;
  for (int64_t s0 = 0; s0 < n; s0 += bs) {  // one block: rows s0 .. s0 + bs
    const int64_t block = blocks[s0 / bs];
    const T* kvb = kv + block * bs * r;
    const T* peb = pe + block * bs * dr;
    const int64_t rows = std::min(bs, n - s0);
    if (s0 + bs < n) {  // the rows are read across, 16 at once: fetch the next block ahead
      const char* next_kv = reinterpret_cast<const char*>(kv + blocks[s0 / bs + 1] * bs * r);
      const char* next_pe = reinterpret_cast<const char*>(pe + blocks[s0 / bs + 1] * bs * dr);
      for (int64_t b = 0; b < (int64_t)(bs * r * sizeof(T)); b += 64) __builtin_prefetch(next_kv + b);
      for (int64_t b = 0; b < (int64_t)(bs * dr * sizeof(T)); b += 64) __builtin_prefetch(next_pe + b);
    }
    for (int64_t i = 0; i < rows;) {  // pieces of 16, 8, 4, 2, 1 rows
      const int64_t piece = std::min<int64_t>(ROWS, int64_t(1) << (63 - __builtin_clzll(rows - i)));
      const T *kvr = kvb + i * r, *per = peb + i * dr;
      float* dst = p.data() + (s0 + i) * LANES;
      switch (piece) {
        case 1: score_rows<1>(kvr, r, per, dr, packed.data(), dst, half); break;
        case 2: score_rows<2>(kvr, r, per, dr, packed.data(), dst, half); break;
        case 4: score_rows<4>(kvr, r, per, dr, packed.data(), dst, half); break;
        case 8: score_rows<8>(kvr, r, per, dr, packed.data(), dst, half); break;
        default: score_rows<16>(kvr, r, per, dr, packed.data(), dst, half); break;
      }
      i += piece;
    }
  }
  // softmax over s on the 16 lanes; positions a query may not see weigh exactly 0
  i32x16 lastv;
  for (int j = 0; j < LANES; ++j) lastv[j] = (int32_t)last[j];
  f32x16 top = f32x16{} - std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < n; ++s) {
    const f32x16 x = load<f32x16>(&p[s * LANES]) * scale;
    top = (i32x16{} + (int32_t)s) <= lastv ? (x > top ? x : top) : top;
    std::memcpy(&p[s * LANES], &x, sizeof(f32x16));
  }
  top = top == -std::numeric_limits<float>::infinity() ? f32x16{} : top;  // lanes with no query
  f32x16 sum = {};
  for (int64_t s = 0; s < n; ++s) {
    f32x16 e = exp_nonpositive(load<f32x16>(&p[s * LANES]) - top);
    e = (i32x16{} + (int32_t)s) <= lastv ? e : f32x16{};
    sum += e;
    std::memcpy(&p[s * LANES], &e, sizeof(f32x16));
  }
  sum = sum == 0.0f ? 1.0f : sum;
  for (int64_t s = 0; s < n; ++s) {
    f32x16 x = load<f32x16>(&p[s * LANES]) / sum;
    if constexpr (pairs) {  // rounded to BF16 (to nearest even) as torch rounds the probabilities
      const u32x16 bits = (u32x16)x;
      x = (f32x16)((bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u);
    }
    std::memcpy(&p[s * LANES], &x, sizeof(f32x16));
  }
  // out[j] = sum_s p[s][j] kv[s], in FP32
  std::vector<float> acc(QUERIES * r);
  for (int j = 0; j < jn; j += QUERIES) {
    const int qn = std::min(QUERIES, jn - j);
    weighted<T>(qn, kv, blocks, bs, r, n, p.data(), j, acc.data());
    for (int jj = 0; jj < qn; ++jj)
      for (int64_t c = 0; c < r; ++c) out[(j_first + j + jj) * r + c] = T(acc[jj * r + c]);
  }
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& q_pe, const at::Tensor& kv, const at::Tensor& pe,
         const at::Tensor& table, const at::Tensor& start_pos, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), T_ = q.size(1), H = q.size(2), r = q.size(3), dr = q_pe.size(3);
  const int64_t bs = kv.size(1), width = table.size(1), queries = T_ * H;
  const int64_t group = takes_few<T>(H) ? FEW_HEADS : LANES, groups = (queries + group - 1) / group;
  const T* qp = q.const_data_ptr<T>();
  const T* qpe = q_pe.const_data_ptr<T>();
  const T* kvp = kv.const_data_ptr<T>();
  const T* pep = pe.const_data_ptr<T>();
  const int64_t* tab = table.const_data_ptr<int64_t>();
  const int64_t* starts = start_pos.const_data_ptr<int64_t>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, B * groups, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / groups, g = t % groups;
      const int jn = (int)std::min(group, queries - g * group);
      attend<T>(qp + b * queries * r, qpe + b * queries * dr, r, dr, H, g * group, jn, kvp, pep, bs,
                tab + b * width, starts[b], width * bs, (float)scale, o + b * queries * r);
    }
  });
}

}  // namespace

// q [B, T, H, r], q_pe [B, T, H, dr], kv [blocks, bs, r], pe [blocks, bs, dr], table [B, W] int64,
// start_pos [B] int64 -> [B, T, H, r] in q's dtype
at::Tensor paged_decode(const at::Tensor& q_in, const at::Tensor& q_pe_in, const at::Tensor& kv, const at::Tensor& pe,
                        const at::Tensor& table, const at::Tensor& start_pos, double scale) {
  const at::Tensor q = q_in.contiguous(), q_pe = q_pe_in.contiguous();
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "paged_decode: q must be float32 or bfloat16, not ", dtype);
  TORCH_CHECK(q_pe.scalar_type() == dtype && kv.scalar_type() == dtype && pe.scalar_type() == dtype,
              "paged_decode: q, q_pe, kv and pe must share one dtype");
  TORCH_CHECK(q.dim() == 4 && q_pe.dim() == 4 && q_pe.sizes().slice(0, 3) == q.sizes().slice(0, 3),
              "paged_decode: q [B, T, H, r] and q_pe [B, T, H, dr] expected, got ", q.sizes(), " and ", q_pe.sizes());
  TORCH_CHECK(kv.dim() == 3 && pe.dim() == 3 && kv.is_contiguous() && pe.is_contiguous() &&
                  kv.size(0) == pe.size(0) && kv.size(1) == pe.size(1) && kv.size(2) == q.size(3) &&
                  pe.size(2) == q_pe.size(3),
              "paged_decode: kv [blocks, bs, r] and pe [blocks, bs, dr] (contiguous) expected, got ", kv.sizes(),
              " and ", pe.sizes());
  TORCH_CHECK(q.size(3) % LANES == 0 && (dtype == at::kFloat || q_pe.size(3) % 2 == 0),
              "paged_decode: r must be a multiple of 16 (and dr even for bfloat16), got ", q.size(3), ", ",
              q_pe.size(3));
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.size(0) == q.size(0) &&
                  table.is_contiguous() && start_pos.scalar_type() == at::kLong && start_pos.dim() == 1 &&
                  start_pos.size(0) == q.size(0) && start_pos.is_contiguous(),
              "paged_decode: table [B, W] and start_pos [B] int64 expected");
  const int64_t* tab = table.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < table.numel(); ++i)
    TORCH_CHECK(0 <= tab[i] && tab[i] < kv.size(0), "paged_decode: block ", tab[i], " is not in the pool of ",
                kv.size(0));
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (dtype == at::kBFloat16)
    run<c10::BFloat16>(q, q_pe, kv, pe, table, start_pos, scale, out);
  else
    run<float>(q, q_pe, kv, pe, table, start_pos, scale, out);
  return out;
}

TORCH_LIBRARY(dsv3_mla, m) {
  m.def("paged_decode(Tensor q, Tensor q_pe, Tensor kv, Tensor pe, Tensor table, Tensor start_pos, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv3_mla, CPU, m) { m.impl("paged_decode", &paged_decode); }
