// RAT's causal chunked form (CPU, forward and backward): attnlab/entries/rat.py's mathematics fused so
// that each (batch, head) walks its tokens once, in blocks of BLOCK rows, without the summaries of every
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

// h_new = g h + (1 - g) x over n channels, one gate for all or one per channel; h null: a chunk's first
// row (h = 0).
template <typename T>
void recur(const T* h, const T* x, const T* g, bool per_channel, T* out, int64_t n) {
  if (!h) {
    for (int64_t d = 0; d < n; ++d) out[d] = (1 - g[per_channel ? d : 0]) * x[d];
  } else if (per_channel) {
    for (int64_t d = 0; d < n; ++d) out[d] = g[d] * h[d] + (1 - g[d]) * x[d];
  } else {
    const T a = g[0], b = 1 - g[0];
    for (int64_t d = 0; d < n; ++d) out[d] = a * h[d] + b * x[d];
  }
}

// Every row's running summary h_t (L x n) of one (batch, head): the forward's scan, from `carry` when the
// segment starts inside a chunk.
template <typename T>
void summaries(const T* x, const T* g, int64_t gcols, const T* carry, T* h, int64_t L, int64_t n, int64_t C,
               int64_t pos0) {
  for (int64_t t = 0; t < L; ++t) {
    const T* before = (pos0 + t) % C == 0 ? nullptr : t ? h + (t - 1) * n : carry;
    recur(before, x + t * n, g + t * gcols, gcols > 1, h + t * n, n);
  }
}

template <typename T>
void walk(const T* q, const T* k, const T* v, const T* gk, int64_t gk_cols, const T* gv, int64_t gv_cols,
          const T* carry_k, const T* carry_v, T* fin_k, T* fin_v, T* last_k, T* last_v, T* out, T* lse, int64_t BH,
          int64_t L, int64_t D, int64_t Dv, int64_t P, int64_t F, int64_t C, int64_t pos0, T scale) {
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    attnlab::Buffer<T> kt(D * F), qs(BLOCK * D), own_k(BLOCK * D), own_v(BLOCK * Dv), s(BLOCK * KEYS),
        acc(BLOCK * Dv), m(BLOCK), l(BLOCK);
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
        if (t0 + BLOCK < L) {  // the next block's rows on their way while this one works
          const int64_t ahead = std::min(BLOCK, L - t0 - BLOCK), row = bh * L + t0 + BLOCK;
          for (int64_t x = 0; x < ahead * D; x += 64 / sizeof(T)) {  // one prefetch per cache line
            __builtin_prefetch(q + row * D + x);
            __builtin_prefetch(k + row * D + x);
          }
          for (int64_t x = 0; x < ahead * Dv; x += 64 / sizeof(T)) __builtin_prefetch(v + row * Dv + x);
        }
        const int64_t row0 = bh * L + t0;  // scan
        summaries(k + row0 * D, gk + row0 * gk_cols, gk_cols, rk, own_k.data(), rows, D, C, pos0 + t0);
        summaries(v + row0 * Dv, gv + row0 * gv_cols, gv_cols, rv, own_v.data(), rows, Dv, C, pos0 + t0);
        for (int64_t r = 0; r < rows; ++r) {
          const T* ok = own_k.data() + r * D;
          const T* ov = own_v.data() + r * Dv;
          vis[r] = nf;
          if ((pos0 + t0 + r) % C == C - 1) {  // a chunk ends: its final summary joins the finals
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
        if (lse)
          for (int64_t r = 0; r < rows; ++r) lse[bh * L + t0 + r] = m[r] + std::log(l[r]);
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

// The recurrence h_t = g_t h_{t-1} + (1 - g_t) x_t read backwards inside each chunk: dh (L x n) is the
// summaries' gradient from everything that reads them; with a_t = dh_t + g_{t+1} a_{t+1} (a chunk's last
// row, and the segment's, start afresh): dx_t = (1 - g_t) a_t, dg_t = a_t (h_{t-1} - x_t) (summed over the
// channels for one gate per token) and, when the segment starts inside a chunk, dcarry = g_0 a_0 (dcarry
// null: not wanted).
template <typename T>
void recur_back(const T* x, const T* g, int64_t gcols, const T* h, const T* carry, const T* dh, T* dx, T* dg,
                T* dcarry, int64_t L, int64_t n, int64_t C, int64_t pos0) {
  attnlab::Buffer<T> a(n);
  const bool per_channel = gcols > 1;
  for (int64_t t = L - 1; t >= 0; --t) {
    const bool restart = t == L - 1 || (pos0 + t + 1) % C == 0;  // the next row starts a chunk, or is not here
    const T* gn = g + (t + 1) * gcols;
    for (int64_t d = 0; d < n; ++d) a[d] = dh[t * n + d] + (restart ? T(0) : gn[per_channel ? d : 0] * a[d]);
    const T* gt = g + t * gcols;
    const T* xt = x + t * n;
    const T* before = (pos0 + t) % C == 0 ? nullptr : t ? h + (t - 1) * n : carry;
    T sum = 0;
    for (int64_t d = 0; d < n; ++d) {
      const T gd = gt[per_channel ? d : 0], part = a[d] * ((before ? before[d] : T(0)) - xt[d]);
      dx[t * n + d] = (1 - gd) * a[d];
      if (per_channel)
        dg[t * n + d] = part;
      else
        sum += part;
    }
    if (!per_channel) dg[t] = sum;
  }
  if (dcarry)
    for (int64_t d = 0; d < n; ++d) dcarry[d] = pos0 % C ? g[per_channel ? d : 0] * a[d] : T(0);
}

// The backward of walk() for one segment: the summaries recomputed (the finals come from the forward), then
// per block of rows FlashAttention-2's backward over the visible finals plus the row's own summary
// (P = exp(s - lse), dS = P (dO.v - D), D = dO.o), the finals' gradients summed over the blocks, and the
// recurrences read backwards with every summary's gradient: its own row's, its chunk's final's (and the
// returned finals' and last summary's gradients).
template <typename T>
void walk_back(const T* q, const T* k, const T* v, const T* gk, int64_t gk_cols, const T* gv, int64_t gv_cols,
               const T* carry_k, const T* carry_v, const T* fin_k, const T* fin_v, const T* out, const T* lse,
               const T* dout, const T* d_fin_k, const T* d_fin_v, const T* d_last_k, const T* d_last_v, T* dq, T* dk,
               T* dv, T* dgk, T* dgv, T* d_past_k, T* d_past_v, T* d_carry_k, T* d_carry_v, int64_t BH, int64_t L,
               int64_t D, int64_t Dv, int64_t P, int64_t F, int64_t C, int64_t pos0, T scale) {
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t stop) {
    attnlab::Buffer<T> hk(L * D), hv(L * Dv), dhk(L * D), dhv(L * Dv), dfk(F * D), dfv(F * Dv), kt(D * F),
        qs(BLOCK * D), s(BLOCK * KEYS), dp(BLOCK * KEYS), st(KEYS * BLOCK), dqb(BLOCK * D), Dr(BLOCK);
    std::vector<int64_t> vis(BLOCK);
    for (int64_t bh = begin; bh < stop; ++bh) {
      const T* fk = fin_k + bh * F * D;
      const T* fv = fin_v + bh * F * Dv;
      attnlab::transpose(fk, F, D, kt.data(), F);
      summaries(k + bh * L * D, gk + bh * L * gk_cols, gk_cols, carry_k + bh * D, hk.data(), L, D, C, pos0);
      summaries(v + bh * L * Dv, gv + bh * L * gv_cols, gv_cols, carry_v + bh * Dv, hv.data(), L, Dv, C, pos0);
      for (int64_t x = 0; x < F * D; ++x) dfk[x] = d_fin_k[bh * F * D + x];  // the returned finals' gradients
      for (int64_t x = 0; x < F * Dv; ++x) dfv[x] = d_fin_v[bh * F * Dv + x];
      for (int64_t t0 = 0; t0 < L; t0 += BLOCK) {
        const int64_t rows = std::min(BLOCK, L - t0);
        const T* qp = q + (bh * L + t0) * D;
        const T* op = out + (bh * L + t0) * Dv;
        const T* dop = dout + (bh * L + t0) * Dv;
        const T* lp = lse + bh * L + t0;
        for (int64_t r = 0; r < rows; ++r) {  // the own summary: the row's first key
          const int64_t t = t0 + r;
          vis[r] = P + (pos0 + t) / C - pos0 / C;
          T dr = 0, sown = 0, dpown = 0;
          for (int64_t d = 0; d < Dv; ++d) {
            dr += dop[r * Dv + d] * op[r * Dv + d];
            dpown += dop[r * Dv + d] * hv[t * Dv + d];
          }
          for (int64_t d = 0; d < D; ++d) {
            qs[r * D + d] = qp[r * D + d] * scale;
            sown += qs[r * D + d] * hk[t * D + d];
          }
          Dr[r] = dr;
          const T pown = std::exp(sown - lp[r]), dsown = pown * (dpown - dr);
          for (int64_t d = 0; d < Dv; ++d) dhv[t * Dv + d] = pown * dop[r * Dv + d];
          for (int64_t d = 0; d < D; ++d) {
            dhk[t * D + d] = dsown * qs[r * D + d];
            dqb[r * D + d] = dsown * hk[t * D + d];
          }
        }
        const int64_t keys = vis[rows - 1];
        for (int64_t a = 0; a < keys; a += KEYS) {
          const int64_t n = std::min(KEYS, keys - a);
          attnlab::gemm(rows, n, D, qs.data(), D, kt.data() + a, F, false, s.data(), n);
          attnlab::blas_gemm(true, rows, n, Dv, dop, Dv, fv + a * Dv, Dv, dp.data(), n);  // dO . V_f^T
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t e = std::clamp<int64_t>(vis[r] - a, 0, n);
            T* sr = s.data() + r * n;
            T* dpr = dp.data() + r * n;
            for (int64_t j = 0; j < e; ++j) {
              sr[j] = std::exp(sr[j] - lp[r]);   // P
              dpr[j] = sr[j] * (dpr[j] - Dr[r]);  // dS
            }
            std::fill(sr + e, sr + n, T(0));
            std::fill(dpr + e, dpr + n, T(0));
          }
          attnlab::gemm(rows, D, n, dp.data(), n, fk + a * D, D, true, dqb.data(), D);  // dq += dS K_f
          attnlab::transpose(s.data(), rows, n, st.data(), rows);
          attnlab::gemm(n, Dv, rows, st.data(), rows, dop, Dv, true, dfv.data() + a * Dv, Dv);  // dV_f += P^T dO
          attnlab::transpose(dp.data(), rows, n, st.data(), rows);
          attnlab::gemm(n, D, rows, st.data(), rows, qs.data(), D, true, dfk.data() + a * D, D);  // dK_f += dS^T Qs
        }
        T* dqp = dq + (bh * L + t0) * D;
        for (int64_t x = 0; x < rows * D; ++x) dqp[x] = dqb[x] * scale;
      }
      for (int64_t t = 0; t < L; ++t) {  // a chunk's last row is its final: that key's gradient joins its own
        if ((pos0 + t) % C != C - 1) continue;
        const int64_t c = P + (pos0 + t) / C - pos0 / C;
        for (int64_t d = 0; d < D; ++d) dhk[t * D + d] += dfk[c * D + d];
        for (int64_t d = 0; d < Dv; ++d) dhv[t * Dv + d] += dfv[c * Dv + d];
      }
      for (int64_t d = 0; d < D; ++d) dhk[(L - 1) * D + d] += d_last_k[bh * D + d];
      for (int64_t d = 0; d < Dv; ++d) dhv[(L - 1) * Dv + d] += d_last_v[bh * Dv + d];
      std::copy(dfk.data(), dfk.data() + P * D, d_past_k + bh * P * D);
      std::copy(dfv.data(), dfv.data() + P * Dv, d_past_v + bh * P * Dv);
      recur_back(k + bh * L * D, gk + bh * L * gk_cols, gk_cols, hk.data(), carry_k + bh * D, dhk.data(),
                 dk + bh * L * D, dgk + bh * L * gk_cols, d_carry_k + bh * D, L, D, C, pos0);
      recur_back(v + bh * L * Dv, gv + bh * L * gv_cols, gv_cols, hv.data(), carry_v + bh * Dv, dhv.data(),
                 dv + bh * L * Dv, dgv + bh * L * gv_cols, d_carry_v + bh * Dv, L, Dv, C, pos0);
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
      for (int64_t item = begin; item < stop; ++item) {  // one chunk of one (batch, head)
        const int64_t bh = item / n, c0 = (item % n) * chunk, e = std::min(L, c0 + chunk);
        T* ok = fkp + item * D;
        T* ov = fvp + item * Dv;
        for (int64_t t = c0; t < e; ++t) {
          const int64_t row = bh * L + t;
          recur(t == c0 ? nullptr : ok, kp + row * D, gkp + row * ck, ck > 1, ok, D);
          recur(t == c0 ? nullptr : ov, vp + row * Dv, gvp + row * cv, cv > 1, ov, Dv);
        }
      }
    });
  });
  return {fk, fv};
}

// The gradients of rat_finals: its inputs and the finals' gradients d_fk (B, H, n, D), d_fv (B, H, n, Dv).
// Returns (dk, dv, dgk, dgv): each chunk's recurrence read backwards from its last row, one (batch, head,
// chunk) per work item.
std::vector<torch::Tensor> rat_finals_backward(torch::Tensor k, torch::Tensor v, torch::Tensor gk, torch::Tensor gv,
                                               int64_t chunk, torch::Tensor d_fk, torch::Tensor d_fv) {
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && chunk > 0, "k (B, H, L, D), v (B, H, L, Dv); chunk positive");
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3), Dv = v.size(3);
  const int64_t n = (L + chunk - 1) / chunk;
  TORCH_CHECK(L > 0 && v.size(0) == B && v.size(1) == H && v.size(2) == L && d_fk.numel() == B * H * n * D &&
                  d_fv.numel() == B * H * n * Dv,
              "v (B, H, L, Dv) and the finals' gradients (B, H, ceil(L / chunk), D|Dv)");
  check_gates(gk, gv, k, Dv);
  std::vector<torch::Tensor> in{k, v, gk, gv, d_fk, d_fv};
  for (auto& x : in) {
    TORCH_CHECK(x.scalar_type() == k.scalar_type(), "every tensor must have k's dtype");
    x = x.contiguous();
  }
  auto dk = torch::empty_like(in[0]), dv = torch::empty_like(in[1]);
  auto dgk = torch::empty_like(in[2]), dgv = torch::empty_like(in[3]);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "rat_finals_backward", [&] {
    using T = scalar_t;
    const int64_t ck = gk.size(3), cv = gv.size(3);
    at::parallel_for(0, B * H * n, 1, [&](int64_t begin, int64_t stop) {
      attnlab::Buffer<T> h(chunk * std::max(D, Dv)), dh(chunk * std::max(D, Dv));
      for (int64_t item = begin; item < stop; ++item) {  // one chunk of one (batch, head)
        const int64_t bh = item / n, c0 = (item % n) * chunk, m = std::min(L, c0 + chunk) - c0, row = bh * L + c0;
        for (int side = 0; side < 2; ++side) {
          const int64_t w = side ? Dv : D, cols = side ? cv : ck;
          const T* x = in[side].data_ptr<T>() + row * w;
          const T* g = in[2 + side].data_ptr<T>() + row * cols;
          const T* dfin = in[4 + side].data_ptr<T>() + item * w;
          summaries(x, g, cols, static_cast<const T*>(nullptr), h.data(), m, w, chunk, int64_t(0));
          std::fill(dh.begin(), dh.begin() + m * w, T(0));
          std::copy(dfin, dfin + w, dh.data() + (m - 1) * w);  // only the chunk's last row is read
          recur_back(x, g, cols, h.data(), static_cast<const T*>(nullptr), dh.data(),
                     (side ? dv : dk).data_ptr<T>() + row * w, (side ? dgv : dgk).data_ptr<T>() + row * cols,
                     static_cast<T*>(nullptr), m, w, chunk, int64_t(0));
        }
      }
    });
  });
  return {dk, dv, dgk, dgv};
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
                                      double scale, c10::optional<torch::Tensor> lse) {
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
  if (lse)
    TORCH_CHECK(lse->is_contiguous() && lse->scalar_type() == dt && lse->numel() == B * H * L,
                "lse must be a contiguous (B, H, L) tensor of q's dtype");
  if (L == 0) return {out, fin_k, fin_v, carry_k.clone(), carry_v.clone()};
  AT_DISPATCH_FLOATING_TYPES(dt, "rat_chunks", [&] {
    using T = scalar_t;
    walk<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), gk.data_ptr<T>(), gk.size(3), gv.data_ptr<T>(),
            gv.size(3), carry_k.data_ptr<T>(), carry_v.data_ptr<T>(), fin_k.data_ptr<T>(), fin_v.data_ptr<T>(),
            last_k.data_ptr<T>(), last_v.data_ptr<T>(), out.data_ptr<T>(), lse ? lse->data_ptr<T>() : nullptr, B * H,
            L, D, Dv, P, F, chunk, pos0, static_cast<T>(scale));
  });
  return {out, fin_k, fin_v, last_k, last_v};
}

// The gradients of rat_chunks (L > 0): its inputs, then what it returned (out, finals_k, finals_v) and its
// lse (B, H, L), then the gradients of out, finals_k, finals_v, last_k and last_v. Returns (dq, dk, dv, dgk,
// dgv, d_past_k, d_past_v, d_carry_k, d_carry_v), each shaped as its input (the gates' as the (B, H, L, 1|F)
// tensors given).
std::vector<torch::Tensor> rat_chunks_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor gk,
                                               torch::Tensor gv, torch::Tensor carry_k, torch::Tensor carry_v,
                                               int64_t past, int64_t chunk, int64_t pos0, double scale,
                                               torch::Tensor out, torch::Tensor fin_k, torch::Tensor fin_v,
                                               torch::Tensor lse, torch::Tensor dout, torch::Tensor d_fin_k,
                                               torch::Tensor d_fin_v, torch::Tensor d_last_k, torch::Tensor d_last_v) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4, "q, k must be (B, H, L, D), v (B, H, L, Dv)");
  const auto dt = q.scalar_type();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Dv = v.size(3), F = fin_k.size(2);
  TORCH_CHECK(L > 0 && chunk > 0 && pos0 >= 0 && past >= 0 && past <= F, "L, chunk positive; 0 <= past <= F");
  check_gates(gk, gv, k, Dv);
  TORCH_CHECK(out.sizes() == v.sizes() && dout.sizes() == v.sizes() && lse.numel() == B * H * L &&
                  fin_k.dim() == 4 && fin_k.size(3) == D && fin_v.numel() == B * H * F * Dv &&
                  d_fin_k.sizes() == fin_k.sizes() && d_fin_v.numel() == fin_v.numel() &&
                  carry_k.numel() == B * H * D && carry_v.numel() == B * H * Dv && d_last_k.numel() == B * H * D &&
                  d_last_v.numel() == B * H * Dv,
              "out, dout (B, H, L, Dv), lse (B, H, L), finals and their gradients (B, H, F, D|Dv), carry and last "
              "gradients (B, H, D|Dv)");
  std::vector<torch::Tensor> in{q, k, v, gk, gv, carry_k, carry_v, fin_k, fin_v, out, lse, dout, d_fin_k, d_fin_v,
                                d_last_k, d_last_v};
  for (auto& x : in) {
    TORCH_CHECK(x.scalar_type() == dt, "every tensor must have q's dtype");
    x = x.contiguous();
  }
  auto dq = torch::empty_like(in[0]), dk = torch::empty_like(in[1]), dv = torch::empty_like(in[2]);
  auto dgk = torch::empty_like(in[3]), dgv = torch::empty_like(in[4]);
  auto d_past_k = torch::empty({B, H, past, D}, q.options()), d_past_v = torch::empty({B, H, past, Dv}, q.options());
  auto d_carry_k = torch::empty({B, H, D}, q.options()), d_carry_v = torch::empty({B, H, Dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "rat_chunks_backward", [&] {
    using T = scalar_t;
    auto p = [&](int i) { return in[i].data_ptr<T>(); };
    walk_back<T>(p(0), p(1), p(2), p(3), gk.size(3), p(4), gv.size(3), p(5), p(6), p(7), p(8), p(9), p(10), p(11),
                 p(12), p(13), p(14), p(15), dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(), dgk.data_ptr<T>(),
                 dgv.data_ptr<T>(), d_past_k.data_ptr<T>(), d_past_v.data_ptr<T>(), d_carry_k.data_ptr<T>(),
                 d_carry_v.data_ptr<T>(), B * H, L, D, Dv, past, F, chunk, pos0, static_cast<T>(scale));
  });
  return {dq, dk, dv, dgk, dgv, d_past_k, d_past_v, d_carry_k, d_carry_v};
}
