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
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "parallel.h"

torch::Tensor packed_linear(torch::Tensor x, torch::Tensor wp, c10::optional<torch::Tensor> bias);
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor qw, torch::Tensor scales, c10::optional<torch::Tensor> bias,
                           bool bf16, int64_t int8_rows);

// x float32 [M, K], rows grouped by expert; counts [E] (summing to M); weights 2E tensors: expert
// e's packed float weight and an empty tensor, or its quantized weight and scales; an expert whose
// weight is empty is another rank's (expert parallel): its rows come out zero. quant_bf16 /
// int8_rows as quant_linear's. Returns y [M, N], N the experts' common output size.
torch::Tensor grouped_linear(torch::Tensor x, const std::vector<int64_t>& counts,
                             const std::vector<torch::Tensor>& weights, int64_t out_features, bool quant_bf16,
                             int64_t int8_rows) {
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
  TORCH_CHECK(total == x.size(0), "grouped_linear: counts sum to ", total, " rows, x has ", x.size(0));
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
    const torch::Tensor& s = weights[2 * e + 1];
    const auto xe = x.narrow(0, start[e], counts[e]);
    auto ye = s.numel() ? quant_linear(xe, w, s, c10::nullopt, quant_bf16, int8_rows) : packed_linear(xe, w, c10::nullopt);
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
