// Every decoder layer of a Llama-family model for one step, in one call: the same kernels, in the
// same order, as the Python modules in llama.py run them (the results are bitwise equal), with
// nothing in between. Driven from Python, each of the ~10 kernel calls of a layer paid for the
// module call, argument parsing and view objects: 5 ms of a decode step and 12 ms of a step with
// prompt chunks (SmolLM2's 30 layers), during which the second core idled. llama.py stays the
// readable reference and the path for every other device and backend.
#include <torch/extension.h>
#include <ATen/record_function.h>

#include <vector>

// The kernels (paged_attention_cpu.cpp, prefill_attention_cpu.cpp, gemm_cpu.cpp, fused_cpu.cpp).
void paged_attention_decode(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor context_lens, double scale, bool bf16_math,
                            c10::optional<torch::Tensor> k_scales, c10::optional<torch::Tensor> v_scales);
void paged_attention_prefill(torch::Tensor out, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                             torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_table, int64_t start,
                             int64_t num_tokens, int64_t context_len, double scale, bool bf16_math,
                             c10::optional<torch::Tensor> k_scales, c10::optional<torch::Tensor> v_scales);
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor blocks,
              torch::Tensor offsets, c10::optional<torch::Tensor> k_scales, c10::optional<torch::Tensor> v_scales);
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor wp, c10::optional<torch::Tensor> bias);
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor qw, torch::Tensor scales, c10::optional<torch::Tensor> bias,
                           bool bf16, int64_t int8_rows);
void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor w, double eps);
void add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps);
void rotary_embedding(torch::Tensor q, torch::Tensor k, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_and_mul(torch::Tensor gate_up);

// Each kernel shows in torch.profiler under the name benchmarks/step_overhead.py gives the same
// kernel called from Python (free when no profiler is recording).
#define PS_LABEL(name) RECORD_FUNCTION("pagedserve::" name, std::vector<c10::IValue>())

// Per layer: input norm, qkv (2), qkv bias (empty: none), o (2), post-attention norm, gate/up (2), down (2).
// Each Linear is two tensors: a packed float weight and an empty one, or a quantized weight and its
// scales (with offsets) for quant_linear (gemm_quant_cpu.cpp).
constexpr int64_t kPerLayer = 11;

// One Linear given as its two tensors (also moe_cpu.cpp's experts).
torch::Tensor linear_of(const torch::Tensor& x, const torch::Tensor* w, c10::optional<torch::Tensor> bias,
                     bool quant_bf16, int64_t int8_rows) {
  PS_LABEL("packed_linear");
  if (w[1].numel()) return quant_linear(x, w[0], w[1], bias, quant_bf16, int8_rows);
  return packed_linear(x, w[0], bias);
}

// x: the step's embeddings [T, hidden]; kv_caches [layers, 2, blocks, KVH, block_size, D], and for
// an int8 / float8_e4m3fn cache its row scales kv_scales [layers, 2, blocks, KVH, block_size];
// weights: kPerLayer tensors per layer (Linear weights packed or quantized), then the final norm's;
// quant_bf16: quantized weights multiply in bf16 (the bf16 GEMM's precision), else in float32;
// quant_int8_rows: batches of that many rows or more take int8 activations (quant_linear; 0: never).
// Attention metadata as in attention.py's AttentionMetadata, the prefill chunks as parallel lists.
// rows: the tokens whose hidden states are wanted (the last layer's output projection and MLP run
// for those only). bf16_attention: q.k and p.v in bf16 math on a bf16 cache (attention_bf16.h).
// Returns the final-normed hidden states [T or rows, hidden].
torch::Tensor llama_layers(torch::Tensor x, torch::Tensor positions, torch::Tensor kv_caches,
                           const std::vector<torch::Tensor>& weights, torch::Tensor cos, torch::Tensor sin,
                           torch::Tensor slot_blocks, torch::Tensor slot_offsets, int64_t num_decodes,
                           c10::optional<torch::Tensor> decode_block_tables,
                           c10::optional<torch::Tensor> decode_context_lens,
                           const std::vector<torch::Tensor>& prefill_tables, const std::vector<int64_t>& prefill_starts,
                           const std::vector<int64_t>& prefill_tokens, const std::vector<int64_t>& prefill_contexts,
                           c10::optional<torch::Tensor> rows, int64_t num_heads, int64_t num_kv_heads, double eps,
                           double scale, bool bf16_attention, c10::optional<torch::Tensor> kv_scales, bool quant_bf16,
                           int64_t quant_int8_rows) {
  const int64_t L = kv_caches.size(0), T = x.size(0), D = kv_caches.size(5);
  const int64_t q_size = num_heads * D, kv_size = num_kv_heads * D;
  const size_t P = prefill_tables.size();
  TORCH_CHECK(kv_caches.dim() == 6 && int64_t(weights.size()) == L * kPerLayer + 1,
              "llama_layers: ", weights.size(), " weights for ", L, " layers");
  TORCH_CHECK(prefill_starts.size() == P && prefill_tokens.size() == P && prefill_contexts.size() == P,
              "llama_layers: prefill lists of different lengths");
  TORCH_CHECK(num_decodes == 0 || (decode_block_tables.has_value() && decode_context_lens.has_value()),
              "llama_layers: decodes without block tables");
  torch::Tensor residual;
  for (int64_t i = 0; i < L; ++i) {
    const torch::Tensor* w = weights.data() + i * kPerLayer;
    if (!residual.defined()) {  // first layer: the residual stream starts as the embeddings
      PS_LABEL("rms_norm");
      residual = x;
      x = torch::empty_like(residual);
      rms_norm(x, residual, w[0], eps);
    } else {
      PS_LABEL("add_rms_norm");
      add_rms_norm(x, residual, w[0], eps);
    }
    const auto qkv_bias = w[3].numel() ? c10::optional<torch::Tensor>(w[3]) : c10::nullopt;
    torch::Tensor qkv = linear_of(x, w + 1, qkv_bias, quant_bf16, quant_int8_rows);
    auto q = qkv.narrow(1, 0, q_size).view({T, num_heads, D});
    auto k = qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads, D});
    auto v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads, D});
    {
      PS_LABEL("rotary_embedding");
      rotary_embedding(q, k, positions, cos, sin);
    }
    auto layer_cache = kv_caches.select(0, i);
    auto k_cache = layer_cache.select(0, 0), v_cache = layer_cache.select(0, 1);
    c10::optional<torch::Tensor> k_scales, v_scales;
    if (kv_scales.has_value()) {
      k_scales = kv_scales->select(0, i).select(0, 0);
      v_scales = kv_scales->select(0, i).select(0, 1);
    }
    {
      PS_LABEL("write_kv");
      write_kv(k, v, k_cache, v_cache, slot_blocks, slot_offsets, k_scales, v_scales);
    }
    auto attn = torch::empty({T, num_heads, D}, x.options());
    if (num_decodes) {
      PS_LABEL("paged_attention_decode");
      paged_attention_decode(attn.narrow(0, 0, num_decodes), q.narrow(0, 0, num_decodes), k_cache, v_cache,
                             *decode_block_tables, *decode_context_lens, scale, bf16_attention, k_scales, v_scales);
    }
    for (size_t p = 0; p < P; ++p) {
      PS_LABEL("paged_attention_prefill");
      paged_attention_prefill(attn, q, k, v, k_cache, v_cache, prefill_tables[p], prefill_starts[p],
                              prefill_tokens[p], prefill_contexts[p], scale, bf16_attention, k_scales, v_scales);
    }
    auto o = attn.view({T, q_size});
    if (i == L - 1 && rows.has_value()) {
      o = o.index_select(0, *rows);
      residual = residual.index_select(0, *rows);
    }
    x = linear_of(o, w + 4, c10::nullopt, quant_bf16, quant_int8_rows);
    {
      PS_LABEL("add_rms_norm");
      add_rms_norm(x, residual, w[6], eps);
    }
    torch::Tensor gate_up = linear_of(x, w + 7, c10::nullopt, quant_bf16, quant_int8_rows), act;
    {
      PS_LABEL("silu_and_mul");
      act = silu_and_mul(gate_up);
    }
    gate_up.reset();  // its memory can serve the next allocation
    x = linear_of(act, w + 9, c10::nullopt, quant_bf16, quant_int8_rows);
  }
  PS_LABEL("add_rms_norm");
  add_rms_norm(x, residual, weights.back(), eps);
  return x;
}
