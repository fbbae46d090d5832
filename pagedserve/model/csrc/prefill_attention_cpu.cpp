// Prefill attention for CPU (float32 compute, or bf16 math: prefill_bf16): the tokens of one
// prompt chunk attend causally over the chunk's cached prefix and over themselves, flash-attention
// style: an online softmax over 64-key steps, so the [queries, keys] score matrix never exists in
// memory.
//
// Why our own kernel: PyTorch's CPU flash attention ran at ~60 GFLOP/s on these shapes (64-wide
// heads, 3 query heads per kv head, chunks of at most 512 tokens), and a chunk that follows a
// cached prefix first had its prefix gathered into new tensors and then took the masked path.
//
// Layout: per kv head, the context's keys are gathered once into panels of 16 keys stored [D][16]
// (the packed GEMM's layout: a register tile of scores accumulates over D, 6 rows x 16 keys with
// AVX2, 12 x 32 with AVX-512) and the values into rows [keys][D]. For contexts up to ~1000 tokens both sit in L2
// while every query row of the chunk reuses them. Prefix keys come from the paged cache (widened
// from a 16- or 8-bit cache); the chunk's own keys from k/v as computed, as the PyTorch path does.
// A query row is a (token, query head of the group) pair; a tile is QR consecutive rows (6, or 12
// with AVX-512), so with 3 heads per group a tile is 2 (4) tokens whose causal frontiers differ
// by up to 1 (3) keys.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include "attention_bf16.h"
#include "gemm_tile.h"
#include "gemm_tile512.h"
#include "kv_types.h"
#ifdef PS_ATTN_BF16
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#include "gemm_tile_bf16.h"
#pragma GCC pop_options
#endif

namespace {
constexpr int64_t KP = 16;   // keys per panel
#if defined(__AVX512F__)
constexpr int64_t QR = 12;   // query rows per tile: the AVX-512 tile's 12 x 32
#else
constexpr int64_t QR = 6;    // query rows per tile: the AVX2 tile's 6 x 16
#endif
constexpr int64_t KS = 64;   // keys per online-softmax step (4 panels)
}  // namespace

// S[r][0:16*np] = Q[r] . keys of np (1 or 2) adjacent panels, r < QR. Q rows D apart; S rows KS
// apart. It is the packed GEMM's tile (A = Q, B = the [D][16] panels): both panels at once in the
// AVX-512 tile, one after the other in the AVX2 one.
static inline void qk_panels(const float* Q, int64_t D, const float* panel, int64_t np, float* S) {
#if defined(__AVX512F__)
  if (np == 2)
    tile512<QR, 2>(Q, D, panel, KP, KP * D, S, KS, D, true, nullptr, nullptr);
  else
    tile512<QR, 1>(Q, D, panel, KP, KP * D, S, KS, D, true, nullptr, nullptr);
#elif defined(PS_AVX2)
  for (int64_t p = 0; p < np; ++p) tile<QR>(Q, D, panel + p * KP * D, KP, S + p * KP, KS, D, true, nullptr);
#else
  for (int64_t p = 0; p < np; ++p)
    for (int64_t r = 0; r < QR; ++r)
      for (int64_t j = 0; j < KP; ++j) {
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += Q[r * D + d] * panel[p * KP * D + d * KP + j];
        S[r * KS + p * KP + j] = dot;
      }
#endif
}

// O[r][0:D] += sum over t < nt of P[r][t] * V[t][0:D], r < QR. P rows KS apart, V and O rows D
// apart. The GEMM's tile accumulating into O (A = P, B = V): 32 columns at a time with AVX-512
// (two 16-wide "panels" 16 floats apart in each row of V), 16 with AVX2.
static inline void pv_step(const float* P, const float* V, int64_t nt, int64_t D, float* O) {
  int64_t d0 = 0;
#if defined(__AVX512F__)
  for (; d0 + 32 <= D; d0 += 32) tile512<QR, 2>(P, KS, V + d0, D, 16, O + d0, D, nt, false, nullptr, nullptr);
  for (; d0 + 16 <= D; d0 += 16) tile512<QR, 1>(P, KS, V + d0, D, 16, O + d0, D, nt, false, nullptr, nullptr);
#elif defined(PS_AVX2)
  for (; d0 + 16 <= D; d0 += 16) tile<QR>(P, KS, V + d0, D, O + d0, D, nt, false, nullptr);
#endif
  for (int64_t r = 0; r < QR; ++r)
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t d = d0; d < D; ++d) O[r * D + d] += P[r * KS + t] * V[t * D + d];
}

// One call's inputs, as raw pointers and sizes.
template <typename T>
struct Prefill {
  const float *q, *k, *v;
  const T *kc, *vc;
  const float *ksc, *vsc;  // a scaled cache's row scales (kv_types.h), else null
  float* out;
  const int64_t* table;
  int64_t qs0, ks0, ks1, vs0, vs1, H, D, KVH, G, BS, start, n, L, prefix;
  float scale;

  // Kv head h's key and value at context position t < L, as float32: from the cache for the
  // prefix, else the chunk's own as computed (as the PyTorch path reads them). A scaled cache is
  // read for the chunk's own too (written before attention runs): every query then sees the same
  // quantized K/V whether its prefix was computed in this chunk, an earlier one or came from the
  // prefix cache, so outputs do not depend on chunking or caching.
  void kv_rows(int64_t h, int64_t t, float* krow, float* vrow) const {
    if (t < prefix || ksc != nullptr) {
      const int64_t row = (table[t / BS] * KVH + h) * BS + t % BS, off = row * D;
      const float ks = ksc ? ksc[row] : 1.f, vs = vsc ? vsc[row] : 1.f;
      for (int64_t d = 0; d < D; ++d) krow[d] = ks * to_float(kc[off + d]);
      for (int64_t d = 0; d < D; ++d) vrow[d] = vs * to_float(vc[off + d]);
    } else {
      std::copy_n(k + (start + t - prefix) * ks0 + h * ks1, D, krow);
      std::copy_n(v + (start + t - prefix) * vs0 + h * vs1, D, vrow);
    }
  }
};

#ifdef PS_ATTN_BF16
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
// The same computation in bf16 math (attention_bf16.h): q.k and p.v on the bf16 GEMM's tile
// (gemm_tile_bf16.h), keys and values gathered as bf16 pair panels, scores and softmax float32.
// Layouts, per kv head: keys in panels of 16 as [D/2][16][2] (the tile's B with k = d), values per
// 64-key step and 16-wide column panel of D as [32][16][2] (B with k = key: pairs of keys). D a
// multiple of 32, QR = 12 (the AVX-512 build).
template <typename T>
static void prefill_bf16(const Prefill<T>& c) {
  const int64_t D = c.D, D2 = D / 2, G = c.G, L = c.L, KVH = c.KVH;
  const int64_t NP = (L + KP - 1) / KP, NS = (L + KS - 1) / KS, DP = D / 16;
  const int64_t kpanel = D2 * 32, vpanel = (KS / 2) * 32;  // bf16 values per key / value panel
  std::unique_ptr<uint16_t[]> kt(new uint16_t[KVH * NP * kpanel]), vt(new uint16_t[KVH * NS * DP * vpanel]);
  std::fill(kt.get(), kt.get() + KVH * NP * kpanel, 0);  // pad keys past L are zero (finite products)
  std::fill(vt.get(), vt.get() + KVH * NS * DP * vpanel, 0);
  pagedserve::parallel_for(0, KVH * NP, 4, [&](int64_t b, int64_t e) {
    std::unique_ptr<float[]> kr(new float[2 * D]);
    std::unique_ptr<uint16_t[]> kb(new uint16_t[2 * D]);
    for (int64_t w = b; w < e; ++w) {
      const int64_t h = w / NP, p = w % NP;
      for (int64_t j = 0; j < KP && p * KP + j < L; ++j) {
        const int64_t t = p * KP + j;
        c.kv_rows(h, t, kr.get(), kr.get() + D);
        attn_bf16::round_bf16(kr.get(), 2 * D, kb.get());
        uint16_t* kpan = kt.get() + w * kpanel;
        for (int64_t d = 0; d < D; ++d) kpan[(d / 2) * 32 + j * 2 + (d & 1)] = kb[d];
        const int64_t s = t / KS, tp = (t % KS) / 2;
        uint16_t* vpan = vt.get() + (h * NS + s) * DP * vpanel;
        for (int64_t d = 0; d < D; ++d) vpan[(d / 16) * vpanel + tp * 32 + (d % 16) * 2 + (t & 1)] = kb[D + d];
      }
    }
  });
  const int64_t R = c.n * G, ntiles = (R + QR - 1) / QR;
  pagedserve::parallel_for(0, KVH * ntiles, 1, [&](int64_t b, int64_t e) {
    std::unique_ptr<float[]> Qf(new float[D]), O(new float[QR * D]), S(new float[QR * KS]);
    std::unique_ptr<uint32_t[]> Q(new uint32_t[QR * D2]), P(new uint32_t[QR * KS / 2]);
    for (int64_t w = b; w < e; ++w) {
      const int64_t h = w / ntiles, i = w % ntiles;
      const int64_t tile = i % 2 == 0 ? i / 2 : ntiles - 1 - i / 2;  // zig-zag, as prefill_impl
      int64_t pos[QR], tok[QR], head[QR];
      float mx[QR], sum[QR];
      int64_t pmax = 0;
      for (int64_t r = 0; r < QR; ++r) {
        const int64_t row = std::min(tile * QR + r, R - 1);
        tok[r] = row / G;
        head[r] = h * G + row % G;
        pos[r] = c.prefix + tok[r];
        pmax = std::max(pmax, pos[r]);
        const float* src = c.q + (c.start + tok[r]) * c.qs0 + head[r] * D;
        for (int64_t d = 0; d < D; ++d) Qf[d] = src[d] * c.scale;
        attn_bf16::round_bf16(Qf.get(), D, reinterpret_cast<uint16_t*>(Q.get() + r * D2));
        mx[r] = std::numeric_limits<float>::lowest();
        sum[r] = 0.f;
      }
      std::fill(O.get(), O.get() + QR * D, 0.f);
      const uint16_t* kh = kt.get() + h * NP * kpanel;
      for (int64_t j0 = 0; j0 <= pmax; j0 += KS) {
        const int64_t nt = std::min(KS, pmax + 1 - j0);
        for (int64_t p = 0; p * KP < nt; p += 2) {
          const uint16_t* kp = kh + (j0 / KP + p) * kpanel;
          if ((p + 1) * KP < nt) bf16tile::tile<QR, 2>(Q.get(), D2, kp, kpanel, S.get() + p * KP, KS, D2, true, nullptr);
          else bf16tile::tile<QR, 1>(Q.get(), D2, kp, kpanel, S.get() + p * KP, KS, D2, true, nullptr);
        }
        for (int64_t r = 0; r < QR; ++r) {
          float* s = S.get() + r * KS;
          const int64_t valid = std::max<int64_t>(0, std::min(nt, pos[r] + 1 - j0));
          float m = mx[r], part = 0.f;
          if (valid == nt && nt % 16 == 0) {
            part = exp_in_place(s, nt, m);
          } else {
            for (int64_t t = 0; t < valid; ++t) m = std::max(m, s[t]);
            for (int64_t t = 0; t < valid; ++t) {
              s[t] = std::exp(s[t] - m);
              part += s[t];
            }
            for (int64_t t = valid; t < nt; ++t) s[t] = 0.f;
          }
          if (m > mx[r]) {
            const float corr = sum[r] > 0.f ? std::exp(mx[r] - m) : 0.f;
            sum[r] *= corr;
            for (int64_t d = 0; d < D; ++d) O[r * D + d] *= corr;
            mx[r] = m;
          }
          sum[r] += part;
          attn_bf16::round_bf16(s, nt, reinterpret_cast<uint16_t*>(P.get() + r * KS / 2));  // zero past nt
        }
        const uint16_t* vs = vt.get() + (h * NS + j0 / KS) * DP * vpanel;
        for (int64_t d0 = 0; d0 < D; d0 += 32)
          bf16tile::tile<QR, 2>(P.get(), KS / 2, vs + (d0 / 16) * vpanel, vpanel, O.get() + d0, D, (nt + 1) / 2, false,
                                nullptr);
      }
      const int64_t rows = std::min(QR, R - tile * QR);
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = c.out + (c.start + tok[r]) * c.H * D + head[r] * D;
        const float inv = 1.f / sum[r];
        for (int64_t d = 0; d < D; ++d) dst[d] = O[r * D + d] * inv;
      }
    }
  });
}
#pragma GCC pop_options
#endif

template <typename T>
static void prefill_impl(torch::Tensor out, torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_cache,
                         torch::Tensor v_cache, torch::Tensor block_table, int64_t start, int64_t n, int64_t L,
                         double scale, bool bf16_math, const float* ksc, const float* vsc) {
  const int64_t H = q.size(1), D = q.size(2), KVH = k.size(1), NB = k_cache.size(0), BS = k_cache.size(2);
  TORCH_CHECK(H % KVH == 0 && k.size(2) == D && v.size(1) == KVH && v.size(2) == D && k_cache.size(1) == KVH &&
                  k_cache.size(3) == D && out.size(1) == H && out.size(2) == D,
              "paged_attention_prefill: shape mismatch");
  const int64_t prefix = L - n, G = H / KVH;
  TORCH_CHECK(n >= 1 && prefix >= 0 && start >= 0 && start + n <= q.size(0) && start + n <= k.size(0) &&
                  start + n <= out.size(0),
              "paged_attention_prefill: chunk [", start, ", ", start + n, ") with context ", L, " out of range");
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t cached = ksc ? L : prefix;  // the positions read from the cache (kv_rows)
  TORCH_CHECK(block_table.numel() * BS >= cached, "paged_attention_prefill: block table shorter than the prefix");
  for (int64_t b = 0; b * BS < cached; ++b)
    TORCH_CHECK(table[b] >= 0 && table[b] < NB, "paged_attention_prefill: block id out of range");

  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const int64_t qs0 = q.stride(0), ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
  const Prefill<T> c{qp, kp, vp, kc, vc, ksc, vsc, op, table, qs0, ks0, ks1, vs0, vs1, H, D, KVH, G, BS, start, n, L, prefix,
                     static_cast<float>(scale)};
#ifdef PS_ATTN_BF16
  if (bf16_math && D % 32 == 0 && bf16_attention_supported()) return prefill_bf16(c);
#else
  (void)bf16_math;
#endif

  // 1. Gather every kv head's keys into panels [D][16] and values into rows; pad keys (past L) are
  //    zero, so the tail panel's products are finite and its masked probabilities (0) cancel them.
  //    2 * KVH * L * D floats per call: 768 KiB for the default model's longest 512-token prompt
  //    (a long-context model would want them per kv head, or in windows of keys).
  const int64_t NP = (L + KP - 1) / KP;
  std::unique_ptr<float[]> kt(new float[KVH * NP * KP * D]), vb(new float[KVH * NP * KP * D]);
  pagedserve::parallel_for(0, KVH * NP, 4, [&](int64_t b, int64_t e) {
    std::unique_ptr<float[]> kr(new float[D]);
    for (int64_t w = b; w < e; ++w) {
      const int64_t h = w / NP, p = w % NP;
      float* kpan = kt.get() + w * KP * D;
      float* vrow = vb.get() + w * KP * D;
      for (int64_t j = 0; j < KP; ++j) {
        const int64_t t = p * KP + j;
        float* vr = vrow + j * D;
        if (t >= L) {
          for (int64_t d = 0; d < D; ++d) kpan[d * KP + j] = 0.f;
          std::fill(vr, vr + D, 0.f);
        } else {
          c.kv_rows(h, t, kr.get(), vr);
          for (int64_t d = 0; d < D; ++d) kpan[d * KP + j] = kr[d];
        }
      }
    }
  });

  // 2. Tiles of 6 query rows. Row r of a kv head is token r / G, query head h * G + r % G, at key
  //    position prefix + r / G. Causal work grows with the position, so tiles are dealt out
  //    zig-zag (first, last, second, ...): each thread's contiguous range gets an even share.
  const int64_t R = n * G, ntiles = (R + QR - 1) / QR;
  const float sc = static_cast<float>(scale);
  pagedserve::parallel_for(0, KVH * ntiles, 1, [&](int64_t b, int64_t e) {
    std::unique_ptr<float[]> Q(new float[QR * D]), O(new float[QR * D]), S(new float[QR * KS]);
    for (int64_t w = b; w < e; ++w) {
      const int64_t h = w / ntiles, i = w % ntiles;
      const int64_t tile = i % 2 == 0 ? i / 2 : ntiles - 1 - i / 2;
      int64_t pos[QR], tok[QR], head[QR];
      float mx[QR], sum[QR];
      int64_t pmax = 0;
      for (int64_t r = 0; r < QR; ++r) {
        const int64_t row = std::min(tile * QR + r, R - 1);  // a short last tile repeats its last row
        tok[r] = row / G;
        head[r] = h * G + row % G;
        pos[r] = prefix + tok[r];
        pmax = std::max(pmax, pos[r]);
        const float* src = qp + (start + tok[r]) * qs0 + head[r] * D;
        for (int64_t d = 0; d < D; ++d) Q[r * D + d] = src[d] * sc;
        mx[r] = std::numeric_limits<float>::lowest();  // finite: built with -ffast-math
        sum[r] = 0.f;
      }
      std::fill(O.get(), O.get() + QR * D, 0.f);
      const float* kh = kt.get() + h * NP * KP * D;
      const float* vh = vb.get() + h * NP * KP * D;
      for (int64_t j0 = 0; j0 <= pmax; j0 += KS) {
        const int64_t nt = std::min(KS, pmax + 1 - j0);  // keys some row of the tile may see
        for (int64_t p = 0; p * KP < nt; p += 2)
          qk_panels(Q.get(), D, kh + (j0 / KP + p) * KP * D, (p + 1) * KP < nt ? 2 : 1, S.get() + p * KP);
        for (int64_t r = 0; r < QR; ++r) {
          float* s = S.get() + r * KS;
          // Keys this row sees here: none when another row of the tile set pmax (with G = 1 a
          // tile spans QR tokens, and the step may start past this row's position).
          const int64_t valid = std::max<int64_t>(0, std::min(nt, pos[r] + 1 - j0));
          float m = mx[r];
          float part = 0.f;
#ifdef PS_AVX2
          if (valid == nt && nt % 8 == 0)  // every step but a row's last: in registers, exp inline
            part = exp_in_place(s, nt, m);
          else
#endif
          {
            for (int64_t t = 0; t < valid; ++t) m = std::max(m, s[t]);
#pragma omp simd reduction(+ : part)
            for (int64_t t = 0; t < valid; ++t) {
              s[t] = std::exp(s[t] - m);
              part += s[t];
            }
            for (int64_t t = valid; t < nt; ++t) s[t] = 0.f;
          }
          if (m > mx[r]) {  // a new running max rescales what was accumulated under the old one
            const float corr = sum[r] > 0.f ? std::exp(mx[r] - m) : 0.f;
            sum[r] *= corr;
            for (int64_t d = 0; d < D; ++d) O[r * D + d] *= corr;
            mx[r] = m;
          }
          sum[r] += part;
        }
        pv_step(S.get(), vh + j0 * D, nt, D, O.get());
      }
      const int64_t rows = std::min(QR, R - tile * QR);
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = op + (start + tok[r]) * H * D + head[r] * D;
        const float inv = 1.f / sum[r];
        for (int64_t d = 0; d < D; ++d) dst[d] = O[r * D + d] * inv;
      }
    }
  });
}

// out[start:start+n] = causal attention of the chunk's queries q[start:start+n] over its context
// of L tokens: L - n cached ones (k_cache/v_cache through block_table) then the chunk's own k/v.
// q [T, H, D], k/v [T, KVH, D] (rows may be strided views of the fused QKV output); out [T, H, D]
// contiguous; caches [num_blocks, KVH, block_size, D] float32, float16, bfloat16 or float8_e5m2, or
// int8 / float8_e4m3fn with their row scales [num_blocks, KVH, block_size] (kv_types.h).
// bf16_math: q.k and p.v in bf16 where the CPU has AVX512_BF16 (prefill_bf16), else float32.
void paged_attention_prefill(torch::Tensor out, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                             torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_table, int64_t start,
                             int64_t num_tokens, int64_t context_len, double scale, bool bf16_math,
                             c10::optional<torch::Tensor> k_scales, c10::optional<torch::Tensor> v_scales) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
                  v.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32 &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "paged_attention_prefill: float32 q, k, v and out; K and V caches of one dtype");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2) && k.dim() == 3 && k.stride(2) == 1 &&
                  v.dim() == 3 && v.stride(2) == 1 && out.dim() == 3 && out.is_contiguous() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && block_table.is_contiguous() &&
                  block_table.scalar_type() == torch::kInt64,
              "paged_attention_prefill: q [T, H, D] with packed heads, k/v [T, KVH, D] with unit-stride rows, "
              "contiguous out, caches and int64 block table");
  with_kv_type(k_cache.scalar_type(), "paged_attention_prefill", [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    prefill_impl<T>(out, q, k, v, k_cache, v_cache, block_table, start, num_tokens, context_len, scale, bf16_math,
                    kv_scales<T>(k_scales, k_cache, "paged_attention_prefill"),
                    kv_scales<T>(v_scales, v_cache, "paged_attention_prefill"));
  });
}
