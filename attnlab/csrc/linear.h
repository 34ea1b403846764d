// Shared by attnlab's linear kernels (linear_chunks.cpp, linear_backward.cpp): the feature maps
// (attnlab/linear.py's feature_map), applied row by row as a chunk is read, their backward, and the
// normalizer column of a state.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <utility>

#include "simd.h"

namespace attnlab {

// Features per row of Din channels for `feature` (Taylor: 1 + d + d^2 of the first d = taylor_dim),
// after checking taylor_dim.
inline int64_t feature_count(int64_t feature, int64_t taylor_dim, int64_t Din) {
  TORCH_CHECK(feature >= 0 && feature <= 3, "feature: 0 (identity), 1 (elu+1), 2 (relu) or 3 (Taylor)");
  TORCH_CHECK(feature != 3 || (taylor_dim >= 1 && taylor_dim <= Din), "taylor_dim must be in 1..", Din);
  return feature == 3 ? 1 + taylor_dim + taylor_dim * taylor_dim : Din;
}

// The Taylor map's factors times `factor`: 1 / d^(1/4) on x, 1 / (sqrt 2 sqrt d) on x x^T.
template <typename T>
std::pair<T, T> taylor_factors(int64_t d, T factor) {
  return {factor * T(std::pow(double(d), -0.25)), factor / T(std::sqrt(2.0 * double(d)))};
}

// dst (rows x F) = factor * phi(src (rows x Din)); phi by `feature` (0 identity, 1 elu + 1, 2 relu:
// F = Din; 3 Taylor of the first d channels: F = 1 + d + d^2).
template <typename T>
void feature_map(const T* src, int64_t rows, int64_t Din, int64_t F, int feature, int64_t d, T factor, T* dst) {
  if (feature == 3) {
    const auto [c1, c2] = taylor_factors(d, factor);
    for (int64_t r = 0; r < rows; ++r) {
      const T* x = src + r * Din;
      T* y = dst + r * F;
      y[0] = factor;
      for (int64_t i = 0; i < d; ++i) y[1 + i] = c1 * x[i];
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) y[1 + d + i * d + j] = c2 * x[i] * x[j];
    }
    return;
  }
  // elementwise, a vector of lanes at a time (NaN inputs stay NaN); elu + 1: x + 1 above 0, exp(x) below
  using V = typename Vec<T>::V;
  constexpr int L = LANES<T>;
  const int64_t count = rows * F;
  auto one = [&](T a) {
    const T y = feature == 1 ? (a > 0 ? a + T(1) : std::exp(a)) : feature == 2 ? std::max(a, T(0)) : a;
    return factor * (is_nan(a) ? a : y);
  };
  int64_t x = 0;
  for (; x + L <= count; x += L) {
    const V a = load<T>(src + x), zero = V{};
    V y = a;
    if (feature == 1) y = a > zero ? a + T(1) : exp_nonpositive(a > zero ? zero : a);
    if (feature == 2) y = a > zero ? a : zero;
    store<T>(dst + x, factor * keep_nan<T>(a, y));
  }
  for (; x < count; ++x) dst[x] = one(src[x]);
}

// dx (rows x Din) = the gradient through dst = factor * phi(src) for dy (rows x F), by `feature` as
// feature_map: elementwise, factor * dy * phi'(x) (elu + 1: 1 above 0, exp(x) below; relu: 1 above
// 0); Taylor: factor * (dy[1 + i] / d^(1/4) + sum_j (dy[ij] + dy[ji]) x_j / (sqrt 2 sqrt d)) for the
// first d channels, 0 for the others.
template <typename T>
void feature_grad(const T* src, const T* dy, int64_t rows, int64_t Din, int64_t F, int feature, int64_t d, T factor,
                  T* dx) {
  if (feature == 3) {
    const auto [c1, c2] = taylor_factors(d, factor);
    for (int64_t r = 0; r < rows; ++r) {
      const T* x = src + r * Din;
      const T* g = dy + r * F;
      T* o = dx + r * Din;
      std::fill(o, o + Din, T(0));
      for (int64_t i = 0; i < d; ++i) {
        T acc = 0;
        for (int64_t j = 0; j < d; ++j) acc += (g[1 + d + i * d + j] + g[1 + d + j * d + i]) * x[j];
        o[i] = c1 * g[1 + i] + c2 * acc;
      }
    }
    return;
  }
  // elementwise, a vector of lanes at a time (NaN inputs give NaN: exp(NaN), or a NaN dy)
  using V = typename Vec<T>::V;
  constexpr int L = LANES<T>;
  const int64_t count = rows * F;
  int64_t x = 0;
  for (; x + L <= count; x += L) {
    const V a = load<T>(src + x), g = factor * load<T>(dy + x), zero = V{};
    V y = g;
    if (feature == 1) y = a > zero ? g : g * exp_nonpositive(a > zero ? zero : a);
    if (feature == 2) y = a > zero ? g : zero;
    store<T>(dx + x, feature == 1 ? keep_nan<T>(a, y) : y);
  }
  for (; x < count; ++x) {
    const T a = src[x];
    const T slope = feature == 1 ? (a > 0 ? T(1) : std::exp(a)) : feature == 2 ? (a > 0 ? T(1) : T(0)) : T(1);
    dx[x] = factor * dy[x] * slope;
  }
}

// The normalizer column of a state S (F rows of Ds = Dv + 1): S[f][Dv] += sum of row f of kt (F x n).
template <typename T>
void add_key_sums(const T* kt, int64_t F, int64_t n, T* S, int64_t Ds, int64_t Dv) {
  for (int64_t f = 0; f < F; ++f) {
    T z = 0;
    for (int64_t t = 0; t < n; ++t) z += kt[f * n + t];
    S[f * Ds + Dv] += z;
  }
}

// sum += the n rows (n x D, contiguous) of x.
template <typename T>
void add_rows(const T* x, int64_t n, int64_t D, T* sum) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t d = 0; d < D; ++d) sum[d] += x[t * D + d];
}

// InLine's centred state (the non-causal form): with `mean` holding the sum of the Lk values on entry
// (divided here: their mean u), S[f][x] -= z[f] u[x] for the F rows of S (Dv + 1 columns, the last one
// the key sums z).
template <typename T>
void centre_state(T* S, int64_t F, int64_t Dv, T* mean, int64_t Lk) {
  const T inv = T(1) / T(std::max<int64_t>(Lk, 1));
  for (int64_t x = 0; x < Dv; ++x) mean[x] *= inv;
  for (int64_t f = 0; f < F; ++f)
    for (int64_t x = 0; x < Dv; ++x) S[f * (Dv + 1) + x] -= S[f * (Dv + 1) + Dv] * mean[x];
}

// The non-causal form's keys' state as its backward reads it, one record of noncausal_record(F, Dv)
// floats per (batch, head), written by linear_noncausal's forward (so the backward has no keys' pass of
// its own): S (F x Dv; centred for InLine, over Z for RALA), z (F, the key sums; over Z for RALA),
// RALA's qbar (F), InLine's ubar (Dv), RALA's M and Z; zeros where the form has none.
inline int64_t noncausal_record(int64_t F, int64_t Dv) { return F * Dv + 2 * F + Dv + 2; }

// The parts of (batch, head) bh's record in `base` (T const for the reader).
template <typename T>
struct NoncausalRecord {
  T *S, *z, *qbar, *ubar, *M, *Z;
  NoncausalRecord(T* base, int64_t bh, int64_t F, int64_t Dv)
      : S(base + bh * noncausal_record(F, Dv)), z(S + F * Dv), qbar(z + F), ubar(qbar + F), M(ubar + Dv), Z(M + 1) {}
};

// RALA's logits l_t = qbar . phi(k_t) of n mapped keys (n x F) into `logit`; returns their maximum.
template <typename T>
T rala_logits(const T* mapped, int64_t n, int64_t F, const T* qbar, T* logit) {
  T mx = -std::numeric_limits<T>::max();
  for (int64_t t = 0; t < n; ++t) {
    T l = 0;
    for (int64_t f = 0; f < F; ++f) l += qbar[f] * mapped[t * F + f];
    logit[t] = l;
    mx = std::max(mx, l);
  }
  return mx;
}

// RALA's online softmax over the keys, one chunk of n mapped keys (n x F) at a time: each row times
// exp(l_t - M) with M the logits' running maximum (moved up here: the sum Z and the `rescaled` arrays,
// the state built so far, times exp(M_old - M_new); Z = 0: nothing yet), Z += those weights.
template <typename T>
void rala_weigh(T* mapped, int64_t n, int64_t F, const T* qbar, T* logit, T& M, T& Z,
                std::initializer_list<std::pair<T*, int64_t>> rescaled) {
  const T mx = rala_logits(mapped, n, F, qbar, logit);
  const T M1 = Z > T(0) ? std::max(M, mx) : mx, across = Z > T(0) ? std::exp(M - M1) : T(0);
  if (across != T(1)) {
    for (const auto& a : rescaled)
      for (int64_t x = 0; x < a.second; ++x) a.first[x] *= across;
    Z *= across;
  }
  M = M1;
  for (int64_t t = 0; t < n; ++t) {
    const T w = std::exp(logit[t] - M);
    Z += w;
    for (int64_t f = 0; f < F; ++f) mapped[t * F + f] *= w;
  }
}

// The per-head log decay (H) and the log gates expanded to (B, H, L, F|1), in dtype dt and contiguous,
// as the linear kernels read them; undefined where not given (at most one of the two).
inline std::pair<torch::Tensor, torch::Tensor> decay_and_gates(const c10::optional<torch::Tensor>& log_decay,
                                                               const c10::optional<torch::Tensor>& log_gates,
                                                               at::ScalarType dt, int64_t B, int64_t H, int64_t L,
                                                               int64_t F) {
  torch::Tensor lam, gates;
  if (log_decay.has_value() && log_decay->defined()) {
    lam = log_decay->to(dt).contiguous();
    TORCH_CHECK(lam.numel() == H, "log_decay must have one entry per head");
  }
  if (log_gates.has_value() && log_gates->defined()) {
    TORCH_CHECK(!lam.defined(), "give log_decay or log_gates, not both");
    const int64_t cols = log_gates->size(-1) == 1 ? 1 : F;
    gates = log_gates->to(dt).expand({B, H, L, cols}).contiguous();
  }
  return {lam, gates};
}

// The sizes (B, H, Lq, Din, Lk, Dv) of a non-causal call, after checking q, k (B, H, Lq|Lk, Din) and
// v (B, H, Lk, Dv), of one dtype.
inline std::array<int64_t, 6> noncausal_sizes(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k (B, H, L, Din), v (B, H, Lk, Dv)");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v dtypes differ");
  const int64_t B = q.size(0), H = q.size(1), Din = q.size(3), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == Din && v.size(0) == B && v.size(1) == H &&
                  v.size(2) == Lk, "k, v shapes do not match q");
  return {B, H, q.size(2), Din, Lk, v.size(3)};
}

}  // namespace attnlab
