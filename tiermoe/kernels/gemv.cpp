// Matrix products for decode and batch-invariant prefill: y[M, N] = x[M, K] @ W[N, K]^T for any M.
//
// Batch-1 decode streams every weight byte once per token, so the speed limit is memory bandwidth; torch's GEMM
// libraries are tuned for large M and reach a fraction of it on one row. Here each thread streams a contiguous
// band of W's rows, a few rows at a time, and dots them with blocks of x rows while they are in cache; with many
// rows (batched decode, prefill) the same register blocks make it a GEMM whose W is read once per L2-sized panel.
//
// NOTE: every output element y[m, n] is one vector accumulator over k in ascending chunks, reduced in a fixed
// order, whatever M is, whatever other rows are in the batch, however rows are tiled or split across threads.
// That makes a row's result independent of its batch (bitwise), which the engine promises.
//
// Code paths, chosen at run time by CPU features (TIERMOE_KERNEL_ISA=avx512|avx2 caps it, for tests):
//   avx512bf16: bf16 x and W, _mm512_dpbf16_ps (pairs of bf16 products summed into fp32 lanes)
//   avx512:     fp32 x, fp32 or bf16 W (bf16 widened exactly to fp32), FMA
//   avx2:       as avx512 on 8 lanes
// Anything else (other dtypes, other ISAs, more rows than the caller's limit) is at::linear.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

enum class Isa { none = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3 };

Isa detect_isa() {
  __builtin_cpu_init();
  Isa best = Isa::none;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) best = Isa::avx512;
  if (best == Isa::avx512 && __builtin_cpu_supports("avx512bf16")) best = Isa::avx512bf16;
  const char* cap = std::getenv("TIERMOE_KERNEL_ISA");
  if (cap != nullptr) {
    std::string c(cap);
    Isa limit = c == "avx2" ? Isa::avx2 : c == "avx512" ? Isa::avx512 : c == "avx512bf16" ? Isa::avx512bf16 : Isa::none;
    best = std::min(best, limit);
  }
  return best;
}

const Isa kIsa = detect_isa();
std::atomic<int64_t> kCalls{0};  // products computed here (not by at::linear): lets tests see the path is used

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512bf16: return "avx512bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "none";
  }
}

// ---- vector operations: one struct per (ISA, weight dtype); x is fp32 except for Dpbf16 ----
// Each provides: step (elements per chunk), mr x nr (the register block: x rows by W rows), Acc, W, X, zero(),
// load_w, load_w_tail(p, n) (the first n < step elements, zeros after, nothing read past them), load_x,
// fma(acc, x, w), reduce(acc).

inline uint32_t tail_mask(int64_t n) { return (uint32_t{1} << n) - 1; }  // n < 32

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define AVX2 __attribute__((target("avx2,fma")))

struct Avx512F32 {
  using welem = float;
  using xelem = float;
  using Acc = __m512;
  using W = __m512;
  using X = __m512;
  static constexpr int step = 16, mr = 4, nr = 6;
  AVX512 static inline Acc zero() { return _mm512_setzero_ps(); }
  AVX512 static inline W load_w(const welem* p) { return _mm512_loadu_ps(p); }
  AVX512 static inline W load_w_tail(const welem* p, int64_t n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
  AVX512 static inline X load_x(const xelem* p) { return _mm512_loadu_ps(p); }
  AVX512 static inline Acc fma(Acc a, X x, W w) { return _mm512_fmadd_ps(x, w, a); }
  AVX512 static inline float reduce(Acc a) { return _mm512_reduce_add_ps(a); }
};

struct Avx512Bf16W {  // bf16 weights widened to fp32 (exact), fp32 x
  using welem = bf16;
  using xelem = float;
  using Acc = __m512;
  using W = __m512;
  using X = __m512;
  static constexpr int step = 16, mr = 4, nr = 6;
  AVX512 static inline Acc zero() { return _mm512_setzero_ps(); }
  AVX512 static inline W widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  AVX512 static inline W load_w(const welem* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  AVX512 static inline W load_w_tail(const welem* p, int64_t n) {
    return widen(_mm256_maskz_loadu_epi16(static_cast<__mmask16>(tail_mask(n)), p));
  }
  AVX512 static inline X load_x(const xelem* p) { return _mm512_loadu_ps(p); }
  AVX512 static inline Acc fma(Acc a, X x, W w) { return _mm512_fmadd_ps(x, w, a); }
  AVX512 static inline float reduce(Acc a) { return _mm512_reduce_add_ps(a); }
};

struct Dpbf16 {  // bf16 x and W: each lane adds two exact bf16 products in fp32
  using welem = bf16;
  using xelem = bf16;
  using Acc = __m512;
  using W = __m512i;
  using X = __m512i;
  static constexpr int step = 32, mr = 4, nr = 6;
  AVX512BF16 static inline Acc zero() { return _mm512_setzero_ps(); }
  AVX512BF16 static inline W load_w(const welem* p) { return _mm512_loadu_si512(p); }
  AVX512BF16 static inline W load_w_tail(const welem* p, int64_t n) {
    return _mm512_maskz_loadu_epi16(static_cast<__mmask32>(tail_mask(n)), p);
  }
  AVX512BF16 static inline X load_x(const xelem* p) { return _mm512_loadu_si512(p); }
  AVX512BF16 static inline Acc fma(Acc a, X x, W w) {
    return _mm512_dpbf16_ps(a, reinterpret_cast<__m512bh>(x), reinterpret_cast<__m512bh>(w));
  }
  AVX512BF16 static inline float reduce(Acc a) { return _mm512_reduce_add_ps(a); }
};

AVX2 inline float reduce256(__m256 a) {  // fixed order: halves, then pairs, then the last two
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Avx2F32 {
  using welem = float;
  using xelem = float;
  using Acc = __m256;
  using W = __m256;
  using X = __m256;
  static constexpr int step = 8, mr = 2, nr = 4;  // 16 registers: 8 accumulators, 2 x, 1 W
  AVX2 static inline Acc zero() { return _mm256_setzero_ps(); }
  AVX2 static inline W load_w(const welem* p) { return _mm256_loadu_ps(p); }
  AVX2 static inline W load_w_tail(const welem* p, int64_t n) {
    alignas(32) welem pad[step] = {};
    std::memcpy(pad, p, n * sizeof(welem));
    return load_w(pad);
  }
  AVX2 static inline X load_x(const xelem* p) { return _mm256_loadu_ps(p); }
  AVX2 static inline Acc fma(Acc a, X x, W w) { return _mm256_fmadd_ps(x, w, a); }
  AVX2 static inline float reduce(Acc a) { return reduce256(a); }
};

struct Avx2Bf16W {
  using welem = bf16;
  using xelem = float;
  using Acc = __m256;
  using W = __m256;
  using X = __m256;
  static constexpr int step = 8, mr = 2, nr = 4;
  AVX2 static inline Acc zero() { return _mm256_setzero_ps(); }
  AVX2 static inline W load_w(const welem* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  AVX2 static inline W load_w_tail(const welem* p, int64_t n) {
    alignas(16) welem pad[step] = {};
    std::memcpy(pad, p, n * sizeof(welem));
    return load_w(pad);
  }
  AVX2 static inline X load_x(const xelem* p) { return _mm256_loadu_ps(p); }
  AVX2 static inline Acc fma(Acc a, X x, W w) { return _mm256_fmadd_ps(x, w, a); }
  AVX2 static inline float reduce(Acc a) { return reduce256(a); }
};

// ---- the blocked loop, one instantiation per vector-op struct ----
//
// Each output y[m, n] is ONE vector accumulator: chunk c of K (Op::step elements, ascending) is multiplied into it,
// then its lanes are reduced in a fixed order. The blocking below only decides which outputs are computed together
// (MR rows of x by NR rows of W share their loads), never the order of one output's sums: that is what makes a
// row's result independent of the other rows, their number, the blocking and the thread split, bit for bit.

// Bytes of x rows in one panel (the rows sharing a pass over W), sized to stay in L2.
constexpr int64_t kPanelBytes = 256 * 1024;

// res[m * NR + j] = dot(x row m, W row j) for an MR x NR block; x rows are zero-padded to Kp (a multiple of
// Op::step), W rows hold K elements: the last partial chunk is loaded masked (zeros past K, nothing read there).
template <class Op, int MR, int NR>
__attribute__((always_inline)) inline void block(const typename Op::xelem* x, int64_t Kp,
                                                 const typename Op::welem* w, int64_t ldw, int64_t K, float* res) {
  using Acc = typename Op::Acc;
  constexpr int64_t step = Op::step;
  Acc acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[m][j] = Op::zero();
  const int64_t kfull = K - K % step;
  for (int64_t k = 0; k < kfull; k += step) {
    typename Op::X xv[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) xv[m] = Op::load_x(x + m * Kp + k);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      typename Op::W wv = Op::load_w(w + j * ldw + k);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][j] = Op::fma(acc[m][j], xv[m], wv);
    }
  }
  if (kfull < K) {
    for (int j = 0; j < NR; ++j) {
      typename Op::W wv = Op::load_w_tail(w + j * ldw + kfull, K - kfull);
      for (int m = 0; m < MR; ++m) acc[m][j] = Op::fma(acc[m][j], Op::load_x(x + m * Kp + kfull), wv);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) res[m * NR + j] = Op::reduce(acc[m][j]);
}

// What happens to a dot product before it is stored: + bias[n], * row_scale[m], then rounded to the output dtype.
struct Epilogue {
  const float* bias;  // [N] or null
  const float* row_scale;  // [M] or null
  void* out;  // [M, ldo] of out_dtype
  int64_t ldo;
  bool out_bf16;

  inline void store(int64_t m, int64_t n, float v) const {
    if (bias != nullptr) v += bias[n];
    if (row_scale != nullptr) v *= row_scale[m];
    if (out_bf16) {
      static_cast<bf16*>(out)[m * ldo + n] = bf16(v);
    } else {
      static_cast<float*>(out)[m * ldo + n] = v;
    }
  }
};

// An MR x NR block at (m0, n), MR = mr <= 4 chosen at run time.
template <class Op, int NR>
__attribute__((always_inline)) inline void block_at(const typename Op::xelem* x, int64_t m0, int64_t mr, int64_t Kp,
                                                    const typename Op::welem* w, int64_t ldw, int64_t K, int64_t n,
                                                    const Epilogue& ep) {
  float res[4 * NR];
  const typename Op::xelem* xm = x + m0 * Kp;
  const typename Op::welem* wn = w + n * ldw;
  switch (mr) {
    case 4: block<Op, 4, NR>(xm, Kp, wn, ldw, K, res); break;
    case 3: block<Op, 3, NR>(xm, Kp, wn, ldw, K, res); break;
    case 2: block<Op, 2, NR>(xm, Kp, wn, ldw, K, res); break;
    default: block<Op, 1, NR>(xm, Kp, wn, ldw, K, res); break;
  }
  for (int64_t m = 0; m < mr; ++m)
    for (int j = 0; j < NR; ++j) ep.store(m0 + m, n + j, res[m * NR + j]);
}

// Rows [n0, n1) of W against every row of x: x in panels that stay in L2, each panel against the band of W in
// blocks of Op::nr W rows by Op::mr x rows (a W block is read from memory once per panel and reused from cache).
template <class Op>
__attribute__((always_inline)) inline void rows(const typename Op::xelem* x, int64_t M, int64_t Kp,
                                                const typename Op::welem* w, int64_t ldw, int64_t K, int64_t n0,
                                                int64_t n1, const Epilogue& ep) {
  constexpr int MR = Op::mr, NR = Op::nr;
  const int64_t per_row = Kp * static_cast<int64_t>(sizeof(typename Op::xelem));
  const int64_t panel = std::max<int64_t>(MR, kPanelBytes / per_row / MR * MR);
  for (int64_t p0 = 0; p0 < M; p0 += panel) {
    const int64_t p1 = std::min(M, p0 + panel);
    int64_t n = n0;
    // One x row (decode): one W row per block streams W faster (fewer concurrent streams); a block's shape never
    // changes an output's bits, each output has its own accumulator summed in the same order.
    if (p1 - p0 > 1)
      for (; n + NR <= n1; n += NR)
        for (int64_t m = p0; m < p1; m += MR) block_at<Op, NR>(x, m, std::min<int64_t>(MR, p1 - m), Kp, w, ldw, K, n, ep);
    for (; n < n1; ++n)
      for (int64_t m = p0; m < p1; m += MR) block_at<Op, 1>(x, m, std::min<int64_t>(MR, p1 - m), Kp, w, ldw, K, n, ep);
  }
}

// One instantiation per ISA, so the compiler can inline the target-specific intrinsics.
#define DEFINE_ROWS(NAME, OP, TARGET)                                                                       \
  TARGET void NAME(const OP::xelem* x, int64_t M, int64_t Kp, const OP::welem* w, int64_t ldw, int64_t K,   \
                   int64_t n0, int64_t n1, const Epilogue& ep) {                                           \
    rows<OP>(x, M, Kp, w, ldw, K, n0, n1, ep);                                                              \
  }
DEFINE_ROWS(rows_avx512_f32, Avx512F32, AVX512)
DEFINE_ROWS(rows_avx512_bf16w, Avx512Bf16W, AVX512)
DEFINE_ROWS(rows_dpbf16, Dpbf16, AVX512BF16)
DEFINE_ROWS(rows_avx2_f32, Avx2F32, AVX2)
DEFINE_ROWS(rows_avx2_bf16w, Avx2Bf16W, AVX2)

// x as the kernel reads it: [M, Kp] contiguous, zero-padded past K, in the Op's x dtype.
torch::Tensor padded_x(const torch::Tensor& x, int64_t step, at::ScalarType dtype) {
  int64_t K = x.size(1), Kp = (K + step - 1) / step * step;
  if (Kp == K && x.scalar_type() == dtype && x.is_contiguous()) return x;
  auto buf = torch::zeros({x.size(0), Kp}, x.options().dtype(dtype));
  buf.narrow(1, 0, K).copy_(x);
  return buf;
}

// Which path serves (x dtype, W dtype) on this CPU; none = at::linear.
enum class Path { none, dpbf16, f32, bf16w };

Path choose(at::ScalarType xt, at::ScalarType wt) {
  if (kIsa == Isa::none) return Path::none;
  if (xt == at::kBFloat16 && wt == at::kBFloat16) return kIsa == Isa::avx512bf16 ? Path::dpbf16 : Path::bf16w;
  if (xt == at::kFloat && wt == at::kFloat) return Path::f32;
  if (xt == at::kFloat && wt == at::kBFloat16) return Path::bf16w;
  return Path::none;
}

// Work (weight bytes times blocks of x rows) below which one thread does the whole product (a fork/join costs more
// than it saves).
constexpr int64_t kSerialBytes = 64 * 1024;

// y = epilogue(x @ W^T) for rows of W; x [M, K] any strides, W [N, K] with unit stride along K.
void product(Path path, const torch::Tensor& x, const torch::Tensor& w, const Epilogue& ep) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldw = w.stride(0);
  const bool wide = kIsa != Isa::avx2;
  const int64_t step = path == Path::dpbf16 ? Dpbf16::step : wide ? 16 : 8;
  auto xp = padded_x(x, step, path == Path::dpbf16 ? at::kBFloat16 : at::kFloat);
  const int64_t Kp = xp.size(1);
  const int64_t row_bytes = K * w.element_size();
  const int64_t work = row_bytes * ((M + 3) / 4);  // per W row: its bytes, once per block of x rows
  const int64_t grain = std::max<int64_t>(1, kSerialBytes / std::max<int64_t>(1, work));
  const void* wp = w.data_ptr();
  const void* xv = xp.data_ptr();
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    switch (path) {
      case Path::dpbf16:
        rows_dpbf16(static_cast<const bf16*>(xv), M, Kp, static_cast<const bf16*>(wp), ldw, K, n0, n1, ep);
        break;
      case Path::f32:
        (wide ? rows_avx512_f32 : rows_avx2_f32)(static_cast<const float*>(xv), M, Kp,
                                                 static_cast<const float*>(wp), ldw, K, n0, n1, ep);
        break;
      default:
        (wide ? rows_avx512_bf16w : rows_avx2_bf16w)(static_cast<const float*>(xv), M, Kp,
                                                     static_cast<const bf16*>(wp), ldw, K, n0, n1, ep);
        break;
    }
  });
  kCalls.fetch_add(1, std::memory_order_relaxed);
}

bool servable(const torch::Tensor& x, const torch::Tensor& w, int64_t max_rows) {
  return x.device().is_cpu() && w.device().is_cpu() && x.dim() == 2 && w.dim() == 2 && x.size(0) >= 1 &&
         x.size(0) <= max_rows && x.size(1) == w.size(1) && w.stride(1) == 1 && w.size(1) > 0 &&
         !(at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad()));  // no autograd here
}

std::optional<torch::Tensor> fp32_vector(const std::optional<torch::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->reshape({-1}).to(at::kFloat).contiguous();
}

}  // namespace

// F.linear(x, weight, bias) for x [M, K] with M <= max_rows, accumulated in fp32 and stored in x's dtype, or in fp32
// when out_fp32 (a product whose result is summed in fp32 next: the residual stream, logits).
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const std::optional<torch::Tensor>& bias,
                     int64_t max_rows, bool out_fp32) {
  const auto out_dtype = out_fp32 ? at::kFloat : x.scalar_type();
  Path path = servable(x, weight, max_rows) ? choose(x.scalar_type(), weight.scalar_type()) : Path::none;
  if (path == Path::none) {  // weights of another dtype (an fp32 router over bf16 weights) are widened first
    auto dt = x.scalar_type();
    return at::linear(x, weight.to(dt), bias.has_value() && bias->defined() ? bias->to(dt) : bias).to(out_dtype);
  }
  auto b = fp32_vector(bias);
  auto out = torch::empty({x.size(0), weight.size(0)}, x.options().dtype(out_dtype));
  Epilogue ep{b ? b->data_ptr<float>() : nullptr, nullptr, out.data_ptr(), out.size(1),
              out.scalar_type() == at::kBFloat16};
  product(path, x, weight, ep);
  return out;
}

// down(silu(gate) * up) * scale for x [M, H], gate_up [2I, H] (gate rows then up rows), down [H, I], scale [M] or
// None; returns [M, H] in x's dtype (fp32 when out_fp32). The gate/up products stay in fp32 until the activation;
// scale is applied in fp32 before the one rounding to the output dtype.
torch::Tensor swiglu(const torch::Tensor& x, const torch::Tensor& gate_up, const torch::Tensor& down,
                     const std::optional<torch::Tensor>& scale, int64_t max_rows, bool out_fp32) {
  const int64_t I = down.size(1);
  const auto out_dtype = out_fp32 ? at::kFloat : x.scalar_type();
  Path p1 = servable(x, gate_up, max_rows) ? choose(x.scalar_type(), gate_up.scalar_type()) : Path::none;
  Path p2 = choose(x.scalar_type(), down.scalar_type());
  if (p1 == Path::none || p2 == Path::none || down.stride(1) != 1 || gate_up.size(0) != 2 * I ||
      down.size(0) != x.size(1)) {
    auto h = at::linear(x, gate_up);
    auto y = at::linear(at::silu(h.narrow(1, 0, I)) * h.narrow(1, I, I), down);
    return (scale ? y * scale->reshape({-1, 1}) : y).to(out_dtype);
  }
  const int64_t M = x.size(0);
  auto h = torch::empty({M, 2 * I}, x.options().dtype(at::kFloat));
  product(p1, x, gate_up, Epilogue{nullptr, nullptr, h.data_ptr(), 2 * I, false});
  auto act = at::silu(h.narrow(1, 0, I)).mul_(h.narrow(1, I, I)).to(x.scalar_type());  // [M, I]
  auto s = fp32_vector(scale);
  auto out = torch::empty({M, down.size(0)}, x.options().dtype(out_dtype));
  product(p2, act, down, Epilogue{nullptr, s ? s->data_ptr<float>() : nullptr, out.data_ptr(), out.size(1),
                                  out.scalar_type() == at::kBFloat16});
  return out;
}

// ---- small fused ops of a decode step (plain loops; the compiler vectorises them per ISA via target_clones) ----

#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

template <class T>
inline float f32(T v) { return static_cast<float>(v); }

// Sum of squares with 16 lane accumulators combined in a fixed order (vectorisable without reassociation).
template <class T>
CLONES float sum_squares(const T* x, int64_t n) {
  float lane[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lane[l] += f32(x[i + l]) * f32(x[i + l]);
  for (; i < n; ++i) lane[i % 16] += f32(x[i]) * f32(x[i]);
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  return lane[0];
}

// out = w * (x * inv_rms) in fp32, rounded once to the weight's dtype W (X may be wider: the fp32 residual stream).
template <class X, class W>
void rmsnorm_rows(const X* x, const W* w, W* out, int64_t rows, int64_t n, int64_t ldx, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const X* xr = x + r * ldx;
    const float inv = 1.0f / std::sqrt(sum_squares(xr, n) / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) out[r * n + i] = W(f32(w[i]) * (f32(xr[i]) * inv));
  }
}

// Rotate-half rotary on rows of x [T, heads, d] (any strides, last dim contiguous), in place, over the first
// d_rot features: x1' = x1*cos - x2*sin, x2' = x2*cos + x1*sin, each product rounded to T first as torch's
// elementwise ops in T do (so bf16 matches x*cos + rotate_half(x)*sin bit for bit).
template <class T>
void rotary_rows(T* x, int64_t tokens, int64_t heads, int64_t st, int64_t sh, const T* cos, const T* sin,
                 int64_t d_rot) {
  const int64_t half = d_rot / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const T* c = cos + t * d_rot;
    const T* s = sin + t * d_rot;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + t * st + h * sh;
      for (int64_t i = 0; i < half; ++i) {
        float a = f32(v[i]), b = f32(v[i + half]);
        float lo = f32(T(a * f32(c[i]))) - f32(T(b * f32(s[i])));
        float hi = f32(T(b * f32(c[i + half]))) + f32(T(a * f32(s[i + half])));
        v[i] = T(lo);
        v[i + half] = T(hi);
      }
    }
  }
}

// out[m, :] = sum_j p[m, j] * v[j, :] in fp32, j ascending; v rows at stride ldv.
template <class T>
CLONES void weighted_rows(const float* p, int64_t M, int64_t S, const T* v, int64_t ldv, int64_t dv, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    float* o = out + m * dv;
    for (int64_t c = 0; c < dv; ++c) o[c] = 0.0f;
    for (int64_t j = 0; j < S; ++j) {
      const float pj = p[m * S + j];
      const T* vj = v + j * ldv;
      for (int64_t c = 0; c < dv; ++c) o[c] += pj * f32(vj[c]);
    }
  }
}

torch::Tensor rmsnorm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const int64_t n = x.size(-1);
  const auto xt = x.scalar_type(), wt = weight.scalar_type();
  const bool mixed = xt == at::kFloat && wt == at::kBFloat16;
  if (!x.device().is_cpu() || x.stride(-1) != 1 || (xt != wt && !mixed) || !weight.is_contiguous() ||
      (xt != at::kFloat && xt != at::kBFloat16) || weight.numel() != n || x.dim() < 2) {
    auto xf = x.to(at::kFloat);
    return (weight.to(at::kFloat) * (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps))).to(wt);
  }
  if (x.dim() > 2) return rmsnorm(x.reshape({-1, n}), weight, eps).view(x.sizes());
  auto out = torch::empty({x.size(0), n}, x.options().dtype(wt));
  const float e = static_cast<float>(eps);
  if (xt == at::kBFloat16) {
    rmsnorm_rows(x.data_ptr<bf16>(), weight.data_ptr<bf16>(), out.data_ptr<bf16>(), x.size(0), n, x.stride(0), e);
  } else if (mixed) {
    rmsnorm_rows(x.data_ptr<float>(), weight.data_ptr<bf16>(), out.data_ptr<bf16>(), x.size(0), n, x.stride(0), e);
  } else {
    rmsnorm_rows(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), x.size(0), n, x.stride(0), e);
  }
  return out;
}

// In place on q [T, h, d] and k [T, g, d] (views into one projection output are fine); cos, sin [T, d_rot].
bool rotary_(torch::Tensor q, torch::Tensor k, const torch::Tensor& cos, const torch::Tensor& sin) {
  const auto dt = q.scalar_type();
  const int64_t d_rot = cos.size(-1);
  for (const auto* t : {&q, &k})
    if (t->dim() != 3 || t->stride(2) != 1 || t->scalar_type() != dt || t->size(2) < d_rot) return false;
  if ((dt != at::kFloat && dt != at::kBFloat16) || !cos.is_contiguous() || !sin.is_contiguous() ||
      cos.scalar_type() != dt || sin.scalar_type() != dt || cos.size(0) != q.size(0) || d_rot % 2 != 0)
    return false;
  for (auto* t : {&q, &k}) {
    if (dt == at::kFloat) {
      rotary_rows(t->data_ptr<float>(), t->size(0), t->size(1), t->stride(0), t->stride(1), cos.data_ptr<float>(),
                  sin.data_ptr<float>(), d_rot);
    } else {
      rotary_rows(t->data_ptr<bf16>(), t->size(0), t->size(1), t->stride(0), t->stride(1), cos.data_ptr<bf16>(),
                  sin.data_ptr<bf16>(), d_rot);
    }
  }
  return true;
}

// One query row per head over S cached keys: q [h, d], k [S, g, d], v [S, g, dv] (rows may be strided);
// returns [h, dv] in q's dtype. Per KV head: scores by the GEMV kernel (the group's query heads as its rows),
// softmax in fp32, then the fp32 weighted sum of values.
std::optional<torch::Tensor> decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                              double scale) {
  const int64_t h = q.size(0), S = k.size(0), g = k.size(1), dv = v.size(2);
  Path path = choose(q.scalar_type(), k.scalar_type());
  if (path == Path::none || q.dim() != 2 || k.dim() != 3 || v.dim() != 3 || h % g != 0 || S == 0 ||
      k.stride(2) != 1 || v.stride(2) != 1 || v.scalar_type() != k.scalar_type() || q.size(1) != k.size(2))
    return std::nullopt;
  const int64_t per = h / g;
  auto out = torch::empty({h, dv}, q.options());
  auto qc = q.contiguous();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, S * (k.size(2) + dv) * per));
  at::parallel_for(0, g, grain, [&](int64_t g0, int64_t g1) {
    std::vector<float> p(per * S), o(per * dv);
    for (int64_t kv = g0; kv < g1; ++kv) {
      auto kg = k.select(1, kv);  // [S, d] at row stride g * d
      Epilogue ep{nullptr, nullptr, p.data(), S, false};
      product(path, qc.narrow(0, kv * per, per), kg, ep);  // serial inside this region (ATen runs it inline)
      for (int64_t m = 0; m < per; ++m) {
        float* row = p.data() + m * S;
        float mx = -INFINITY;
        for (int64_t j = 0; j < S; ++j) mx = std::max(mx, row[j] *= static_cast<float>(scale));
        float sum = 0.0f;
        for (int64_t j = 0; j < S; ++j) sum += (row[j] = std::exp(row[j] - mx));
        for (int64_t j = 0; j < S; ++j) row[j] /= sum;
      }
      if (v.scalar_type() == at::kFloat) {
        weighted_rows(p.data(), per, S, v.data_ptr<float>() + kv * v.stride(1), v.stride(0), dv, o.data());
      } else {
        weighted_rows(p.data(), per, S, v.data_ptr<bf16>() + kv * v.stride(1), v.stride(0), dv, o.data());
      }
      Epilogue store{nullptr, nullptr, out.data_ptr(), dv, q.scalar_type() == at::kBFloat16};
      for (int64_t m = 0; m < per; ++m)
        for (int64_t c = 0; c < dv; ++c) store.store(kv * per + m, c, o[m * dv + c]);
    }
  });
  return out;
}

std::string isa() { return isa_name(kIsa); }

int64_t calls() { return kCalls.load(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "F.linear for a few rows (fp32 accumulation, batch-invariant)");
  m.def("swiglu", &swiglu, "down(silu(gate) * up) * scale for a few rows");
  m.def("rmsnorm", &rmsnorm, "RMSNorm in fp32, rounded once to the weight's dtype");
  m.def("rotary_", &rotary_, "rotate-half rotary in place on q and k; False if the layout is not served");
  m.def("decode_attention", &decode_attention, "one query row per head over the cache; None if not served");
  m.def("isa", &isa, "the code path chosen for this CPU");
  m.def("calls", &calls, "products computed by the kernels so far");
}
