// Aaren's many-to-many attention (CPU, forward): attnlab/entries/aaren.py's prefix outputs of one
// query per (batch, head), computed as the RNN it is: each (batch, head) walks its keys once with the
// state (m, u, w) = (running max of the scores, sum of exp(s - m), sum of exp(s - m) v).
//
// Per block of BLOCK keys: the scores s_t = scale q.k_t, the running maxima M_t (a scalar pass),
// then the factors a_t = exp(M_{t-1} - M_t), b_t = exp(s_t - M_t) (vector exponentials, every
// exponent <= 0), then per key  u <- a_t u + b_t,  w <- a_t w + b_t v_t,  o_t = w / u.
// The work is O(L (D + Dv)) on O(L (D + Dv)) data: the kernel streams k, v and the output once.
#include "native.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t BLOCK = 256;

template <typename T>
void walk(const T* query, const T* k, const T* v, T* m, T* u, T* w, T* out, int64_t BH, int64_t L, int64_t D,
          int64_t Dv, T scale, bool causal) {
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    std::vector<T> s(BLOCK), M(BLOCK), a(BLOCK), b(BLOCK);
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

}  // namespace

// query: (B, H, D); k: (B, H, L, D); v: (B, H, L, Dv); the state m, u: (B, H), w: (B, H, Dv), contiguous,
// updated in place (an empty state has u = 0). Returns the prefix outputs (B, H, L, Dv), or with
// causal = false the output after the last key (B, H, 1, Dv).
torch::Tensor aaren_scan(torch::Tensor query, torch::Tensor k, torch::Tensor v, torch::Tensor m, torch::Tensor u,
                         torch::Tensor w, double scale, bool causal) {
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
  auto out = torch::empty({B, H, causal ? L : 1, Dv}, k.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "aaren_scan", [&] {
    using T = scalar_t;
    walk<T>(query.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), m.data_ptr<T>(), u.data_ptr<T>(), w.data_ptr<T>(),
            out.data_ptr<T>(), B * H, L, D, Dv, static_cast<T>(scale), causal);
  });
  return out;
}
