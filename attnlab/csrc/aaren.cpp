// Aaren's many-to-many attention (CPU, forward and backward): attnlab/entries/aaren.py's prefix outputs of one
// query per (batch, head), computed as the RNN it is: each (batch, head) walks its keys once with the
// state (m, u, w) = (running max of the scores, sum of exp(s - m), sum of exp(s - m) v).
//
// Per block of BLOCK keys: the scores s_t = scale q.k_t, the running maxima M_t (a scalar pass),
// then the factors a_t = exp(M_{t-1} - M_t), b_t = exp(s_t - M_t) (vector exponentials, every
// exponent <= 0), then per key  u <- a_t u + b_t,  w <- a_t w + b_t v_t,  o_t = w / u.
// The work is O(L (D + Dv)) on O(L (D + Dv)) data: the kernel streams k, v and the output once.
// Given a trace (B, H, L, 2), it writes each prefix's (M_t, u_t) there for the backward.
//
// Backward (aaren_scan_backward), one reverse pass per (batch, head) with p_tj = e^(s_j - M_t) / u_t:
//   G_j = e^(M_j - M_{j+1}) G_{j+1} + do_j / u_j,   H_j = e^(M_j - M_{j+1}) H_{j+1} + do_j.o_j / u_j
// (every factor <= 1: the running max only grows), started from the final state's gradients
// G = dw_N, H = -du_N (and, non-causal, the one output's do / u_N, do.o / u_N); then with
// e_j = e^(s_j - M_j):  dv_j = e_j G_j,  ds_j = e_j (G_j.v_j - H_j),  dk_j = scale ds_j q,
// dq = scale sum_j ds_j k_j, and the initial state's dw_0 = e^(m_0 - M_0) G_0, du_0 = -e^(m_0 - M_0) H_0.
// m is a stop-gradient stabiliser: it has none.
#include "native.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t BLOCK = 256;

template <typename T>
void walk(const T* query, const T* k, const T* v, T* m, T* u, T* w, T* out, T* trace, int64_t BH, int64_t L,
          int64_t D, int64_t Dv, T scale, bool causal) {
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    attnlab::Buffer<T> s(BLOCK), M(BLOCK), a(BLOCK), b(BLOCK);
    for (int64_t bh = begin; bh < stop; ++bh) {
      const T* q = query + bh * D;
      T* wh = w + bh * Dv;
      T mh = m[bh], uh = u[bh];
      bool empty = uh == T(0);  // no key yet: the first key's factor a is 0 whatever m holds
      for (int64_t t0 = 0; t0 < L; t0 += BLOCK) {
        const int64_t n = std::min(BLOCK, L - t0);
        const T* kb = k + (bh * L + t0) * D;
        const T* vb = v + (bh * L + t0) * Dv;
        for (int64_t t = 0; t < n; ++t) {
          T dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q[d] * kb[t * D + d];
          s[t] = dot * scale;
        }
        T prev = empty ? s[0] : mh;
        for (int64_t t = 0; t < n; ++t) {
          M[t] = std::max(prev, s[t]);
          a[t] = prev - M[t];
          b[t] = s[t] - M[t];
          prev = M[t];
        }
        for (int64_t t = 0; t < n; ++t) a[t] = std::exp(a[t]);
        for (int64_t t = 0; t < n; ++t) b[t] = std::exp(b[t]);
        if (empty) a[0] = 0;
        empty = false;
        for (int64_t t = 0; t < n; ++t) {
          const T at = a[t], bt = b[t];
          const T* vt = vb + t * Dv;
          uh = at * uh + bt;
          for (int64_t d = 0; d < Dv; ++d) wh[d] = at * wh[d] + bt * vt[d];
          if (trace) {
            trace[(bh * L + t0 + t) * 2] = M[t];
            trace[(bh * L + t0 + t) * 2 + 1] = uh;
          }
          if (causal) {
            T* ot = out + (bh * L + t0 + t) * Dv;
            const T inv = T(1) / uh;
            for (int64_t d = 0; d < Dv; ++d) ot[d] = wh[d] * inv;
          }
        }
        mh = prev;
      }
      m[bh] = mh;
      u[bh] = uh;
      if (!causal) {
        const T inv = T(1) / uh;
        for (int64_t d = 0; d < Dv; ++d) out[bh * Dv + d] = wh[d] * inv;
      }
    }
  });
}

template <typename T>
void walk_back(const T* query, const T* k, const T* v, const T* out, const T* trace, const T* dout, const T* du,
               const T* dw, const T* m0, const T* u0, T* dq, T* dk, T* dv, T* du0, T* dw0, int64_t BH, int64_t L,
               int64_t D, int64_t Dv, T scale, bool causal) {
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    attnlab::Buffer<T> G(Dv);
    for (int64_t bh = begin; bh < stop; ++bh) {
      const T* q = query + bh * D;
      const T* tr = trace + bh * L * 2;
      T* dqh = dq + bh * D;
      std::fill(dqh, dqh + D, T(0));
      T H = -du[bh];
      for (int64_t d = 0; d < Dv; ++d) G[d] = dw[bh * Dv + d];
      if (!causal) {  // the one output o_N = w_N / u_N, its gradient summed over the rows
        const T inv = T(1) / tr[(L - 1) * 2 + 1];
        T dot = 0;
        for (int64_t d = 0; d < Dv; ++d) {
          G[d] += dout[bh * Dv + d] * inv;
          dot += dout[bh * Dv + d] * out[bh * Dv + d];
        }
        H += dot * inv;
      }
      for (int64_t j = L - 1; j >= 0; --j) {
        const T Mj = tr[j * 2], uj = tr[j * 2 + 1];
        if (j < L - 1) {
          const T f = std::exp(Mj - tr[(j + 1) * 2]);
          H *= f;
          for (int64_t d = 0; d < Dv; ++d) G[d] *= f;
        }
        const T* kj = k + (bh * L + j) * D;
        const T* vj = v + (bh * L + j) * Dv;
        if (causal) {
          const T* oj = out + (bh * L + j) * Dv;
          const T* doj = dout + (bh * L + j) * Dv;
          const T inv = T(1) / uj;
          T dot = 0;
          for (int64_t d = 0; d < Dv; ++d) {
            G[d] += doj[d] * inv;
            dot += doj[d] * oj[d];
          }
          H += dot * inv;
        }
        T s = 0, gv = 0;
        for (int64_t d = 0; d < D; ++d) s += q[d] * kj[d];
        const T e = std::exp(s * scale - Mj);
        T* dvj = dv + (bh * L + j) * Dv;
        for (int64_t d = 0; d < Dv; ++d) {
          dvj[d] = e * G[d];
          gv += G[d] * vj[d];
        }
        const T ds = e * (gv - H) * scale;
        T* dkj = dk + (bh * L + j) * D;
        for (int64_t d = 0; d < D; ++d) {
          dkj[d] = ds * q[d];
          dqh[d] += ds * kj[d];
        }
      }
      const T f0 = u0[bh] == T(0) ? T(0) : std::exp(m0[bh] - tr[0]);  // an empty state: nothing to carry back
      du0[bh] = -f0 * H;
      for (int64_t d = 0; d < Dv; ++d) dw0[bh * Dv + d] = f0 * G[d];
    }
  });
}

}  // namespace

// query: (B, H, D); k: (B, H, L, D); v: (B, H, L, Dv); the state m, u: (B, H), w: (B, H, Dv), contiguous,
// updated in place (an empty state has u = 0). Returns the prefix outputs (B, H, L, Dv), or with
// causal = false the output after the last key (B, H, 1, Dv).
torch::Tensor aaren_scan(torch::Tensor query, torch::Tensor k, torch::Tensor v, torch::Tensor m, torch::Tensor u,
                         torch::Tensor w, double scale, bool causal, c10::optional<torch::Tensor> trace) {
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && query.dim() == 3, "query (B, H, D), k (B, H, L, D), v (B, H, L, Dv)");
  const auto dt = k.scalar_type();
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3), Dv = v.size(3);
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == L && query.size(0) == B && query.size(1) == H &&
                  query.size(2) == D, "query, k, v shapes do not match");
  TORCH_CHECK(L > 0 || causal, "a non-causal call needs at least one key");
  for (const auto* x : {&query, &v, &m, &u, &w}) TORCH_CHECK(x->scalar_type() == dt, "dtypes differ");
  TORCH_CHECK(m.is_contiguous() && u.is_contiguous() && w.is_contiguous() && m.numel() == B * H &&
                  u.numel() == B * H && w.numel() == B * H * Dv,
              "m, u (B, H) and w (B, H, Dv) must be contiguous (they are updated in place)");
  query = query.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  if (trace)
    TORCH_CHECK(trace->is_contiguous() && trace->scalar_type() == dt && trace->numel() == B * H * L * 2,
                "trace must be a contiguous (B, H, L, 2) tensor of k's dtype");
  auto out = torch::empty({B, H, causal ? L : 1, Dv}, k.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "aaren_scan", [&] {
    using T = scalar_t;
    walk<T>(query.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), m.data_ptr<T>(), u.data_ptr<T>(), w.data_ptr<T>(),
            out.data_ptr<T>(), trace ? trace->data_ptr<T>() : nullptr, B * H, L, D, Dv, static_cast<T>(scale),
            causal);
  });
  return out;
}

// The gradients of aaren_scan: query, k, v, out (as it returned), trace (its (M_t, u_t)), dout (out's
// shape; non-causal: summed over the rows), du (B, H) and dw (B, H, Dv) the final state's gradients, m0 and
// u0 (B, H) the state before the keys (u0 = 0: empty). Returns (dquery (B, H, D), dk, dv, du0, dw0).
std::vector<torch::Tensor> aaren_scan_backward(torch::Tensor query, torch::Tensor k, torch::Tensor v,
                                               torch::Tensor out, torch::Tensor trace, torch::Tensor dout,
                                               torch::Tensor du, torch::Tensor dw, torch::Tensor m0, torch::Tensor u0,
                                               double scale, bool causal) {
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && query.dim() == 3, "query (B, H, D), k (B, H, L, D), v (B, H, L, Dv)");
  const auto dt = k.scalar_type();
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3), Dv = v.size(3);
  TORCH_CHECK(L > 0, "the backward needs at least one key");
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == L && query.size(0) == B && query.size(1) == H &&
                  query.size(2) == D, "query, k, v shapes do not match");
  const int64_t rows = causal ? L : 1;
  TORCH_CHECK(out.numel() == B * H * rows * Dv && dout.numel() == B * H * rows * Dv && trace.numel() == B * H * L * 2 &&
                  du.numel() == B * H && dw.numel() == B * H * Dv && m0.numel() == B * H && u0.numel() == B * H,
              "out, dout (B, H, L or 1, Dv), trace (B, H, L, 2), du, m0, u0 (B, H), dw (B, H, Dv)");
  for (const auto* x : {&query, &v, &out, &trace, &dout, &du, &dw, &m0, &u0})
    TORCH_CHECK(x->scalar_type() == dt, "dtypes differ");
  std::vector<torch::Tensor> in{query, k, v, out, trace, dout, du, dw, m0, u0};
  for (auto& x : in) x = x.contiguous();
  auto dq = torch::empty({B, H, D}, k.options()), dk = torch::empty_like(in[1]), dv = torch::empty_like(in[2]);
  auto du0 = torch::empty({B, H}, k.options()), dw0 = torch::empty({B, H, Dv}, k.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "aaren_scan_backward", [&] {
    using T = scalar_t;
    walk_back<T>(in[0].data_ptr<T>(), in[1].data_ptr<T>(), in[2].data_ptr<T>(), in[3].data_ptr<T>(),
                 in[4].data_ptr<T>(), in[5].data_ptr<T>(), in[6].data_ptr<T>(), in[7].data_ptr<T>(),
                 in[8].data_ptr<T>(), in[9].data_ptr<T>(), dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(),
                 du0.data_ptr<T>(), dw0.data_ptr<T>(), B * H, L, D, Dv, static_cast<T>(scale), causal);
  });
  return {dq, dk, dv, du0, dw0};
}
