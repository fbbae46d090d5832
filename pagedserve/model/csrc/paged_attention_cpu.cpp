// Paged decode attention for CPU (float32 compute; bf16 math on a bf16 cache where asked for and
// the CPU has AVX512_BF16, attention_bf16.h): each query token attends over its context, reading
// K/V blocks in place through the block table; nothing is gathered or copied. The cache holds
// float32, float16, bfloat16 or float8 e5m2, or int8 / float8 e4m3 with a scale per row
// (--kv-cache-dtype; kv_types.h): 16-bit halves the bytes this kernel streams and 8-bit quarters
// them; widening to float32 as a block is loaded costs one to three instructions per 8 values.
//
// Shapes: q, out [n, H, D]; k_cache, v_cache [num_blocks, KVH, block_size, D] (head-major inside a
// block, so one head's keys of a block are contiguous and stream well);
// block_tables [n, max_blocks] int64; context_lens [n] int64. H = KVH * G (grouped-query).
// Work is split over (sequence, kv head) pairs, and for small batches over block ranges too; each
// item streams its keys and values once, block by block, for all G query heads that share them,
// with an online softmax (running max and sum, as in flash-decoding): one pass over memory, which
// is what bounds this kernel.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <limits>
#include <type_traits>
#include <vector>

#include "kv_types.h"
#include "attention_bf16.h"

// Blocks come in table order, i.e. scattered in memory: ask for the next block's lines while
// this one is being used, since the hardware prefetcher cannot guess the jump.
template <typename T>
static inline void prefetch_block(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < n * int64_t(sizeof(T)); i += 64) __builtin_prefetch(c + i, 0, 1);
}

// The portable path (no AVX2, or a head size that is not a multiple of 32), one query head at a
// time. scores[t] = scale * q . k[t] for t < n (key rows D values apart).
template <typename T>
static inline void block_scores(const float* q, const T* k, int64_t n, int64_t D, float scale, float* scores) {
  for (int64_t t = 0; t < n; ++t) {
    const T* kt = k + t * D;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += q[d] * to_float(kt[d]);
    scores[t] = dot * scale;
  }
}

// acc[0:D] += sum over t < n of p[t] * v[t] (value rows D values apart).
template <typename T>
static inline void accumulate_values(const float* p, const T* v, int64_t n, int64_t D, float* acc) {
  for (int64_t t = 0; t < n; ++t) {
    const float pt = p[t];
    const T* vt = v + t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += pt * to_float(vt[d]);
  }
}

#ifdef PS_AVX2
// The fast path takes NH (<= 3) query heads of one group at once, so each K or V vector is loaded
// (and, from a 16-bit cache, widened) once for all of them: 12 accumulators, 16 ymm registers in
// all. It also spreads the next block's prefetches over its loop, a few lines per step: a burst
// of 128 prefetches stalls the core until the miss buffers drain, which serialized memory and
// compute (measured: the DRAM-bound time was the in-cache time plus the transfer time).
template <typename T>
static inline void prefetch_rows(const T* p, int64_t row, int64_t rows, int64_t D) {
  if (p != nullptr) prefetch_block(p + row * D, rows * D);
}

// s[h * BS + t] = scale * q[h] . k[t] for h < NH, t < n; q rows D apart.
template <typename T, int NH>
static inline void scores_nh(const float* q, const T* k, int64_t n, int64_t D, int64_t BS, float scale, float* s,
                             const T* next_k) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    prefetch_rows(next_k, t, 4, D);
    __m256 a[NH][4];
    for (int h = 0; h < NH; ++h)
      for (int j = 0; j < 4; ++j) a[h][j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      __m256 qv[NH];
      for (int h = 0; h < NH; ++h) qv[h] = _mm256_loadu_ps(q + h * D + d);
      for (int j = 0; j < 4; ++j) {
        const __m256 kv = load8(k + (t + j) * D + d);
        for (int h = 0; h < NH; ++h) a[h][j] = _mm256_fmadd_ps(qv[h], kv, a[h][j]);
      }
    }
    for (int h = 0; h < NH; ++h) {  // four dot products: transpose-add, then the two 128-bit halves
      const __m256 r = _mm256_hadd_ps(_mm256_hadd_ps(a[h][0], a[h][1]), _mm256_hadd_ps(a[h][2], a[h][3]));
      const __m128 four = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
      _mm_storeu_ps(s + h * BS + t, _mm_mul_ps(four, _mm_set1_ps(scale)));
    }
  }
  prefetch_rows(next_k, t, n - t, D);
  for (; t < n; ++t)
    for (int h = 0; h < NH; ++h) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * D + d), load8(k + t * D + d), acc);
      const __m128 x = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
      const __m128 y = _mm_add_ps(x, _mm_movehl_ps(x, x));
      s[h * BS + t] = _mm_cvtss_f32(_mm_add_ss(y, _mm_movehdup_ps(y))) * scale;
    }
}

// acc[h] += sum over t < n of p[h * BS + t] * v[t] for h < NH; D a multiple of 32.
template <typename T, int NH>
static inline void values_nh(const float* p, const T* v, int64_t n, int64_t D, int64_t BS, float* acc,
                             const T* next_v) {
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    __m256 a[NH][4];
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < 4; ++c) a[h][c] = _mm256_loadu_ps(acc + h * D + d0 + 8 * c);
    for (int64_t t = 0; t < n; ++t) {
      if (d0 == 0) prefetch_rows(next_v, t, 1, D);
      __m256 pb[NH];
      for (int h = 0; h < NH; ++h) pb[h] = _mm256_broadcast_ss(p + h * BS + t);
      for (int c = 0; c < 4; ++c) {
        const __m256 vv = load8(v + t * D + d0 + 8 * c);
        for (int h = 0; h < NH; ++h) a[h][c] = _mm256_fmadd_ps(pb[h], vv, a[h][c]);
      }
    }
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(acc + h * D + d0 + 8 * c, a[h][c]);
  }
}
#endif

// Online-softmax update for one query head over one block's scores s[0:n]: a new running max
// rescales what was accumulated so far; s becomes the block's unnormalized probabilities.
static inline void softmax_step(float* s, int64_t n, int64_t D, float& mx, float& sum, float* acc) {
  float bm = mx;
  for (int64_t t = 0; t < n; ++t) bm = std::max(bm, s[t]);
  if (bm > mx) {
    const float corr = std::exp(mx - bm);
    sum *= corr;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] *= corr;
    mx = bm;
  }
  float bsum = 0.f;
#pragma omp simd reduction(+ : bsum)
  for (int64_t t = 0; t < n; ++t) {
    s[t] = std::exp(s[t] - bm);
    bsum += s[t];
  }
  sum += bsum;
}

#ifdef PS_AVX2
// softmax_step for n a multiple of 8 (every full block), the exps in registers (exp_in_place).
static inline void softmax_step8(float* s, int64_t n, int64_t D, float& mx, float& sum, float* acc) {
  const float old = mx;
  const float part = exp_in_place(s, n, mx);
  if (mx > old) {
    const float corr = std::exp(old - mx);
    sum *= corr;
    const __m256 c = _mm256_set1_ps(corr);
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(acc + d, _mm256_mul_ps(c, _mm256_loadu_ps(acc + d)));
  }
  sum += part;
}
#endif

// A scaled cache's row scales (kv_types.h), applied per key: to its score (q.k), then to its
// probability (p.v) once the softmax has summed it. Null: an unscaled cache.
static inline void scale_rows(float* s, const float* rs, int64_t n) {
  if (rs == nullptr) return;
  for (int64_t t = 0; t < n; ++t) s[t] *= rs[t];
}

// One block (n keys and values) for the G query heads of one kv head. next_k / next_v: the block
// this item reads next (prefetched as this one is used), or null. ks / vs: the rows' scales of a
// scaled cache, else null.
template <typename T>
static inline void attend_block(const float* q, const T* kb, const T* vb, int64_t n, int64_t G, int64_t D,
                                int64_t BS, float scale, float* scores, float* mx, float* sum, float* acc,
                                const T* next_k, const T* next_v, const float* ks, const float* vs) {
#ifdef PS_AVX2
  if (D % 32 == 0) {
    for (int64_t g0 = 0; g0 < G; g0 += 3) {
      const int64_t nh = std::min<int64_t>(3, G - g0);
      const T* pk = g0 == 0 ? next_k : nullptr;  // prefetch once, during the first chunk of heads
      const T* pv = g0 == 0 ? next_v : nullptr;
      const float* qg = q + g0 * D;
      float* sg = scores + g0 * BS;
      if (nh == 3) scores_nh<T, 3>(qg, kb, n, D, BS, scale, sg, pk);
      else if (nh == 2) scores_nh<T, 2>(qg, kb, n, D, BS, scale, sg, pk);
      else scores_nh<T, 1>(qg, kb, n, D, BS, scale, sg, pk);
      for (int64_t g = g0; g < g0 + nh; ++g) {
        scale_rows(scores + g * BS, ks, n);
        if (n % 8 == 0) softmax_step8(scores + g * BS, n, D, mx[g], sum[g], acc + g * D);
        else softmax_step(scores + g * BS, n, D, mx[g], sum[g], acc + g * D);
        scale_rows(scores + g * BS, vs, n);
      }
      float* ag = acc + g0 * D;
      if (nh == 3) values_nh<T, 3>(sg, vb, n, D, BS, ag, pv);
      else if (nh == 2) values_nh<T, 2>(sg, vb, n, D, BS, ag, pv);
      else values_nh<T, 1>(sg, vb, n, D, BS, ag, pv);
    }
    return;
  }
#endif
  if (next_k) {
    prefetch_block(next_k, BS * D);
    prefetch_block(next_v, BS * D);
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * BS;
    block_scores(q + g * D, kb, n, D, scale, sg);
    scale_rows(sg, ks, n);
    softmax_step(sg, n, D, mx[g], sum[g], acc + g * D);
    scale_rows(sg, vs, n);
    accumulate_values(sg, vb, n, D, acc + g * D);
  }
}

#ifdef PS_ATTN_BF16
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
// attend_block in bf16 math (attention_bf16.h): q holds the G heads' bf16 values, acc is in
// attn_bf16::acc_index order; D a multiple of 64.
static inline void attend_block_bf16(const uint16_t* q, const uint16_t* kb, const uint16_t* vb, int64_t n, int64_t G,
                                     int64_t D, int64_t BS, float scale, float* scores, float* mx, float* sum,
                                     float* acc, uint16_t* pp, const uint16_t* next_k, const uint16_t* next_v) {
  for (int64_t g0 = 0; g0 < G; g0 += 3) {
    const int64_t nh = std::min<int64_t>(3, G - g0);
    const uint16_t* pk = g0 == 0 ? next_k : nullptr;  // prefetch once, during the first chunk of heads
    const uint16_t* pv = g0 == 0 ? next_v : nullptr;
    const uint16_t* qg = q + g0 * D;
    float* sg = scores + g0 * BS;
    if (nh == 3) attn_bf16::scores<3>(qg, kb, n, D, BS, scale, sg, pk);
    else if (nh == 2) attn_bf16::scores<2>(qg, kb, n, D, BS, scale, sg, pk);
    else attn_bf16::scores<1>(qg, kb, n, D, BS, scale, sg, pk);
    for (int64_t g = g0; g < g0 + nh; ++g) {
      if (n % 8 == 0) softmax_step8(scores + g * BS, n, D, mx[g], sum[g], acc + g * D);
      else softmax_step(scores + g * BS, n, D, mx[g], sum[g], acc + g * D);
    }
    float* ag = acc + g0 * D;
    if (nh == 3) attn_bf16::values<3>(sg, vb, n, D, BS, ag, pp, pv);
    else if (nh == 2) attn_bf16::values<2>(sg, vb, n, D, BS, ag, pp, pv);
    else attn_bf16::values<1>(sg, vb, n, D, BS, ag, pp, pv);
  }
}
#pragma GCC pop_options
#endif

template <typename T>
static void decode_impl(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                        torch::Tensor block_tables, torch::Tensor context_lens, double scale, bool bf16_math,
                        const float* ksc, const float* vsc) {
  // q may be a view into the fused QKV output: rows strided, heads packed.
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "paged_attention_decode: q must be [n, H, D] with packed heads");
  TORCH_CHECK(out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  block_tables.is_contiguous() && context_lens.is_contiguous(),
              "paged_attention_decode: tensors must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && context_lens.scalar_type() == torch::kInt64,
              "paged_attention_decode: block_tables and context_lens must be int64");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(1), BS = k_cache.size(2);
  TORCH_CHECK(H % KVH == 0 && k_cache.size(3) == D, "paged_attention_decode: shape mismatch");
  const int64_t G = H / KVH, MB = block_tables.size(1);
  const int64_t head_stride = BS * D, blk_stride = KVH * BS * D;
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* cl = context_lens.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);
  const int64_t q_row = q.stride(0);
  // bf16 math (attention_bf16.h) on a bf16 cache when asked for and the CPU has AVX512_BF16.
  bool use_bf16 = false;
#ifdef PS_ATTN_BF16
  use_bf16 = std::is_same_v<T, at::BFloat16> && bf16_math && D % 64 == 0 && bf16_attention_supported();
#endif

  // One work item = a sequence, a range of its kv heads, and a range of its blocks. With enough
  // sequences to keep every thread busy, an item takes all heads and all blocks: a block's keys
  // (then values) for all heads are one contiguous run (KVH * 4 KiB at the default sizes), which
  // streams from memory better than one head's 4 KiB at a time. With few sequences, one head per
  // item, and with fewer such items than 4 per thread (a small decode batch: 3 items for 2
  // threads at batch 1), each sequence's blocks are also split, flash-decoding style, into
  // ranges of at least 8 blocks whose partial softmax states merge below.
  const int64_t threads = pagedserve::planned_threads();  // not the running count: results never depend on it
  const int64_t hp = n >= 2 * threads ? KVH : 1;
  const int64_t items_per_seq = KVH / hp;
  int64_t splits = 1;
  if (n * items_per_seq < 4 * threads) {
    int64_t longest = 0;
    for (int64_t s = 0; s < n; ++s) longest = std::max(longest, (cl[s] + BS - 1) / BS);
    const int64_t want = (4 * threads + n * items_per_seq - 1) / (n * items_per_seq);
    splits = std::max<int64_t>(1, std::min(want, longest / 8));
  }
  const int64_t HG = hp * G;  // query heads per item
  // Partial states when split: per item and query head, D accumulated values, the max and the sum.
  std::vector<float> part(splits > 1 ? n * items_per_seq * splits * HG * (D + 2) : 0);
  // Items are handed out one at a time, longest context first: the contexts of a batch differ
  // several-fold, and an even split by index left one thread waiting for the other.
  const int64_t total = n * items_per_seq * splits;
  std::vector<int64_t> order(total);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return cl[a / splits / items_per_seq] > cl[b / splits / items_per_seq];
  });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), total), 1, [&](int64_t, int64_t) {
    std::vector<float> scores(HG * BS), acc(HG * D), mx(HG), sum(HG);
    std::vector<uint16_t> qb(use_bf16 ? HG * D : 0), pp(use_bf16 ? 3 * attn_bf16::pp_row(BS) : 0);
    // acc's index of value d (bf16 math keeps it permuted; attention_bf16.h)
    auto acc_at = [&](int64_t g, int64_t d) { return g * D + (use_bf16 ? attn_bf16::acc_index(d) : d); };
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < total;) {
      const int64_t w = order[i];
      const int64_t item = w / splits, sp = w % splits;
      const int64_t s = item / items_per_seq, h0 = (item % items_per_seq) * hp, L = cl[s];
      const int64_t* table = bt + s * MB;
      const float* qs = qp + s * q_row + h0 * G * D;  // the hp * G query heads of these kv heads
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(mx.begin(), mx.end(), std::numeric_limits<float>::lowest());  // finite: built with -ffast-math
      std::fill(sum.begin(), sum.end(), 0.f);
#ifdef PS_ATTN_BF16
      if (use_bf16) attn_bf16::round_bf16(qs, HG * D, qb.data());
#endif
      const int64_t nblocks = (L + BS - 1) / BS, per = (nblocks + splits - 1) / splits;
      const int64_t b0 = std::min(nblocks, sp * per), b1 = std::min(nblocks, b0 + per);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t nt = std::min(BS, L - b * BS);
        for (int64_t h = 0; h < hp; ++h) {
          const int64_t off = table[b] * blk_stride + (h0 + h) * head_stride;
          const int64_t next = b + 1 < b1 ? table[b + 1] * blk_stride + (h0 + h) * head_stride : -1;
#ifdef PS_ATTN_BF16
          if (use_bf16) {
            auto bits = [](const T* p) { return reinterpret_cast<const uint16_t*>(p); };
            attend_block_bf16(qb.data() + h * G * D, bits(kp + off), bits(vp + off), nt, G, D, BS, sc,
                              scores.data() + h * G * BS, mx.data() + h * G, sum.data() + h * G,
                              acc.data() + h * G * D, pp.data(), next < 0 ? nullptr : bits(kp + next),
                              next < 0 ? nullptr : bits(vp + next));
            continue;
          }
#endif
          const int64_t so = (table[b] * KVH + h0 + h) * BS;  // the rows' scales (scaled caches)
          attend_block(qs + h * G * D, kp + off, vp + off, nt, G, D, BS, sc, scores.data() + h * G * BS,
                       mx.data() + h * G, sum.data() + h * G, acc.data() + h * G * D,
                       next < 0 ? nullptr : kp + next, next < 0 ? nullptr : vp + next,
                       ksc ? ksc + so : nullptr, vsc ? vsc + so : nullptr);
        }
      }
      if (splits > 1) {  // keep the partial state; an empty range (short sequence) has sum 0
        float* pw = part.data() + w * HG * (D + 2);
        for (int64_t g = 0; g < HG; ++g) {
          for (int64_t d = 0; d < D; ++d) pw[g * (D + 2) + d] = acc[acc_at(g, d)];
          pw[g * (D + 2) + D] = mx[g];
          pw[g * (D + 2) + D + 1] = sum[g];
        }
        continue;
      }
      for (int64_t g = 0; g < HG; ++g) {
        float* og = op + (s * H + h0 * G + g) * D;
        const float inv = 1.f / sum[g];
        for (int64_t d = 0; d < D; ++d) og[d] = acc[acc_at(g, d)] * inv;
      }
    }
  });
  if (splits == 1) return;
  // Merge the splits of each (item, query head): rescale every partial to the common max.
  pagedserve::parallel_for(0, n * items_per_seq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / items_per_seq, h0 = (item % items_per_seq) * hp;
      for (int64_t g = 0; g < HG; ++g) {
        float m = std::numeric_limits<float>::lowest(), total = 0.f;
        for (int64_t sp = 0; sp < splits; ++sp) {
          const float* pw = part.data() + ((item * splits + sp) * HG + g) * (D + 2);
          if (pw[D + 1] > 0.f) m = std::max(m, pw[D]);
        }
        float* og = op + (s * H + h0 * G + g) * D;
        std::fill(og, og + D, 0.f);
        for (int64_t sp = 0; sp < splits; ++sp) {
          const float* pw = part.data() + ((item * splits + sp) * HG + g) * (D + 2);
          if (pw[D + 1] == 0.f) continue;
          const float f = std::exp(pw[D] - m);
          total += pw[D + 1] * f;
          for (int64_t d = 0; d < D; ++d) og[d] += pw[d] * f;
        }
        const float inv = 1.f / total;
        for (int64_t d = 0; d < D; ++d) og[d] *= inv;
      }
    }
  });
}

void paged_attention_decode(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor context_lens, double scale, bool bf16_math,
                            c10::optional<torch::Tensor> k_scales, c10::optional<torch::Tensor> v_scales) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32 &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "paged_attention_decode: float32 q and out; K and V caches of one dtype");
  with_kv_type(k_cache.scalar_type(), "paged_attention_decode", [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    decode_impl<T>(out, q, k_cache, v_cache, block_tables, context_lens, scale, bf16_math,
                   kv_scales<T>(k_scales, k_cache, "paged_attention_decode"),
                   kv_scales<T>(v_scales, v_cache, "paged_attention_decode"));
  });
}

// One row of D float32 values into the cache's dtype (round to nearest even).
static inline void store_row(const float* src, float* dst, int64_t D) { std::copy_n(src, D, dst); }
static inline void store_row(const float* src, at::Half* dst, int64_t D) {
  int64_t d = 0;
#ifdef PS_AVX2
  for (; d + 8 <= D; d += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d), _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; d < D; ++d) dst[d] = at::Half(src[d]);
}
static inline void store_row(const float* src, at::BFloat16* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = at::BFloat16(src[d]);  // c10 rounds to nearest even
}
static inline void store_row(const float* src, c10::Float8_e5m2* dst, int64_t D) {
  // c10's conversion, as torch's .to(float8_e5m2): nearest even, and past 57344 infinity (no
  // saturation), so both attention paths store the same bytes.
  for (int64_t d = 0; d < D; ++d) dst[d] = c10::Float8_e5m2(src[d]);
}

template <typename C>
static void write_kv_impl(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                          torch::Tensor blocks, torch::Tensor offsets, float* ksc, float* vsc) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.stride(2) == 1 && v.stride(2) == 1 && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && blocks.is_contiguous() && offsets.is_contiguous(),
              "write_kv: layout");
  const int64_t T = k.size(0), KVH = k.size(1), D = k.size(2), NB = k_cache.size(0), BS = k_cache.size(2);
  TORCH_CHECK(k_cache.size(1) == KVH && k_cache.size(3) == D && blocks.numel() == T && offsets.numel() == T,
              "write_kv: shape mismatch");
  const int64_t* bp = blocks.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(bp[t] >= 0 && bp[t] < NB && op[t] >= 0 && op[t] < BS, "write_kv: slot out of range");
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  C* kc = k_cache.data_ptr<C>();
  C* vc = v_cache.data_ptr<C>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
  pagedserve::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t h = 0; h < KVH; ++h) {
        const int64_t row = (bp[t] * KVH + h) * BS + op[t];
        if constexpr (kv_scaled<C>) {
          quantize_row(kp + t * ks0 + h * ks1, kc + row * D, D, ksc + row);
          quantize_row(vp + t * vs0 + h * vs1, vc + row * D, D, vsc + row);
        } else {
          store_row(kp + t * ks0 + h * ks1, kc + row * D, D);
          store_row(vp + t * vs0 + h * vs1, vc + row * D, D);
        }
      }
  });
}

// Store each token's K and V ([T, KVH, D] float32, rows may be strided views of the fused QKV
// output) in its slot (block, offset) of the caches [num_blocks, KVH, block_size, D]; a scaled
// cache's row scales go to the same slot of k_scales / v_scales.
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor blocks,
              torch::Tensor offsets, c10::optional<torch::Tensor> k_scales, c10::optional<torch::Tensor> v_scales) {
  TORCH_CHECK(k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "write_kv: float32 K/V rows; K and V caches of one dtype");
  with_kv_type(k_cache.scalar_type(), "write_kv", [&](auto* type) {
    using C = std::remove_pointer_t<decltype(type)>;
    write_kv_impl<C>(k, v, k_cache, v_cache, blocks, offsets, kv_scales<C>(k_scales, k_cache, "write_kv"),
                     kv_scales<C>(v_scales, v_cache, "write_kv"));
  });
}

void paged_attention_prefill(torch::Tensor out, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                             torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_table, int64_t start,
                             int64_t num_tokens, int64_t context_len, double scale, bool bf16_math,
                             c10::optional<torch::Tensor> k_scales, c10::optional<torch::Tensor> v_scales);  // prefill_attention_cpu.cpp
torch::Tensor pack_linear_weight(torch::Tensor w);  // gemm_cpu.cpp
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor wp, c10::optional<torch::Tensor> bias);
bool packed_linear_supported();
torch::Tensor pack_linear_weight_bf16(torch::Tensor w);  // gemm_bf16_cpu.cpp
bool packed_linear_bf16_supported();
void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor w, double eps);  // fused_cpu.cpp
void add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps);
void rotary_embedding(torch::Tensor q, torch::Tensor k, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_and_mul(torch::Tensor gate_up);
torch::Tensor argmax_rows(torch::Tensor x);
torch::Tensor llama_layers(torch::Tensor x, torch::Tensor positions, torch::Tensor kv_caches,  // llama_layers_cpu.cpp
                           const std::vector<torch::Tensor>& weights, torch::Tensor cos, torch::Tensor sin,
                           torch::Tensor slot_blocks, torch::Tensor slot_offsets, int64_t num_decodes,
                           c10::optional<torch::Tensor> decode_block_tables,
                           c10::optional<torch::Tensor> decode_context_lens,
                           const std::vector<torch::Tensor>& prefill_tables, const std::vector<int64_t>& prefill_starts,
                           const std::vector<int64_t>& prefill_tokens, const std::vector<int64_t>& prefill_contexts,
                           c10::optional<torch::Tensor> rows, int64_t num_heads, int64_t num_kv_heads, double eps,
                           double scale, bool bf16_attention, c10::optional<torch::Tensor> kv_scales,
                           bool quant_bf16, int64_t quant_int8_rows);
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor qw, torch::Tensor scales,  // gemm_quant_cpu.cpp
                           c10::optional<torch::Tensor> bias, bool bf16, int64_t int8_rows);
torch::Tensor quant_embedding(torch::Tensor ids, torch::Tensor qw, torch::Tensor scales);
bool quant_linear_vnni_supported();
torch::Tensor grouped_linear(torch::Tensor x, const std::vector<int64_t>& counts,  // moe_cpu.cpp
                             const std::vector<torch::Tensor>& weights, int64_t out_features, bool quant_bf16,
                             int64_t int8_rows, c10::optional<torch::Tensor> rows);
std::tuple<torch::Tensor, torch::Tensor, std::vector<int64_t>> moe_route(torch::Tensor logits, int64_t k,
                                                                          bool renormalize);
torch::Tensor moe_combine(torch::Tensor ys, torch::Tensor order, torch::Tensor weights);
void set_quant_vnni_max_rows(int64_t n);
void set_quant_prefetch(int64_t bytes);
void set_gemm_prefetch(int64_t bytes);
void set_quant_activation_passes(int64_t n);

// Every kernel runs without the GIL (plain C++ on tensors): the server's event loop thread can
// stream tokens while the engine thread is inside one, instead of waiting for the interpreter's
// switch interval (5 ms) at the next bytecode between kernels.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("paged_attention_decode", &paged_attention_decode,
        "paged decode attention (CPU; float32 q, float32/float16/bfloat16/float8_e5m2 KV cache; bf16_math: "
        "q.k and p.v in bf16 on a bf16 cache where the CPU has AVX512_BF16)",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"), py::arg("bf16_math") = false, py::arg("k_scales") = py::none(),
        py::arg("v_scales") = py::none(), nogil());
  m.def("paged_attention_prefill", &paged_attention_prefill,
        "causal attention of one prompt chunk over its cached prefix and itself (CPU; float32 q/k/v; bf16_math: "
        "q.k and p.v in bf16 where the CPU has AVX512_BF16)",
        py::arg("out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_table"), py::arg("start"), py::arg("num_tokens"), py::arg("context_len"), py::arg("scale"),
        py::arg("bf16_math") = false, py::arg("k_scales") = py::none(), py::arg("v_scales") = py::none(), nogil());
  m.def("write_kv", &write_kv,
        "store float32 K/V rows in their cache slots (CPU; cache float32/float16/bfloat16/float8_e5m2, or "
        "int8/float8_e4m3fn with row scales)",
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("blocks"), py::arg("offsets"),
        py::arg("k_scales") = py::none(), py::arg("v_scales") = py::none(), nogil());
  m.def("pack_linear_weight", &pack_linear_weight, "W [N, K] -> column panels [N/16, K, 16] for packed_linear",
        nogil());
  m.def("packed_linear", &packed_linear, "x @ W.T (+ bias) with W from pack_linear_weight (float32) or pack_linear_weight_bf16 (CPU, float32 x)",
        py::arg("x"), py::arg("wp"), py::arg("bias") = py::none(), nogil());
  m.def("packed_linear_supported", &packed_linear_supported, "built with AVX2+FMA");
  m.def("pack_linear_weight_bf16", &pack_linear_weight_bf16,
        "W [N, K] -> bf16 k-pair panels [N/16, ceil(K/2), 32] for packed_linear's AVX512_BF16 path", nogil());
  m.def("packed_linear_bf16_supported", &packed_linear_bf16_supported,
        "the x86-64-v4 build, on a CPU with AVX512_BF16");
  m.def("quant_linear", &quant_linear,
        "x @ W.T (+ bias) with W quantized: 4-bit uint8 [N/16, K/8, 64] or 8-bit int8 [N/16, K/4, 64], "
        "float32 scales [N/16, K/G, 16] or scales + offsets [N/16, K/G, 32] (model/quantization/weight.py packs "
        "them); small batches in int8 x int4/int8 dot products (VNNI), larger ones dequantized into the float32 "
        "or (bf16) bf16 GEMM, or with int8_rows > 0 batches of that many rows or more in one-pass int8 activations",
        py::arg("x"), py::arg("qw"), py::arg("scales"), py::arg("bias") = py::none(), py::arg("bf16") = false,
        py::arg("int8_rows") = 0, nogil());
  m.def("quant_linear_vnni_supported", &quant_linear_vnni_supported, "the x86-64-v4 build on a CPU with AVX512_VNNI");
  m.def("grouped_linear", &grouped_linear,
        "MoE experts in one call: x's rows (or x[rows]) grouped by expert (counts), each group times its expert's "
        "packed or quantized weight (two tensors an expert; an empty weight: zero rows)",
        py::arg("x"), py::arg("counts"), py::arg("weights"), py::arg("out_features"), py::arg("quant_bf16") = false,
        py::arg("int8_rows") = 0, py::arg("rows") = py::none(), nogil());
  m.def("moe_route", &moe_route,
        "each token's top k experts by router logit: (softmax weights [T, k], pairs sorted by expert [T * k], counts)",
        py::arg("logits"), py::arg("k"), py::arg("renormalize"), nogil());
  m.def("moe_combine", &moe_combine, "out[t] = sum_j weights[t, j] * ys[row of pair t * k + j]", py::arg("ys"),
        py::arg("order"), py::arg("weights"), nogil());
  m.def("set_quant_vnni_max_rows", &set_quant_vnni_max_rows,
        "batches of up to this many rows take quant_linear's integer (VNNI) kernel; 0: never");
  m.def("set_quant_prefetch", &set_quant_prefetch,
        "quant_linear's integer kernel prefetches the weights this many bytes ahead (default 1024; 0: off)");
  m.def("set_gemm_prefetch", &set_gemm_prefetch,
        "the packed float32/bf16 GEMMs, at decode sizes (float32 up to 16 rows, bf16 up to 64), prefetch their "
        "weights this many bytes ahead into L2 (default 4096; 0: off)");
  m.def("set_quant_activation_passes", &set_quant_activation_passes,
        "int8 passes per activation in quant_linear's integer kernel: 2 (~15 bits, default) or 1 (8 bits)");
  m.def("quant_embedding", &quant_embedding, "rows of a quantized matrix (layout of quant_linear) as float32",
        py::arg("ids"), py::arg("qw"), py::arg("scales"), nogil());
  m.def("rms_norm", &rms_norm, "out = w * x / rms(x)", nogil());
  m.def("add_rms_norm", &add_rms_norm, "in place: residual += x; x = w * residual / rms(residual)", nogil());
  m.def("rotary_embedding", &rotary_embedding, "in place rotate-half rotary embedding of q and k", nogil());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up from [gate | up]", nogil());
  m.def("argmax_rows", &argmax_rows, "row-wise argmax of float32 [B, V], as torch.argmax (first max; NaN is largest)", nogil());
  m.def("set_planned_threads", [](int64_t n) { pagedserve::planned_threads_value().store(n); },
        "the thread count work is decomposed for (0: the current one); fewer threads may run it, same results");
  m.def("set_dynamic_split", [](bool on) { pagedserve::dynamic_split_flag().store(on); },
        "hand kernels' work out in chunks from a shared counter (default) or in at::parallel_for's fixed shares");
  m.def("llama_layers", &llama_layers, "every decoder layer of a Llama-family model for one step (CPU, float32)",
        nogil());
}
