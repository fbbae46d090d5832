// What the CPU attention kernels share: the KV cache's element types (float32, float16,
// bfloat16, float8 e5m2; int8 and float8 e4m3 with a scale per token and kv head) read as float32,
// and a dispatch on the cache's dtype.
#pragma once
#include <torch/extension.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PS_AVX2 1
#include <immintrin.h>
#endif

static inline float to_float(float x) { return x; }
static inline float to_float(at::Half x) { return static_cast<float>(x); }
static inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }
static inline float to_float(c10::Float8_e5m2 x) { return static_cast<float>(x); }
static inline float to_float(int8_t x) { return static_cast<float>(x); }
static inline float to_float(c10::Float8_e4m3fn x) { return static_cast<float>(x); }

// Scaled caches (--kv-cache-dtype int8, fp8 / fp8_e4m3): each (token, kv head) row of D values is
// stored as x / s with s = max|x| / kv_qmax, and s beside it in a float32 scales tensor
// [num_blocks, KVH, block_size]; a row reads back as s * stored. Per row, so an outlier token
// costs only its own precision, and the scale multiplies a whole dot product (q.k) or a
// probability (p.v), not each value.
template <typename T>
constexpr bool kv_scaled = std::is_same_v<T, int8_t> || std::is_same_v<T, c10::Float8_e4m3fn>;
template <typename T>
constexpr float kv_qmax = std::is_same_v<T, int8_t> ? 127.f : 448.f;  // e4m3's largest finite value

// Row x[0:D] into dst and its scale, as attention.py's quantize_kv computes them (the same bits).
template <typename T>
static inline void quantize_row(const float* x, T* dst, int64_t D, float* scale) {
  float amax = 0.f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
  const float inv = amax > 0.f ? kv_qmax<T> / amax : 0.f;
  // times the float32 of the double 1/qmax, as torch multiplies a float32 tensor by a Python float
  // (a division by the constant would be this product anyway under -ffast-math)
  *scale = amax * static_cast<float>(1.0 / double(kv_qmax<T>));
  for (int64_t d = 0; d < D; ++d) {
    const float y = std::min(kv_qmax<T>, std::max(-kv_qmax<T>, x[d] * inv));
    if constexpr (std::is_same_v<T, int8_t>)
      dst[d] = static_cast<int8_t>(std::nearbyint(y));  // nearest, ties to even (torch.round)
    else
      dst[d] = T(y);  // c10's conversion, as torch's .to(float8_e4m3fn)
  }
}

// The scales tensor of a scaled cache ([num_blocks, KVH, block_size] float32, contiguous), checked;
// null for the other types (which must not have one).
template <typename T>
static float* kv_scales(const c10::optional<torch::Tensor>& s, const torch::Tensor& cache, const char* who) {
  if (!kv_scaled<T>) {
    TORCH_CHECK(!s.has_value(), who, ": scales are for int8 / float8_e4m3fn caches only");
    return nullptr;
  }
  TORCH_CHECK(s.has_value(), who, ": an int8 / float8_e4m3fn cache needs its scales");
  TORCH_CHECK(s->scalar_type() == torch::kFloat32 && s->is_contiguous() && s->dim() == 3 &&
                  s->size(0) == cache.size(0) && s->size(1) == cache.size(1) && s->size(2) == cache.size(2),
              who, ": scales must be float32 [num_blocks, KVH, block_size], contiguous");
  return s->data_ptr<float>();
}

// Calls f with a null pointer of the KV cache's element type (float32, float16, bfloat16 or
// float8 e5m2).
template <typename F>
static void with_kv_type(at::ScalarType t, const char* who, F f) {
  switch (t) {
    case torch::kFloat32: return f(static_cast<float*>(nullptr));
    case torch::kFloat16: return f(static_cast<at::Half*>(nullptr));
    case torch::kBFloat16: return f(static_cast<at::BFloat16*>(nullptr));
    case torch::kFloat8_e5m2: return f(static_cast<c10::Float8_e5m2*>(nullptr));
    case torch::kChar: return f(static_cast<int8_t*>(nullptr));
    case torch::kFloat8_e4m3fn: return f(static_cast<c10::Float8_e4m3fn*>(nullptr));
    default: TORCH_CHECK(false, who, ": KV cache must be float32, float16, bfloat16, float8_e5m2, int8 or float8_e4m3fn");
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
// float8 e5m2 is the top byte of a float16 (same sign, 5-bit exponent and bias): each byte
// becomes the high half of a 16-bit lane, exactly, then widens as float16 does.
static inline __m256 load8(const c10::Float8_e5m2* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), b));
}

// int8 and float8 e4m3 (scaled caches): the stored values, before the row's scale.
static inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// e4m3 (bias 7) is float16 (bias 15) with 4 exponent and 3 mantissa bits: shifted into a float16's
// bit positions it reads as the value * 2^-8, subnormals included (both scale the same way), so
// widen as float16 and multiply back. No NaN is ever stored (quantize_row clamps).
static inline __m256 load8(const c10::Float8_e4m3fn* p) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7),
                                 _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8));
  return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.f));
}

static inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static inline float hsum8(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}

// exp of a vector of floats (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial for
// e^r, then 2^n through the exponent bits), within 2 ulp of std::exp; inputs below -87 give
// ~1e-38, not 0. One set of constants for the 8- and 16-lane versions.
namespace expf_poly {
constexpr float lo = -87.0f, hi = 88.0f, log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
constexpr float c[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                        5.0000001201e-1f};
}  // namespace expf_poly

static inline __m256 exp256(__m256 x) {
  using namespace expf_poly;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(ln2_lo), _mm256_fnmadd_ps(n, _mm256_set1_ps(ln2_hi), x));
  __m256 p = _mm256_set1_ps(c[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c[i]));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#if defined(__AVX512F__)
static inline __m512 exp512(__m512 x) {
  using namespace expf_poly;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(ln2_lo), _mm512_fnmadd_ps(n, _mm512_set1_ps(ln2_hi), x));
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

// The online softmax's step over a full run of scores, shared by decode and prefill attention:
// m becomes max(m, s[0:n]), each s[t] becomes exp(s[t] - m) in place, and their sum is returned
// (the caller rescales what it accumulated under the old m). n a multiple of 8; 16 lanes at a
// time where the CPU has AVX-512. In registers with the inline exp rather than a libmvec call
// per vector.
static inline float exp_in_place(float* s, int64_t n, float& m) {
#if defined(__AVX512F__)
  if (n % 16 == 0) {
    __m512 vm = _mm512_set1_ps(m);
    for (int64_t t = 0; t < n; t += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(s + t));
    m = _mm512_reduce_max_ps(vm);
    const __m512 vb = _mm512_set1_ps(m);
    __m512 vs = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), vb));
      _mm512_storeu_ps(s + t, e);
      vs = _mm512_add_ps(vs, e);
    }
    return _mm512_reduce_add_ps(vs);
  }
#endif
  __m256 vm = _mm256_set1_ps(m);
  for (int64_t t = 0; t < n; t += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + t));
  m = hmax8(vm);
  const __m256 vb = _mm256_set1_ps(m);
  __m256 vs = _mm256_setzero_ps();
  for (int64_t t = 0; t < n; t += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), vb));
    _mm256_storeu_ps(s + t, e);
    vs = _mm256_add_ps(vs, e);
  }
  return hsum8(vs);
}
#endif
