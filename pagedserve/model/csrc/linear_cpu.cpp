// y[M, N] = x[M, K] @ W[N, K]^T for small M (1..8): the decode-step linear layers.
//
// At small M the linear layers are bound by reading the weights. BLAS GEMM/GEMV paths measured
// here reach 11-13 GB/s at M=1 and drop to 3-7 GB/s at M=2..8, since they re-stream weight panels
// per row of x. This kernel reads each weight row once, for all M rows of x at the same time
// (x stays in L1), splitting the output columns over threads: 23-31 GB/s at M=1 on this machine.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

template <int M, int R>  // M rows of x, R weight rows at a time: R*M accumulators in registers
static void rows(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m256 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      __m256 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) {
        const __m256 wv = _mm256_loadu_ps(w + (n + r) * K + k);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
        s = _mm_hadd_ps(s, s);
        s = _mm_hadd_ps(s, s);
        y[m * N + n + r] = _mm_cvtss_f32(s);
      }
  }
  for (; n < n1; ++n)  // the last N % R rows
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[n * K + k];
      y[m * N + n] = s;
    }
}

template <int M, int R>
static void run(const float* x, const float* w, float* y, int64_t K, int64_t N) {
  constexpr int64_t kChunk = 64;  // output columns per task
  at::parallel_for(0, (N + kChunk - 1) / kChunk, 1, [&](int64_t b, int64_t e) {
    rows<M, R>(x, w, y, K, N, b * kChunk, std::min(N, e * kChunk));
  });
}
#endif

bool linear_small_m_supported() {
#if defined(__AVX2__) && defined(__FMA__)
  return true;
#else
  return false;
#endif
}

torch::Tensor linear_small_m(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32, "float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.dim() == 2 && w.dim() == 2, "contiguous 2-D tensors");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && K % 8 == 0 && M >= 1 && M <= 8, "needs 1 <= M <= 8 and K % 8 == 0");
#if defined(__AVX2__) && defined(__FMA__)
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (M) {
    case 1: run<1, 8>(xp, wp, yp, K, N); break;
    case 2: run<2, 4>(xp, wp, yp, K, N); break;
    case 3: run<3, 4>(xp, wp, yp, K, N); break;
    case 4: run<4, 2>(xp, wp, yp, K, N); break;
    case 5: run<5, 2>(xp, wp, yp, K, N); break;
    case 6: run<6, 2>(xp, wp, yp, K, N); break;
    case 7: run<7, 1>(xp, wp, yp, K, N); break;
    default: run<8, 1>(xp, wp, yp, K, N); break;
  }
  return y;
#else
  return torch::mm(x, w.t());
#endif
}
