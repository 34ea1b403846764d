// Small SIMD helpers shared by attnlab's C++ kernels: vectors through the compiler's vector
// extension (portable: AVX-512, AVX2 or SSE code from the same source) and a vector exponential.
#pragma once
#include <cmath>
#include <cstdint>

namespace attnlab {

// Vector types through the compiler's vector extension (GCC and Clang): `V` is 32 bytes of lanes,
// `W` 64 bytes, `I` the integer vector of V's shape (`E` its element).
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef float VU __attribute__((vector_size(32), aligned(4), may_alias));
  typedef int32_t E;
  typedef int32_t I __attribute__((vector_size(32)));
  typedef float W __attribute__((vector_size(64)));
  typedef float WU __attribute__((vector_size(64), aligned(4), may_alias));
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef double VU __attribute__((vector_size(32), aligned(8), may_alias));
  typedef int64_t E;
  typedef int64_t I __attribute__((vector_size(32)));
  typedef double W __attribute__((vector_size(64)));
  typedef double WU __attribute__((vector_size(64), aligned(8), may_alias));
};

template <typename T>
constexpr int LANES = 32 / sizeof(T);  // lanes of a V
template <typename T>
constexpr int WIDE = 64 / sizeof(T);  // lanes of a W

template <typename T, typename V = typename Vec<T>::V>
inline V load(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::VU*>(p);
}
template <typename T>
inline void store(T* p, typename Vec<T>::V x) {
  *reinterpret_cast<typename Vec<T>::VU*>(p) = x;
}
template <typename T>
inline typename Vec<T>::W load_wide(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::WU*>(p);
}
template <typename T>
inline void store_wide(T* p, typename Vec<T>::W x) {
  *reinterpret_cast<typename Vec<T>::WU*>(p) = x;
}

// exp(x) for x <= 0 on a vector. Float: 2^n * e^r with n = round(x / ln 2) and a degree-6
// Taylor polynomial on |r| <= ln(2)/2 (relative error below 2e-7, about 1.5 ulp); inputs below
// -87.3 give exp(-87.3) ~ 1e-38. Double: the C library, lane by lane.
inline Vec<float>::V exp_nonpositive(Vec<float>::V x) {
  using V = Vec<float>::V;
  using I = Vec<float>::I;
  const V lo = V{} - 87.3f;
  x = x < lo ? lo : x;
  const I n = __builtin_convertvector(x * 1.44269504f - 0.5f, I);  // round half away (x <= 0)
  const V nf = __builtin_convertvector(n, V);
  const V r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;  // x - n ln 2, ln 2 split in two
  V p = V{} + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I bits = (n + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline Vec<double>::V exp_nonpositive(Vec<double>::V x) {
  for (int i = 0; i < LANES<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

// NaN tests on the bits (integer arithmetic, so -ffast-math cannot assume them away): `keep_nan(x, y)`
// is x where x is NaN, else y, so that an elementwise map passes NaN inputs through as NaN. `bits` is
// an integer (vector) of T's width: NaN when its magnitude is above infinity's.
template <typename T, typename Bits>
inline auto nan_bits(Bits bits) {
  using E = typename Vec<T>::E;
  constexpr E sign = E(1) << (8 * sizeof(E) - 1), infinity = sizeof(T) == 4 ? E(0x7f800000) : E(0x7ff0000000000000LL);
  return (bits & ~sign) > infinity;
}
template <typename T>
inline bool is_nan(T x) {
  typename Vec<T>::E bits;
  __builtin_memcpy(&bits, &x, sizeof bits);
  return nan_bits<T>(bits);
}
template <typename T>
inline typename Vec<T>::V keep_nan(typename Vec<T>::V x, typename Vec<T>::V y) {
  typename Vec<T>::I bits;
  __builtin_memcpy(&bits, &x, sizeof bits);
  return nan_bits<T>(bits) ? x : y;
}

}  // namespace attnlab
