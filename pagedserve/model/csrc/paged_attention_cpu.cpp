// Paged decode attention for CPU (float32 compute): each query token attends over its context,
// reading K/V blocks in place through the block table; nothing is gathered or copied. The cache
// holds float32, float16 or bfloat16 (--kv-cache-dtype): 16-bit halves the bytes this kernel
// streams, and widening to float32 as a block is loaded costs one instruction per 8 values.
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

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PS_AVX2 1
#include <immintrin.h>
#endif

// Blocks come in table order, i.e. scattered in memory: ask for the next block's lines while
// this one is being used, since the hardware prefetcher cannot guess the jump.
template <typename T>
static inline void prefetch_block(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < n * int64_t(sizeof(T)); i += 64) __builtin_prefetch(c + i, 0, 1);
}

static inline float to_float(float x) { return x; }
static inline float to_float(at::Half x) { return static_cast<float>(x); }
static inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }

// Calls f with a null pointer of the KV cache's element type (float32, float16 or bfloat16).
template <typename F>
static void with_kv_type(at::ScalarType t, const char* who, F f) {
  switch (t) {
    case torch::kFloat32: return f(static_cast<float*>(nullptr));
    case torch::kFloat16: return f(static_cast<at::Half*>(nullptr));
    case torch::kBFloat16: return f(static_cast<at::BFloat16*>(nullptr));
    default: TORCH_CHECK(false, who, ": KV cache must be float32, float16 or bfloat16");
  }
}

#ifdef PS_AVX2
// Eight cache values widened to float32.
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline __m256 load8(const at::BFloat16* p) {  // bfloat16 is the top half of a float32
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
#endif

// scores[t] = scale * q . k[t] for t < n (key rows D values apart).
template <typename T>
static inline void block_scores(const float* q, const T* k, int64_t n, int64_t D, float scale, float* scores) {
  int64_t t = 0;
#ifdef PS_AVX2
  if (D % 8 == 0) {
    // Eight keys at a time into eight accumulators, then one transpose-add: no horizontal sum
    // per key.
    for (; t + 8 <= n; t += 8) {
      const T* kt = k + t * D;
      __m256 a[8];
      for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, load8(kt + j * D + d), a[j]);
      }
      const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
      const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
      const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
      _mm256_storeu_ps(scores + t, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
    }
  }
#endif
  for (; t < n; ++t) {
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
  int64_t d0 = 0;
#ifdef PS_AVX2
  // 64 columns at a time with the accumulators in registers (8 of the 16 ymm).
  for (; d0 + 64 <= D; d0 += 64) {
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_loadu_ps(acc + d0 + 8 * j);
    for (int64_t t = 0; t < n; ++t) {
      const __m256 pv = _mm256_set1_ps(p[t]);
      const T* vt = v + t * D + d0;
      for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(pv, load8(vt + 8 * j), a[j]);
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(acc + d0 + 8 * j, a[j]);
  }
#endif
  if (d0 == D) return;
  for (int64_t t = 0; t < n; ++t) {
    const float pt = p[t];
    const T* vt = v + t * D;
#pragma omp simd
    for (int64_t d = d0; d < D; ++d) acc[d] += pt * to_float(vt[d]);
  }
}

template <typename T>
static void decode_impl(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                        torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
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

  // One work item = a sequence, a range of its kv heads, and a range of its blocks. With enough
  // sequences to keep every thread busy, an item takes all heads and all blocks: a block's keys
  // (then values) for all heads are one contiguous run (KVH * 4 KiB at the default sizes), which
  // streams from memory better than one head's 4 KiB at a time. With few sequences, one head per
  // item, and with fewer such items than 4 per thread (a small decode batch: 3 items for 2
  // threads at batch 1), each sequence's blocks are also split, flash-decoding style, into
  // ranges of at least 8 blocks whose partial softmax states merge below.
  const int64_t threads = at::get_num_threads();
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
  at::parallel_for(0, n * items_per_seq * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(HG * BS), acc(HG * D), mx(HG), sum(HG);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t item = w / splits, sp = w % splits;
      const int64_t s = item / items_per_seq, h0 = (item % items_per_seq) * hp, L = cl[s];
      const int64_t* table = bt + s * MB;
      const float* qs = qp + s * q_row + h0 * G * D;  // the hp * G query heads of these kv heads
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(mx.begin(), mx.end(), std::numeric_limits<float>::lowest());  // finite: built with -ffast-math
      std::fill(sum.begin(), sum.end(), 0.f);
      const int64_t nblocks = (L + BS - 1) / BS, per = (nblocks + splits - 1) / splits;
      const int64_t b0 = std::min(nblocks, sp * per), b1 = std::min(nblocks, b0 + per);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t nt = std::min(BS, L - b * BS);
        for (int64_t h = 0; h < hp; ++h) {
          if (b + 1 < b1) {
            const int64_t next = table[b + 1] * blk_stride + (h0 + h) * head_stride;
            prefetch_block(kp + next, BS * D);
            prefetch_block(vp + next, BS * D);
          }
          const int64_t off = table[b] * blk_stride + (h0 + h) * head_stride;
          const T* kb = kp + off;
          const T* vb = vp + off;
          for (int64_t g = h * G; g < (h + 1) * G; ++g) {
            float* sg = scores.data() + g * BS;
            block_scores(qs + g * D, kb, nt, D, sc, sg);
            float bm = mx[g];
            for (int64_t t = 0; t < nt; ++t) bm = std::max(bm, sg[t]);
            float* ag = acc.data() + g * D;
            if (bm > mx[g]) {  // a new running max: rescale what was accumulated so far
              const float corr = std::exp(mx[g] - bm);
              sum[g] *= corr;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
              mx[g] = bm;
            }
            float bsum = 0.f;
#pragma omp simd reduction(+ : bsum)
            for (int64_t t = 0; t < nt; ++t) {
              sg[t] = std::exp(sg[t] - bm);
              bsum += sg[t];
            }
            sum[g] += bsum;
            accumulate_values(sg, vb, nt, D, ag);
          }
        }
      }
      if (splits > 1) {  // keep the partial state; an empty range (short sequence) has sum 0
        float* pw = part.data() + w * HG * (D + 2);
        for (int64_t g = 0; g < HG; ++g) {
          std::copy_n(acc.data() + g * D, D, pw + g * (D + 2));
          pw[g * (D + 2) + D] = mx[g];
          pw[g * (D + 2) + D + 1] = sum[g];
        }
        continue;
      }
      for (int64_t g = 0; g < HG; ++g) {
        float* og = op + (s * H + h0 * G + g) * D;
        const float inv = 1.f / sum[g];
        for (int64_t d = 0; d < D; ++d) og[d] = acc[g * D + d] * inv;
      }
    }
  });
  if (splits == 1) return;
  // Merge the splits of each (item, query head): rescale every partial to the common max.
  at::parallel_for(0, n * items_per_seq, 1, [&](int64_t begin, int64_t end) {
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
                            torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32 &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "paged_attention_decode: float32 q and out; K and V caches of one dtype");
  with_kv_type(k_cache.scalar_type(), "paged_attention_decode", [&](auto* type) {
    decode_impl<std::remove_pointer_t<decltype(type)>>(out, q, k_cache, v_cache, block_tables, context_lens, scale);
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

template <typename C>
static void write_kv_impl(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                          torch::Tensor blocks, torch::Tensor offsets) {
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
  at::parallel_for(0, T, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t h = 0; h < KVH; ++h) {
        const int64_t dst = ((bp[t] * KVH + h) * BS + op[t]) * D;
        store_row(kp + t * ks0 + h * ks1, kc + dst, D);
        store_row(vp + t * vs0 + h * vs1, vc + dst, D);
      }
  });
}

// Store each token's K and V ([T, KVH, D] float32, rows may be strided views of the fused QKV
// output) in its slot (block, offset) of the caches [num_blocks, KVH, block_size, D].
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor blocks,
              torch::Tensor offsets) {
  TORCH_CHECK(k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "write_kv: float32 K/V rows; K and V caches of one dtype");
  with_kv_type(k_cache.scalar_type(), "write_kv", [&](auto* type) {
    write_kv_impl<std::remove_pointer_t<decltype(type)>>(k, v, k_cache, v_cache, blocks, offsets);
  });
}

torch::Tensor pack_linear_weight(torch::Tensor w);  // gemm_cpu.cpp
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor wp, c10::optional<torch::Tensor> bias);
bool packed_linear_supported();
void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor w, double eps);  // fused_cpu.cpp
void add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps);
void rotary_embedding(torch::Tensor q, torch::Tensor k, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_and_mul(torch::Tensor gate_up);

// Every kernel runs without the GIL (plain C++ on tensors): the server's event loop thread can
// stream tokens while the engine thread is inside one, instead of waiting for the interpreter's
// switch interval (5 ms) at the next bytecode between kernels.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("paged_attention_decode", &paged_attention_decode, "paged decode attention (CPU; float32 q, float32/float16/bfloat16 KV cache)", nogil());
  m.def("write_kv", &write_kv, "store float32 K/V rows in their cache slots (CPU; cache float32/float16/bfloat16)", nogil());
  m.def("pack_linear_weight", &pack_linear_weight, "W [N, K] -> column panels [N/16, K, 16] for packed_linear",
        nogil());
  m.def("packed_linear", &packed_linear, "x @ W.T (+ bias) with W from pack_linear_weight (CPU, float32)",
        py::arg("x"), py::arg("wp"), py::arg("bias") = py::none(), nogil());
  m.def("packed_linear_supported", &packed_linear_supported, "built with AVX2+FMA");
  m.def("rms_norm", &rms_norm, "out = w * x / rms(x)", nogil());
  m.def("add_rms_norm", &add_rms_norm, "in place: residual += x; x = w * residual / rms(residual)", nogil());
  m.def("rotary_embedding", &rotary_embedding, "in place rotate-half rotary embedding of q and k", nogil());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up from [gate | up]", nogil());
}
