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
#include <ATen/ThreadLocalState.h>
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

// How far ahead of its loads a one-row product asks for W (bytes): the one accumulator per output is a chain of
// dependent FMAs, so the loads of a row do not run far ahead by themselves and the core waits on DRAM between
// them; prefetching keeps the stream in flight (measured +10-25% GB/s on weights from DRAM, same bits).
constexpr int kPrefetchBytes = 4096;

// res[m * NR + j] = dot(x row m, W row j) for an MR x NR block; x rows are zero-padded to Kp (a multiple of
// Op::step), W rows hold K elements: the last partial chunk is loaded masked (zeros past K, nothing read there).
template <class Op, int MR, int NR, int PF = 0>
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
    if constexpr (PF > 0) {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + k) + PF, _MM_HINT_T0);
    }
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
    // One x row (decode): one W row per block, prefetched, streams W faster than blocks of several W rows (more
    // concurrent streams); a block's shape never changes an output's bits, each output has its own accumulator
    // summed in the same order.
    if (p1 - p0 == 1) {
      float res;
      for (; n < n1; ++n) {
        block<Op, 1, 1, kPrefetchBytes>(x + p0 * Kp, Kp, w + n * ldw, ldw, K, &res);
        ep.store(p0, n, res);
      }
      continue;
    }
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

// x's chunk width and dtype for a path (x is padded to a multiple of the width, in that dtype).
int64_t x_step(Path path) { return path == Path::dpbf16 ? Dpbf16::step : kIsa != Isa::avx2 ? 16 : 8; }
at::ScalarType x_dtype(Path path) { return path == Path::dpbf16 ? at::kBFloat16 : at::kFloat; }

// Rows [n0, n1) of W against the M rows of x (padded: x_step, x_dtype), on the calling thread.
void rows_for(Path path, const void* xv, int64_t M, int64_t Kp, const void* wp, int64_t ldw, int64_t K, int64_t n0,
              int64_t n1, const Epilogue& ep) {
  const bool wide = kIsa != Isa::avx2;
  switch (path) {
    case Path::dpbf16:
      rows_dpbf16(static_cast<const bf16*>(xv), M, Kp, static_cast<const bf16*>(wp), ldw, K, n0, n1, ep);
      break;
    case Path::f32:
      (wide ? rows_avx512_f32 : rows_avx2_f32)(static_cast<const float*>(xv), M, Kp, static_cast<const float*>(wp),
                                               ldw, K, n0, n1, ep);
      break;
    default:
      (wide ? rows_avx512_bf16w : rows_avx2_bf16w)(static_cast<const float*>(xv), M, Kp,
                                                   static_cast<const bf16*>(wp), ldw, K, n0, n1, ep);
      break;
  }
}

// Work (weight bytes times blocks of x rows) below which one thread does the whole product (a fork/join costs more
// than it saves).
constexpr int64_t kSerialBytes = 64 * 1024;

// Bytes a product of M rows streams per W row of K elements: the row once per block of 4 x rows.
int64_t row_work(int64_t M, int64_t K, int64_t elem) { return K * elem * ((M + 3) / 4); }

// y = epilogue(x @ W^T) for rows of W; x [M, K] any strides, W [N, K] with unit stride along K.
void product(Path path, const torch::Tensor& x, const torch::Tensor& w, const Epilogue& ep) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldw = w.stride(0);
  auto xp = padded_x(x, x_step(path), x_dtype(path));
  const int64_t Kp = xp.size(1);
  const int64_t grain = std::max<int64_t>(1, kSerialBytes / std::max<int64_t>(1, row_work(M, K, w.element_size())));
  const void* wp = w.data_ptr();
  const void* xv = xp.data_ptr();
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows_for(path, xv, M, Kp, wp, ldw, K, n0, n1, ep); });
  kCalls.fetch_add(1, std::memory_order_relaxed);
}

bool servable(const torch::Tensor& x, const torch::Tensor& w, int64_t max_rows) {
  return x.device().is_cpu() && w.device().is_cpu() && x.dim() == 2 && w.dim() == 2 && x.size(0) >= 1 &&
         x.size(0) <= max_rows && x.size(1) == w.size(1) && w.stride(1) == 1 && w.size(1) > 0 &&
         !(at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad()));  // no autograd here
}

// silu(h[:, :I]) * h[:, I:] for h [M, 2I] fp32, rounded to dtype. torch's silu computes a row's elements in
// vectors and the last few one by one, which can differ in the last bit; handing it whole rows (in parallel over
// rows, never splitting one) gives every row the split it gets alone, whatever the number of rows.
torch::Tensor activate(const torch::Tensor& h, int64_t I, at::ScalarType dtype) {
  const int64_t M = h.size(0);
  auto act = torch::empty({M, I}, h.options().dtype(dtype));
  const at::ThreadLocalState caller;  // inference mode and the like, for the torch ops on the pool's threads
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, I)), [&](int64_t r0, int64_t r1) {
    at::ThreadLocalStateGuard as_caller(caller);
    auto hr = h.narrow(0, r0, r1 - r0);
    act.narrow(0, r0, r1 - r0).copy_(at::silu(hr.narrow(1, 0, I)).mul_(hr.narrow(1, I, I)));
  });
  return act;
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
  auto act = activate(h, I, x.scalar_type());  // [M, I]
  auto s = fp32_vector(scale);
  auto out = torch::empty({M, down.size(0)}, x.options().dtype(out_dtype));
  product(p2, act, down, Epilogue{nullptr, s ? s->data_ptr<float>() : nullptr, out.data_ptr(), out.size(1),
                                  out.scalar_type() == at::kBFloat16});
  return out;
}

namespace {

// A piece of a grouped product: rows [n0, n1) of expert e's weight against that expert's rows of x.
struct Piece {
  int64_t e, n0, n1;
};

// Every expert's W rows cut into pieces of about kSerialBytes of work (a multiple of 12 rows: whole register blocks
// on every ISA), so the threads share a layer's experts however unevenly the tokens route.
std::vector<Piece> pieces(const std::vector<int64_t>& counts, int64_t n, int64_t K, int64_t elem) {
  std::vector<Piece> out;
  for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e) {
    const int64_t band = std::max<int64_t>(12, kSerialBytes / row_work(counts[e], K, elem) / 12 * 12);
    for (int64_t n0 = 0; n0 < n; n0 += band) out.push_back({e, n0, std::min(n, n0 + band)});
  }
  return out;
}

}  // namespace

// The routed experts of one MoE layer in one call: x [N, H] holds the experts' rows one expert after the other
// (counts[e] rows for gate_ups[e] [2I, H] and downs[e] [H, I]), scale [N] or None. Returns [N, H] (fp32 when
// out_fp32) where each row is bit for bit what swiglu gives it with its expert's weights: the same products, each
// output one accumulator in the same order, and the same activation. None (nothing computed) when the kernels do not
// serve one of the experts; the caller then runs swiglu per expert.
std::optional<torch::Tensor> grouped_swiglu(const torch::Tensor& x, const std::vector<torch::Tensor>& gate_ups,
                                            const std::vector<torch::Tensor>& downs,
                                            const std::vector<int64_t>& counts,
                                            const std::optional<torch::Tensor>& scale, bool out_fp32) {
  const int64_t E = static_cast<int64_t>(counts.size());
  if (E == 0 || static_cast<int64_t>(gate_ups.size()) != E || static_cast<int64_t>(downs.size()) != E ||
      x.dim() != 2)
    return std::nullopt;
  const int64_t N = x.size(0), H = x.size(1), I = downs[0].size(1);
  const Path p1 = choose(x.scalar_type(), gate_ups[0].scalar_type()), p2 = choose(x.scalar_type(), downs[0].scalar_type());
  std::vector<int64_t> off(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    const auto &gu = gate_ups[e], &dn = downs[e];
    if (counts[e] < 1 || !servable(x, gu, N) || !dn.device().is_cpu() || dn.dim() != 2 || dn.stride(1) != 1 ||
        gu.size(0) != 2 * I || dn.size(0) != H || dn.size(1) != I || choose(x.scalar_type(), gu.scalar_type()) != p1 ||
        choose(x.scalar_type(), dn.scalar_type()) != p2)
      return std::nullopt;
    off[e + 1] = off[e] + counts[e];
  }
  auto s = fp32_vector(scale);
  if (p1 == Path::none || p2 == Path::none || off[E] != N || (s && s->numel() != N)) return std::nullopt;
  const auto out_dtype = out_fp32 ? at::kFloat : x.scalar_type();
  // gate/up products of every expert's rows: [N, 2I] fp32
  auto xp = padded_x(x, x_step(p1), x_dtype(p1));
  const int64_t Kp1 = xp.size(1), xe1 = xp.element_size();
  auto h = torch::empty({N, 2 * I}, x.options().dtype(at::kFloat));
  float* hp = h.data_ptr<float>();
  const auto first = pieces(counts, 2 * I, H, gate_ups[0].element_size());
  at::parallel_for(0, static_cast<int64_t>(first.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Piece& pc = first[i];
      const auto& w = gate_ups[pc.e];
      rows_for(p1, static_cast<const char*>(xp.data_ptr()) + off[pc.e] * Kp1 * xe1, counts[pc.e], Kp1, w.data_ptr(),
               w.stride(0), H, pc.n0, pc.n1, Epilogue{nullptr, nullptr, hp + off[pc.e] * 2 * I, 2 * I, false});
    }
  });
  // silu(gate) * up, as swiglu computes it
  auto act = activate(h, I, x.scalar_type());
  // down products, scaled per row
  auto ap = padded_x(act, x_step(p2), x_dtype(p2));
  const int64_t Kp2 = ap.size(1), xe2 = ap.element_size();
  auto out = torch::empty({N, H}, x.options().dtype(out_dtype));
  const int64_t oe = out.element_size();
  const auto second = pieces(counts, H, I, downs[0].element_size());
  at::parallel_for(0, static_cast<int64_t>(second.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Piece& pc = second[i];
      const auto& w = downs[pc.e];
      Epilogue ep{nullptr, s ? s->data_ptr<float>() + off[pc.e] : nullptr,
                  static_cast<char*>(out.data_ptr()) + off[pc.e] * H * oe, H, out_dtype == at::kBFloat16};
      rows_for(p2, static_cast<const char*>(ap.data_ptr()) + off[pc.e] * Kp2 * xe2, counts[pc.e], Kp2, w.data_ptr(),
               w.stride(0), I, pc.n0, pc.n1, ep);
    }
  });
  kCalls.fetch_add(2 * E, std::memory_order_relaxed);
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

// out[m, :] += sum_{j < n} p[m * ldp + j] * v[j, :] in fp32, j ascending; v rows at stride ldv. Called on
// consecutive runs of the cached rows, it sums each output over all of them in ascending order, as one call would.
template <class T>
CLONES void weighted_rows(const float* p, int64_t M, int64_t ldp, int64_t n, const T* v, int64_t ldv, int64_t dv,
                          float* out) {
  for (int64_t m = 0; m < M; ++m) {
    float* o = out + m * dv;
    for (int64_t j = 0; j < n; ++j) {
      const float pj = p[m * ldp + j];
      const T* vj = v + j * ldv;
      for (int64_t c = 0; c < dv; ++c) o[c] += pj * f32(vj[c]);
    }
  }
}

// row[0..S) = softmax(row * scale) in fp32 (the maximum subtracted first).
inline void softmax_scaled(float* row, int64_t S, float scale) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < S; ++j) mx = std::max(mx, row[j] *= scale);
  float sum = 0.0f;
  for (int64_t j = 0; j < S; ++j) sum += (row[j] = std::exp(row[j] - mx));
  for (int64_t j = 0; j < S; ++j) row[j] /= sum;
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

namespace {

// Where a sequence's cached rows are: row j of one KV head's keys at k + slot(j) * ldk, its values at
// v + slot(j) * ldv (elements of T), with slot(j) = table[j / block] * block + j % block in a paged cache (table
// set), else j.
template <class T>
struct KvRows {
  const T* k;
  const T* v;
  int64_t ldk, ldv;
  const int64_t* table;
  int64_t block;

  int64_t slot(int64_t j) const { return table == nullptr ? j : table[j / block] * block + j % block; }
  // end of the run of consecutive slots starting at row j (at most `end`)
  int64_t run_end(int64_t j, int64_t end) const {
    return table == nullptr ? end : std::min(end, (j / block + 1) * block);
  }
};

// Attention of `per` query heads (rows of qx, padded for `path`) sharing one KV head over its cached rows
// [start, end): scores by the product kernel, softmax in fp32, then the fp32 weighted sum of values into o [per, dv].
// A score is one accumulator whichever run of rows it is computed in, so paged and contiguous caches agree bitwise.
template <class T>
void attend_head(Path path, const void* qx, int64_t per, int64_t Kp, int64_t d, const KvRows<T>& kv, int64_t start,
                 int64_t end, int64_t dv, float scale, std::vector<float>& p, float* o) {
  const int64_t S = end - start;
  p.resize(per * S);
  for (int64_t j = start, j1; j < end; j = j1) {
    j1 = kv.run_end(j, end);
    rows_for(path, qx, per, Kp, kv.k + kv.slot(j) * kv.ldk, kv.ldk, d, 0, j1 - j,
             Epilogue{nullptr, nullptr, p.data() + (j - start), S, false});
  }
  for (int64_t m = 0; m < per; ++m) softmax_scaled(p.data() + m * S, S, scale);
  std::fill(o, o + per * dv, 0.0f);
  for (int64_t j = start, j1; j < end; j = j1) {
    j1 = kv.run_end(j, end);
    weighted_rows(p.data() + (j - start), per, S, j1 - j, kv.v + kv.slot(j) * kv.ldv, kv.ldv, dv, o);
  }
}

// Query rows of one forward pass over their sequences' caches: row r (heads [h, d] of q) sees the cached rows
// [start(r), end[r]) of sequence seq[r], start(r) = max(0, end[r] - window) with a window (> 0), else 0.
struct AttentionRows {
  const torch::Tensor& q;  // [rows, h, d]
  const torch::Tensor& k;  // [slots, g, d] (any row stride)
  const torch::Tensor& v;  // [slots, g, dv]
  const int64_t* tables;  // [seqs, width] block ids (null: one contiguous cache, seq ignored)
  int64_t width, block;
  const int64_t* seq;  // [rows] or null
  const int64_t* end;  // [rows]
  int64_t window;
  double scale;
};

// The attention of every (row, KV head) pair, in parallel over the pairs; [rows, h, dv] in q's dtype. Each pair is
// computed alone, so a row's result does not depend on the other rows or on the thread split.
template <class T>
torch::Tensor attend_rows(Path path, const AttentionRows& a) {
  const int64_t rows = a.q.size(0), h = a.q.size(1), d = a.q.size(2), g = a.k.size(1), dv = a.v.size(2);
  const int64_t per = h / g;
  auto qx = padded_x(a.q.reshape({rows * h, d}), x_step(path), x_dtype(path));  // [rows * h, Kp]
  const int64_t Kp = qx.size(1), xe = qx.element_size();
  auto out = torch::empty({rows, h, dv}, a.q.options());
  const Epilogue store{nullptr, nullptr, out.data_ptr(), dv, a.q.scalar_type() == at::kBFloat16};
  int64_t keys = 0;
  for (int64_t r = 0; r < rows; ++r) keys += a.end[r];
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) * rows / std::max<int64_t>(1, keys * (d + dv) * per));
  at::parallel_for(0, rows * g, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> p, o(per * dv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / g, kv = t % g, end = a.end[r];
      const int64_t start = a.window > 0 ? std::max<int64_t>(0, end - a.window) : 0;
      const KvRows<T> cache{a.k.data_ptr<T>() + kv * a.k.stride(1), a.v.data_ptr<T>() + kv * a.v.stride(1),
                            a.k.stride(0), a.v.stride(0), a.tables ? a.tables + a.seq[r] * a.width : nullptr,
                            a.block};
      const int64_t q0 = r * h + kv * per;  // first query head of this KV head's group
      attend_head(path, static_cast<const char*>(qx.data_ptr()) + q0 * Kp * xe, per, Kp, d, cache, start, end, dv,
                  static_cast<float>(a.scale), p, o.data());
      for (int64_t m = 0; m < per; ++m)
        for (int64_t c = 0; c < dv; ++c) store.store(q0 + m, c, o[m * dv + c]);
    }
  });
  return out;
}

// Whether the kernels serve attention of q [.., h, d] over k [.., g, d], v [.., g, dv] (the layout checks common
// to both entry points).
Path attention_path(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  Path path = choose(q.scalar_type(), k.scalar_type());
  const int64_t h = q.size(-2), g = k.size(-2);
  if (path == Path::none || !q.device().is_cpu() || !k.device().is_cpu() || !v.device().is_cpu() || h % g != 0 ||
      v.size(-2) != g || k.stride(-1) != 1 || v.stride(-1) != 1 || v.scalar_type() != k.scalar_type() ||
      q.size(-1) != k.size(-1))
    return Path::none;
  return path;
}

torch::Tensor attend_any(Path path, const AttentionRows& a) {
  return a.k.scalar_type() == at::kFloat ? attend_rows<float>(path, a) : attend_rows<bf16>(path, a);
}

}  // namespace

// One query row per head over S cached keys: q [h, d], k [S, g, d], v [S, g, dv] (rows may be strided);
// returns [h, dv] in q's dtype. Per KV head: scores by the GEMV kernel (the group's query heads as its rows),
// softmax in fp32, then the fp32 weighted sum of values.
std::optional<torch::Tensor> decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                              double scale) {
  if (q.dim() != 2 || k.dim() != 3 || v.dim() != 3 || k.size(0) == 0 || v.size(0) != k.size(0)) return std::nullopt;
  const Path path = attention_path(q, k, v);
  if (path == Path::none) return std::nullopt;
  const int64_t end = k.size(0);
  return attend_any(path, AttentionRows{q.unsqueeze(0), k, v, nullptr, 0, 1, nullptr, &end, 0, scale}).squeeze(0);
}

// Attention of the rows of one forward pass over paged caches, in one call: q [T, h, d]; k_pool [P, B, g, d] and
// v_pool [P, B, g, dv] hold every sequence's rows in blocks of B; tables [n, width] each sequence's block ids; row t
// of q belongs to sequence seq[t] and sees its cached rows [0, end[t]) (the last `window` of them when window > 0).
// Each row's result is bitwise decode_attention's over the same keys. None when not served.
std::optional<torch::Tensor> paged_attention(const torch::Tensor& q, const torch::Tensor& k_pool,
                                             const torch::Tensor& v_pool, const torch::Tensor& tables,
                                             const torch::Tensor& seq, const torch::Tensor& end, int64_t window,
                                             double scale) {
  const int64_t T = q.size(0);
  const bool ok = q.dim() == 3 && k_pool.dim() == 4 && v_pool.dim() == 4 && k_pool.is_contiguous() &&
                  v_pool.is_contiguous() && k_pool.size(0) == v_pool.size(0) && k_pool.size(1) == v_pool.size(1) &&
                  tables.dim() == 2 && tables.scalar_type() == at::kLong && tables.is_contiguous() &&
                  seq.scalar_type() == at::kLong && end.scalar_type() == at::kLong && seq.is_contiguous() &&
                  end.is_contiguous() && seq.numel() == T && end.numel() == T && T > 0;
  if (!ok) return std::nullopt;
  const auto k = k_pool.flatten(0, 1), v = v_pool.flatten(0, 1);  // [slots, g, d]: views
  const Path path = attention_path(q, k, v);
  const int64_t* ends = end.data_ptr<int64_t>();
  const int64_t* seqs = seq.data_ptr<int64_t>();
  const int64_t width = tables.size(1), block = k_pool.size(1);
  for (int64_t t = 0; t < T; ++t)  // every row sees at least one key, within its table
    if (ends[t] < 1 || ends[t] > width * block || seqs[t] < 0 || seqs[t] >= tables.size(0)) return std::nullopt;
  if (path == Path::none) return std::nullopt;
  return attend_any(path, AttentionRows{q, k, v, tables.data_ptr<int64_t>(), width, block, seqs, ends, window,
                                        scale});
}

// Elementwise fp32 functions with every element through the C library's expf: torch's elementwise kernels send a
// tensor's vector-sized runs through Sleef's exp and the rest through expf (last-bit differences), and split large
// tensors between threads anywhere, so an element's result would depend on where it sits in the tensor. Each is
// torch's scalar formula, so a tensor of fewer elements than a vector (a [1, 1] gate) gets torch's bits.
template <typename F>
torch::Tensor each_element(const torch::Tensor& x, const char* name, F f) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, ": fp32 CPU tensors only");
  const auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const float* src = xc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, xc.numel(), 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dst[i] = f(src[i]);
  });
  return out;
}

torch::Tensor sigmoid(const torch::Tensor& x) {
  return each_element(x, "sigmoid", [](float v) { return 1.0f / (1.0f + std::exp(-v)); });
}

torch::Tensor silu(const torch::Tensor& x) {
  return each_element(x, "silu", [](float v) { return v / (1.0f + std::exp(-v)); });
}

std::string isa() { return isa_name(kIsa); }

int64_t calls() { return kCalls.load(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The products run without the interpreter lock, as torch's own ops do: an offloading store's reader threads then
  // issue and land expert reads while the model computes (holding it, they waited for the model to block).
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("linear", &linear, "F.linear for a few rows (fp32 accumulation, batch-invariant)", nogil);
  m.def("swiglu", &swiglu, "down(silu(gate) * up) * scale for a few rows", nogil);
  m.def("rmsnorm", &rmsnorm, "RMSNorm in fp32, rounded once to the weight's dtype", nogil);
  m.def("rotary_", &rotary_, "rotate-half rotary in place on q and k; False if the layout is not served", nogil);
  m.def("decode_attention", &decode_attention, "one query row per head over the cache; None if not served", nogil);
  m.def("paged_attention", &paged_attention, "query rows over paged caches in one call; None if not served", nogil);
  m.def("grouped_swiglu", &grouped_swiglu, "every routed expert of a layer in one call; None if not served", nogil);
  m.def("sigmoid", &sigmoid, "torch.sigmoid for fp32, each element by the same code path", nogil);
  m.def("silu", &silu, "F.silu for fp32, each element by the same code path", nogil);
  m.def("isa", &isa, "the code path chosen for this CPU");
  m.def("calls", &calls, "products computed by the kernels so far");
}
