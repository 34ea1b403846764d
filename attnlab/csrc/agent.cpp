// Agent attention's causal chunked form (CPU, forward): attnlab/entries/agent.py's n-feature linear
// attention, fused so that each (batch, head) walks its chunks with the per-agent softmax state
// (reference r, sum Z, weighted sum U) in cache, without the L x n logits ever being written out.
//
// Per chunk of keys K_c, queries Q_c, values V_c (s = scale k.a, p = softmax_a(scale q.a)):
//   r' = max(r, max_t s_ta) per agent;  Z, U scaled by exp(r - r')  (every exponent <= 0)
//   w_ta = exp(s_ta - r'),  z_ta = Z_a + sum_{j<=t} w_ja,  phi_ta = p_ta / z_ta
//   O_c = (phi w^T masked to j <= t) V_c + phi U;   U += w^T V_c;  Z = z_{last}
// which is o_t = sum_a p_ta V_A^(t)_a with V_A^(t) the agents' softmax over the keys up to t. z_ta can
// only be tiny when a later key of the chunk carries a logit far above every earlier one; when some z
// falls below exp(-RANGE) the call reports it and the caller takes the per-chunk PyTorch form.
// The non-causal form (agent_noncausal, forward and backward) absorbs every key into the same state
// online, then reads it out to the queries.
#include "native.h"
#include "simd.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// At (D x n) = scale * A^T: the agents as the B operand of the logits GEMMs; with As, also As (n x D) = scale * A
// (the A operand of the agents-by-keys logits and of the logits' backward).
template <typename T>
void scaled_agents(const T* a, int64_t n, int64_t D, T scale, T* At, T* As = nullptr) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < D; ++d) At[d * n + i] = scale * a[i * D + d];
  if (As)
    for (int64_t x = 0; x < n * D; ++x) As[x] = scale * a[x];
}

// Each of the m rows of p (n logits) -> its softmax over the agents, divided by z (m x n) when given.
template <typename T>
void softmax_rows(T* p, int64_t m, int64_t n, const T* z) {
  for (int64_t t = 0; t < m; ++t) {
    T* row = p + t * n;
    T mx = row[0];
    for (int64_t i = 1; i < n; ++i) mx = std::max(mx, row[i]);
    T sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += (row[i] = std::exp(row[i] - mx));
    for (int64_t i = 0; i < n; ++i) row[i] /= z ? sum * z[t * n + i] : sum;
  }
}

template <typename T>
bool walk(const T* q, const T* k, const T* v, const T* agents, T* r, T* Z, T* U, T* out, int64_t BH, int64_t L,
          int64_t D, int64_t Dv, int64_t n, int64_t C, T scale) {
  std::atomic<bool> ok{true};
  const T floor = std::exp(-attnlab::kRange<T>);
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    // kq: the chunk's keys then its queries, one GEMM for both logits (s: the keys', phi: the queries')
    attnlab::Buffer<T> At(D * n), kq(2 * C * D), sp(2 * C * n), w(C * n), wt(n * C), z(C * n), scores(C * C), rn(n), f(n);
    for (int64_t bh = begin; bh < stop && ok; ++bh) {
      scaled_agents(agents + bh * n * D, n, D, scale, At.data());
      T* rh = r + bh * n;
      T* Zh = Z + bh * n;
      T* Uh = U + bh * n * Dv;
      for (int64_t c0 = 0; c0 < L && ok; c0 += C) {
        const int64_t m = std::min(C, L - c0);
        const T* qc = q + (bh * L + c0) * D;
        const T* kc = k + (bh * L + c0) * D;
        const T* vc = v + (bh * L + c0) * Dv;
        T* oc = out + (bh * L + c0) * Dv;
        std::copy(kc, kc + m * D, kq.data());
        std::copy(qc, qc + m * D, kq.data() + m * D);
        attnlab::gemm(2 * m, n, D, kq.data(), D, At.data(), n, false, sp.data(), n);  // key and query logits
        const T* s = sp.data();
        T* phi = sp.data() + m * n;
        std::copy(s, s + n, rn.data());  // the chunk's largest key logit per agent, rows at a time
        for (int64_t t = 1; t < m; ++t)
          for (int64_t i = 0; i < n; ++i) rn[i] = std::max(rn[i], s[t * n + i]);
        for (int64_t i = 0; i < n; ++i) {
          const bool empty = Zh[i] == T(0);  // no key yet: whatever r holds is not a reference
          rn[i] = empty ? rn[i] : std::max(rh[i], rn[i]);
          f[i] = empty ? T(0) : std::exp(rh[i] - rn[i]);
        }
        for (int64_t i = 0; i < n; ++i) {
          if (f[i] == T(1)) continue;  // the agent's reference did not move
          Zh[i] *= f[i];
          for (int64_t d = 0; d < Dv; ++d) Uh[i * Dv + d] *= f[i];
        }
        for (int64_t t = 0; t < m; ++t)
          for (int64_t i = 0; i < n; ++i) w[t * n + i] = s[t * n + i] - rn[i];
        for (int64_t x = 0; x < m * n; ++x) w[x] = std::exp(w[x]);
        for (int64_t i = 0; i < n; ++i) z[i] = w[i] + Zh[i];
        for (int64_t t = 1; t < m; ++t)
          for (int64_t i = 0; i < n; ++i) z[t * n + i] = w[t * n + i] + z[(t - 1) * n + i];
        bool bad = false;  // a normalizer out of range, or NaN (tested on its bits: fast math keeps them)
        for (int64_t x = 0; x < m * n; ++x) bad |= attnlab::is_nan(z[x]) | (z[x] < floor);
        if (bad) {
          ok = false;
          break;
        }
        softmax_rows(phi, m, n, z.data());  // phi = p / z
        attnlab::transpose(w.data(), m, n, wt.data(), m);
        attnlab::causal_scores(m, n, phi, wt.data(), scores.data());
        for (int64_t t = 0; t < m; ++t) std::fill(scores.data() + t * m + t + 1, scores.data() + (t + 1) * m, T(0));
        attnlab::causal_values(m, Dv, scores.data(), vc, oc);
        attnlab::gemm(m, Dv, n, phi, n, Uh, Dv, true, oc, Dv);  // + the state before the chunk
        attnlab::gemm(n, Dv, m, wt.data(), m, vc, Dv, true, Uh, Dv);    // U += w^T V_c
        for (int64_t i = 0; i < n; ++i) {
          Zh[i] = z[(m - 1) * n + i];
          rh[i] = rn[i];
        }
      }
    }
    attnlab::gemm_done();
  });
  return ok;
}

// A chunk's key logits st (n x m: agents x keys) and its values vc (m x Dv) into the agents' softmax state:
// the maxima r moved up (Z and U rescaled; `started` false: the first chunk sets them), Z += sum exp(st - r),
// U += exp(st - r) vc. st is overwritten with exp(st - r); every pass runs along an agent's keys.
template <typename T>
void absorb(T* st, int64_t m, int64_t n, bool started, const T* vc, int64_t Dv, T* r, T* Z, T* U) {
  for (int64_t i = 0; i < n; ++i) {
    T* row = st + i * m;
    T mx = row[0];
    for (int64_t t = 1; t < m; ++t) mx = std::max(mx, row[t]);
    const T r1 = started ? std::max(r[i], mx) : mx, across = started ? std::exp(r[i] - r1) : T(0);
    r[i] = r1;
    Z[i] *= across;
    for (int64_t d = 0; d < Dv; ++d) U[i * Dv + d] *= across;
    T sum = 0;
    for (int64_t t = 0; t < m; ++t) sum += (row[t] = std::exp(row[t] - r1));
    Z[i] += sum;
  }
  attnlab::gemm(n, Dv, m, st, m, vc, Dv, true, U, Dv);
}

// The agents' values V_A (n x Dv, into U) of one (batch, head): every key chunk absorbed, then U / Z. As: the
// scaled agents (n x D); the logits come agents by keys (As K^T: a GEMM m wide, not n).
template <typename T>
void agent_values(const T* k, const T* v, const T* As, int64_t Lk, int64_t D, int64_t Dv, int64_t n, int64_t C,
                  T* st, T* r, T* Z, T* U) {
  std::fill(Z, Z + n, T(0));
  std::fill(U, U + n * Dv, T(0));
  for (int64_t c0 = 0; c0 < Lk; c0 += C) {
    const int64_t m = std::min(C, Lk - c0);
    attnlab::blas_gemm(true, n, m, D, As, D, k + c0 * D, D, st, m);
    absorb(st, m, n, c0 > 0, v + c0 * Dv, Dv, r, Z, U);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < Dv; ++d) U[i * Dv + d] /= Z[i];
}

// Non-causal: every key into the agents' softmax state (the same online rescaling, chunk by chunk), then
// V_A = U / Z and each query chunk's softmax over the agents times V_A. `saved` (or null): that state per
// (batch, head) for the backward, n (Dv + 2) floats: V_A (n x Dv), r (n), Z (n).
template <typename T>
void noncausal(const T* q, const T* k, const T* v, const T* agents, T* out, T* saved, int64_t BH, int64_t Lq,
               int64_t Lk, int64_t D, int64_t Dv, int64_t n, int64_t C, T scale) {
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    attnlab::Buffer<T> At(D * n), As(n * D), s(C * n), wt(n * C), r(n), Z(n), U(n * Dv);
    for (int64_t bh = begin; bh < stop; ++bh) {
      scaled_agents(agents + bh * n * D, n, D, scale, At.data(), As.data());
      agent_values(k + bh * Lk * D, v + bh * Lk * Dv, As.data(), Lk, D, Dv, n, C, wt.data(), r.data(), Z.data(),
                   U.data());
      if (saved) {
        T* rec = saved + bh * n * (Dv + 2);
        std::copy(U.begin(), U.end(), rec);
        std::copy(r.begin(), r.end(), rec + n * Dv);
        std::copy(Z.begin(), Z.end(), rec + n * Dv + n);
      }
      for (int64_t c0 = 0; c0 < Lq; c0 += C) {
        const int64_t m = std::min(C, Lq - c0);
        attnlab::gemm(m, n, D, q + (bh * Lq + c0) * D, D, At.data(), n, false, s.data(), n);
        softmax_rows(s.data(), m, n, static_cast<const T*>(nullptr));
        attnlab::gemm(m, Dv, n, s.data(), n, U.data(), Dv, false, out + (bh * Lq + c0) * Dv, Dv);
      }
    }
    attnlab::gemm_done();
  });
}

// The logits' backward for rows x (m x D) against the agents: with dS (m x n) the logits' gradient,
// dx = dS (scale A) (As = scale A, n x D) and da += dS^T x (the caller scales da once at the end).
template <typename T>
void logits_back(const T* dS, int64_t m, int64_t n, int64_t D, const T* As, const T* x, T* dx, T* da, T* scratch) {
  attnlab::gemm(m, D, n, dS, n, As, D, false, dx, D);
  attnlab::transpose(dS, m, n, scratch, m);
  attnlab::gemm(n, D, m, scratch, m, x, D, true, da, D);
}

// The gradients of agent_noncausal. Per (batch, head), with At = scale A^T, from the forward's agents'
// softmax state (`saved`: V_A, max r, sum Z): the queries' pass (P = softmax_a(Q At)) gives
// dV_A = sum P^T dO, dS_q = P * (dO V_A^T - rowsum(P * dO V_A^T)), dQ = dS_q (scale A) and dA = scale dS_q^T Q;
// then with c_a = dV_A,a . V_A,a the keys' pass gives alpha = exp(K At - r) / Z, dV = alpha dV_A,
// dS_k = alpha * (V dV_A^T - c), dK = dS_k (scale A) and dA += scale dS_k^T K.
template <typename T>
void noncausal_back(const T* q, const T* k, const T* v, const T* agents, const T* dout, const T* saved, T* dq, T* dk,
                    T* dv, T* da, int64_t BH, int64_t Lq, int64_t Lk, int64_t D, int64_t Dv, int64_t n, int64_t C,
                    T scale) {
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    attnlab::Buffer<T> At(D * n), As(n * D), s(C * n), g(C * n), st(n * C), Ut(Dv * n), dU(n * Dv), dUt(Dv * n), c(n);
    for (int64_t bh = begin; bh < stop; ++bh) {
      const T* a = agents + bh * n * D;
      scaled_agents(a, n, D, scale, At.data(), As.data());
      T* dah = da + bh * n * D;
      std::fill(dah, dah + n * D, T(0));
      std::fill(dU.begin(), dU.end(), T(0));
      const T* U = saved + bh * n * (Dv + 2);  // V_A, then r and Z, as the forward left them
      const T *r = U + n * Dv, *Z = r + n;
      attnlab::transpose(U, n, Dv, Ut.data(), n);
      for (int64_t c0 = 0; c0 < Lq; c0 += C) {  // the queries
        const int64_t m = std::min(C, Lq - c0);
        const T* qc = q + (bh * Lq + c0) * D;
        const T* gc = dout + (bh * Lq + c0) * Dv;
        attnlab::gemm(m, n, D, qc, D, At.data(), n, false, s.data(), n);
        softmax_rows(s.data(), m, n, static_cast<const T*>(nullptr));  // P
        attnlab::gemm(m, n, Dv, gc, Dv, Ut.data(), n, false, g.data(), n);  // dP = dO V_A^T
        for (int64_t t = 0; t < m; ++t) {
          T dot = 0;
          for (int64_t i = 0; i < n; ++i) dot += s[t * n + i] * g[t * n + i];
          for (int64_t i = 0; i < n; ++i) g[t * n + i] = s[t * n + i] * (g[t * n + i] - dot);  // dS_q
        }
        attnlab::transpose(s.data(), m, n, st.data(), m);
        attnlab::gemm(n, Dv, m, st.data(), m, gc, Dv, true, dU.data(), Dv);  // dV_A += P^T dO
        logits_back(g.data(), m, n, D, As.data(), qc, dq + (bh * Lq + c0) * D, dah, st.data());
      }
      for (int64_t i = 0; i < n; ++i) {
        T dot = 0;
        for (int64_t d = 0; d < Dv; ++d) dot += dU[i * Dv + d] * U[i * Dv + d];
        c[i] = dot;
      }
      attnlab::transpose(dU.data(), n, Dv, dUt.data(), n);
      for (int64_t c0 = 0; c0 < Lk; c0 += C) {  // the keys
        const int64_t m = std::min(C, Lk - c0);
        const T* kc = k + (bh * Lk + c0) * D;
        const T* vc = v + (bh * Lk + c0) * Dv;
        attnlab::gemm(m, n, D, kc, D, At.data(), n, false, s.data(), n);
        for (int64_t t = 0; t < m; ++t)
          for (int64_t i = 0; i < n; ++i) s[t * n + i] = std::exp(s[t * n + i] - r[i]) / Z[i];  // alpha
        attnlab::gemm(m, Dv, n, s.data(), n, dU.data(), Dv, false, dv + (bh * Lk + c0) * Dv, Dv);
        attnlab::gemm(m, n, Dv, vc, Dv, dUt.data(), n, false, g.data(), n);  // d alpha = V dV_A^T
        for (int64_t t = 0; t < m; ++t)
          for (int64_t i = 0; i < n; ++i) g[t * n + i] = s[t * n + i] * (g[t * n + i] - c[i]);  // dS_k
        logits_back(g.data(), m, n, D, As.data(), kc, dk + (bh * Lk + c0) * D, dah, st.data());
      }
      for (int64_t x = 0; x < n * D; ++x) dah[x] *= scale;
    }
    attnlab::gemm_done();
  });
}

// The shapes of a non-causal call, checked: (B, H, Lq, D, Lk, Dv, n).
std::vector<int64_t> agent_sizes(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                 const torch::Tensor& agents, int64_t chunk) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && agents.dim() == 4,
              "q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv), agents (B, H, n, D)");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2), Dv = v.size(3),
                n = agents.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.size(0) == B && v.size(1) == H &&
                  v.size(2) == Lk && agents.size(0) == B && agents.size(1) == H && agents.size(3) == D && n > 0 &&
                  Lk > 0, "k, v or agents do not match q");
  for (const auto* x : {&k, &v, &agents}) TORCH_CHECK(x->scalar_type() == q.scalar_type(), "dtypes differ");
  return {B, H, Lq, D, Lk, Dv, n};
}

}  // namespace

// Non-causal agent attention (cross lengths too): q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv),
// agents (B, H, n, D). Returns [out (B, H, Lq, Dv)], with save also the agents' softmax state for the
// backward (B, H, n (Dv + 2)).
std::vector<torch::Tensor> agent_noncausal(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor agents,
                                           double scale, int64_t chunk, bool save) {
  const auto z = agent_sizes(q, k, v, agents, chunk);
  const int64_t B = z[0], H = z[1], Lq = z[2], D = z[3], Lk = z[4], Dv = z[5], n = z[6];
  const auto dt = q.scalar_type();
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  agents = agents.contiguous();
  auto out = torch::empty({B, H, Lq, Dv}, q.options());
  auto saved = save ? torch::empty({B, H, n * (Dv + 2)}, q.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dt, "agent_noncausal", [&] {
    using T = scalar_t;
    noncausal<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), agents.data_ptr<T>(), out.data_ptr<T>(),
                 save ? saved.data_ptr<T>() : nullptr, B * H, Lq, Lk, D, Dv, n, chunk, static_cast<T>(scale));
  });
  if (save) return {out, saved};
  return {out};
}

// q, k: (B, H, L, D); v: (B, H, L, Dv); agents: (B, H, n, D); the state r, Z: (B, H, n), U: (B, H, n, Dv),
// contiguous, updated in place (an empty state has Z = 0). Returns (out (B, H, L, Dv), ok): ok is false
// when some prefix's normalizer fell below exp(-RANGE) (or a logit is NaN); out and the state are then
// incomplete and the caller runs the PyTorch form from its own copy of the state.
std::tuple<torch::Tensor, bool> agent_chunks(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor agents,
                                             torch::Tensor r, torch::Tensor Z, torch::Tensor U, double scale,
                                             int64_t chunk) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4 && agents.dim() == 4,
              "q, k (B, H, L, D), v (B, H, L, Dv), agents (B, H, n, D)");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const auto dt = q.scalar_type();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Dv = v.size(3), n = agents.size(2);
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == L && agents.size(0) == B && agents.size(1) == H &&
                  agents.size(3) == D && n > 0, "v or agents do not match q");
  for (const auto* x : {&k, &v, &agents, &r, &Z, &U}) TORCH_CHECK(x->scalar_type() == dt, "dtypes differ");
  TORCH_CHECK(r.is_contiguous() && Z.is_contiguous() && U.is_contiguous() && r.numel() == B * H * n &&
                  Z.numel() == B * H * n && U.numel() == B * H * n * Dv,
              "r, Z (B, H, n) and U (B, H, n, Dv) must be contiguous (they are updated in place)");
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  agents = agents.contiguous();
  auto out = torch::empty({B, H, L, Dv}, q.options());
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(dt, "agent_chunks", [&] {
    using T = scalar_t;
    ok = walk<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), agents.data_ptr<T>(), r.data_ptr<T>(),
                 Z.data_ptr<T>(), U.data_ptr<T>(), out.data_ptr<T>(), B * H, L, D, Dv, n, chunk,
                 static_cast<T>(scale));
  });
  return {out, ok};
}

// The gradients (dq, dk, dv, dagents) of agent_noncausal for dout (B, H, Lq, Dv); arguments as its, and
// `saved` its agents' softmax state (save=True).
std::vector<torch::Tensor> agent_noncausal_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                    torch::Tensor agents, torch::Tensor dout, torch::Tensor saved,
                                                    double scale, int64_t chunk) {
  const auto z = agent_sizes(q, k, v, agents, chunk);
  const int64_t B = z[0], H = z[1], Lq = z[2], D = z[3], Lk = z[4], Dv = z[5], n = z[6];
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == B && dout.size(1) == H && dout.size(2) == Lq && dout.size(3) == Dv &&
                  dout.scalar_type() == q.scalar_type(), "dout must be (B, H, Lq, Dv) of q's dtype");
  TORCH_CHECK(saved.scalar_type() == q.scalar_type() && saved.numel() == B * H * n * (Dv + 2),
              "saved must be agent_noncausal's state for these inputs (save=True)");
  std::vector<torch::Tensor> in{q, k, v, agents, dout, saved};
  for (auto& x : in) x = x.contiguous();
  auto dq = torch::empty_like(in[0]), dk = torch::empty_like(in[1]), dv = torch::empty_like(in[2]),
       da = torch::empty_like(in[3]);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "agent_noncausal_backward", [&] {
    using T = scalar_t;
    noncausal_back<T>(in[0].data_ptr<T>(), in[1].data_ptr<T>(), in[2].data_ptr<T>(), in[3].data_ptr<T>(),
                      in[4].data_ptr<T>(), in[5].data_ptr<T>(), dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(),
                      da.data_ptr<T>(),
                      B * H, Lq, Lk, D, Dv, n, chunk, static_cast<T>(scale));
  });
  return {dq, dk, dv, da};
}
