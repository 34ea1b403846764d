// Causal chunked linear attention with an optional per-head decay or per-channel gates (CPU,
// forward): the same mathematics as attnlab/linear.py's chunked form, fused so that a (batch, head)
// pair walks its chunks with the state held in cache and nothing of size L is materialized besides
// the output.
//
// Per chunk c of n tokens (t, s = 0..n-1 within the chunk), per-head decay lam <= 0:
//   scores = (Q_c K_c^T) * W,   W[t][s] = exp(lam (t - s)) for s <= t, else 0
//   out_c  = scores V_c + (Q_c * exp(lam (t + 1))) S
//   S      = exp(lam n) S + (K_c * exp(lam (n - 1 - s)))^T V_c
// Per-channel log gates g <= 0 (GLA), G = cumsum of g within the chunk, last = G[n - 1]:
//   scores[t][s] = sum_f q_tf k_sf exp(G_tf - G_sf) for s <= t: one GEMM of Q*exp(G) and K*exp(-G)
//                  when the chunk's gates sum to less than RANGE (exp stays far inside the dtype),
//                  else computed pair by pair
//   out_c  = scores V_c + (Q_c * exp(G)) S
//   S      = exp(last) * S (row f scaled) + (K_c * exp(last - G))^T V_c
// With the normalizer (Linear Transformer), z = sum of the (decayed) keys rides in the state's last
// column and each output row is divided by its denominator in the chunk, so nothing is appended
// to V. Four small GEMMs per chunk (attnlab::gemm). (batch, head) pairs run in parallel on torch's
// thread pool.
#include "native.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
constexpr T kRange = std::is_same_v<T, float> ? T(60) : T(600);  // as attnlab/linear.py's _GATE_RANGE

template <typename T>
void chunks(const T* q, const T* k, const T* v, const T* lam, const T* gates, T* state, T* out, int64_t BH,
            int64_t H, int64_t L, int64_t F, int64_t Dv, int64_t C, bool normalize, T eps) {
  const int64_t Ds = Dv + (normalize ? 1 : 0);  // state row: Dv value columns, then the normalizer z
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    std::vector<T> kt(F * C), scores(C * C), qs(C * F), G(C * F), w(C * C), qdecay(C), kdecay(C), den(C);
    for (int64_t bh = begin; bh < stop; ++bh) {
      const T l = lam ? lam[bh % H] : T(0);
      T* S = state + bh * F * Ds;
      int64_t built = -1;  // chunk length the decay tables were built for
      for (int64_t c0 = 0; c0 < L; c0 += C) {
        const int64_t n = std::min(C, L - c0);
        const T* qc = q + (bh * L + c0) * F;
        const T* kc = k + (bh * L + c0) * F;
        const T* vc = v + (bh * L + c0) * Dv;
        T* oc = out + (bh * L + c0) * Dv;
        const T* qread = qc;  // Q', the queries as they read the state
        const T* last = nullptr;
        if (gates) {
          const T* gc = gates + (bh * L + c0) * F;
          for (int64_t t = 0; t < n; ++t)
            for (int64_t f = 0; f < F; ++f) G[t * F + f] = gc[t * F + f] + (t ? G[(t - 1) * F + f] : T(0));
          last = G.data() + (n - 1) * F;
          for (int64_t x = 0; x < n * F; ++x) qs[x] = qc[x] * std::exp(G[x]);
          qread = qs.data();
          if (-*std::min_element(last, last + F) < kRange<T>) {
            for (int64_t s = 0; s < n; ++s)
              for (int64_t f = 0; f < F; ++f) kt[f * n + s] = kc[s * F + f] * std::exp(-G[s * F + f]);
            attnlab::gemm(n, n, F, qs.data(), F, kt.data(), n, false, scores.data(), n);
            for (int64_t t = 0; t < n; ++t) std::fill(scores.data() + t * n + t + 1, scores.data() + (t + 1) * n, T(0));
          } else {  // strong decay: exp(G_t - G_s) <= 1 pair by pair
            for (int64_t t = 0; t < n; ++t)
              for (int64_t s = 0; s < n; ++s) {
                T acc = 0;
                if (s <= t)
                  for (int64_t f = 0; f < F; ++f)
                    acc += qc[t * F + f] * kc[s * F + f] * std::exp(G[t * F + f] - G[s * F + f]);
                scores[t * n + s] = acc;
              }
          }
          for (int64_t s = 0; s < n; ++s)
            for (int64_t f = 0; f < F; ++f) kt[f * n + s] = kc[s * F + f] * std::exp(last[f] - G[s * F + f]);
        } else {
          if (n != built) {
            for (int64_t t = 0; t < n; ++t) {
              for (int64_t s = 0; s < n; ++s) w[t * n + s] = s <= t ? std::exp(l * T(t - s)) : T(0);
              qdecay[t] = std::exp(l * T(t + 1));
              kdecay[t] = std::exp(l * T(n - 1 - t));
            }
            built = n;
          }
          attnlab::transpose(kc, n, F, kt.data(), n);
          attnlab::gemm(n, n, F, qc, F, kt.data(), n, false, scores.data(), n);
          for (int64_t x = 0; x < n * n; ++x) scores[x] *= w[x];
          if (l != T(0)) {
            for (int64_t t = 0; t < n; ++t)
              for (int64_t f = 0; f < F; ++f) qs[t * F + f] = qc[t * F + f] * qdecay[t];
            qread = qs.data();
            for (int64_t f = 0; f < F; ++f)
              for (int64_t s = 0; s < n; ++s) kt[f * n + s] *= kdecay[s];
          }
        }
        attnlab::gemm(n, Dv, n, scores.data(), n, vc, Dv, false, oc, Dv);  // intra-chunk
        attnlab::gemm(n, Dv, F, qread, F, S, Ds, true, oc, Dv);             // + the state before it
        if (normalize) {  // den = row sums of the scores + Q' z; out = num / (den + eps)
          for (int64_t t = 0; t < n; ++t) {
            T d = 0;
            for (int64_t s2 = 0; s2 < n; ++s2) d += scores[t * n + s2];
            for (int64_t f = 0; f < F; ++f) d += qread[t * F + f] * S[f * Ds + Dv];
            const T inv = T(1) / (d + eps);
            for (int64_t x = 0; x < Dv; ++x) oc[t * Dv + x] *= inv;
          }
        }
        for (int64_t f = 0; f < F; ++f) {  // S = decay over the chunk (per row) * S + K'^T [V_c, 1]
          const T across = last ? std::exp(last[f]) : std::exp(l * T(n));
          if (across != T(1))
            for (int64_t d = 0; d < Ds; ++d) S[f * Ds + d] *= across;
          if (normalize) {
            T z = 0;
            for (int64_t s2 = 0; s2 < n; ++s2) z += kt[f * n + s2];
            S[f * Ds + Dv] += z;
          }
        }
        attnlab::gemm(F, Dv, n, kt.data(), n, vc, Dv, true, S, Ds);
      }
    }
    attnlab::gemm_done();
  });
}

}  // namespace

// q, k: (B, H, L, F); v: (B, H, L, Dv); log_decay: (H,) or undefined; log_gates: (B, H, L, F) or
// undefined (not both). Without normalize_eps: state (B, H, F, Dv), returns the raw output
// (B, H, L, Dv). With it: state (B, H, F, Dv + 1) whose last column is the normalizer's (the sum of
// the keys), returns num / (den + eps). The state is updated in place.
torch::Tensor linear_chunks(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor state,
                            c10::optional<torch::Tensor> log_decay, c10::optional<torch::Tensor> log_gates,
                            int64_t chunk, c10::optional<double> normalize_eps) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4, "q, k must be (B, H, L, F), v (B, H, L, Dv)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  q.scalar_type() == state.scalar_type(), "q, k, v, state dtypes differ");
  TORCH_CHECK(state.is_contiguous(), "state must be contiguous (it is updated in place)");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), F = q.size(3), Dv = v.size(3);
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == L, "v must be (B, H, L, Dv)");
  const bool normalize = normalize_eps.has_value();
  TORCH_CHECK(state.size(0) == B && state.size(1) == H && state.size(2) == F && state.size(3) == Dv + normalize,
              normalize ? "state must be (B, H, F, Dv + 1)" : "state must be (B, H, F, Dv)");
  auto out = torch::empty({B, H, L, Dv}, q.options());
  torch::Tensor lam, gates;
  if (log_decay.has_value() && log_decay->defined()) {
    lam = log_decay->to(q.scalar_type()).contiguous();
    TORCH_CHECK(lam.numel() == H, "log_decay must have one entry per head");
  }
  if (log_gates.has_value() && log_gates->defined()) {
    TORCH_CHECK(!lam.defined(), "give log_decay or log_gates, not both");
    gates = log_gates->to(q.scalar_type()).expand({B, H, L, F}).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "linear_chunks", [&] {
    chunks<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                     lam.defined() ? lam.data_ptr<scalar_t>() : nullptr,
                     gates.defined() ? gates.data_ptr<scalar_t>() : nullptr, state.data_ptr<scalar_t>(),
                     out.data_ptr<scalar_t>(), B * H, H, L, F, Dv, chunk, normalize,
                     static_cast<scalar_t>(normalize_eps.value_or(0.0)));
  });
  return out;
}
