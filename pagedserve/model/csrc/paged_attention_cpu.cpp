// Paged decode attention for CPU (float32): each query token attends over its context, reading
// K/V blocks in place through the block table; nothing is gathered or copied.
//
// Shapes: q, out [n, H, D]; k_cache, v_cache [num_blocks, KVH, block_size, D] (head-major inside a
// block, so one head's keys of a block are contiguous and stream well);
// block_tables [n, max_blocks] int64; context_lens [n] int64. H = KVH * G (grouped-query).
// Work is split over (sequence, kv head) pairs; each pair reads its keys once for all G query
// heads that share them, and its values once. Two passes: scores + max, then exp and the
// weighted sum of values (scores fit in cache: G * context floats).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// Blocks come in table order, i.e. scattered in memory: ask for the next block's lines while
// this one is being used, since the hardware prefetcher cannot guess the jump.
static inline void prefetch_block(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, 0, 1);
}

void paged_attention_decode(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32,
              "paged_attention_decode: float32 only");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
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
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* cl = context_lens.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, n * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(G * D), mx(G), inv(G);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t s = w / KVH, h = w % KVH, L = cl[s];
      const int64_t* table = bt + s * MB;
      const float* qs = qp + (s * H + h * G) * D;  // the G query heads of this kv head: [G, D]
      scores.resize(G * L);
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < L; ++t) {
        if (t % BS == 0 && t + BS < L) prefetch_block(kp + table[t / BS + 1] * blk_stride + h * head_stride, BS * D);
        const float* kt = kp + table[t / BS] * blk_stride + h * head_stride + (t % BS) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qs + g * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * kt[d];
          dot *= sc;
          scores[g * L + t] = dot;
          mx[g] = std::max(mx[g], dot);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float sum = 0.f, m = mx[g];
        float* sg = scores.data() + g * L;
        for (int64_t t = 0; t < L; ++t) {
          sg[t] = std::exp(sg[t] - m);
          sum += sg[t];
        }
        inv[g] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      prefetch_block(vp + table[0] * blk_stride + h * head_stride, std::min(L, BS) * D);
      for (int64_t t = 0; t < L; ++t) {
        if (t % BS == 0 && t + BS < L) prefetch_block(vp + table[t / BS + 1] * blk_stride + h * head_stride, BS * D);
        const float* vt = vp + table[t / BS] * blk_stride + h * head_stride + (t % BS) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + t];
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += p * vt[d];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* og = op + (s * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) og[d] = acc[g * D + d] * inv[g];
      }
    }
  });
}

torch::Tensor linear_small_m(torch::Tensor x, torch::Tensor w);  // linear_cpu.cpp
bool linear_small_m_supported();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention_decode", &paged_attention_decode, "paged decode attention (CPU, float32)");
  m.def("linear_small_m", &linear_small_m, "x @ W.T for 1..8 rows of x, each weight row read once (CPU, float32)");
  m.def("linear_small_m_supported", &linear_small_m_supported, "built with AVX2+FMA");
}
