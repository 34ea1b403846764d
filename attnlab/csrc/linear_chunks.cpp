// Causal chunked linear attention with an optional per-head decay or per-channel gates (CPU,
// forward): the same mathematics as attnlab/linear.py's chunked form, fused so that a (batch, head)
// pair walks its chunks with the state held in cache and nothing of size L is materialized besides
// the output.
//
// Per chunk c of n tokens (t, s = 0..n-1 within the chunk), per-head decay lam <= 0:
//   scores = (Q_c K_c^T) * W,   W[t][s] = exp(lam (t - s)) for s <= t, else 0
//   out_c  = scores V_c + (Q_c * exp(lam (t + 1))) S
//   S      = exp(lam n) S + (K_c * exp(lam (n - 1 - s)))^T V_c
// One log gate per token (gates of shape (B, H, L, 1)): as the per-head decay, with lam (t - s)
// replaced by G_t - G_s, G = cumsum of the gates within the chunk (every exponent <= 0).
// Per-channel log gates g <= 0 (GLA), G = cumsum of g within the chunk, last = G[n - 1]:
//   scores[t][s] = sum_f q_tf k_sf exp(G_tf - G_sf) for s <= t: one GEMM of Q*exp(G) and K*exp(-G)
//                  when the chunk's gates sum to less than RANGE (exp stays far inside the dtype),
//                  else computed pair by pair
//   out_c  = scores V_c + (Q_c * exp(G)) S
//   S      = exp(last) * S (row f scaled) + (K_c * exp(last - G))^T V_c
// With the normalizer (Linear Transformer), z = sum of the (decayed) keys rides in the state's last
// column and each output row is divided by its denominator in the chunk, so nothing is appended
// to V. InLine's centred form (no decay) uses the same denominator differently: with the running
// sum of the values (`centre`, updated in place) and N = the tokens seen so far,
//   out = centre_scale / N (num - den u) + u,   u = (sum of the values) / N.
// Small GEMMs per chunk (attnlab::gemm); the two intra-chunk products are cut at half the chunk so
// that the block above the diagonal, masked anyway, is not computed (a quarter of each).
// (batch, head) pairs run in parallel on torch's thread pool.
//
// The feature map, when elementwise (identity, elu+1, relu: `feature` 0, 1, 2) or BASED's Taylor map
// (`feature` 3: phi(x) = [1, x'/d^(1/4), vec(x' x'^T)/(sqrt 2 sqrt d)] of the first d = taylor_dim
// channels x', F = 1 + d + d^2 features from rows of Din channels), and a factor on the queries are
// applied chunk by chunk as the chunk is read, so the caller passes q and k as they are: mapping
// them first would be two more passes over L x F floats in memory. Gates of shape
// (B, H, L, 1) (one per token, shared by the channels) are read as they are too.
#include "linear.h"
#include "native.h"
#include "simd.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// row[s] = exp(G[t] - G[s]) for s <= t, else 0 (s < n; G non-increasing: every exponent <= 0), a
// vector of lanes at a time; writes up to a vector past n (the next row's first lanes, or spare).
template <typename T>
void decay_row(const T* G, int64_t t, int64_t n, T* row) {
  using V = typename attnlab::Vec<T>::V;
  using I = typename attnlab::Vec<T>::I;
  using E = typename attnlab::Vec<T>::E;
  constexpr int L = attnlab::LANES<T>;
  I lane;
  for (int i = 0; i < L; ++i) lane[i] = i;
  for (int64_t s = 0; s <= t; s += L) {
    const V x = G[t] - attnlab::load<T>(G + s), zero = V{};
    const V e = attnlab::exp_nonpositive(x > zero ? zero : x);
    attnlab::store<T>(row + s, lane <= E(t - s) ? e : zero);
  }
  for (int64_t s = (t / L + 1) * L; s < n; ++s) row[s] = T(0);
}

template <typename T>
void chunks(const T* q, const T* k, const T* v, const T* lam, const T* gates, int64_t gate_cols, T* state, T* out,
            int64_t BH, int64_t H, int64_t L, int64_t Din, int64_t F, int64_t Dv, int64_t C, bool normalize, T eps,
            int feature, int64_t taylor_dim, T q_scale, T* centre, T centre_scale, int64_t count0, bool reverse,
            bool strict, bool accumulate) {
  const int64_t Ds = Dv + (normalize ? 1 : 0);  // state row: Dv value columns, then the normalizer z
  const bool map_q = feature != 0 || q_scale != T(1), map_k = feature != 0;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    // Gt and w have a vector of lanes to spare: decay_row writes whole vectors
    attnlab::Buffer<T> kt(F * C), scores(C * C), qs(C * F), G(C * F), Gt(C + attnlab::LANES<T>),
        w(C * C + attnlab::LANES<T>), qdecay(C), kdecay(C), qm, km;
    if (map_q) qm.resize(C * F);
    if (map_k) km.resize(C * F);
    attnlab::Buffer<T> rq, rk, rv, rg, ro;  // a reversed chunk's rows; the output rows before they land
    if (reverse) {
      rq.resize(C * Din);
      rk.resize(C * Din);
      rv.resize(C * Dv);
      if (gates) rg.resize(C * gate_cols);
    }
    if (reverse || accumulate) ro.resize(C * Dv);
    for (int64_t bh = begin; bh < stop; ++bh) {
      const T l = lam ? lam[bh % H] : T(0);
      T* S = state + bh * F * Ds;
      int64_t built = -1;  // chunk length the decay tables were built for
      for (int64_t c0 = 0; c0 < L; c0 += C) {
        const int64_t n = std::min(C, L - c0);
        const int64_t r0 = reverse ? L - c0 - n : c0;  // the chunk's first row in memory
        const T* qc = q + (bh * L + r0) * Din;
        const T* kc = k + (bh * L + r0) * Din;
        const T* vc = v + (bh * L + r0) * Dv;
        const T* gc = gates ? gates + (bh * L + r0) * gate_cols : nullptr;
        if (reverse) {  // the sequence read backwards: the chunk's rows in reverse order
          auto flip = [n](const T* src, int64_t width, attnlab::Buffer<T>& dst) {
            for (int64_t t = 0; t < n; ++t)
              std::copy(src + (n - 1 - t) * width, src + (n - t) * width, dst.data() + t * width);
            return dst.data();
          };
          qc = flip(qc, Din, rq);
          kc = flip(kc, Din, rk);
          vc = flip(vc, Dv, rv);
          if (gc) gc = flip(gc, gate_cols, rg);
        }
        if (map_q) {
          attnlab::feature_map(qc, n, Din, F, feature, taylor_dim, q_scale, qm.data());
          qc = qm.data();
        }
        if (map_k) {
          attnlab::feature_map(kc, n, Din, F, feature, taylor_dim, T(1), km.data());
          kc = km.data();
        }
        T* oc = ro.empty() ? out + (bh * L + c0) * Dv : ro.data();
        const T* qread = qc;  // Q', the queries as they read the state
        const T* last = nullptr;
        T chunk_decay = std::exp(l * T(n));  // of the state across the chunk (per-channel gates: `last`)
        if (gates && gate_cols > 1) {  // per-channel gates: gate_cols == F
          for (int64_t t = 0; t < n; ++t)
            for (int64_t f = 0; f < F; ++f)
              G[t * F + f] = gc[t * F + f] + (t ? G[(t - 1) * F + f] : T(0));
          last = G.data() + (n - 1) * F;
          for (int64_t x = 0; x < n * F; ++x) qs[x] = qc[x] * std::exp(G[x]);
          qread = qs.data();
          if (-*std::min_element(last, last + F) < attnlab::kRange<T>) {
            for (int64_t s = 0; s < n; ++s)
              for (int64_t f = 0; f < F; ++f) kt[f * n + s] = kc[s * F + f] * std::exp(-G[s * F + f]);
            attnlab::causal_scores(n, F, qs.data(), kt.data(), scores.data());
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
          if (gates) {  // one gate per token: G_t = cumsum, the per-head decay's tables from G
            for (int64_t t = 0; t < n; ++t) Gt[t] = gc[t] + (t ? Gt[t - 1] : T(0));
            for (int64_t t = 0; t < n; ++t) {
              decay_row(Gt.data(), t, n, w.data() + t * n);
              qdecay[t] = std::exp(Gt[t]);
              kdecay[t] = std::exp(Gt[n - 1] - Gt[t]);
            }
            chunk_decay = qdecay[n - 1];
          } else if (n != built) {
            for (int64_t t = 0; t < n; ++t) {
              for (int64_t s = 0; s < n; ++s) w[t * n + s] = s <= t ? std::exp(l * T(t - s)) : T(0);
              qdecay[t] = std::exp(l * T(t + 1));
              kdecay[t] = std::exp(l * T(n - 1 - t));
            }
            built = n;
          }
          attnlab::transpose(kc, n, F, kt.data(), n);
          attnlab::causal_scores(n, F, qc, kt.data(), scores.data());
          for (int64_t x = 0; x < n * n; ++x) scores[x] *= w[x];
          if (l != T(0) || gates) {
            for (int64_t t = 0; t < n; ++t)
              for (int64_t f = 0; f < F; ++f) qs[t * F + f] = qc[t * F + f] * qdecay[t];
            qread = qs.data();
            for (int64_t f = 0; f < F; ++f)
              for (int64_t s = 0; s < n; ++s) kt[f * n + s] *= kdecay[s];
          }
        }
        if (strict)
          for (int64_t t = 0; t < n; ++t) scores[t * n + t] = T(0);
        attnlab::causal_values(n, Dv, scores.data(), vc, oc);                        // intra-chunk
        attnlab::gemm(n, Dv, F, qread, F, S, Ds, true, oc, Dv);             // + the state before it
        if (normalize) {  // den = row sums of the scores + Q' z
          T* vs = centre ? centre + bh * Dv : nullptr;
          for (int64_t t = 0; t < n; ++t) {
            T d = 0;
            for (int64_t s2 = 0; s2 < n; ++s2) d += scores[t * n + s2];
            for (int64_t f = 0; f < F; ++f) d += qread[t * F + f] * S[f * Ds + Dv];
            T* o = oc + t * Dv;
            if (vs) {  // InLine: a/N (num - den u) + u, u = (sum of the values so far) / N
              const T N = T(count0 + c0 + t + 1), a = centre_scale / N;
              for (int64_t x = 0; x < Dv; ++x) {
                vs[x] += vc[t * Dv + x];
                const T u = vs[x] / N;
                o[x] = a * (o[x] - d * u) + u;
              }
            } else {  // num / (den + eps)
              const T inv = T(1) / (d + eps);
              for (int64_t x = 0; x < Dv; ++x) o[x] *= inv;
            }
          }
        }
        for (int64_t f = 0; f < F; ++f) {  // S = decay over the chunk (per row) * S + K'^T [V_c, 1]
          const T across = last ? std::exp(last[f]) : chunk_decay;
          if (across != T(1))
            for (int64_t d = 0; d < Ds; ++d) S[f * Ds + d] *= across;
        }
        if (normalize) attnlab::add_key_sums(kt.data(), F, n, S, Ds, Dv);
        attnlab::gemm(F, Dv, n, kt.data(), n, vc, Dv, true, S, Ds);
        if (!ro.empty())  // the output rows land (in reverse order when reading backwards), added or written
          for (int64_t t = 0; t < n; ++t) {
            T* dst = out + (bh * L + (reverse ? r0 + n - 1 - t : c0 + t)) * Dv;
            const T* src = ro.data() + t * Dv;
            if (accumulate)
              for (int64_t x = 0; x < Dv; ++x) dst[x] += src[x];
            else
              std::copy(src, src + Dv, dst);
          }
      }
    }
    attnlab::gemm_done();
  });
}

// Non-causal, no decay: S = sum over the key chunks of phi(K_c)^T [V_c, 1], then O_c = phi(Q_c) S per
// query chunk, divided by the normalizer column.
// RALA (rala_scale > 0): the weights are a_j = softmax_j(rala_scale qbar . phi(k_j)), qbar = the mean of
// phi(q_i), from a first pass over the queries; the softmax runs online (S and its sum Z rescaled
// when the maximum grows) and its division is folded into the normalizer: num / (den + eps Z).
// InLine (centred): O = phi(Q) (S - z ubar^T) + ubar, z = the sum of phi(k), ubar = the mean value (the
// keys' pass sums both; the state is centred once, before the read-out; q_scale carries InLine's scale / Lk).
// `saved` (or null): the keys' state of every (batch, head) for the backward (attnlab::noncausal_record).
template <typename T>
void noncausal(const T* q, const T* k, const T* v, T* out, T* saved, int64_t BH, int64_t Lq, int64_t Lk,
               int64_t Din, int64_t F, int64_t Dv, int64_t C, bool normalize, T eps, int feature, int64_t taylor_dim,
               T q_scale, T rala_scale, bool centred) {
  const int64_t Ds = Dv + (normalize || centred ? 1 : 0);
  const bool rala = rala_scale > 0;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    attnlab::Buffer<T> S(F * Ds), mapped(C * F), kt(F * C), qbar(F), logit(C), ubar(centred ? Dv : 0);
    for (int64_t bh = begin; bh < stop; ++bh) {
      std::fill(S.begin(), S.end(), T(0));
      std::fill(ubar.begin(), ubar.end(), T(0));
      std::fill(qbar.begin(), qbar.end(), T(0));
      T M = 0, Z = 0;  // RALA: the logits' running maximum and the sum of exp(logit - M) (empty: Z = 0)
      if (rala) {
        for (int64_t c0 = 0; c0 < Lq; c0 += C) {
          const int64_t n = std::min(C, Lq - c0);
          attnlab::feature_map(q + (bh * Lq + c0) * Din, n, Din, F, feature, taylor_dim, rala_scale / T(Lq),
                               mapped.data());
          for (int64_t t = 0; t < n; ++t)
            for (int64_t f = 0; f < F; ++f) qbar[f] += mapped[t * F + f];
        }
      }
      for (int64_t c0 = 0; c0 < Lk; c0 += C) {
        const int64_t n = std::min(C, Lk - c0);
        attnlab::feature_map(k + (bh * Lk + c0) * Din, n, Din, F, feature, taylor_dim, T(1), mapped.data());
        if (rala) attnlab::rala_weigh(mapped.data(), n, F, qbar.data(), logit.data(), M, Z, {{S.data(), F * Ds}});
        attnlab::transpose(mapped.data(), n, F, kt.data(), n);
        attnlab::gemm(F, Dv, n, kt.data(), n, v + (bh * Lk + c0) * Dv, Dv, true, S.data(), Ds);
        if (normalize || centred) attnlab::add_key_sums(kt.data(), F, n, S.data(), Ds, Dv);
        if (centred) attnlab::add_rows(v + (bh * Lk + c0) * Dv, n, Dv, ubar.data());
      }
      if (centred) attnlab::centre_state(S.data(), F, Dv, ubar.data(), Lk);
      if (saved) {  // as the backward reads it: RALA's S and z over Z
        const attnlab::NoncausalRecord<T> r(saved, bh, F, Dv);
        const T over = rala ? Z : T(1);
        for (int64_t f = 0; f < F; ++f) {
          for (int64_t x = 0; x < Dv; ++x) r.S[f * Dv + x] = S[f * Ds + x] / over;
          r.z[f] = Ds > Dv ? S[f * Ds + Dv] / over : T(0);
        }
        std::copy(qbar.begin(), qbar.end(), r.qbar);
        std::fill(r.ubar, r.ubar + Dv, T(0));
        std::copy(ubar.begin(), ubar.end(), r.ubar);
        *r.M = M;
        *r.Z = Z;
      }
      for (int64_t c0 = 0; c0 < Lq; c0 += C) {
        const int64_t n = std::min(C, Lq - c0);
        attnlab::feature_map(q + (bh * Lq + c0) * Din, n, Din, F, feature, taylor_dim, q_scale, mapped.data());
        T* oc = out + (bh * Lq + c0) * Dv;
        attnlab::gemm(n, Dv, F, mapped.data(), F, S.data(), Ds, false, oc, Dv);
        if (normalize)
          for (int64_t t = 0; t < n; ++t) {
            T d = 0;
            for (int64_t f = 0; f < F; ++f) d += mapped[t * F + f] * S[f * Ds + Dv];
            const T inv = T(1) / (d + (rala ? eps * Z : eps));
            for (int64_t x = 0; x < Dv; ++x) oc[t * Dv + x] *= inv;
          }
        if (centred)
          for (int64_t t = 0; t < n; ++t)
            for (int64_t x = 0; x < Dv; ++x) oc[t * Dv + x] += ubar[x];
      }
    }
    attnlab::gemm_done();
  });
}

}  // namespace

// phi(x) of rows of Din channels (x: (..., Din) -> (..., F)), by `feature` as linear_chunks applies it.
torch::Tensor map_features(torch::Tensor x, int64_t feature, int64_t taylor_dim) {
  TORCH_CHECK(x.dim() >= 1, "x must be (..., Din)");
  const int64_t Din = x.size(-1), F = attnlab::feature_count(feature, taylor_dim, Din);
  const int64_t rows = x.numel() / std::max<int64_t>(Din, 1);
  x = x.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = F;
  auto out = torch::empty(sizes, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "map_features", [&] {
    using T = scalar_t;
    const T* src = x.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, rows, 1024, [&](int64_t begin, int64_t stop) {
      attnlab::feature_map(src + begin * Din, stop - begin, Din, F, static_cast<int>(feature), taylor_dim, T(1),
                  dst + begin * F);
    });
  });
  return out;
}

// Non-causal linear attention without decay (cross attention too): q (B, H, Lq, Din), k (B, H, Lk, Din)
// mapped by `feature` (q also times q_scale), v (B, H, Lk, Dv); with rala_scale > 0 each key weighted by
// RALA's softmax computed here. Returns the raw output, with normalize_eps num / (den + eps), or with
// centred InLine's phi(q) (S - z ubar^T) + ubar. With save, also the keys' state for the backward
// (B, H, attnlab::noncausal_record(F, Dv)).
std::vector<torch::Tensor> linear_noncausal(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t chunk,
                                            c10::optional<double> normalize_eps, int64_t feature, int64_t taylor_dim,
                                            double q_scale, double rala_scale, bool centred, bool save) {
  TORCH_CHECK(rala_scale <= 0 || normalize_eps.has_value(), "RALA's weights need the normalizer");
  TORCH_CHECK(!centred || (!normalize_eps.has_value() && rala_scale <= 0), "centred takes no normalizer or RALA");
  const auto n = attnlab::noncausal_sizes(q, k, v);
  const int64_t B = n[0], H = n[1], Lq = n[2], Din = n[3], Lk = n[4], Dv = n[5];
  const auto dt = q.scalar_type();
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t F = attnlab::feature_count(feature, taylor_dim, Din);
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  auto out = torch::empty({B, H, Lq, Dv}, q.options());
  auto saved = save ? torch::empty({B, H, attnlab::noncausal_record(F, Dv)}, q.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dt, "linear_noncausal", [&] {
    using T = scalar_t;
    noncausal<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), out.data_ptr<T>(),
                 save ? saved.data_ptr<T>() : nullptr, B * H, Lq, Lk, Din, F, Dv, chunk,
                 normalize_eps.has_value(), static_cast<T>(normalize_eps.value_or(0.0)), static_cast<int>(feature),
                 taylor_dim, static_cast<T>(q_scale), static_cast<T>(rala_scale), centred);
  });
  if (save) return {out, saved};
  return {out};
}

// q, k: (B, H, L, Din), mapped by `feature` to F features (and q times q_scale) chunk by chunk;
// v: (B, H, L, Dv);
// log_decay: (H,) or undefined; log_gates: (B|1, H|1, L, F|1) or undefined (not both). Without
// normalize_eps: state (B, H, F, Dv), returns the raw output (B, H, L, Dv). With it: state
// (B, H, F, Dv + 1) whose last column is the normalizer's (the sum of the keys), returns
// num / (den + eps); with `centre` (B, H, Dv), the sum of the values before this segment (count0
// tokens), InLine's centred output instead. The state and `centre` are updated in place.
// reverse: the sequence read backwards (as if q, k, v and the gates were flipped along L, the output
// flipped back): the anti-causal half of a bidirectional form; strict: the diagonal (a token with
// itself) left out of the intra-chunk products; add_to: the output added into this tensor (returned).
torch::Tensor linear_chunks(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor state,
                            c10::optional<torch::Tensor> log_decay, c10::optional<torch::Tensor> log_gates,
                            int64_t chunk, c10::optional<double> normalize_eps, int64_t feature, int64_t taylor_dim,
                            double q_scale, c10::optional<torch::Tensor> centre, double centre_scale, int64_t count0,
                            bool reverse, bool strict, c10::optional<torch::Tensor> add_to) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4, "q, k must be (B, H, L, F), v (B, H, L, Dv)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  q.scalar_type() == state.scalar_type(), "q, k, v, state dtypes differ");
  TORCH_CHECK(state.is_contiguous(), "state must be contiguous (it is updated in place)");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), Din = q.size(3), Dv = v.size(3);
  const int64_t F = attnlab::feature_count(feature, taylor_dim, Din);
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == L, "v must be (B, H, L, Dv)");
  const bool centred = centre.has_value() && centre->defined();
  const bool normalize = normalize_eps.has_value() || centred;
  if (centred) {
    TORCH_CHECK(centre->is_contiguous() && centre->scalar_type() == q.scalar_type() && centre->dim() == 3 &&
                    centre->size(0) == B && centre->size(1) == H && centre->size(2) == Dv,
                "centre must be a contiguous (B, H, Dv) tensor of q's dtype (it is updated in place)");
  }
  TORCH_CHECK(state.size(0) == B && state.size(1) == H && state.size(2) == F && state.size(3) == Dv + normalize,
              normalize ? "state must be (B, H, F, Dv + 1)" : "state must be (B, H, F, Dv)");
  const bool accumulate = add_to.has_value() && add_to->defined();
  TORCH_CHECK(!(reverse || accumulate) || !normalize,
              "reverse and add_to take the raw form (no normalizer, no centre)");
  if (accumulate)
    TORCH_CHECK(add_to->is_contiguous() && add_to->scalar_type() == q.scalar_type() && add_to->dim() == 4 &&
                    add_to->size(0) == B && add_to->size(1) == H && add_to->size(2) == L && add_to->size(3) == Dv,
                "add_to must be a contiguous (B, H, L, Dv) tensor of q's dtype");
  auto out = accumulate ? *add_to : torch::empty({B, H, L, Dv}, q.options());
  torch::Tensor lam, gates;  // named: the dispatch lambda below captures them
  std::tie(lam, gates) = attnlab::decay_and_gates(log_decay, log_gates, q.scalar_type(), B, H, L, F);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "linear_chunks", [&] {
    chunks<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                     lam.defined() ? lam.data_ptr<scalar_t>() : nullptr,
                     gates.defined() ? gates.data_ptr<scalar_t>() : nullptr, gates.defined() ? gates.size(3) : 0,
                     state.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B * H, H, L, Din, F, Dv, chunk, normalize,
                     static_cast<scalar_t>(normalize_eps.value_or(0.0)), static_cast<int>(feature), taylor_dim,
                     static_cast<scalar_t>(q_scale), centred ? centre->data_ptr<scalar_t>() : nullptr,
                     static_cast<scalar_t>(centre_scale), count0, reverse, strict, accumulate);
  });
  return out;
}
