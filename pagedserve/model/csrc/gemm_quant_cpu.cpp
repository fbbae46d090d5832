// y[M, N] = x[M, K] @ W[N, K]^T (+ bias) with W kept quantized in memory: 4-bit or 8-bit integers
// q in groups of G along K, each group with a float32 scale s and an optional offset b per output
// column, w = q * s + b. Every weight format pagedserve loads maps onto this exactly (GGUF Q4_0:
// s = d, b = -8d; Q4_1: s = d, b = m; Q8_0: s = d; AWQ / GPTQ: b = -s * zero; compressed-tensors
// symmetric int8/int4: no b); model/quantization/weight.py does the mapping and the packing.
//
// Layout: column panels of 16 output columns (as the float GEMM's), each a run of 64-byte units
// shaped for VNNI's dot product, which sums four adjacent bytes of a 32-bit lane:
//   8-bit: unit t holds k = 4t..4t+3; byte 4c + i = q[column c][4t + i] (int8)      [P, K/4, 64]
//   4-bit: unit t holds k = 8t..8t+7; byte 4c + i: low nibble q[c][8t + i], high nibble
//          q[c][8t + 4 + i] (unsigned 0..15)                                          [P, K/8, 64]
// Scales: [P, K/G, 16], or with offsets [P, K/G, 32] (a group's 16 scales, then its 16 offsets):
// beside the weights, one more sequential stream per thread, not two. float16 where every scale and
// offset is one exactly (GGUF's are: its d and m are float16 in the file), else float32: at batch 1
// the step reads every byte, and float16 scales make Q4_1's 0.75 bytes a weight 0.625.
//
// Two ways through, chosen by batch size:
// - Small M (decode steps at low concurrency, bound by the weight bytes read), on CPUs with
//   AVX512_VNNI: an integer kernel. Each row of x is quantized per group to int8 in two passes
//   (QX below: ~15 bits a value), VPDPBUSD multiplies 64 weight bytes by four broadcast x bytes a
//   lane, and each group's int32 sums are scaled once: y += s * s_x * sum(q * x_q) + b * sum(x).
//   4-bit nibbles are the unsigned operand as they are (no conversion at all); 8-bit weights are
//   the signed one, x_q + 128 the unsigned, and 128 * sum(q) (one more VPDPBUSD per unit, shared
//   by the rows) comes back off.
// - Larger M: each panel slice is dequantized once into a small scratch (bf16 k-pairs for the
//   AVX512_BF16 tile, float32 rows for the float32 tiles) that every row tile of x then reuses from
//   L1/L2, so the expansion is amortized over M / 12 tiles and the product runs at the packed
//   GEMM's rate in the precision --dtype asks for.
// - --activation-dtype int8 (int8_rows): every batch on the integer kernel with one int8 pass,
//   above 4 rows in tiles of 10 rows (the 64-byte unit unpacked once for ten rows).
#include <torch/extension.h>
#include "parallel.h"
#include "prefetch.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

namespace qgemm {
constexpr int64_t NR = 16;      // output columns per panel
constexpr int64_t KC = 2048;    // float32 path: k rows per slice (as gemm_cpu.cpp)
constexpr int64_t KCP = 1024;   // bf16 path: k-pairs per slice (as gemm_bf16_cpu.cpp)
constexpr int64_t UNIT = 64;    // bytes per (panel, unit)

struct QW {  // one quantized weight, as the kernels read it
  const uint8_t* q;
  const void* sb;  // per (panel, group): 16 scales, then 16 offsets when has_b; float16 when half
  bool has_b, half;
  int64_t P, K, G, bits;
  // Element offset of (panel j, group g)'s 16 scales; its offsets follow them.
  int64_t at(int64_t j, int64_t g) const { return (j * groups() + g) * (has_b ? 2 * NR : NR); }
  float sb_value(int64_t i) const {
    return half ? float(reinterpret_cast<const at::Half*>(sb)[i]) : reinterpret_cast<const float*>(sb)[i];
  }
  // (panel j, group g)'s 16 scales and 16 offsets (zeros without) as float32.
  void group(int64_t j, int64_t g, float* s, float* b) const {
    const int64_t i = at(j, g);
    for (int c = 0; c < NR; ++c) {
      s[c] = sb_value(i + c);
      b[c] = has_b ? sb_value(i + NR + c) : 0.f;
    }
  }
  int64_t kper() const { return bits == 4 ? 8 : 4; }  // k per 64-byte unit
  int64_t units() const { return K / kper(); }
  int64_t groups() const { return K / G; }
  const uint8_t* panel(int64_t j) const { return q + j * units() * UNIT; }
  // q[column 16j + c][k]
  int value(int64_t j, int64_t c, int64_t k) const {
    const uint8_t byte = panel(j)[(k / kper()) * UNIT + 4 * c + (k % 4)];
    if (bits == 8) return int8_t(byte);
    return (k % 8) < 4 ? (byte & 15) : (byte >> 4);
  }
};

// Panel j, k rows [k0, k0 + kc) (kc a multiple of the unit) -> float32 rows [kc][16] (dst). Plain
// loops over the unit's bytes: GCC vectorizes them at -O3 for both feature levels.
template <int BITS>
static void dequant_rows(const QW& w, int64_t j, int64_t k0, int64_t kc, float* __restrict dst) {
  constexpr int64_t KPER = BITS == 4 ? 8 : 4;
  const uint8_t* __restrict u = w.panel(j) + (k0 / KPER) * UNIT;
  float s[NR], b[NR];
  int64_t have = -1;  // the group whose scales s and b hold
  for (int64_t k = k0; k < k0 + kc; k += KPER, u += UNIT, dst += KPER * NR) {
    if (k / w.G != have) w.group(j, have = k / w.G, s, b);
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < NR; ++c) {
        const uint8_t byte = u[4 * c + i];
        if constexpr (BITS == 4) {
          dst[i * NR + c] = float(byte & 15) * s[c] + b[c];
          dst[(4 + i) * NR + c] = float(byte >> 4) * s[c] + b[c];
        } else {
          dst[i * NR + c] = float(int8_t(byte)) * s[c] + b[c];
        }
      }
  }
}

static QW view(const torch::Tensor& qw, const torch::Tensor& scales) {
  const bool four = qw.scalar_type() == torch::kUInt8;
  TORCH_CHECK((four || qw.scalar_type() == torch::kInt8) && qw.dim() == 3 && qw.size(2) == UNIT && qw.is_contiguous(),
              "a packed quantized weight: uint8 [N/16, K/8, 64] (4-bit) or int8 [N/16, K/4, 64] (8-bit)");
  const int64_t K = qw.size(1) * (four ? 8 : 4);
  const bool half = scales.scalar_type() == torch::kHalf;
  TORCH_CHECK((half || scales.scalar_type() == torch::kFloat32) && scales.dim() == 3 && scales.size(0) == qw.size(0) &&
                  (scales.size(2) == NR || scales.size(2) == 2 * NR) && scales.is_contiguous() && scales.size(1) > 0 &&
                  K % scales.size(1) == 0 && (K / scales.size(1)) % (four ? 8 : 4) == 0,
              "scales must be float32 or float16 [N/16, K/G, 16] (or [N/16, K/G, 32]: scales then offsets), the group size G a "
              "multiple of ", four ? 8 : 4, " dividing K");
  return QW{reinterpret_cast<const uint8_t*>(qw.data_ptr()), scales.data_ptr(), scales.size(2) == 2 * NR, half,
            qw.size(0), K, K / scales.size(1), four ? 4 : 8};
}

#if defined(__AVX512F__)
// (panel j, group g)'s 16 scales (which 0) or offsets (which 1) as float32 lanes.
static inline __m512 load16(const QW& w, int64_t j, int64_t g, int which) {
  const int64_t i = w.at(j, g) + which * NR;
  if (w.half) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                      reinterpret_cast<const at::Half*>(w.sb) + i)));
  return _mm512_loadu_ps(reinterpret_cast<const float*>(w.sb) + i);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// float32 path: panels [j0, j1) (pairs kept whole), each slice dequantized into `scratch` and
// multiplied by every row tile of x with the float32 tile of this build.
static void panels_f32(const QW& w, const float* A, int64_t lda, const float* bias, float* C, int64_t ldc, int64_t M,
                       int64_t j0, int64_t j1, float* scratch) {
  const int64_t K = w.K;
  const int64_t kc_max = K <= 3 * KC / 2 ? K : KC;  // KC is a multiple of every unit
  for (int64_t j = j0; j < j1; j += 2) {
    const int64_t np = std::min<int64_t>(2, j1 - j);
    const float* b = bias ? bias + j * NR : nullptr;
    for (int64_t pc = 0; pc < K; pc += kc_max) {
      const int64_t kc = std::min(kc_max, K - pc);
      for (int64_t t = 0; t < np; ++t) {
        if (w.bits == 4) dequant_rows<4>(w, j + t, pc, kc, scratch + t * kc * NR);
        else dequant_rows<8>(w, j + t, pc, kc, scratch + t * kc * NR);
      }
#if defined(__AVX512F__)
      constexpr int64_t MR5 = 12;
      for (int64_t ir = 0; ir < M; ir += MR5) {
        const int64_t rows = std::min(MR5, M - ir);
        if (np == 2)
          tile512_rows<2>(rows, A + ir * lda + pc, lda, scratch, NR, kc * NR, C + ir * ldc + j * NR, ldc, kc, pc == 0, b, nullptr);
        else
          tile512_rows<1>(rows, A + ir * lda + pc, lda, scratch, NR, kc * NR, C + ir * ldc + j * NR, ldc, kc, pc == 0, b, nullptr);
      }
#else
      constexpr int64_t MR6 = 6;
      for (int64_t t = 0; t < np; ++t)
        for (int64_t ir = 0; ir < M; ir += MR6)
          tile_rows(std::min(MR6, M - ir), A + ir * lda + pc, lda, scratch + t * kc * NR, NR,
                    C + ir * ldc + (j + t) * NR, ldc, kc, pc == 0, b ? b + t * NR : nullptr);
#endif
    }
  }
}
#endif

#if defined(__AVX512F__)  // the integer kernel's input: built where it is (x86-64-v4)
// x rows quantized per group for the integer kernel: int8 [M, K] in one or two passes, s_x and
// sum(x) [M, K/G]. Pass two holds what pass one rounded off, at 254x the resolution:
// x ~= s_x * (q1 + q2 / 254), ~15 bits a value, where one pass alone (8 bits, llama.cpp's Q8
// activations) cost the default model +1.5% perplexity and 7% of its top-1 agreement.
struct QX {
  std::vector<int8_t> q[2];
  std::vector<float> s, sum;
};

// Rows [m0, m1) of x, 16 values a vector (G a multiple of 16): the scalar loop's q and s_x bit for bit
// (the same max, product and round-to-nearest-even), sum(x) to float rounding (another order).
static void quantize_rows_512(const float* x, int64_t ldx, int64_t m0, int64_t m1, int64_t K, int64_t G, bool plus128,
                              int passes, QX& out) {
  const int64_t ng = K / G;
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), add = _mm512_set1_epi32(plus128 ? 128 : 0);
  const __m512 second = _mm512_set1_ps(254.f);
  auto store = [&](__m512i q, int8_t* dst) {  // clamped, + 128 for the unsigned operand, low bytes
    q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi), add);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(q));
  };
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      const float* src = x + m * ldx + g * G;
      __m512 mx = _mm512_setzero_ps(), sm = _mm512_setzero_ps();
      for (int64_t k = 0; k < G; k += 16) {
        const __m512 v = _mm512_loadu_ps(src + k);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
        sm = _mm512_add_ps(sm, v);
      }
      const float amax = _mm512_reduce_max_ps(mx);
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      const int64_t at = m * K + g * G;
      for (int64_t k = 0; k < G; k += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(src + k), inv);
        const __m512i q1 = _mm512_cvtps_epi32(v);
        store(q1, out.q[0].data() + at + k);
        if (passes == 2) {  // what pass one rounded off (from the clamped q1, as the scalar loop)
          const __m512 q1f = _mm512_cvtepi32_ps(_mm512_min_epi32(_mm512_max_epi32(q1, lo), hi));
          store(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(v, q1f), second)), out.q[1].data() + at + k);
        }
      }
      out.s[m * ng + g] = amax / 127.f;
      out.sum[m * ng + g] = _mm512_reduce_add_ps(sm);
    }
}

static void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t G, bool plus128, int passes,
                          QX& out) {
  const int64_t ng = K / G;
  for (int p = 0; p < passes; ++p) out.q[p].resize(M * K);
  out.s.resize(M * ng);
  out.sum.resize(M * ng);
  if (G % 16 == 0) {
    pagedserve::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
      quantize_rows_512(x, ldx, m0, m1, K, G, plus128, passes, out);
    });
    return;
  }
  auto store = [plus128](int v) { return plus128 ? int8_t(uint8_t(v + 128)) : int8_t(v); };  // the unsigned operand's bits
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      const float* src = x + m * ldx + g * G;
      float amax = 0.f, sum = 0.f;
      for (int64_t k = 0; k < G; ++k) {
        amax = std::max(amax, std::fabs(src[k]));
        sum += src[k];
      }
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t k = 0; k < G; ++k) {
        const float v = src[k] * inv;
        const int q1 = std::clamp(int(std::nearbyint(v)), -127, 127);
        out.q[0][m * K + g * G + k] = store(q1);
        if (passes == 2) out.q[1][m * K + g * G + k] = store(std::clamp(int(std::nearbyint((v - q1) * 254.f)), -127, 127));
      }
      out.s[m * ng + g] = amax / 127.f;
      out.sum[m * ng + g] = sum;
    }
}
#endif
}  // namespace qgemm

#if defined(__AVX512F__) && defined(__GNUC__)
#define PAGEDSERVE_VNNI_GEMM 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
namespace qgemm {
// The integer tile asks for the weight bytes prefetch_bytes() ahead of the unit it multiplies
// (1 KiB: 16 units, four Q4_1 groups; past a panel's end that is the next panel, which the same
// thread usually takes next). With the weights streaming from memory (30 layers of SmolLM2, 66 MB),
// the hardware prefetcher alone left each unit's load waiting before its dot products: at M = 4-16
// rows the time was close to the stream's plus the products'. benchmarks/quant_weights.py measures
// it on and off (set_quant_prefetch); 768 bytes gained less, 2048 about the same, and into L2
// (prefetcht1, what the float GEMMs use: prefetch.h) measured the same within the noise.
static inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Rows r0 .. r0 + R of x (quantized: xq, PASSES passes) times panel j, all of K. One panel at a
// time, not two side by side: each thread then reads one sequential stream of units (and one of
// scales), and at batch 1 that streamed 30% faster (4.65-5.2 -> 3.3-3.7 ms for 30 layers).
template <int R, int BITS, int PASSES, int UPG>
static void vnni_tile(const QW& w, const QX& xq, int64_t r0, int64_t j, const float* bias, float* C, int64_t ldc) {
  const int64_t K = w.K;
  const int8_t* x0[2] = {xq.q[0].data() + r0 * K, PASSES > 1 ? xq.q[1].data() + r0 * K : nullptr};
  const float* xs = xq.s.data() + r0 * w.groups();
  const float* xsum = xq.sum.data() + r0 * w.groups();
  constexpr int64_t KPER = BITS == 4 ? 8 : 4;
  const int64_t ng = w.groups(), upg = UPG ? UPG : w.G / KPER;  // units per group: UPG when known, unrolled
  __m512 f[R];
  for (int r = 0; r < R; ++r) f[r] = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  const __m512i nib = _mm512_set1_epi8(15), u128 = _mm512_set1_epi8(char(0x80));
  const __m512 second = _mm512_set1_ps(1.f / 254.f);
  const uint8_t* up = w.panel(j);
  const int64_t pf = pagedserve::quant_prefetch_bytes().load(std::memory_order_relaxed);  // 0: the line read (no-op)
  for (int64_t g = 0; g < ng; ++g) {
    __m512i acc[R][PASSES], corr = _mm512_setzero_si512();
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < PASSES; ++h) acc[r][h] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int64_t t = 0; t < upg; ++t, up += UNIT) {
      const int64_t k = (g * upg + t) * KPER;
      _mm_prefetch(reinterpret_cast<const char*>(up) + pf, _MM_HINT_T0);  // a hint: never faults
      const __m512i v = _mm512_loadu_si512(up);
      if constexpr (BITS == 4) {
        const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        for (int r = 0; r < R; ++r)
          for (int h = 0; h < PASSES; ++h) {
            const int8_t* xr = x0[h] + r * K + k;
            acc[r][h] = _mm512_dpbusd_epi32(acc[r][h], lo, bcast4(xr));
            acc[r][h] = _mm512_dpbusd_epi32(acc[r][h], hi, bcast4(xr + 4));
          }
      } else {
        corr = _mm512_dpbusd_epi32(corr, u128, v);
        for (int r = 0; r < R; ++r)
          for (int h = 0; h < PASSES; ++h) acc[r][h] = _mm512_dpbusd_epi32(acc[r][h], bcast4(x0[h] + r * K + k), v);
      }
    }
    const __m512 s = load16(w, j, g, 0);
    const __m512 b = w.has_b ? load16(w, j, g, 1) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      __m512 dot = _mm512_cvtepi32_ps(BITS == 8 ? _mm512_sub_epi32(acc[r][0], corr) : acc[r][0]);
      if constexpr (PASSES > 1)
        dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(BITS == 8 ? _mm512_sub_epi32(acc[r][1], corr) : acc[r][1]), second,
                              dot);
      f[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(s, _mm512_set1_ps(xs[r * ng + g])), f[r]);
      if (w.has_b) f[r] = _mm512_fmadd_ps(b, _mm512_set1_ps(xsum[r * ng + g]), f[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(C + r * ldc, f[r]);
}

template <int BITS, int PASSES, int UPG>
static void vnni_rows(int64_t rows, const QW& w, const QX& xq, int64_t r0, int64_t j, const float* bias, float* C,
                      int64_t ldc) {
  if constexpr (PASSES == 1) {  // the wide tile (WIDE_MR rows: 10 accumulator pairs)
    switch (rows) {
      case 10: vnni_tile<10, BITS, 1, UPG>(w, xq, r0, j, bias, C, ldc); return;
      case 9: vnni_tile<9, BITS, 1, UPG>(w, xq, r0, j, bias, C, ldc); return;
      case 8: vnni_tile<8, BITS, 1, UPG>(w, xq, r0, j, bias, C, ldc); return;
      case 7: vnni_tile<7, BITS, 1, UPG>(w, xq, r0, j, bias, C, ldc); return;
      case 6: vnni_tile<6, BITS, 1, UPG>(w, xq, r0, j, bias, C, ldc); return;
      case 5: vnni_tile<5, BITS, 1, UPG>(w, xq, r0, j, bias, C, ldc); return;
      default: break;
    }
  }
  switch (rows) {
    case 4: vnni_tile<4, BITS, PASSES, UPG>(w, xq, r0, j, bias, C, ldc); break;
    case 3: vnni_tile<3, BITS, PASSES, UPG>(w, xq, r0, j, bias, C, ldc); break;
    case 2: vnni_tile<2, BITS, PASSES, UPG>(w, xq, r0, j, bias, C, ldc); break;
    default: vnni_tile<1, BITS, PASSES, UPG>(w, xq, r0, j, bias, C, ldc); break;
  }
}

constexpr int64_t WIDE_MR = 10;

// Panels [j0, j1) for all M rows, in row tiles of MR: 2 with two passes (twice the accumulators),
// WIDE_MR with one, where at larger batches the panel's weights stay in L1 across the row tiles and
// each 64-byte unit's unpacking is shared by more rows.
template <int PASSES, int64_t MR>
static void vnni_panels(const QW& w, const QX& xq, int64_t M, int64_t j0, int64_t j1, const float* bias, float* C,
                        int64_t ldc) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t ir = 0; ir < M; ir += MR) {
      const int64_t rows = std::min<int64_t>(MR, M - ir);
      const float* bj = bias ? bias + j * NR : nullptr;
      float* c = C + ir * ldc + j * NR;
      // Four units a group (GGUF's groups of 32 at 4 bits, Q6_K's 16 at 8) unrolled: GCC then keeps
      // the accumulators in place instead of copying them around the loop.
      const bool four = w.G == 4 * w.kper();
      if (w.bits == 4) {
        if (four) vnni_rows<4, PASSES, 4>(rows, w, xq, ir, j, bj, c, ldc);
        else vnni_rows<4, PASSES, 0>(rows, w, xq, ir, j, bj, c, ldc);
      } else {
        if (four) vnni_rows<8, PASSES, 4>(rows, w, xq, ir, j, bj, c, ldc);
        else vnni_rows<8, PASSES, 0>(rows, w, xq, ir, j, bj, c, ldc);
      }
    }
}
}  // namespace qgemm
#pragma GCC pop_options
#endif

#if defined(PAGEDSERVE_BF16_GEMM)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
namespace qgemm {
// Panel j, k rows [k0, k0 + 2 np) -> bf16 pair rows [np][32] (dst) in the bf16 GEMM's order:
// (column c, even k), (column c, odd k) side by side. The float32 values q * s + b round to bf16
// (nearest-even) as a bf16 model's weights do.
template <int BITS>
static void dequant_pairs_bf16(const QW& w, int64_t j, int64_t k0, int64_t np, uint16_t* __restrict dst) {
  // lanes of cvtne2ps(hi, lo) are [lo 0..15 | hi 0..15]; interleave to (lo c, hi c) pairs.
  alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  constexpr int64_t KPER = BITS == 4 ? 8 : 4;
  const __m512i idx = _mm512_load_si512(order);
  const __m512i mask = _mm512_set1_epi32(BITS == 4 ? 15 : 255);
  const uint8_t* u = w.panel(j) + (k0 / KPER) * UNIT;
  for (int64_t k = k0; k < k0 + 2 * np; k += KPER, u += UNIT) {
    const int64_t g = k / w.G;
    const __m512 s = load16(w, j, g, 0);
    const __m512 b = w.has_b ? load16(w, j, g, 1) : _mm512_setzero_ps();
    const __m512i v = _mm512_loadu_si512(u);
    __m512 row[KPER];
    for (int i = 0; i < KPER; ++i) {
      __m512i q;
      if constexpr (BITS == 4) q = _mm512_and_si512(_mm512_srli_epi32(v, 8 * (i % 4) + 4 * (i / 4)), mask);
      else q = _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * i), 24);
      row[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, b);
    }
    for (int i = 0; i < KPER; i += 2, dst += 2 * NR)
      _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(row[i + 1], row[i])));
  }
}

// bf16 path: x already rounded to bf16 pairs (A, lda pairs per row).
static void panels_bf16(const QW& w, const uint32_t* A, int64_t lda, const float* bias, float* C, int64_t ldc,
                        int64_t M, int64_t j0, int64_t j1, uint16_t* scratch) {
  const int64_t K2 = w.K / 2;
  const int64_t kcp_max = K2 <= 3 * KCP / 2 ? K2 : KCP;  // KCP pairs: a multiple of every unit
  for (int64_t j = j0; j < j1; j += 2) {
    const int64_t np = std::min<int64_t>(2, j1 - j);
    const float* b = bias ? bias + j * NR : nullptr;
    for (int64_t pc = 0; pc < K2; pc += kcp_max) {
      const int64_t kp = std::min(kcp_max, K2 - pc);
      for (int64_t t = 0; t < np; ++t) {
        if (w.bits == 4) dequant_pairs_bf16<4>(w, j + t, 2 * pc, kp, scratch + t * kp * 2 * NR);
        else dequant_pairs_bf16<8>(w, j + t, 2 * pc, kp, scratch + t * kp * 2 * NR);
      }
      for (int64_t ir = 0; ir < M; ir += bf16gemm::MR) {
        const int64_t rows = std::min(bf16gemm::MR, M - ir);
        if (np == 2)
          bf16gemm::tile_rows<2>(rows, A + ir * lda + pc, lda, scratch, kp * 2 * NR, C + ir * ldc + j * NR, ldc, kp, pc == 0, b);
        else
          bf16gemm::tile_rows<1>(rows, A + ir * lda + pc, lda, scratch, kp * 2 * NR, C + ir * ldc + j * NR, ldc, kp, pc == 0, b);
      }
    }
  }
}
}  // namespace qgemm
#pragma GCC pop_options
#endif

bool quant_linear_vnni_supported() {
#if defined(PAGEDSERVE_VNNI_GEMM)
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// Up to this many rows of x take the integer (VNNI) kernel; more take the dequantize-then-GEMM path
// (benchmarks/quant_weights.py measures the crossover: with two activation passes on a 2-core Zen 4,
// for 30 layers of SmolLM2's projections, 4-bit 4.1 vs 8.0 ms at M = 1, 7.1 vs 8.2 at M = 4, 10.4
// vs 10.2 at M = 8, 18.3 vs 14.2 at M = 16). 0 turns the integer kernel off.
static std::atomic<int64_t>& vnni_max_rows() {
  static std::atomic<int64_t> v{4};
  return v;
}

// How many int8 passes x takes in the integer kernel (QX above): 2 by default, 1 for llama.cpp's
// precision (benchmarks/quant_weights.py measures both).
static std::atomic<int64_t>& activation_passes() {
  static std::atomic<int64_t> v{2};
  return v;
}

// x float32 [M, K] @ a quantized weight (layout above), + bias. bf16: the larger-M path multiplies
// in bf16 on the AVX512_BF16 tile (x and the dequantized weights rounded to bf16, float32
// accumulation), else in float32. int8_rows > 0 (--activation-dtype int8): batches of at least that
// many rows take the integer kernel with ONE int8 pass per activation (8 bits a value per group of
// G, as OpenVINO's CPU dynamic quantization and llama.cpp's Q8 activations), above 4 rows on its
// wide row tile: VPDPBUSD's 64 products an instruction against the bf16 tile's 32, for some
// accuracy (benchmarks/quant_weights.py measures both).
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor qw, torch::Tensor scales, c10::optional<torch::Tensor> bias,
                           bool bf16, int64_t int8_rows) {
  const qgemm::QW w = qgemm::view(qw, scales);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.size(1) == w.K, "x must be float32 [M, ", w.K,
              "], got ", x.sizes());
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t M = x.size(0), N = w.P * qgemm::NR, K = w.K;
  const float* b = nullptr;
  if (bias.has_value() && bias->defined() && bias->numel()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == torch::kFloat32,
                "bias must be float32 [", N, "]");
    b = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
#if defined(PAGEDSERVE_VNNI_GEMM)
  const int64_t small = vnni_max_rows().load(std::memory_order_relaxed);
  const bool int8 = int8_rows > 0 && M >= int8_rows;
  if ((M <= small || int8) && quant_linear_vnni_supported()) {
    const int passes = int8 || activation_passes().load(std::memory_order_relaxed) == 1 ? 1 : 2;
    // Kept from call to call (a fresh buffer each call is page faults at larger batches); named
    // through a reference, which the lambdas below capture: a thread_local named inside them
    // would be each worker thread's own, empty one.
    thread_local qgemm::QX kept;
    qgemm::QX& xq = kept;
    qgemm::quantize_rows(xp, ldx, M, K, w.G, w.bits == 8, passes, xq);
    pagedserve::parallel_for(0, w.P, M > 4 ? 1 : 2, [&](int64_t j0, int64_t j1) {
      if (passes == 1) qgemm::vnni_panels<1, qgemm::WIDE_MR>(w, xq, M, j0, j1, b, yp, N);
      else qgemm::vnni_panels<2, 2>(w, xq, M, j0, j1, b, yp, N);
    });
    return y;
  }
#endif
  if (bf16) {
#if defined(PAGEDSERVE_BF16_GEMM)
    TORCH_CHECK(packed_linear_bf16_supported(), "this CPU has no AVX512_BF16");
    const int64_t K2 = K / 2;
    const auto xb = bf16gemm::round_input(x, K2);
    const uint32_t* A = reinterpret_cast<const uint32_t*>(xb.data_ptr<at::BFloat16>());
    pagedserve::parallel_for(0, (w.P + 1) / 2, 1, [&](int64_t q0, int64_t q1) {
      thread_local std::vector<uint16_t> scratch;
      scratch.resize(2 * std::min(K2, qgemm::KCP * 3 / 2) * 2 * qgemm::NR);
      qgemm::panels_bf16(w, A, K2, b, yp, N, M, 2 * q0, std::min(w.P, 2 * q1), scratch.data());
    });
    return y;
#else
    TORCH_CHECK(false, "bf16 quantized products need the x86-64-v4 kernel build and a CPU with AVX512_BF16");
#endif
  }
#if defined(__AVX2__) && defined(__FMA__)
  pagedserve::parallel_for(0, (w.P + 1) / 2, 1, [&](int64_t q0, int64_t q1) {
    thread_local std::vector<float> scratch;
    scratch.resize(2 * std::min(K, qgemm::KC * 3 / 2) * qgemm::NR);
    qgemm::panels_f32(w, xp, ldx, b, yp, N, M, 2 * q0, std::min(w.P, 2 * q1), scratch.data());
  });
  return y;
#else
  TORCH_CHECK(false, "quantized products need a CPU with AVX2+FMA");
#endif
}

// Rows `ids` of a quantized [N, K] matrix as float32 [T, K]: the embedding lookup of a quantized
// table (GGUF's token_embd), read from the same packed weight the tied output head multiplies by.
torch::Tensor quant_embedding(torch::Tensor ids, torch::Tensor qw, torch::Tensor scales) {
  const qgemm::QW w = qgemm::view(qw, scales);
  TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.dim() == 1, "ids must be int64 [T]");
  ids = ids.contiguous();
  const int64_t T = ids.size(0), K = w.K, N = w.P * qgemm::NR;
  auto out = torch::empty({T, K}, scales.options().dtype(torch::kFloat32));
  const int64_t* id = ids.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(id[t] >= 0 && id[t] < N, "token id ", id[t], " is outside the vocabulary [0, ", N, ")");
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = id[t] / qgemm::NR, c = id[t] % qgemm::NR;
      float* dst = o + t * K;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = w.at(j, k / w.G) + c;
        dst[k] = float(w.value(j, c, k)) * w.sb_value(i) + (w.has_b ? w.sb_value(i + NR) : 0.f);
      }
    }
  });
  return out;
}

void set_quant_vnni_max_rows(int64_t n) { vnni_max_rows().store(n); }
void set_quant_prefetch(int64_t bytes) { pagedserve::set_prefetch_bytes(pagedserve::quant_prefetch_bytes(), bytes); }
void set_quant_activation_passes(int64_t n) {
  TORCH_CHECK(n == 1 || n == 2, "activation passes: 1 or 2, got ", n);
  activation_passes().store(n);
}
