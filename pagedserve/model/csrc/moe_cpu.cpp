// The experts of a Mixture-of-Experts layer in one call (model/moe.py). x's rows come grouped by
// expert (counts[e] rows for expert e, in order) and each group is multiplied by its own expert's
// weight, packed or quantized like any Linear's (llama_layers_cpu.cpp's two-tensor convention).
//
// Why: an OLMoE-shaped layer at batch 64 routes 512 (token, expert) pairs to ~all 64 experts, ~8
// rows each. One Python call per expert per projection was ~130 calls a layer, each its own module
// dispatch, output allocation, activation quantization and fork/join of the threads over 16-32
// column panels: at ~8 rows an expert that overhead is as large as the product. Here, with at least
// two experts with work per thread, the threads split the EXPERTS (each expert's product runs on one
// thread, start to end, streaming its own weights; parallel.h's stealing evens out the group
// sizes); with fewer (Mixtral's 8 experts at low batch, or many cores), the experts run one after
// another, each split over the threads by columns as a single Linear is.
//
// Routing and the combine are here too (moe_route, moe_combine): a handful of small torch ops each
// (softmax, top-k, argsort, bincount, index_select, mul, zeros, index_add) cost ~1 ms of a 5 ms
// layer, and on a shared CPU torch's fixed thread split made them wait for a busy core (~20 ms of
// index_add with a compile running beside it). These loops take tens of microseconds.
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "parallel.h"

// A Linear as its two tensors: packed float weight + empty, or quantized weight + scales (llama_layers_cpu.cpp).
torch::Tensor linear_of(const torch::Tensor& x, const torch::Tensor* w, c10::optional<torch::Tensor> bias,
                     bool quant_bf16, int64_t int8_rows);

// Each token's top k experts by router logit (softmax is monotonic: the top k probabilities,
// picked without exp's rounding; equal logits: the lower expert first), their softmax
// probabilities — over all experts, or renormalized over the k (Mixtral; Qwen2-MoE and OLMoE by
// norm_topk_prob) — and the (token, expert) pairs p = t * k + j sorted by expert, stable (a
// counting sort: torch.argsort(ids.flatten(), stable=True)). logits float32 [T, E]. Returns
// (weights float32 [T, k] in rank order, order int64 [T * k], counts [E]).
std::tuple<torch::Tensor, torch::Tensor, std::vector<int64_t>> moe_route(torch::Tensor logits, int64_t k,
                                                                          bool renormalize) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32, "moe_route: logits must be float32 [T, E]");
  logits = logits.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "moe_route: top k must be in [1, ", E, "], got ", k);
  auto weights = torch::empty({T, k}, logits.options());
  auto ids = std::vector<int32_t>(T * k);
  const float* l = logits.data_ptr<float>();
  float* w = weights.data_ptr<float>();
  pagedserve::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = l + t * E;
      int32_t* top = ids.data() + t * k;
      int64_t n = 0;  // insertion into the k best so far, best first
      for (int64_t e = 0; e < E; ++e) {
        if (n == k && !(row[e] > row[top[k - 1]])) continue;
        int64_t i = n < k ? n++ : k - 1;
        while (i > 0 && row[e] > row[top[i - 1]]) {
          top[i] = top[i - 1];
          --i;
        }
        top[i] = int32_t(e);
      }
      const float m = row[top[0]];
      double denom = 0;
      if (renormalize)
        for (int64_t j = 0; j < k; ++j) denom += std::exp(double(row[top[j]] - m));
      else
        for (int64_t e = 0; e < E; ++e) denom += std::exp(double(row[e] - m));
      for (int64_t j = 0; j < k; ++j) w[t * k + j] = float(std::exp(double(row[top[j]] - m)) / denom);
    }
  });
  std::vector<int64_t> counts(E, 0), next(E, 0);
  for (int64_t p = 0; p < T * k; ++p) ++counts[ids[p]];
  for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + counts[e - 1];
  auto order = torch::empty({T * k}, logits.options().dtype(torch::kLong));
  int64_t* o = order.data_ptr<int64_t>();
  for (int64_t p = 0; p < T * k; ++p) o[next[ids[p]]++] = p;
  return {weights, order, counts};
}

// out [T, H]: each token's k expert outputs, weighted: out[t] = sum_j weights[t, j] * ys[row of pair
// t * k + j], j in rank order (the same sums alone or in any batch). ys [T * k, H] in `order`'s rows.
torch::Tensor moe_combine(torch::Tensor ys, torch::Tensor order, torch::Tensor weights) {
  TORCH_CHECK(ys.dim() == 2 && ys.scalar_type() == torch::kFloat32 && weights.dim() == 2 &&
                  weights.scalar_type() == torch::kFloat32 && order.scalar_type() == torch::kLong &&
                  order.numel() == ys.size(0) && weights.numel() == ys.size(0),
              "moe_combine: ys float32 [T * k, H], order int64 [T * k], weights float32 [T, k]");
  ys = ys.contiguous();
  weights = weights.contiguous();
  order = order.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = ys.size(1), P = T * k;
  std::vector<int64_t> row(P);  // pair p's row in ys
  const int64_t* o = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < P; ++i) {
    TORCH_CHECK(o[i] >= 0 && o[i] < P, "moe_combine: order is no permutation of [0, ", P, ")");
    row[o[i]] = i;
  }
  auto out = torch::empty({T, H}, ys.options());
  const float* y = ys.data_ptr<float>();
  const float* w = weights.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  pagedserve::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* __restrict d = dst + t * H;
      for (int64_t h = 0; h < H; ++h) d[h] = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const float wj = w[t * k + j];
        const float* __restrict src = y + row[t * k + j] * H;
        for (int64_t h = 0; h < H; ++h) d[h] += wj * src[h];
      }
    }
  });
  return out;
}

// x float32 [M, K], rows grouped by expert — or, with `rows` (int64 [R]), the pairs' inputs are
// x[rows[i]] and x is the tokens' [T, K] (the gather happens here, per expert); counts [E] (summing
// to M = R); weights 2E tensors: expert e's packed float weight and an empty tensor, or its
// quantized weight and scales; an expert whose weight is empty is another rank's (expert
// parallel): its rows come out zero. quant_bf16 / int8_rows as quant_linear's. Returns y [M, N], N
// the experts' common output size.
torch::Tensor grouped_linear(torch::Tensor x, const std::vector<int64_t>& counts,
                             const std::vector<torch::Tensor>& weights, int64_t out_features, bool quant_bf16,
                             int64_t int8_rows, c10::optional<torch::Tensor> rows) {
  const int64_t E = static_cast<int64_t>(counts.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 2 * E, "grouped_linear: two tensors per expert (", 2 * E,
              "), got ", weights.size());
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "grouped_linear: x must be float32 [M, K]");
  x = x.contiguous();
  int64_t total = 0;
  std::vector<int64_t> start(E), work;  // work: the experts with rows, in order
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(counts[e] >= 0, "grouped_linear: negative row count for expert ", e);
    start[e] = total;
    total += counts[e];
    if (counts[e]) work.push_back(e);
    const torch::Tensor& w = weights[2 * e];
    TORCH_CHECK(!w.numel() || (w.dim() == 3 && w.size(0) * 16 == out_features), "grouped_linear: expert ", e,
                "'s weight has ", w.dim() == 3 ? w.size(0) * 16 : -1, " outputs, expected ", out_features);
  }
  const int64_t* gather = nullptr;
  torch::Tensor rows_c;
  if (rows.has_value() && rows->defined()) {
    rows_c = rows->contiguous();
    TORCH_CHECK(rows_c.scalar_type() == torch::kLong && rows_c.dim() == 1 && rows_c.numel() == total,
                "grouped_linear: rows must be int64 [", total, "] (the counts' sum), got ", rows_c.sizes());
    gather = rows_c.data_ptr<int64_t>();
    for (int64_t i = 0; i < total; ++i)
      TORCH_CHECK(gather[i] >= 0 && gather[i] < x.size(0), "grouped_linear: row ", gather[i], " is outside x's ",
                  x.size(0));
  } else {
    TORCH_CHECK(total == x.size(0), "grouped_linear: counts sum to ", total, " rows, x has ", x.size(0));
  }
  const int64_t K = x.size(1);
  auto y = torch::empty({total, out_features}, x.options());
  // Rows are written with plain memory copies: a worker thread is not in the caller's
  // InferenceMode, where an in-place tensor op on the engine's (inference) output is refused.
  float* yp = y.data_ptr<float>();
  auto one = [&](int64_t e) {
    float* rows = yp + start[e] * out_features;
    const torch::Tensor& w = weights[2 * e];
    if (!w.numel()) {
      std::memset(rows, 0, sizeof(float) * counts[e] * out_features);
      return;
    }
    torch::Tensor xe;
    if (gather) {  // this expert's rows of x, side by side
      xe = torch::empty({counts[e], K}, x.options());
      const float* src = x.data_ptr<float>();
      float* dst = xe.data_ptr<float>();
      for (int64_t i = 0; i < counts[e]; ++i)
        std::memcpy(dst + i * K, src + gather[start[e] + i] * K, sizeof(float) * K);
    } else {
      xe = x.narrow(0, start[e], counts[e]);
    }
    const auto ye = linear_of(xe, &weights[2 * e], c10::nullopt, quant_bf16, int8_rows);
    std::memcpy(rows, ye.data_ptr<float>(), sizeof(float) * counts[e] * out_features);
  };
  const int64_t n = static_cast<int64_t>(work.size());
  if (n >= 2 * at::get_num_threads()) {
    // Inside the region every kernel runs on its caller's thread (parallel.h: in_parallel_region).
    pagedserve::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) one(work[i]);
    });
  } else {
    for (int64_t e : work) one(e);
  }
  return y;
}
