// y[M, N] = x[M, K] @ W[N, K]^T (+ bias) with W re-laid once, at load time, as column panels.
//
// Why our own GEMM: BLAS packs W into its own panel layout on every call. Our weights never
// change, so that copy (10% of offline time in MKL's scopy, measured with perf) is pure waste,
// and at decode batches (M = 16..128) it dominates what little work each weight element gets.
// Here W is stored as [N/16][K][16]: panel j holds output columns 16j..16j+15, one 64-byte row
// per k. A 6x16 register tile (12 AVX2 accumulators, the BLIS Haswell shape) walks a panel
// sequentially; for decode sizes the same loop is a streaming GEMV that reads each weight byte
// once for all rows of x. Where the CPU has AVX-512, a 12x32 tile walks two panels at once
// (gemm_tile512.h, same packed weights): 310-330 GFLOP/s on the model's shapes on a 2-core Xeon,
// against ~165 for the AVX2 tile there.
//
// Blocking: panel by panel, each read from memory once and reused from L2 by every 6-row tile of
// x; only long K (> 3072) is cut into KC-deep slices. Threads split the output columns, so no
// two threads write the same element.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "parallel.h"
#include "prefetch.h"

#include <algorithm>

namespace {
constexpr int64_t NR = 16;   // output columns per panel (two AVX2 vectors)
constexpr int64_t MR = 6;    // rows of x per register tile
constexpr int64_t KC = 2048;  // K slice for long K: 2048 x 16 floats = 128 KB of panel, in L2
}  // namespace

#if defined(__AVX512F__)
#include "gemm_tile512.h"

// AVX-512: the same walk two panels at a time (a 12x32 tile, gemm_tile512.h); an odd last panel
// runs alone. Panels [j0, j1) as above; the caller keeps pairs whole (j0 even). The pair after
// each one is prefetched, up to panel `jpf` (past j1: a thread's share is handed out a pair per
// call, parallel.h, and its next pair follows on).
static void gemm_panels512(const float* A, int64_t lda, const float* Wp, const float* bias, float* C, int64_t ldc,
                           int64_t M, int64_t K, int64_t j0, int64_t j1, int64_t jpf) {
  constexpr int64_t MR5 = 12;
  const int64_t kc_max = K <= 3 * KC / 2 ? K : KC;
  for (int64_t j = j0; j < j1; j += 2) {
    const bool pair = j + 1 < j1;
    const float* b = bias ? bias + j * NR : nullptr;
    for (int64_t pc = 0; pc < K; pc += kc_max) {
      const int64_t kc = std::min(kc_max, K - pc);
      const float* bp = Wp + j * K * NR + pc * NR;
      // Row tiles prefetch the next pair's slice, each an equal share spread evenly over its k
      // loop, so it is in cache when its turn comes (weights stream from DRAM). Without it each
      // pair's first tile waited on memory; with all of it in the first tile (as before), that
      // tile asked for more than the core's fill buffers carry. 30 layers' distinct weights in
      // turn: M = 64 255 -> 289-297 GFLOP/s, M = 32 222 -> 266-274, M = 128 280 -> 300-308.
      // Up to 16 rows (decode, a MoE expert) the first row tile asks for its own panels a few KiB
      // ahead into L2 instead (prefetch.h): faster there than the next pair into L1, slower from
      // 24 rows on.
      const int64_t ahead = M <= 16 ? pagedserve::gemm_prefetch_bytes().load(std::memory_order_relaxed) : 0;
      const float* next = j + 3 < jpf && !ahead ? bp + 2 * K * NR : nullptr;
      const int64_t tiles = (M + MR5 - 1) / MR5, chunk = (kc + tiles - 1) / tiles;
      const int64_t every = std::max<int64_t>(1, kc / chunk);
      for (int64_t ir = 0, t = 0; ir < M; ir += MR5, ++t) {
        const int64_t rows = std::min(MR5, M - ir);
        const float* pf = next ? next + t * chunk * NR : nullptr;
        const int64_t tile_ahead = ir == 0 ? ahead : 0;  // the first row tile streams the pair
        if (pair)
          tile512_rows<2>(rows, A + ir * lda + pc, lda, bp, NR, K * NR, C + ir * ldc + j * NR, ldc, kc, pc == 0, b, pf, every,
                          tile_ahead);
        else
          tile512_rows<1>(rows, A + ir * lda + pc, lda, bp, NR, K * NR, C + ir * ldc + j * NR, ldc, kc, pc == 0, b, nullptr, 1,
                          tile_ahead);
      }
    }
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include "gemm_tile.h"

// Panels [j0, j1) of the output for all M rows. Each panel is read from memory once and then
// used by every row tile while it sits in L2 (panel-outer order measured 0-13% faster than
// blocking M first, for every M from 1 to 600; software prefetch of the next panel measured no
// gain over the hardware prefetcher).
static void gemm_panels(const float* A, int64_t lda, const float* Wp, const float* bias, float* C, int64_t ldc,
                        int64_t M, int64_t K, int64_t j0, int64_t j1) {
  // K in one slice unless long. Every slice after the first re-reads and re-writes C, so slices
  // cost: the 1536-deep down projection of a 512-token chunk ran at 180 GFLOP/s in 256-deep
  // slices and 195 in one; at K = 4096-8192, 2048-deep slices beat both 256-1024 and one slice.
  const int64_t kc_max = K <= 3 * KC / 2 ? K : KC;
  for (int64_t j = j0; j < j1; ++j) {
    const float* b = bias ? bias + j * NR : nullptr;
    for (int64_t pc = 0; pc < K; pc += kc_max) {
      const int64_t kc = std::min(kc_max, K - pc);
      const float* bp = Wp + j * K * NR + pc * NR;
      for (int64_t ir = 0; ir < M; ir += MR)
        tile_rows(std::min(MR, M - ir), A + ir * lda + pc, lda, bp, NR, C + ir * ldc + j * NR, ldc, kc, pc == 0, b);
    }
  }
}
#endif

void set_gemm_prefetch(int64_t bytes) { pagedserve::set_prefetch_bytes(pagedserve::gemm_prefetch_bytes(), bytes); }

bool packed_linear_supported() {
#if defined(__AVX2__) && defined(__FMA__)
  return true;
#else
  return false;
#endif
}

// W[N, K] -> [N/16, K, 16], the layout packed_linear reads.
torch::Tensor pack_linear_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32, "a 2-D float32 weight");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % NR == 0, "out_features must be a multiple of ", NR, ", got ", N);
  w = w.contiguous();
  auto out = torch::empty({N / NR, K, NR}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  // One panel per task: 16 sequential row reads, one sequential write (torch's strided copy of
  // the same transpose ran at 0.7 GB/s and was a second of every start).
  at::parallel_for(0, N / NR, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < NR; ++c) dst[(j * K + k) * NR + c] = src[(j * NR + c) * K + k];
  });
  return out;
}

void packed_linear_bf16(const torch::Tensor& x, const torch::Tensor& wp, const float* bias, torch::Tensor& y);

// x float32 [M, K] @ a packed weight: float32 panels (here) or bf16 k-pairs (gemm_bf16_cpu.cpp,
// chosen by the weight's dtype); the checks, the bias and the output are shared.
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor wp, c10::optional<torch::Tensor> bias) {
  const bool bf16 = wp.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && (bf16 || wp.scalar_type() == torch::kFloat32),
              "float32 x and a float32 or bf16 packed weight");
  TORCH_CHECK(x.dim() == 2 && wp.dim() == 3 && wp.size(2) == (bf16 ? 2 * NR : NR) && wp.is_contiguous(),
              "x [M, K] and a packed weight: [N/16, K, 16] (pack_linear_weight) or [N/16, ceil(K/2), 32] "
              "(pack_linear_weight_bf16)");
  if (bf16) {
    TORCH_CHECK((x.size(1) + 1) / 2 == wp.size(1), "x has ", x.size(1), " features, the weight expects ",
                2 * wp.size(1) - 1, " or ", 2 * wp.size(1));
  } else {
    TORCH_CHECK(x.size(1) == wp.size(1), "x has ", x.size(1), " features, the weight expects ", wp.size(1));
  }
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), P = wp.size(0), N = P * NR;
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == torch::kFloat32,
                "bias must be float32 [", N, "]");
    b = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  if (bf16) {
    packed_linear_bf16(x, wp, b, y);
    return y;
  }
#if defined(__AVX2__) && defined(__FMA__)
  const float* xp = x.data_ptr<float>();
  const float* wpp = wp.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t lda = x.stride(0);
  // One panel pair (AVX2: 4 panels) per unit: each thread walks its share in order, a long sequential
  // run of weights, and units move to another thread only when this one falls behind (parallel.h).
#if defined(__AVX512F__)
  pagedserve::parallel_for(0, (P + 1) / 2, 1, [&](int64_t q0, int64_t q1) {
    gemm_panels512(xp, lda, wpp, b, yp, N, M, K, 2 * q0, std::min(P, 2 * q1), P);
  });
#else
  pagedserve::parallel_for(0, P, 4, [&](int64_t j0, int64_t j1) { gemm_panels(xp, lda, wpp, b, yp, N, M, K, j0, j1); });
#endif
  return y;
#else
  auto w = wp.transpose(1, 2).reshape({N, K});
  return b ? torch::addmm(*bias, x, w.t()) : torch::mm(x, w.t());
#endif
}
