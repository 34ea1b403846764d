// Backward of the causal chunked linear form (linear_chunks, read forwards or backwards; and of
// linear_noncausal, RALA's weights and InLine's centring included, at the end). Per (batch, head), one sweep recomputes
// the state before every chunk (one GEMM per chunk, the states kept: L/C x F x Ds floats), then the
// chunks are walked backwards with the state's gradient dS' (of the state after the chunk) in cache.
// The feature map is applied to each chunk as it is read, and its backward to dQ and dK at the end
// (attnlab/csrc/linear.h). With the normalizer (or InLine's centred finish) the chunk's denominators
// are recomputed from A and the state's z column, dO becomes the gradients of num (dn) and of den
// (dd, one per row: the rank-one terms below), and z's gradient rides in dS' as the forward's z
// rides in S.
//
// Per chunk, with the forward's tables (attnlab/csrc/linear_chunks.cpp): Q' = Q * QF and
// K' = K * KF (the queries as they read the state, the keys as they enter it), `across` (per row
// of the state) and the masked intra-chunk scores A (n x n):
//   forward    O = A V + Q' S,   S_next = across * S + K'^T V
//   backward   dV = A^T dO + K' dS'
//              M  = tril(dO V^T + dd 1^T) (times the decay weights W where A = (Q K^T) * W)
//              dQ = d(intra)/dQ + (dO S^T + dd z^T) * QF,   dK = d(intra)/dK + (V dS'^T + 1 dz'^T) * KF
//              dS = across * dS' + Q'^T [dO, dd]
// where the intra-chunk terms are, by the forward's three ways of weighting a pair:
//   per-head decay or one gate per token (W): M K and M^T Q;
//   per-channel gates in range (A = tril((Q e^G) (K e^-G)^T)): (M (K e^-G)) e^G and (M^T (Q e^G)) e^-G;
//   per-channel gates beyond it: pair by pair, sum_s M_ts K_sf e^(G_tf - G_sf) and its transpose.
// The gates' own gradient: the cumulative log gate G_t enters as phi(q_t) e^G_t and phi(k_t) e^-G_t
// only (and the final state as e^G_L on its rows), so dG_t = phi(q_t) dphi(q_t) - phi(k_t) dphi(k_t)
// (plus sum(S_L * dS_L) per row at the last token), and dg_t is the sum of dG over t and every later
// token: a running sum as the walk goes backwards.
#include "linear.h"
#include "native.h"
#include "simd.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// o (n x Dv) = s (n x n, upper triangular: the transpose of causal_scores' lower form) . x (n x Dv);
// the zero block (rows [h, n), columns [0, h)) skipped.
template <typename T>
void anticausal_values(int64_t n, int64_t Dv, const T* s, const T* x, T* o) {
  const int64_t h = attnlab::split(n);
  attnlab::gemm(h, Dv, n, s, n, x, Dv, false, o, Dv);
  if (h < n) attnlab::gemm(n - h, Dv, n - h, s + h * n + h, n, x + h * Dv, Dv, false, o + h * Dv, Dv);
}

// One chunk's weighting of pairs and of the state, as the forward builds it.
template <typename T>
struct Tables {
  int mode = 0;  // 0: W (no decay, per-head decay, one gate per token); 1: per-channel gates, one GEMM; 2: pair by pair
  attnlab::Buffer<T> w, G, QF, KF, EG, across, gt;  // EG = exp(-G) (per-channel gates in range)
  int64_t built = -1;  // mode 0 with a per-head decay: the chunk length w was built for
  Tables(int64_t C, int64_t F) : w(C * C), G(C * F), QF(C * F), KF(C * F), EG(C * F), across(F), gt(C) {}

  // gc: the chunk's gates (n x cols) or null; l: the per-head log decay (0: none)
  // keys_only: what the states' sweep reads (KF, across), not the queries' factors
  void build(const T* gc, int64_t cols, T l, int64_t n, int64_t F, bool keys_only = false) {
    if (gc && cols > 1) {
      for (int64_t t = 0; t < n; ++t)
        for (int64_t f = 0; f < F; ++f) G[t * F + f] = gc[t * F + f] + (t ? G[(t - 1) * F + f] : T(0));
      const T* last = G.data() + (n - 1) * F;
      mode = -*std::min_element(last, last + F) < attnlab::kRange<T> ? 1 : 2;
      for (int64_t t = 0; t < n; ++t)  // row by row: vector exponentials
        for (int64_t f = 0; f < F; ++f) KF[t * F + f] = std::exp(last[f] - G[t * F + f]);
      if (!keys_only) {
        for (int64_t x = 0; x < n * F; ++x) QF[x] = std::exp(G[x]);
        if (mode == 1)
          for (int64_t x = 0; x < n * F; ++x) EG[x] = std::exp(-G[x]);
      }
      for (int64_t f = 0; f < F; ++f) across[f] = std::exp(last[f]);
      return;
    }
    mode = 0;
    if (!gc && n == built) return;
    if (gc)
      for (int64_t t = 0; t < n; ++t) gt[t] = gc[t] + (t ? gt[t - 1] : T(0));
    auto cum = [&](int64_t t) { return gc ? gt[t] : l * T(t + 1); };  // inclusive log decay up to t
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t s = 0; s < n; ++s) w[t * n + s] = s <= t ? std::exp(cum(t) - cum(s)) : T(0);
      const T qf = std::exp(cum(t)), kf = std::exp(cum(n - 1) - cum(t));
      std::fill(QF.data() + t * F, QF.data() + (t + 1) * F, qf);
      std::fill(KF.data() + t * F, KF.data() + (t + 1) * F, kf);
    }
    std::fill(across.begin(), across.end(), std::exp(cum(n - 1)));
    built = gc ? -1 : n;
  }
};

// How the forward finished its output from [num, den] (as linear_chunks): raw; num / (den + eps)
// (`out` the forward's output); or InLine's centred scale / N (num - den u) + u, u the mean of the
// values so far (`vsum0` their sum before the segment of `count0` tokens, `dvsum0` its gradient).
template <typename T>
struct Finish {
  bool normalize = false;
  T eps = 0;
  const T* out = nullptr;
  const T* vsum0 = nullptr;
  T* dvsum0 = nullptr;
  T scale = 0;
  int64_t count0 = 0;
};

template <typename T>
void backward(const T* q, const T* k, const T* v, const T* lam, const T* gates, int64_t cols, const T* S0,
              const T* dout, const T* dSL, T* dq, T* dk, T* dv, T* dS0, int64_t BH, int64_t H, int64_t L, int64_t Din,
              int64_t F, int64_t Dv, int64_t C, int feature, int64_t taylor_dim, T q_scale, const Finish<T>& fin,
              bool reverse, bool strict, const T* SL, T* dgates) {
  const bool normalize = fin.normalize, centre = fin.vsum0 != nullptr;
  const int64_t m = (L + C - 1) / C, Ds = Dv + (normalize ? 1 : 0);  // state rows: Dv values, then z
  const bool map_q = feature != 0 || q_scale != T(1), map_k = feature != 0;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    Tables<T> tab(C, F);
    attnlab::Buffer<T> states(std::max<int64_t>(m, 1) * F * Ds), dS(F * Ds), St(Dv * F), dSt(Dv * F), qr(C * F),
        qrt(F * C), kr(C * F), krt(F * C), kt(F * C), vt(Dv * C), A(C * C), At(C * C), M(C * C), Mt(C * C),
        qa(C * F), ka(C * F), intra(C * F), inter(C * F), qm, km, dqm, dkm, dn, dd;
    if (map_q) qm.resize(C * F), dqm.resize(C * F);
    if (map_k) km.resize(C * F), dkm.resize(C * F);
    if (normalize) dn.resize(C * Dv), dd.resize(C);
    attnlab::Buffer<T> vsums, vs(Dv), du, r(Dv);  // InLine: the values' sum before each chunk, du / N, its reverse sum
    if (centre) vsums.resize(std::max<int64_t>(m, 1) * Dv), du.resize(C * Dv);
    // reverse: the chunk's rows read backwards into buffers, its gradients' rows written back from them
    attnlab::Buffer<T> rq, rk, rv, rg, rdo, oq, ok, ov, og, gacc(std::max<int64_t>(cols, 1));
    if (reverse) {
      og.resize(C * std::max<int64_t>(cols, 1));
      for (auto* b : {&rq, &rk, &oq, &ok}) b->resize(C * Din);
      for (auto* b : {&rv, &rdo, &ov}) b->resize(C * Dv);
      rg.resize(C * std::max<int64_t>(cols, 1));
    }
    auto rows = [&](const T* base, int64_t width, int64_t c0, int64_t n, attnlab::Buffer<T>& buf) -> const T* {
      if (!base || !reverse) return base ? base + c0 * width : nullptr;
      const int64_t r0 = L - c0 - n;
      for (int64_t t = 0; t < n; ++t)
        std::copy(base + (r0 + n - 1 - t) * width, base + (r0 + n - t) * width, buf.data() + t * width);
      return buf.data();
    };
    auto target = [&](T* base, int64_t width, int64_t c0, attnlab::Buffer<T>& buf) {
      return reverse ? buf.data() : base + c0 * width;
    };
    auto land = [&](const attnlab::Buffer<T>& buf, T* base, int64_t width, int64_t c0, int64_t n) {
      if (!reverse) return;
      const int64_t r0 = L - c0 - n;
      for (int64_t t = 0; t < n; ++t)
        std::copy(buf.data() + t * width, buf.data() + (t + 1) * width, base + (r0 + n - 1 - t) * width);
    };
    // the chunk's features: q, k as they are, or mapped (q times q_scale) into qm, km
    auto features = [&](const T* qc, const T* kc, int64_t n, const T** fq, const T** fk) {
      if (map_q) attnlab::feature_map(qc, n, Din, F, feature, taylor_dim, q_scale, qm.data());
      if (map_k) attnlab::feature_map(kc, n, Din, F, feature, taylor_dim, T(1), km.data());
      *fq = map_q ? qm.data() : qc;
      *fk = map_k ? km.data() : kc;
    };
    for (int64_t bh = begin; bh < stop; ++bh) {
      const T l = lam ? lam[bh % H] : T(0);
      const T* qh = q + bh * L * Din;
      const T* kh = k + bh * L * Din;
      const T* vh = v + bh * L * Dv;
      const T* gh = gates ? gates + bh * L * cols : nullptr;
      tab.built = -1;
      // the states before each chunk
      std::copy(S0 + bh * F * Ds, S0 + (bh + 1) * F * Ds, states.data());
      if (centre) std::copy(fin.vsum0 + bh * Dv, fin.vsum0 + (bh + 1) * Dv, vsums.data());
      for (int64_t c = 0; c + 1 < m; ++c) {
        const int64_t c0 = c * C, n = std::min(C, L - c0);
        const T* fk = rows(kh, Din, c0, n, rk);
        const T* vc = rows(vh, Dv, c0, n, rv);
        if (map_k) {
          attnlab::feature_map(fk, n, Din, F, feature, taylor_dim, T(1), km.data());
          fk = km.data();
        }
        tab.build(rows(gh, cols, c0, n, rg), cols, l, n, F, true);
        const T* S = states.data() + c * F * Ds;
        T* Sn = states.data() + (c + 1) * F * Ds;
        for (int64_t f = 0; f < F; ++f)
          for (int64_t d = 0; d < Ds; ++d) Sn[f * Ds + d] = tab.across[f] * S[f * Ds + d];
        for (int64_t s = 0; s < n; ++s)
          for (int64_t f = 0; f < F; ++f) krt[f * n + s] = fk[s * F + f] * tab.KF[s * F + f];
        attnlab::gemm(F, Dv, n, krt.data(), n, vc, Dv, true, Sn, Ds);
        if (normalize) attnlab::add_key_sums(krt.data(), F, n, Sn, Ds, Dv);
        if (centre) {
          std::copy(vsums.data() + c * Dv, vsums.data() + (c + 1) * Dv, vsums.data() + (c + 1) * Dv);
          for (int64_t t = 0; t < n; ++t)
            for (int64_t x = 0; x < Dv; ++x) vsums[(c + 1) * Dv + x] += vh[(c0 + t) * Dv + x];
        }
      }
      std::fill(r.begin(), r.end(), T(0));
      // the gates' gradient, summed from the last token back: the final state's term first
      std::fill(gacc.begin(), gacc.end(), T(0));
      if (dgates && dSL && SL)
        for (int64_t f = 0; f < F; ++f) {
          T acc = 0;
          for (int64_t d = 0; d < Ds; ++d) acc += SL[(bh * F + f) * Ds + d] * dSL[(bh * F + f) * Ds + d];
          gacc[cols > 1 ? f : 0] += acc;
        }
      if (dSL)
        std::copy(dSL + bh * F * Ds, dSL + (bh + 1) * F * Ds, dS.data());
      else
        std::fill(dS.begin(), dS.end(), T(0));
      tab.built = -1;
      for (int64_t c = m - 1; c >= 0; --c) {
        const int64_t c0 = c * C, n = std::min(C, L - c0);
        const T *qc, *kc;
        const T* qraw = rows(qh, Din, c0, n, rq);
        const T* kraw = rows(kh, Din, c0, n, rk);
        features(qraw, kraw, n, &qc, &kc);
        const T* vc = rows(vh, Dv, c0, n, rv);
        const T* doc = rows(dout + bh * L * Dv, Dv, c0, n, rdo);
        T* dqo = target(dq + bh * L * Din, Din, c0, oq);  // where the chunk's dq, dk, dv rows go
        T* dko = target(dk + bh * L * Din, Din, c0, ok);
        T* dvc = target(dv + bh * L * Dv, Dv, c0, ov);
        T* dqc = map_q ? dqm.data() : dqo;
        T* dkc = map_k ? dkm.data() : dko;
        const T* S = states.data() + c * F * Ds;
        tab.build(rows(gh, cols, c0, n, rg), cols, l, n, F);
        const int mode = tab.mode;
        for (int64_t x = 0; x < n * F; ++x) {
          qr[x] = qc[x] * tab.QF[x];
          kr[x] = kc[x] * tab.KF[x];
        }
        attnlab::transpose(qr.data(), n, F, qrt.data(), n);
        attnlab::transpose(vc, n, Dv, vt.data(), n);
        // the operands of the intra-chunk scores: A = qa ka^T
        const T* qa_ = qc;
        const T* ka_ = kc;
        if (mode == 1) {
          for (int64_t x = 0; x < n * F; ++x) ka[x] = kc[x] * tab.EG[x];
          qa_ = qr.data();
          ka_ = ka.data();
        }
        if (mode == 2) {
          for (int64_t t = 0; t < n; ++t)
            for (int64_t s = 0; s < n; ++s) {
              T acc = 0;
              if (s <= t)
                for (int64_t f = 0; f < F; ++f)
                  acc += qc[t * F + f] * kc[s * F + f] * std::exp(tab.G[t * F + f] - tab.G[s * F + f]);
              A[t * n + s] = acc;
            }
        } else {
          attnlab::transpose(ka_, n, F, kt.data(), n);
          attnlab::causal_scores(n, F, qa_, kt.data(), A.data());
          if (mode == 0)
            for (int64_t x = 0; x < n * n; ++x) A[x] *= tab.w[x];
          else
            for (int64_t t = 0; t < n; ++t) std::fill(A.data() + t * n + t + 1, A.data() + (t + 1) * n, T(0));
        }
        if (strict)  // each token's own pair left out
          for (int64_t t = 0; t < n; ++t) A[t * n + t] = T(0);
        if (normalize) {  // the gradients of num (dn) and den (dd), from the finish
          if (centre) std::copy(vsums.data() + c * Dv, vsums.data() + (c + 1) * Dv, vs.data());
          for (int64_t t = 0; t < n; ++t) {
            T d = 0, dot = 0;
            for (int64_t s = 0; s <= t; ++s) d += A[t * n + s];
            for (int64_t f = 0; f < F; ++f) d += qr[t * F + f] * S[f * Ds + Dv];
            const T* g = doc + t * Dv;
            if (centre) {  // out = a (num - den u) + u, a = scale / N, u = vs / N: u's own gradient too
              const T N = T(fin.count0 + c0 + t + 1), a = fin.scale / N;
              for (int64_t x = 0; x < Dv; ++x) {
                vs[x] += vc[t * Dv + x];
                dn[t * Dv + x] = a * g[x];
                dot += g[x] * vs[x] / N;
                du[t * Dv + x] = g[x] * (T(1) - a * d) / N;
              }
              dd[t] = -a * dot;
            } else {  // out = num / (den + eps)
              const T inv = T(1) / (d + fin.eps);
              const T* o = fin.out + (bh * L + c0 + t) * Dv;
              for (int64_t x = 0; x < Dv; ++x) {
                dn[t * Dv + x] = g[x] * inv;
                dot += g[x] * o[x];
              }
              dd[t] = -dot * inv;
            }
          }
          doc = dn.data();
        }
        // dV = A^T dO + K' dS'
        attnlab::transpose(A.data(), n, n, At.data(), n);
        anticausal_values(n, Dv, At.data(), doc, dvc);
        attnlab::gemm(n, Dv, F, kr.data(), F, dS.data(), Ds, true, dvc, Dv);
        if (centre)  // + the sum of du / N over this token and every later one
          for (int64_t t = n - 1; t >= 0; --t)
            for (int64_t x = 0; x < Dv; ++x) dvc[t * Dv + x] += r[x] += du[t * Dv + x];
        // M = tril(dO V^T + dd 1^T) (* W)
        attnlab::causal_scores(n, Dv, doc, vt.data(), M.data());
        if (normalize)
          for (int64_t t = 0; t < n; ++t)
            for (int64_t s = 0; s <= t; ++s) M[t * n + s] += dd[t];
        if (mode == 0)
          for (int64_t x = 0; x < n * n; ++x) M[x] *= tab.w[x];
        else
          for (int64_t t = 0; t < n; ++t) std::fill(M.data() + t * n + t + 1, M.data() + (t + 1) * n, T(0));
        if (strict)
          for (int64_t t = 0; t < n; ++t) M[t * n + t] = T(0);
        attnlab::transpose(M.data(), n, n, Mt.data(), n);
        // dQ = intra + (dO S^T + dd z^T) * QF
        for (int64_t f = 0; f < F; ++f)
          for (int64_t d = 0; d < Dv; ++d) St[d * F + f] = S[f * Ds + d];
        attnlab::gemm(n, F, Dv, doc, Dv, St.data(), F, false, inter.data(), F);
        if (normalize)
          for (int64_t t = 0; t < n; ++t)
            for (int64_t f = 0; f < F; ++f) inter[t * F + f] += dd[t] * S[f * Ds + Dv];
        if (mode == 2) {
          std::fill(intra.begin(), intra.begin() + n * F, T(0));
          std::fill(qa.begin(), qa.begin() + n * F, T(0));  // dK's intra term
          for (int64_t t = 0; t < n; ++t)
            for (int64_t s = 0; s <= t; ++s) {
              const T mts = M[t * n + s];
              for (int64_t f = 0; f < F; ++f) {
                const T e = mts * std::exp(tab.G[t * F + f] - tab.G[s * F + f]);
                intra[t * F + f] += e * kc[s * F + f];
                qa[s * F + f] += e * qc[t * F + f];
              }
            }
        } else {
          attnlab::causal_values(n, F, M.data(), ka_, intra.data());
        }
        for (int64_t x = 0; x < n * F; ++x)
          dqc[x] = (mode == 1 ? intra[x] * tab.QF[x] : intra[x]) + inter[x] * tab.QF[x];
        // dK = intra + (V dS'^T + 1 dz^T) * KF
        for (int64_t f = 0; f < F; ++f)
          for (int64_t d = 0; d < Dv; ++d) dSt[d * F + f] = dS[f * Ds + d];
        attnlab::gemm(n, F, Dv, vc, Dv, dSt.data(), F, false, inter.data(), F);
        if (normalize)
          for (int64_t t = 0; t < n; ++t)
            for (int64_t f = 0; f < F; ++f) inter[t * F + f] += dS[f * Ds + Dv];
        if (mode == 2)
          std::copy(qa.begin(), qa.begin() + n * F, intra.begin());
        else
          anticausal_values(n, F, Mt.data(), qa_, intra.data());
        for (int64_t x = 0; x < n * F; ++x)
          dkc[x] = (mode == 1 ? intra[x] * tab.EG[x] : intra[x]) + inter[x] * tab.KF[x];
        // dS = across * dS' + Q'^T [dO, dd]
        for (int64_t f = 0; f < F; ++f)
          for (int64_t d = 0; d < Ds; ++d) dS[f * Ds + d] *= tab.across[f];
        attnlab::gemm(F, Dv, n, qrt.data(), n, doc, Dv, true, dS.data(), Ds);
        if (normalize)
          for (int64_t f = 0; f < F; ++f) {
            T z = 0;
            for (int64_t t = 0; t < n; ++t) z += qrt[f * n + t] * dd[t];
            dS[f * Ds + Dv] += z;
          }
        if (dgates) {  // dG_t = phi(q_t) dphi(q_t) - phi(k_t) dphi(k_t), summed over t and later tokens
          T* dgo = target(dgates + bh * L * cols, cols, c0, og);
          for (int64_t t = n - 1; t >= 0; --t)
            for (int64_t f = 0; f < F; ++f) {
              T& acc = gacc[cols > 1 ? f : 0];
              acc += qc[t * F + f] * dqc[t * F + f] - kc[t * F + f] * dkc[t * F + f];
              if (cols > 1 || f == F - 1) dgo[t * cols + (cols > 1 ? f : 0)] = acc;
            }
          land(og, dgates + bh * L * cols, cols, c0, n);
        }
        // through the feature map
        if (map_q) attnlab::feature_grad(qraw, dqm.data(), n, Din, F, feature, taylor_dim, q_scale, dqo);
        if (map_k) attnlab::feature_grad(kraw, dkm.data(), n, Din, F, feature, taylor_dim, T(1), dko);
        land(oq, dq + bh * L * Din, Din, c0, n);
        land(ok, dk + bh * L * Din, Din, c0, n);
        land(ov, dv + bh * L * Dv, Dv, c0, n);
      }
      std::copy(dS.begin(), dS.end(), dS0 + bh * F * Ds);
      if (centre) std::copy(r.begin(), r.end(), fin.dvsum0 + bh * Dv);
    }
    attnlab::gemm_done();
  });
}

// The non-causal form without decay (linear_noncausal): S = phi(K)^T V and z = the sum of phi(k),
// o = phi(Q) S (/ (phi(Q) z + eps)). From the forward's S and z (`saved`, attnlab::noncausal_record) and
// output `out`, two passes per (batch, head): the queries' dn = dout / den, dd = -(dout . o) / den,
// dphi(q) = dn S^T + dd z^T and dS = sum phi(q)^T dn, dz = sum phi(q)^T dd; the keys' dphi(k) = V dS^T + dz
// and dV = phi(K) dS.
// RALA (rala_scale > 0, normalized): the keys are k'_j = a_j phi(k_j) with a_j = softmax_j(l_j), l_j =
// qbar . phi(k_j), qbar = rala_scale mean_i phi(q_i) (S and z, over the softmax's sum Z, qbar, the logits'
// maximum M and Z come saved). The keys' pass turns dk'_j into da_j = dk'_j . phi(k_j),
// dl_j = a_j (da_j - c) with c = sum_j a_j da_j = <dS, S> + <dz, z>, dphi(k_j) = a_j dk'_j + dl_j qbar, and
// sums dqbar = sum_j dl_j phi(k_j); the queries' dphi(q) are kept until then, and a last pass adds
// dqbar rala_scale / Lq to each before the feature map's backward.
// InLine (centred, o = phi(Q) S_c + ubar with S_c = S - z ubar^T): the queries' pass is the raw one on S_c
// (dS_c = sum phi(q)^T dout), and S_c's dependence on z and ubar gives dz = -dS_c ubar (so dphi(k_j) =
// dS_c (v_j - ubar)) and every dv_j the share (sum_i dout_i - dS_c^T z) / Lk of ubar's gradient.
template <typename T>
void noncausal_backward(const T* q, const T* k, const T* v, const T* dout, const T* saved, const T* out, T* dq, T* dk,
                        T* dv, int64_t BH, int64_t Lq, int64_t Lk, int64_t Din, int64_t F, int64_t Dv, int64_t C,
                        int feature, int64_t taylor_dim, T q_scale, bool normalize, T eps, T rala_scale,
                        bool centred) {
  const bool rala = rala_scale > 0;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    attnlab::Buffer<T> St(Dv * F), dS(F * Dv), dSt(Dv * F), dz(F), mapped(C * F), mt(F * C), dn(C * Dv), dd(C),
        dphi(C * F), dqbar(F), a(C), phik(rala ? C * F : 0), dphiq(rala ? Lq * F : 0), dubar(centred ? Dv : 0);
    for (int64_t bh = begin; bh < stop; ++bh) {
      const T* qh = q + bh * Lq * Din;
      const T* kh = k + bh * Lk * Din;
      const T* vh = v + bh * Lk * Dv;
      const attnlab::NoncausalRecord<const T> r(saved, bh, F, Dv);  // the forward's keys' state
      const T *S = r.S, *z = r.z, *qbar = r.qbar, *ubar = r.ubar;
      const T M = *r.M, Z = *r.Z;  // RALA: the logits' maximum and the sum of exp(l - M)
      std::fill(dS.begin(), dS.end(), T(0));
      std::fill(dz.begin(), dz.end(), T(0));
      std::fill(dubar.begin(), dubar.end(), T(0));
      std::fill(dqbar.begin(), dqbar.end(), T(0));
      attnlab::transpose(S, F, Dv, St.data(), F);
      for (int64_t c0 = 0; c0 < Lq; c0 += C) {  // the queries
        const int64_t n = std::min(C, Lq - c0);
        const T* g = dout + (bh * Lq + c0) * Dv;
        attnlab::feature_map(qh + c0 * Din, n, Din, F, feature, taylor_dim, q_scale, mapped.data());
        const T* dnum = g;
        if (centred) attnlab::add_rows(g, n, Dv, dubar.data());
        if (normalize) {
          const T* o = out + (bh * Lq + c0) * Dv;  // num / den
          for (int64_t t = 0; t < n; ++t) {
            T den = eps, dot = 0;
            for (int64_t f = 0; f < F; ++f) den += mapped[t * F + f] * z[f];
            const T inv = T(1) / den;
            for (int64_t x = 0; x < Dv; ++x) {
              dn[t * Dv + x] = g[t * Dv + x] * inv;
              dot += g[t * Dv + x] * o[t * Dv + x];
            }
            dd[t] = -dot * inv;
          }
          dnum = dn.data();
        }
        attnlab::gemm(n, F, Dv, dnum, Dv, St.data(), F, false, dphi.data(), F);
        if (normalize)
          for (int64_t t = 0; t < n; ++t)
            for (int64_t f = 0; f < F; ++f) dphi[t * F + f] += dd[t] * z[f];
        if (rala)  // kept until dqbar is known
          std::copy(dphi.data(), dphi.data() + n * F, dphiq.data() + c0 * F);
        else
          attnlab::feature_grad(qh + c0 * Din, dphi.data(), n, Din, F, feature, taylor_dim, q_scale,
                                dq + (bh * Lq + c0) * Din);
        attnlab::transpose(mapped.data(), n, F, mt.data(), n);
        attnlab::gemm(F, Dv, n, mt.data(), n, dnum, Dv, true, dS.data(), Dv);
        if (normalize)
          for (int64_t f = 0; f < F; ++f)
            for (int64_t t = 0; t < n; ++t) dz[f] += mt[f * n + t] * dd[t];
      }
      attnlab::transpose(dS.data(), F, Dv, dSt.data(), F);
      if (centred) {  // dz = -dS ubar; ubar's gradient sum_i dout_i - dS^T z, shared by the Lk values
        const T share = T(1) / T(std::max<int64_t>(Lk, 1));
        for (int64_t f = 0; f < F; ++f) {
          T d = 0;
          for (int64_t x = 0; x < Dv; ++x) d += dS[f * Dv + x] * ubar[x];
          dz[f] = -d;
        }
        for (int64_t x = 0; x < Dv; ++x) {
          T d = dubar[x];
          for (int64_t f = 0; f < F; ++f) d -= dS[f * Dv + x] * z[f];
          dubar[x] = d * share;
        }
      }
      T c = 0;  // RALA: sum_j a_j da_j
      if (rala) {
        for (int64_t x = 0; x < F * Dv; ++x) c += dS[x] * S[x];
        for (int64_t f = 0; f < F; ++f) c += dz[f] * z[f];
      }
      for (int64_t c0 = 0; c0 < Lk; c0 += C) {  // the keys' gradients
        const int64_t n = std::min(C, Lk - c0);
        attnlab::feature_map(kh + c0 * Din, n, Din, F, feature, taylor_dim, T(1), mapped.data());
        if (rala) {  // the weighted keys k'_j = a_j phi(k_j), phi(k) kept
          std::copy(mapped.data(), mapped.data() + n * F, phik.data());
          attnlab::rala_logits(mapped.data(), n, F, qbar, a.data());
          for (int64_t t = 0; t < n; ++t) {
            a[t] = std::exp(a[t] - M) / Z;
            for (int64_t f = 0; f < F; ++f) mapped[t * F + f] *= a[t];
          }
        }
        T* dvc = dv + (bh * Lk + c0) * Dv;
        attnlab::gemm(n, Dv, F, mapped.data(), F, dS.data(), Dv, false, dvc, Dv);
        if (centred)
          for (int64_t t = 0; t < n; ++t)
            for (int64_t x = 0; x < Dv; ++x) dvc[t * Dv + x] += dubar[x];
        attnlab::gemm(n, F, Dv, vh + c0 * Dv, Dv, dSt.data(), F, false, dphi.data(), F);
        if (normalize || centred)
          for (int64_t t = 0; t < n; ++t)
            for (int64_t f = 0; f < F; ++f) dphi[t * F + f] += dz[f];
        if (rala)
          for (int64_t t = 0; t < n; ++t) {
            const T* pk = phik.data() + t * F;
            T* dp = dphi.data() + t * F;
            T da = 0;
            for (int64_t f = 0; f < F; ++f) da += dp[f] * pk[f];
            const T dl = a[t] * (da - c);
            for (int64_t f = 0; f < F; ++f) {
              dp[f] = a[t] * dp[f] + dl * qbar[f];
              dqbar[f] += dl * pk[f];
            }
          }
        attnlab::feature_grad(kh + c0 * Din, dphi.data(), n, Din, F, feature, taylor_dim, T(1),
                              dk + (bh * Lk + c0) * Din);
      }
      if (rala)  // the queries again: their direct gradient plus qbar's (qbar = rala_scale mean phi(q))
        for (int64_t c0 = 0; c0 < Lq; c0 += C) {
          const int64_t n = std::min(C, Lq - c0);
          const T share = rala_scale / (T(Lq) * q_scale);  // feature_grad multiplies by q_scale
          for (int64_t t = 0; t < n; ++t)
            for (int64_t f = 0; f < F; ++f) dphi[t * F + f] = dphiq[(c0 + t) * F + f] + share * dqbar[f];
          attnlab::feature_grad(qh + c0 * Din, dphi.data(), n, Din, F, feature, taylor_dim, q_scale,
                                dq + (bh * Lq + c0) * Din);
        }
    }
    attnlab::gemm_done();
  });
}

}  // namespace

// The gradients of linear_chunks' causal form (reverse and strict too, not add_to): q, k (B, H, L, Din) mapped by
// `feature` (q times q_scale); v (B, H, L, Dv); log_decay (H,) or log_gates (B, H, L, F|1), or neither;
// state0 (B, H, F, Ds) the initial state (Ds = Dv + 1 with normalize_eps or centre, the normalizer's
// column last); dout (B, H, L, Dv) the output's gradient, d_state the final state's (or undefined:
// zero); with normalize_eps, `out` the forward's output num / (den + eps); with centre (B, H, Dv), the
// values' sum before the segment (count0 tokens), InLine's centred output (centre_scale). Returns
// (dq, dk, dv, d_state0), then with centre its gradient, then with gates_grad the gates' (final_state:
// the forward's final state, when d_state is given). The decay's gradient follows from dq and dk
// (attnlab/linear.py).
std::vector<torch::Tensor> linear_chunks_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                  torch::Tensor state0, c10::optional<torch::Tensor> log_decay,
                                                  c10::optional<torch::Tensor> log_gates, torch::Tensor dout,
                                                  c10::optional<torch::Tensor> d_state, int64_t chunk,
                                                  c10::optional<torch::Tensor> out, c10::optional<double> normalize_eps,
                                                  int64_t feature, int64_t taylor_dim, double q_scale,
                                                  c10::optional<torch::Tensor> centre, double centre_scale,
                                                  int64_t count0, bool reverse, bool strict,
                                                  c10::optional<torch::Tensor> final_state, bool gates_grad) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4, "q, k must be (B, H, L, Din), v (B, H, L, Dv)");
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && state0.scalar_type() == dt && dout.scalar_type() == dt,
              "q, k, v, state0, dout dtypes differ");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), Din = q.size(3), Dv = v.size(3);
  const int64_t F = attnlab::feature_count(feature, taylor_dim, Din);
  const bool centred = centre.has_value() && centre->defined();
  TORCH_CHECK(!(centred && normalize_eps.has_value()), "give normalize_eps or centre, not both");
  const bool normalize = normalize_eps.has_value() || centred;
  TORCH_CHECK(!(reverse || strict) || !normalize, "reverse and strict take the raw form (no normalizer, no centre)");
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == L, "v must be (B, H, L, Dv)");
  TORCH_CHECK(dout.sizes() == v.sizes(), "dout must be (B, H, L, Dv)");
  TORCH_CHECK(state0.dim() == 4 && state0.size(0) == B && state0.size(1) == H && state0.size(2) == F &&
                  state0.size(3) == Dv + normalize,
              normalize ? "state0 must be (B, H, F, Dv + 1)" : "state0 must be (B, H, F, Dv)");
  torch::Tensor o, vsum0, dvsum0;
  if (normalize_eps.has_value()) {
    TORCH_CHECK(out.has_value() && out->defined() && out->sizes() == v.sizes() && out->scalar_type() == dt,
                "the normalized form's backward needs the forward's output (B, H, L, Dv)");
    o = out->contiguous();
  }
  if (centred) {
    TORCH_CHECK(centre->scalar_type() == dt && centre->dim() == 3 && centre->size(0) == B && centre->size(1) == H &&
                    centre->size(2) == Dv, "centre must be a (B, H, Dv) tensor of q's dtype");
    vsum0 = centre->contiguous();
    dvsum0 = torch::empty_like(vsum0);
  }
  const bool has_dS = d_state.has_value() && d_state->defined();
  torch::Tensor dSL;
  if (has_dS) {
    TORCH_CHECK(d_state->sizes() == state0.sizes() && d_state->scalar_type() == dt, "d_state must be like state0");
    dSL = d_state->contiguous();
  }
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  dout = dout.contiguous();
  state0 = state0.contiguous();
  torch::Tensor lam, gates;  // named: the dispatch lambda below captures them
  std::tie(lam, gates) = attnlab::decay_and_gates(log_decay, log_gates, dt, B, H, L, F);
  auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v),
       dS0 = torch::empty_like(state0);
  TORCH_CHECK(!gates_grad || gates.defined(), "gates_grad needs log_gates");
  torch::Tensor dgates = gates_grad ? torch::empty_like(gates) : torch::Tensor(), SL;
  if (gates_grad && has_dS) {
    TORCH_CHECK(final_state.has_value() && final_state->defined() && final_state->sizes() == state0.sizes() &&
                    final_state->scalar_type() == dt, "the gates' gradient with d_state needs the final state");
    SL = final_state->contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES(dt, "linear_chunks_backward", [&] {
    using T = scalar_t;
    Finish<T> fin;
    fin.normalize = normalize;
    fin.eps = static_cast<T>(normalize_eps.value_or(0.0));
    fin.out = o.defined() ? o.data_ptr<T>() : nullptr;
    fin.vsum0 = centred ? vsum0.data_ptr<T>() : nullptr;
    fin.dvsum0 = centred ? dvsum0.data_ptr<T>() : nullptr;
    fin.scale = static_cast<T>(centre_scale);
    fin.count0 = count0;
    backward<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), lam.defined() ? lam.data_ptr<T>() : nullptr,
                gates.defined() ? gates.data_ptr<T>() : nullptr, gates.defined() ? gates.size(3) : 0,
                state0.data_ptr<T>(), dout.data_ptr<T>(), has_dS ? dSL.data_ptr<T>() : nullptr, dq.data_ptr<T>(),
                dk.data_ptr<T>(), dv.data_ptr<T>(), dS0.data_ptr<T>(), B * H, H, L, Din, F, Dv, chunk,
                static_cast<int>(feature), taylor_dim, static_cast<T>(q_scale), fin, reverse, strict,
                SL.defined() ? SL.data_ptr<T>() : nullptr, gates_grad ? dgates.data_ptr<T>() : nullptr);
  });
  std::vector<torch::Tensor> grads{dq, dk, dv, dS0};
  if (centred) grads.push_back(dvsum0);
  if (gates_grad) grads.push_back(dgates);
  return grads;
}

// The gradients (dq, dk, dv) of linear_noncausal (q (B, H, Lq, Din), k (B, H, Lk, Din), v (B, H, Lk, Dv);
// RALA's weights with rala_scale > 0, InLine's centring with centred) for dout (B, H, Lq, Dv); `saved`, the
// forward's keys' state (linear_noncausal with save), and `out`, its output (the normalized form's; else None).
std::vector<torch::Tensor> linear_noncausal_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                     torch::Tensor dout, int64_t chunk,
                                                     c10::optional<double> normalize_eps, int64_t feature,
                                                     int64_t taylor_dim, double q_scale, double rala_scale,
                                                     bool centred, torch::Tensor saved,
                                                     c10::optional<torch::Tensor> out) {
  const auto n = attnlab::noncausal_sizes(q, k, v);
  const int64_t B = n[0], H = n[1], Lq = n[2], Din = n[3], Lk = n[4], Dv = n[5];
  const auto dt = q.scalar_type();
  TORCH_CHECK(dout.scalar_type() == dt, "dout's dtype differs from q's");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  TORCH_CHECK(rala_scale <= 0 || normalize_eps.has_value(), "RALA's weights need the normalizer");
  TORCH_CHECK(!centred || (!normalize_eps.has_value() && rala_scale <= 0), "centred takes no normalizer or RALA");
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == B && dout.size(1) == H && dout.size(2) == Lq && dout.size(3) == Dv,
              "dout must be (B, H, Lq, Dv)");
  const int64_t F = attnlab::feature_count(feature, taylor_dim, Din);
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  dout = dout.contiguous();
  TORCH_CHECK(saved.scalar_type() == dt && saved.numel() == B * H * attnlab::noncausal_record(F, Dv),
              "saved must be linear_noncausal's keys' state for these inputs (save=True)");
  const bool normalize = normalize_eps.has_value();
  torch::Tensor o;
  if (normalize) {
    TORCH_CHECK(out.has_value() && out->scalar_type() == dt && out->sizes() == dout.sizes(),
                "the normalized form's backward needs the forward's output (out)");
    o = out->contiguous();
  }
  saved = saved.contiguous();
  auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(dt, "linear_noncausal_backward", [&] {
    using T = scalar_t;
    noncausal_backward<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), dout.data_ptr<T>(),
                          saved.data_ptr<T>(), normalize ? o.data_ptr<T>() : nullptr,
                          dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(), B * H, Lq, Lk, Din, F, Dv, chunk,
                          static_cast<int>(feature), taylor_dim, static_cast<T>(q_scale), normalize,
                          static_cast<T>(normalize_eps.value_or(0.0)), static_cast<T>(rala_scale), centred);
  });
  return {dq, dk, dv};
}
