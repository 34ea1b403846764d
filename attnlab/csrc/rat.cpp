// RAT's causal chunked form (CPU, forward): attnlab/entries/rat.py's mathematics fused so that each
// (batch, head) walks its tokens once, in blocks of BLOCK rows, without the summaries of every
// position ever being written out.
//
// Per token at absolute position p (chunk c = p / C), gates g in [0, 1] (per token, one or per channel):
//   k~ = g k~ + (1 - g) k,  v~ = g v~ + (1 - g) v     (restarted at every chunk start: k~ = (1 - g) k)
//   o = softmax(scale q . [k~_0 ... k~_{c-1}, k~]) [v~_0 ... v~_{c-1}, v~]
// where k~_i, v~_i are the finished chunks' final summaries (the "finals"; those of earlier segments
// come in as `past`). A block's rows are scanned first (their own summaries, and the finals of chunks
// ending in the block appended), then attend: the row's own summary starts its online softmax
// (m = its score, l = 1, acc = its value), and the finals follow KEYS at a time, each row masked to
// the finals of the chunks before its own (two GEMMs per step).
#include "native.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t BLOCK = 64, KEYS = 1024;

// h_new = g h + (1 - g) x over n channels, one gate for all or one per channel.
template <typename T>
void recur(const T* h, const T* x, const T* g, bool per_channel, T* out, int64_t n) {
  if (per_channel) {
    for (int64_t d = 0; d < n; ++d) out[d] = g[d] * h[d] + (1 - g[d]) * x[d];
  } else {
    const T a = g[0], b = 1 - g[0];
    for (int64_t d = 0; d < n; ++d) out[d] = a * h[d] + b * x[d];
  }
}

template <typename T>
void walk(const T* q, const T* k, const T* v, const T* gk, int64_t gk_cols, const T* gv, int64_t gv_cols,
          const T* carry_k, const T* carry_v, T* fin_k, T* fin_v, T* last_k, T* last_v, T* out, int64_t BH,
          int64_t L, int64_t D, int64_t Dv, int64_t P, int64_t F, int64_t C, int64_t pos0, T scale) {
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    std::vector<T> kt(D * F), qs(BLOCK * D), own_k(BLOCK * D), own_v(BLOCK * Dv), s(BLOCK * KEYS),
        acc(BLOCK * Dv), m(BLOCK), l(BLOCK), zeros(std::max(D, Dv));
    std::vector<int64_t> vis(BLOCK);
    for (int64_t bh = begin; bh < stop; ++bh) {
      T* fk = fin_k + bh * F * D;
      T* fv = fin_v + bh * F * Dv;
      for (int64_t j = 0; j < P; ++j)  // the past finals as the columns of kt (the scores' B operand)
        for (int64_t d = 0; d < D; ++d) kt[d * F + j] = fk[j * D + d];
      int64_t nf = P;
      const T* rk = carry_k + bh * D;  // the running summary before the row being scanned
      const T* rv = carry_v + bh * Dv;
      for (int64_t t0 = 0; t0 < L; t0 += BLOCK) {
        const int64_t rows = std::min(BLOCK, L - t0);
        for (int64_t r = 0; r < rows; ++r) {  // scan
          const int64_t t = t0 + r, p = pos0 + t;
          const bool first = p % C == 0;
          const T* kp = k + (bh * L + t) * D;
          const T* vp = v + (bh * L + t) * Dv;
          const T* gkp = gk + (bh * L + t) * gk_cols;
          const T* gvp = gv + (bh * L + t) * gv_cols;
          T* ok = own_k.data() + r * D;
          T* ov = own_v.data() + r * Dv;
          recur(first ? zeros.data() : rk, kp, gkp, gk_cols > 1, ok, D);
          recur(first ? zeros.data() : rv, vp, gvp, gv_cols > 1, ov, Dv);
          rk = ok;
          rv = ov;
          vis[r] = nf;
          if (p % C == C - 1) {  // a chunk ends: its final summary joins the finals
            std::copy(ok, ok + D, fk + nf * D);
            std::copy(ov, ov + Dv, fv + nf * Dv);
            for (int64_t d = 0; d < D; ++d) kt[d * F + nf] = ok[d];
            ++nf;
          }
        }
        const T* qp = q + (bh * L + t0) * D;
        for (int64_t r = 0; r < rows; ++r) {  // the own summary opens each row's softmax
          T dot = 0;
          for (int64_t d = 0; d < D; ++d) {
            qs[r * D + d] = qp[r * D + d] * scale;
            dot += qs[r * D + d] * own_k[r * D + d];
          }
          m[r] = dot;
          l[r] = 1;
          std::copy(own_v.data() + r * Dv, own_v.data() + (r + 1) * Dv, acc.data() + r * Dv);
        }
        const int64_t keys = vis[rows - 1];
        for (int64_t a = 0; a < keys; a += KEYS) {
          const int64_t n = std::min(KEYS, keys - a);
          attnlab::gemm(rows, n, D, qs.data(), D, kt.data() + a, F, false, s.data(), n);
          for (int64_t r = 0; r < rows; ++r) {
            T* sr = s.data() + r * n;
            const int64_t e = std::clamp<int64_t>(vis[r] - a, 0, n);
            T mx = m[r];
            for (int64_t j = 0; j < e; ++j) mx = std::max(mx, sr[j]);
            const T alpha = std::exp(m[r] - mx);
            T sum = 0;
            for (int64_t j = 0; j < e; ++j) {
              const T pj = std::exp(sr[j] - mx);
              sr[j] = pj;
              sum += pj;
            }
            std::fill(sr + e, sr + n, T(0));
            l[r] = l[r] * alpha + sum;
            m[r] = mx;
            if (alpha != T(1))
              for (int64_t d = 0; d < Dv; ++d) acc[r * Dv + d] *= alpha;
          }
          attnlab::gemm(rows, Dv, n, s.data(), n, fv + a * Dv, Dv, true, acc.data(), Dv);
        }
        T* op = out + (bh * L + t0) * Dv;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t d = 0; d < Dv; ++d) op[r * Dv + d] = acc[r * Dv + d] / l[r];
        // the running summary moves to the next block with the last row
        std::copy(own_k.data() + (rows - 1) * D, own_k.data() + rows * D, last_k + bh * D);
        std::copy(own_v.data() + (rows - 1) * Dv, own_v.data() + rows * Dv, last_v + bh * Dv);
        rk = last_k + bh * D;
        rv = last_v + bh * Dv;
      }
    }
    attnlab::gemm_done();
  });
}

// gk (B, H, L, 1 | D) and gv (B, H, L, 1 | Dv) of k's dtype, as both entry points take them.
void check_gates(const torch::Tensor& gk, const torch::Tensor& gv, const torch::Tensor& k, int64_t Dv) {
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3);
  for (const auto* g : {&gk, &gv})
    TORCH_CHECK(g->dim() == 4 && g->size(0) == B && g->size(1) == H && g->size(2) == L &&
                    (g->size(3) == 1 || g->size(3) == (g == &gk ? D : Dv)) && g->scalar_type() == k.scalar_type(),
                "gk must be (B, H, L, 1 | D) and gv (B, H, L, 1 | Dv), of k's dtype");
}

}  // namespace

// The final summary of every chunk (the last one may be shorter): k (B, H, L, D), v (B, H, L, Dv), gates as
// rat_chunks'. Returns (finals_k (B, H, ceil(L / C), D), finals_v (B, H, ceil(L / C), Dv)).
std::vector<torch::Tensor> rat_finals(torch::Tensor k, torch::Tensor v, torch::Tensor gk, torch::Tensor gv,
                                      int64_t chunk) {
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && chunk > 0, "k (B, H, L, D), v (B, H, L, Dv); chunk positive");
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3), Dv = v.size(3);
  TORCH_CHECK(L > 0 && v.size(0) == B && v.size(1) == H && v.size(2) == L && v.scalar_type() == k.scalar_type(),
              "v must be (B, H, L, Dv) of k's dtype");
  check_gates(gk, gv, k, Dv);
  k = k.contiguous();
  v = v.contiguous();
  gk = gk.contiguous();
  gv = gv.contiguous();
  const int64_t n = (L + chunk - 1) / chunk;
  auto fk = torch::empty({B, H, n, D}, k.options());
  auto fv = torch::empty({B, H, n, Dv}, k.options());
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "rat_finals", [&] {
    using T = scalar_t;
    const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *gkp = gk.data_ptr<T>(), *gvp = gv.data_ptr<T>();
    T *fkp = fk.data_ptr<T>(), *fvp = fv.data_ptr<T>();
    const int64_t ck = gk.size(3), cv = gv.size(3);
    at::parallel_for(0, B * H * n, 1, [&](int64_t begin, int64_t stop) {
      const std::vector<T> zeros(std::max(D, Dv));
      for (int64_t item = begin; item < stop; ++item) {  // one chunk of one (batch, head)
        const int64_t bh = item / n, c0 = (item % n) * chunk, e = std::min(L, c0 + chunk);
        T* ok = fkp + item * D;
        T* ov = fvp + item * Dv;
        for (int64_t t = c0; t < e; ++t) {
          const int64_t row = bh * L + t;
          recur(t == c0 ? zeros.data() : ok, kp + row * D, gkp + row * ck, ck > 1, ok, D);
          recur(t == c0 ? zeros.data() : ov, vp + row * Dv, gvp + row * cv, cv > 1, ov, Dv);
        }
      }
    });
  });
  return {fk, fv};
}

// q, k: (B, H, L, D); v: (B, H, L, Dv); gk: (B, H, L, 1 | D), gv: (B, H, L, 1 | Dv) forget gates;
// past_k: (B, H, P, D), past_v: (B, H, P, Dv) the finished chunks' final summaries before the segment,
// whose first token sits at absolute position pos0; carry_k (B, H, D), carry_v (B, H, Dv) the running
// summary when pos0 is inside a chunk. Returns (out (B, H, L, Dv), finals_k (B, H, P + E, D),
// finals_v (B, H, P + E, Dv), last_k (B, H, D), last_v (B, H, Dv)): E = chunks that end in the segment,
// last = the running summary after its last token.
std::vector<torch::Tensor> rat_chunks(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor gk,
                                      torch::Tensor gv, torch::Tensor past_k, torch::Tensor past_v,
                                      torch::Tensor carry_k, torch::Tensor carry_v, int64_t chunk, int64_t pos0,
                                      double scale) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4, "q, k must be (B, H, L, D), v (B, H, L, Dv)");
  TORCH_CHECK(chunk > 0 && pos0 >= 0, "chunk must be positive and pos0 non-negative");
  const auto dt = q.scalar_type();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Dv = v.size(3), P = past_k.size(2);
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == L, "v must be (B, H, L, Dv)");
  for (const auto* x : {&k, &v, &past_k, &past_v, &carry_k, &carry_v})
    TORCH_CHECK(x->scalar_type() == dt, "every tensor must have q's dtype");
  check_gates(gk, gv, k, Dv);
  TORCH_CHECK(past_k.dim() == 4 && past_k.size(0) == B && past_k.size(1) == H && past_k.size(3) == D &&
                  past_v.dim() == 4 && past_v.size(0) == B && past_v.size(1) == H && past_v.size(2) == P &&
                  past_v.size(3) == Dv, "past_k must be (B, H, P, D) and past_v (B, H, P, Dv)");
  TORCH_CHECK(carry_k.numel() == B * H * D && carry_v.numel() == B * H * Dv, "carry_k (B, H, D), carry_v (B, H, Dv)");
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  gk = gk.contiguous();
  gv = gv.contiguous();
  carry_k = carry_k.contiguous();
  carry_v = carry_v.contiguous();
  const int64_t E = (pos0 % chunk + L) / chunk, F = P + E;
  auto fin_k = torch::empty({B, H, F, D}, q.options());
  auto fin_v = torch::empty({B, H, F, Dv}, q.options());
  fin_k.narrow(2, 0, P).copy_(past_k);
  fin_v.narrow(2, 0, P).copy_(past_v);
  auto last_k = torch::empty({B, H, D}, q.options());
  auto last_v = torch::empty({B, H, Dv}, q.options());
  auto out = torch::empty({B, H, L, Dv}, q.options());
  if (L == 0) return {out, fin_k, fin_v, carry_k.clone(), carry_v.clone()};
  AT_DISPATCH_FLOATING_TYPES(dt, "rat_chunks", [&] {
    using T = scalar_t;
    walk<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), gk.data_ptr<T>(), gk.size(3), gv.data_ptr<T>(),
            gv.size(3), carry_k.data_ptr<T>(), carry_v.data_ptr<T>(), fin_k.data_ptr<T>(), fin_v.data_ptr<T>(),
            last_k.data_ptr<T>(), last_v.data_ptr<T>(), out.data_ptr<T>(), B * H, L, D, Dv, P, F, chunk, pos0,
            static_cast<T>(scale));
  });
  return {out, fin_k, fin_v, last_k, last_v};
}
