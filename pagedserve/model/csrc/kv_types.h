// What the CPU attention kernels share: the KV cache's element types (float32, float16,
// bfloat16) read as float32, and a dispatch on the cache's dtype.
#pragma once
#include <torch/extension.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PS_AVX2 1
#include <immintrin.h>
#endif

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
