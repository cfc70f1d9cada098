// GEMMs of a few rows on weights packed in 16-column panels, and the routed experts built on them.
// What each function computes, and why, is told in panel_gemm.py, which builds this file.
//
// A weight W [N, K] is packed as ceil(N/16) panels of 16 output columns, each panel contiguous:
//   BF16: [K/2][16][2]  (lane j holds W[16p + j, 2k] and W[16p + j, 2k + 1])
//   FP32: [K][16]
// so one 64-byte load gives 16 columns' next inputs, and a row's products accumulate in 16 FP32
// lanes with no horizontal sum. A tile keeps R rows x NP panels of accumulators in registers and
// reads each weight byte once for its R rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_vectors.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t LANES = 16;  // output columns of a panel
constexpr int MAX_ROWS = 4;    // rows of a tile
constexpr int MAX_PANELS = 4;  // panels of a tile
// the least work worth a thread of its own, in weight bytes read per tile of rows: waking a thread
// and joining it costs about what reading 256 KB does, so smaller GEMMs stay on the calling thread
// (tiny preset, decode step at batch 1, two threads: 0.38-0.41 -> 0.32 ms; one thread 0.35)
constexpr int64_t MIN_THREAD_BYTES = int64_t(1) << 18;

using namespace dsv3_cpu;

// y[r, 16p + j] = sum_k x[r, k] W[16p + j, k]; BF16: x as K/2 pairs of BF16 (uint32), kk = K/2
template <int R, int NP>
inline void tile_bf16(const uint32_t* x, int64_t ldx, const uint32_t* w, int64_t kk, float* y, int64_t ldy) {
  const int64_t panel = kk * LANES;
#if defined(__AVX512BF16__)
  __m512 acc[R][NP];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kk; ++k) {
    __m512i wv[NP];
    for (int p = 0; p < NP; ++p) wv[p] = _mm512_loadu_si512(w + p * panel + k * LANES);
    for (int r = 0; r < R; ++r) {
      __m512bh xr = (__m512bh)_mm512_set1_epi32(x[r * ldx + k]);
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], xr, (__m512bh)wv[p]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(y + r * ldy + p * LANES, acc[r][p]);
#else  // a BF16 value is the top half of an FP32 one: widen by shifting, multiply in FP32
  f32x16 acc[R][NP] = {};
  for (int64_t k = 0; k < kk; ++k) {
    f32x16 even[NP], odd[NP];
    for (int p = 0; p < NP; ++p) {
      u32x16 pairs = load<u32x16>(w + p * panel + k * LANES);
      even[p] = (f32x16)(pairs << 16);
      odd[p] = (f32x16)(pairs & 0xFFFF0000u);
    }
    for (int r = 0; r < R; ++r) {
      uint32_t xr = x[r * ldx + k];
      float xe = bits_to_float(xr << 16), xo = bits_to_float(xr & 0xFFFF0000u);
      for (int p = 0; p < NP; ++p) acc[r][p] += xe * even[p] + xo * odd[p];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < NP; ++p) std::memcpy(y + r * ldy + p * LANES, &acc[r][p], sizeof(f32x16));
#endif
}

template <int R, int NP>
inline void tile_f32(const float* x, int64_t ldx, const float* w, int64_t kk, float* y, int64_t ldy) {
  const int64_t panel = kk * LANES;
  f32x16 acc[R][NP] = {};
  for (int64_t k = 0; k < kk; ++k) {
    f32x16 wv[NP];
    for (int p = 0; p < NP; ++p) wv[p] = load<f32x16>(w + p * panel + k * LANES);
    for (int r = 0; r < R; ++r) {
      float xr = x[r * ldx + k];
      for (int p = 0; p < NP; ++p) acc[r][p] += xr * wv[p];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < NP; ++p) std::memcpy(y + r * ldy + p * LANES, &acc[r][p], sizeof(f32x16));
}

template <int NP, typename T>
void tile(int rows, const T* x, int64_t ldx, const T* w, int64_t kk, float* y, int64_t ldy) {
#define DSV3_TILE(R)                                                   \
  case R:                                                              \
    if constexpr (std::is_same_v<T, uint32_t>)                         \
      tile_bf16<R, NP>(x, ldx, w, kk, y, ldy);                         \
    else                                                               \
      tile_f32<R, NP>(x, ldx, w, kk, y, ldy);                          \
    return;
  switch (rows) { DSV3_TILE(1) DSV3_TILE(2) DSV3_TILE(3) DSV3_TILE(4) }
#undef DSV3_TILE
}

// Where a GEMM's result goes: row-major [rows, n] with row stride ld, FP32 or BF16 (rounded to
// nearest even, as torch rounds)
struct Out {
  void* data;
  int64_t ld, n;
  bool bf16;

  // rows [m, m + r) of columns [16 p, 16 (p + np)) from a tile's buffer [r][MAX_PANELS * 16]
  void store(int64_t m, int r, int64_t p, int64_t np, const float* buf) const {
    const int64_t c0 = p * LANES, cols = std::min(np * LANES, n - c0);
    for (int rr = 0; rr < r; ++rr) {
      const float* src = buf + rr * MAX_PANELS * LANES;
      if (bf16) {
        c10::BFloat16* dst = static_cast<c10::BFloat16*>(data) + (m + rr) * ld + c0;
        for (int64_t c = 0; c < cols; ++c) dst[c] = c10::BFloat16(src[c]);
      } else {
        std::memcpy(static_cast<float*>(data) + (m + rr) * ld + c0, src, cols * sizeof(float));
      }
    }
  }
};

// out rows [0, rows) over panels [p0, p1) of the packed w: each group of MAX_PANELS panels is read
// from memory once, for the first MAX_ROWS rows (then from cache)
template <typename T>
void gemm_panels(const T* x, int64_t ldx, int64_t rows, const T* w, int64_t kk, int64_t p0, int64_t p1, const Out& out,
                 int64_t m0) {
  const int64_t panel = kk * LANES;
  float buf[MAX_ROWS * MAX_PANELS * LANES];
  for (int64_t p = p0; p < p1; p += MAX_PANELS) {
    const int64_t np = std::min<int64_t>(MAX_PANELS, p1 - p);
    for (int64_t m = 0; m < rows; m += MAX_ROWS) {
      const int r = (int)std::min<int64_t>(MAX_ROWS, rows - m);
      const T* xm = x + m * ldx;
      const T* wp = w + p * panel;
      switch (np) {
        case 1: tile<1>(r, xm, ldx, wp, kk, buf, MAX_PANELS * LANES); break;
        case 2: tile<2>(r, xm, ldx, wp, kk, buf, MAX_PANELS * LANES); break;
        case 3: tile<3>(r, xm, ldx, wp, kk, buf, MAX_PANELS * LANES); break;
        default: tile<4>(r, xm, ldx, wp, kk, buf, MAX_PANELS * LANES); break;
      }
      out.store(m0 + m, r, p, np, buf);
    }
  }
}

// Rows [m0, m0 + rows) of x (rows `ld` elements apart, from `x`) times panels [p0, p1) of one packed
// weight (kk K-wise steps)
void gemm_rows(const void* x, int64_t ld, bool bf16, int64_t m0, int64_t rows, const void* w, int64_t kk, int64_t p0,
               int64_t p1, const Out& out) {
  if (bf16) {
    const int64_t ldx = ld / 2;
    gemm_panels<uint32_t>(static_cast<const uint32_t*>(x) + m0 * ldx, ldx, rows, static_cast<const uint32_t*>(w), kk,
                          p0, p1, out, m0);
  } else {
    gemm_panels<float>(static_cast<const float*>(x) + m0 * ld, ld, rows, static_cast<const float*>(w), kk, p0, p1, out,
                       m0);
  }
}

// Rows [m0, m0 + rows) of x [M, K] times panels [p0, p1) of one packed weight
void gemm_block(const at::Tensor& x, int64_t m0, int64_t rows, const void* w, int64_t kk, int64_t p0, int64_t p1,
                const Out& out) {
  gemm_rows(x.const_data_ptr(), x.stride(0), x.scalar_type() == at::kBFloat16, m0, rows, w, kk, p0, p1, out);
}

// K-wise steps of a packed weight [..., panels, kk, 16(, 2)]
int64_t steps(const at::Tensor& packed) { return packed.size(packed.dim() - (packed.scalar_type() == at::kBFloat16 ? 3 : 2)); }

// at::parallel_for's grain for pieces of one group of MAX_PANELS panels of a packed weight each,
// each run for `rows` rows (a tile of MAX_ROWS reads the group once)
int64_t group_grain(const at::Tensor& packed, int64_t rows) {
  const int64_t tiles = std::max<int64_t>(1, (rows + MAX_ROWS - 1) / MAX_ROWS);
  const int64_t bytes = MAX_PANELS * steps(packed) * LANES * 4 * tiles;  // a step of a panel: 16 x 4 bytes
  return std::max<int64_t>(1, MIN_THREAD_BYTES / bytes);
}

// x's rows of `cols` inputs (`col_stride` apart, rows `ld` apart) against a weight packed by
// panel_gemm.pack, of sizes `w` (one weight of a stack: its sizes past the stack's dims), from sizes
// and strides alone: a select() for a stack's first weight would cost a dispatch per call
void check_operands(at::ScalarType xt, int64_t cols, int64_t col_stride, int64_t ld, const at::Tensor& packed,
                    at::IntArrayRef w, const char* what) {
  const bool bf16 = xt == at::kBFloat16;
  TORCH_CHECK(bf16 || xt == at::kFloat, what, ": x must be float32 or bfloat16, not ", xt);
  TORCH_CHECK(packed.scalar_type() == xt, what, ": packed weight dtype ", packed.scalar_type(), " != x dtype ", xt);
  TORCH_CHECK(col_stride == 1 && ld % (bf16 ? 2 : 1) == 0, what,
              ": x must have contiguous rows (of an even stride for bfloat16)");
  const int64_t d = static_cast<int64_t>(w.size());
  TORCH_CHECK(packed.is_contiguous() && d == (bf16 ? 4 : 3) && w[d - 1] == (bf16 ? 2 : LANES) &&
                  (!bf16 || w[d - 2] == LANES),
              what, ": packed weight of shape ", packed.sizes(), " is not packed by panel_gemm.pack");
  const int64_t inputs = w[bf16 ? d - 3 : d - 2] * (bf16 ? 2 : 1);
  TORCH_CHECK(inputs == cols, what, ": x has ", cols, " columns, the packed weight ", inputs, " inputs");
}

void check(const at::Tensor& x, const at::Tensor& packed, const char* what) {
  TORCH_CHECK(x.dim() == 2, what, ": x must be 2-D, got ", x.sizes());
  check_operands(x.scalar_type(), x.size(1), x.stride(1), x.stride(0), packed, packed.sizes(), what);
}

}  // namespace

// x [M, K] @ W.T for W [N, K] packed -> [M, N] in x's dtype
at::Tensor panel_linear(const at::Tensor& input, const at::Tensor& packed, int64_t n) {
  const at::Tensor x = input.contiguous();
  check(x, packed, "panel_linear");
  const int64_t panels = packed.size(0), kk = steps(packed), ldy = panels * LANES, rows = x.size(0);
  TORCH_CHECK(0 < n && n <= ldy && ldy - n < LANES, "panel_linear: n=", n, " does not fit ", panels, " panels");
  at::Tensor y = at::empty({rows, n}, x.options());
  const Out out{y.data_ptr(), n, n, x.scalar_type() == at::kBFloat16};
  const void* w = packed.const_data_ptr();
  const int64_t groups = (panels + MAX_PANELS - 1) / MAX_PANELS;
  at::parallel_for(0, groups, group_grain(packed, rows), [&](int64_t g0, int64_t g1) {
    gemm_block(x, 0, rows, w, kk, g0 * MAX_PANELS, std::min(g1 * MAX_PANELS, panels), out);
  });
  return y;
}

// Each head's own product: x [M, G, K] (rows of head g: x[:, g]) times W_g [n, K] packed as
// [G, panels, ...] -> [M, G, n] in x's dtype; the (head, panel group) pieces run in parallel
at::Tensor panel_per_head(const at::Tensor& input, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(input.dim() == 3 && packed.dim() >= 1 && packed.size(0) == input.size(1),
              "panel_per_head: x [M, G, K] and a weight packed per head [G, ...] expected, got ", input.sizes(),
              " and ", packed.sizes());
  const bool bf16 = input.scalar_type() == at::kBFloat16;  // then rows are read as pairs: even strides
  const bool even = input.stride(0) % 2 == 0 && input.stride(1) % 2 == 0 && input.storage_offset() % 2 == 0;
  const at::Tensor x = input.stride(2) == 1 && (!bf16 || even) ? input : input.contiguous();
  const int64_t M = x.size(0), G = x.size(1);
  check_operands(x.scalar_type(), x.size(2), x.stride(2), x.stride(0), packed, packed.sizes().slice(1),
                 "panel_per_head");
  const int64_t panels = packed.size(1), kk = steps(packed);
  TORCH_CHECK(0 < n && n <= panels * LANES && panels * LANES - n < LANES, "panel_per_head: n=", n, " does not fit ",
              panels, " panels");
  at::Tensor y = at::empty({M, G, n}, x.options());
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  const char* wp = static_cast<const char*>(packed.const_data_ptr());
  char* yp = static_cast<char*>(y.data_ptr());
  const int64_t size = x.element_size(), per_head = packed.stride(0) * packed.element_size();
  const int64_t groups = (panels + MAX_PANELS - 1) / MAX_PANELS;
  at::parallel_for(0, G * groups, group_grain(packed, M), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / groups, p = t % groups * MAX_PANELS;
      const Out out{yp + g * n * size, G * n, n, bf16};
      gemm_rows(xp + g * x.stride(1) * size, x.stride(0), bf16, 0, M, wp + g * per_head, kk, p,
                std::min(p + MAX_PANELS, panels), out);
    }
  });
  return y;
}

namespace {

// Rows [m0, m0 + rows) of x (rows `ld` elements apart) times panels [p0, p1) of one expert's
// packed weight (kk K-wise steps), into `out`'s same rows: one piece of an expert layer's work
struct Product {
  const void* x;
  int64_t ld, m0, rows;
  const void* w;
  int64_t kk, p0, p1;
  Out out;
};

// The products of rows [m0, m0 + rows) of x (2-D, contiguous rows) and one packed weight (`panels`
// panels from `w`) into `out`, one per group of MAX_PANELS panels
void add_products(std::vector<Product>& todo, const at::Tensor& x, int64_t m0, int64_t rows, const void* w,
                  int64_t panels, int64_t kk, const Out& out) {
  for (int64_t p = 0; p < panels; p += MAX_PANELS)
    todo.push_back({x.const_data_ptr(), x.stride(0), m0, rows, w, kk, p, std::min(p + MAX_PANELS, panels), out});
}

// Where a product's result goes: columns [c0, c0 + n) of `result` [M, ld]
Out columns(at::Tensor& result, int64_t c0, int64_t n) {
  return Out{static_cast<char*>(result.data_ptr()) + c0 * result.element_size(), result.size(1), n,
             result.scalar_type() == at::kBFloat16};
}

// The products of every expert of the packed experts `w` [E, panels, ...] that has rows (ends [E]:
// cumulative row ends of x, sorted by expert), into `result` [M, n]
void add_expert_products(std::vector<Product>& todo, const int32_t* ends, const at::Tensor& x, const at::Tensor& w,
                         at::Tensor& result) {
  const char* base = static_cast<const char*>(w.const_data_ptr());
  const int64_t per_expert = w.stride(0) * w.element_size();
  for (int64_t e = 0, start = 0; e < w.size(0); start = ends[e], ++e)
    if (ends[e] > start)
      add_products(todo, x, start, ends[e] - start, base + e * per_expert, w.size(1), steps(w),
                   columns(result, 0, result.size(1)));
}

// Every product of `todo` (all of one dtype), in parallel on torch's threads; `w`: one of the packed
// weights, whose piece size sets the grain
void run_products(const std::vector<Product>& todo, bool bf16, const at::Tensor& w) {
  at::parallel_for(0, (int64_t)todo.size(), group_grain(w, 1), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Product& p = todo[t];
      gemm_rows(p.x, p.ld, bf16, p.m0, p.rows, p.w, p.kk, p.p0, p.p1, p.out);
    }
  });
}

// h = silu(gate) * up from gate_up [M, 2I] (FP32, gate first), rounded to h's dtype; with
// `eager_rounding`, gate, up and silu(gate) are each rounded first, as eager BF16 ops round
void swiglu(const at::Tensor& gate_up, at::Tensor& h, bool eager_rounding) {
  const int64_t M = h.size(0), inter = h.size(1), ld = gate_up.size(1);
  const bool bf16 = h.scalar_type() == at::kBFloat16;
  const float* g = gate_up.const_data_ptr<float>();
  void* hp = h.data_ptr();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t i = 0; i < inter; ++i) {
        float gate = g[m * ld + i], up = g[m * ld + inter + i];
        if (bf16 && eager_rounding) {
          gate = c10::BFloat16(gate);
          up = c10::BFloat16(up);
          const float silu = c10::BFloat16(gate / (1.0f + std::exp(-gate)));
          static_cast<c10::BFloat16*>(hp)[m * inter + i] = c10::BFloat16(silu * up);
        } else if (bf16) {
          static_cast<c10::BFloat16*>(hp)[m * inter + i] = c10::BFloat16(gate / (1.0f + std::exp(-gate)) * up);
        } else {
          static_cast<float*>(hp)[m * inter + i] = gate / (1.0f + std::exp(-gate)) * up;
        }
      }
  });
}

// Packed experts gate_up [E, panels of 2 x inter, ...] and down [E, panels of H, ...] for x [., H]
void check_experts(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, int64_t inter,
                   const char* what) {
  const int64_t H = x.size(1);
  TORCH_CHECK(gate_up.dim() >= 2 && down.dim() >= 2 && gate_up.size(0) == down.size(0) && gate_up.size(0) > 0, what,
              ": gate_up and down must be packed for the same experts, got ", gate_up.sizes(), " and ", down.sizes());
  TORCH_CHECK(gate_up.size(1) * LANES >= 2 * inter && 2 * inter > (gate_up.size(1) - 1) * LANES, what,
              ": gate_up does not hold 2 x ", inter, " outputs");
  TORCH_CHECK(down.size(1) * LANES >= H && down.size(1) * LANES - H < LANES, what, ": down does not have ", H,
              " outputs");
  TORCH_CHECK(x.dim() == 2, what, ": x must be 2-D, got ", x.sizes());
  check_operands(x.scalar_type(), H, x.stride(1), x.stride(0), gate_up, gate_up.sizes().slice(1), what);
  TORCH_CHECK(down.scalar_type() == x.scalar_type() && steps(down) * (x.scalar_type() == at::kBFloat16 ? 2 : 1) == inter,
              what, ": down must be packed from ", inter, " inputs in x's dtype");
}

}  // namespace

// The routed experts' SwiGLU on rows of x [M, H] sorted by expert (offs [E] int32 cumulative
// ends): gate_up [E, panels of 2I, ...] and down [E, panels of H, ...] packed -> [M, H]
at::Tensor panel_expert_mlp(const at::Tensor& x, const at::Tensor& offs, const at::Tensor& gate_up,
                            const at::Tensor& down, int64_t inter) {
  const at::Tensor xc = x.contiguous();
  check_experts(xc, gate_up, down, inter, "panel_expert_mlp");
  const int64_t M = x.size(0), H = x.size(1), experts = gate_up.size(0);
  TORCH_CHECK(offs.scalar_type() == at::kInt && offs.dim() == 1 && offs.size(0) == experts,
              "panel_expert_mlp: offs must be int32 [E], E = the packed experts");
  const int32_t* ends = offs.const_data_ptr<int32_t>();
  TORCH_CHECK(ends[experts - 1] == M, "panel_expert_mlp: offs ends at ", ends[experts - 1], ", x has ", M, " rows");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor gu_out = at::empty({M, 2 * inter}, x.options().dtype(at::kFloat));  // gate | up, FP32
  at::Tensor h = at::empty({M, inter}, x.options());
  at::Tensor y = at::empty({M, H}, x.options());
  std::vector<Product> todo;
  add_expert_products(todo, ends, xc, gate_up, gu_out);
  run_products(todo, bf16, gate_up);
  swiglu(gu_out, h, /*eager_rounding=*/true);
  todo.clear();
  add_expert_products(todo, ends, h, down, y);
  run_products(todo, bf16, down);
  return y;
}

// A MoE layer's experts straight from the router's choice, dispatch and combine included:
// x [N, H], indices [N, K] (int64 routed expert ids), weights [N, K] (FP32 gate weights) ->
// y [N, H] FP32, y[n] = sum_k weights[n, k] FFN_{indices[n, k]}(x[n]) + FFN_shared(x[n]).
// The N*K (token, expert) pairs are sorted by expert here (a counting sort), so each chosen
// expert's weights are read once for all the tokens that chose it. The shared experts, if given
// (their MLP's gate, up and down weights, each packed as a Linear's), run on every row in the same
// parallel passes. Gate, up and the down products stay in FP32; each SwiGLU output is rounded to
// x's dtype, as a GEMM's input would be.
at::Tensor panel_routed_experts(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights,
                                const at::Tensor& gate_up, const at::Tensor& down, int64_t inter,
                                const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& shared_up,
                                const std::optional<at::Tensor>& shared_down) {
  TORCH_CHECK(x.dim() == 2 && indices.dim() == 2 && indices.size(0) == x.size(0) &&
                  indices.scalar_type() == at::kLong && weights.sizes() == indices.sizes() &&
                  weights.scalar_type() == at::kFloat,
              "panel_routed_experts: x [N, H], int64 indices [N, K] and float32 weights [N, K] expected, got ",
              x.sizes(), ", ", indices.scalar_type(), " ", indices.sizes(), ", ", weights.scalar_type(), " ",
              weights.sizes());
  const at::Tensor xc = x.contiguous();
  check_experts(xc, gate_up, down, inter, "panel_routed_experts");
  const bool shared = shared_gate.has_value();
  TORCH_CHECK(shared == shared_up.has_value() && shared == shared_down.has_value(),
              "panel_routed_experts: shared_gate, shared_up and shared_down go together");
  const int64_t shared_inter = shared ? steps(*shared_down) * (x.scalar_type() == at::kBFloat16 ? 2 : 1) : 0;
  if (shared) {
    check(xc, *shared_gate, "panel_routed_experts shared_gate");
    check(xc, *shared_up, "panel_routed_experts shared_up");
    TORCH_CHECK(shared_gate->sizes() == shared_up->sizes() && shared_gate->size(0) * LANES - shared_inter < LANES &&
                    shared_down->size(0) * LANES >= x.size(1) && shared_down->size(0) * LANES - x.size(1) < LANES,
                "panel_routed_experts: the shared experts' gate ", shared_gate->sizes(), ", up ", shared_up->sizes(),
                " and down ", shared_down->sizes(), " are not one SwiGLU MLP of hidden size ", x.size(1));
  }
  const int64_t N = x.size(0), H = x.size(1), K = indices.size(1), P = N * K, experts = gate_up.size(0);
  const bool bf16 = x.scalar_type() == at::kBFloat16;

  // counting sort of the pairs by expert: slot[n * K + k] is the pair's row among the sorted ones
  const at::Tensor idx = indices.contiguous(), gw = weights.contiguous();
  const int64_t* chosen = idx.const_data_ptr<int64_t>();
  std::vector<int32_t> ends(experts, 0), next(experts), slot(P);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(0 <= chosen[p] && chosen[p] < experts, "panel_routed_experts: expert index ", chosen[p],
                " is not in [0, ", experts, ")");
    ++ends[chosen[p]];
  }
  for (int64_t e = 0, sum = 0; e < experts; ++e) next[e] = sum, ends[e] = sum += ends[e];
  for (int64_t p = 0; p < P; ++p) slot[p] = next[chosen[p]]++;
  at::Tensor xs = at::empty({P, H}, x.options());  // x's rows in sorted order
  const int64_t row_bytes = H * x.element_size();
  for (int64_t p = 0; p < P; ++p)
    std::memcpy(static_cast<char*>(xs.data_ptr()) + slot[p] * row_bytes,
                static_cast<const char*>(xc.const_data_ptr()) + (p / K) * row_bytes, row_bytes);

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor gu = at::empty({P, 2 * inter}, f32), h = at::empty({P, inter}, x.options()), ys = at::empty({P, H}, f32);
  at::Tensor shared_gu, shared_h, y = at::empty({N, H}, f32);
  std::vector<Product> todo;
  add_expert_products(todo, ends.data(), xs, gate_up, gu);
  if (shared) {
    shared_gu = at::empty({N, 2 * shared_inter}, f32);
    shared_h = at::empty({N, shared_inter}, x.options());
    add_products(todo, xc, 0, N, shared_gate->const_data_ptr(), shared_gate->size(0), steps(*shared_gate),
                 columns(shared_gu, 0, shared_inter));
    add_products(todo, xc, 0, N, shared_up->const_data_ptr(), shared_up->size(0), steps(*shared_up),
                 columns(shared_gu, shared_inter, shared_inter));
  }
  run_products(todo, bf16, gate_up);
  swiglu(gu, h, /*eager_rounding=*/false);
  todo.clear();
  add_expert_products(todo, ends.data(), h, down, ys);
  if (shared) {
    swiglu(shared_gu, shared_h, /*eager_rounding=*/false);
    add_products(todo, shared_h, 0, N, shared_down->const_data_ptr(), shared_down->size(0), steps(*shared_down),
                 columns(y, 0, H));  // y starts as the shared experts' output
  }
  run_products(todo, bf16, down);

  const float* routed = ys.const_data_ptr<float>();
  const float* g = gw.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    float* row = yp + n * H;
    if (!shared) std::fill(row, row + H, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float wk = g[n * K + k];
      const float* src = routed + slot[n * K + k] * H;
      for (int64_t c = 0; c < H; ++c) row[c] += wk * src[c];
    }
  }
  return y;
}

TORCH_LIBRARY(dsv3_panel, m) {
  m.def("linear(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("expert_mlp(Tensor x, Tensor offs, Tensor gate_up, Tensor down, int inter) -> Tensor");
  m.def("per_head(Tensor x, Tensor packed, int n) -> Tensor");
  m.def(
      "routed_experts(Tensor x, Tensor indices, Tensor weights, Tensor gate_up, Tensor down, int inter, "
      "Tensor? shared_gate, Tensor? shared_up, Tensor? shared_down) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv3_panel, CPU, m) {
  m.impl("linear", &panel_linear);
  m.impl("expert_mlp", &panel_expert_mlp);
  m.impl("per_head", &panel_per_head);
  m.impl("routed_experts", &panel_routed_experts);
}
