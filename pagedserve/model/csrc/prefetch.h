// How far ahead, in bytes, the packed float GEMMs' first row tile (the one that streams a panel
// pair from memory; the others find it in L2) asks for the weights, into L2 (prefetcht1), in each
// of the two panels it walks: at decode batches (float32 up to 16 rows, bf16 up to 64) and a MoE
// expert's ~8 rows. Measured on a Zen 4, two threads each streaming their own 1 MB weights at 8
// rows: bf16 22 -> 30 GB/s, float32 (in place of the next-pair prefetch into L1) 21 -> 25, one
// row 29 -> 36; the default model's decode steps 8-25% shorter at 1-8 sequences (bf16 also at
// 16-48). Into L1 (prefetcht0) the same distances gained little: a prefetch into L1 holds one of
// the core's few L1 miss buffers for a whole memory latency, which capped a core near 12 GB/s
// while its arithmetic ran; an L2 fill does not. 2-8 KiB ahead measured alike; 0 turns it off
// (set_gemm_prefetch: benchmarks, and the test that it changes no bit). In the AVX-512 tiles
// (float32 and bf16) only: the AVX2 build's tile keeps the hardware prefetcher alone, as nothing
// here could measure an AVX2-only CPU.
#pragma once
#include <torch/extension.h>

#include <atomic>
#include <cstdint>

namespace pagedserve {
inline std::atomic<int64_t>& gemm_prefetch_bytes() {
  static std::atomic<int64_t> v{4096};
  return v;
}

// The quantized (VNNI) GEMM's distance (gemm_quant_cpu.cpp: 1 KiB ahead, into L1).
inline std::atomic<int64_t>& quant_prefetch_bytes() {
  static std::atomic<int64_t> v{1024};
  return v;
}

// set_gemm_prefetch / set_quant_prefetch: a hint never faults, but a distance is a benchmark's
// choice within 64 KiB.
inline void set_prefetch_bytes(std::atomic<int64_t>& knob, int64_t bytes) {
  TORCH_CHECK(bytes >= 0 && bytes <= 1 << 16, "prefetch distance: 0..65536 bytes, got ", bytes);
  knob.store(bytes);
}
}  // namespace pagedserve
