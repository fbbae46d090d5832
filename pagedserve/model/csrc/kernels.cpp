// Every C++ CPU kernel in one translation unit. setup.py compiles this file once per CPU feature
// level (kernel_levels.py): torch's headers take ~15 s of each compile, so one unit per level
// instead of five cut the install-time build from ~2 min to ~40 s on two cores.
#include "paged_attention_cpu.cpp"
#include "prefill_attention_cpu.cpp"
#include "gemm_cpu.cpp"
#include "gemm_bf16_cpu.cpp"
#include "gemm_quant_cpu.cpp"
#include "moe_cpu.cpp"
#include "fused_cpu.cpp"
#include "llama_layers_cpu.cpp"
