// Exact attention where every query sees one contiguous range of keys, or a few disjoint ones (CPU,
// forward and backward).
//
// out[b, h, i] = softmax_j(scale * q_i . k_j) v_j  over  j in [start[i][r], end[i][r]), r < R
//
// The ranges are shared by every batch and head. One range covers sliding windows (causal or not),
// 1-D neighborhood attention with clamped borders, causal, prefix-LM and packed documents; two
// cover attention sinks plus a window (StreamingLLM). Queries are taken in blocks of `block_q`
// rows; for each r a block visits the union of its rows' r-th ranges,
// `chunk` keys at a time (online softmax, as in FlashAttention), with two GEMMs per chunk (scores,
// then probabilities times values) and the exponentials computed only inside each row's own
// range. Work items (batch, head, query block) run in parallel on torch's thread pool.
//
// Returns (out, lse): lse = -inf and out = 0 for a row with an empty range.
#include "native.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// [lo, hi): the keys a block's rows' ranges cover together (st, en: the rows' bounds, stride R);
// lo >= hi when every range is empty.
inline std::pair<int64_t, int64_t> covered(const int64_t* st, const int64_t* en, int64_t rows, int64_t R,
                                           int64_t Lk) {
  int64_t lo = Lk, hi = 0;
  for (int64_t r = 0; r < rows; ++r)
    if (st[r * R] < en[r * R]) {
      lo = std::min(lo, st[r * R]);
      hi = std::max(hi, en[r * R]);
    }
  return {lo, hi};
}

template <typename T>
void forward(const T* q, const T* k, const T* v, const int64_t* start, const int64_t* end, T* out,
             T* lse, int64_t B, int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t Dv,
             int64_t R, T scale, int64_t block_q, int64_t chunk) {
  const int64_t nq = (Lq + block_q - 1) / block_q;
  const int64_t group = H / Hkv;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, B * H * nq, 1, [&](int64_t begin, int64_t stop) {
    attnlab::Buffer<T> s(block_q * chunk), kt(D * chunk), qs(block_q * D), acc(block_q * Dv), m(block_q), l(block_q);
    for (int64_t item = begin; item < stop; ++item) {
      const int64_t qb = item % nq, bh = item / nq, b = bh / H, h = bh % H;
      const int64_t i0 = qb * block_q, rows = std::min(block_q, Lq - i0);
      const T* qp = q + (bh * Lq + i0) * D;
      const int64_t kvh = b * Hkv + h / group;
      const T* kp = k + kvh * Lk * D;
      const T* vp = v + kvh * Lk * Dv;
      for (int64_t x = 0; x < rows * D; ++x) qs[x] = qp[x] * scale;
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), T(0));
      for (int64_t rr = 0; rr < R; ++rr) {  // each row's rr-th range: one online-softmax sweep
        const int64_t* st = start + i0 * R + rr;
        const int64_t* en = end + i0 * R + rr;
        const auto [lo, hi] = covered(st, en, rows, R, Lk);
        for (int64_t c0 = lo; c0 < hi; c0 += chunk) {
          const int64_t n = std::min(chunk, hi - c0);
          attnlab::transpose(kp + c0 * D, n, D, kt.data(), n);
          attnlab::gemm(rows, n, D, qs.data(), D, kt.data(), n, false, s.data(), n);
          for (int64_t r = 0; r < rows; ++r) {
            T* sr = s.data() + r * n;
            const int64_t a = std::max<int64_t>(st[r * R] - c0, 0);
            const int64_t e = std::min<int64_t>(en[r * R] - c0, n);
            if (a >= e) {
              std::fill(sr, sr + n, T(0));
              continue;
            }
            T mx = m[r];
            for (int64_t j = a; j < e; ++j) mx = std::max(mx, sr[j]);
            const T alpha = std::exp(m[r] - mx);  // 0 on the row's first chunk (m = -inf)
            T sum = 0;
            for (int64_t j = a; j < e; ++j) {
              const T p = std::exp(sr[j] - mx);
              sr[j] = p;
              sum += p;
            }
            std::fill(sr, sr + a, T(0));
            std::fill(sr + e, sr + n, T(0));
            l[r] = l[r] * alpha + sum;
            m[r] = mx;
            if (alpha != T(1)) {
              T* ar = acc.data() + r * Dv;
              for (int64_t d = 0; d < Dv; ++d) ar[d] *= alpha;
            }
          }
          attnlab::gemm(rows, Dv, n, s.data(), n, vp + c0 * Dv, Dv, true, acc.data(), Dv);
        }
      }
      T* op = out + (bh * Lq + i0) * Dv;
      T* lp = lse + bh * Lq + i0;
      for (int64_t r = 0; r < rows; ++r) {
        const T inv = l[r] > 0 ? T(1) / l[r] : T(0);
        for (int64_t d = 0; d < Dv; ++d) op[r * Dv + d] = acc[r * Dv + d] * inv;
        lp[r] = l[r] > 0 ? m[r] + std::log(l[r]) : neg_inf;
      }
    }
    attnlab::gemm_done();
  });
}

// The gradients of forward's output (and lse): FlashAttention-2's backward over the same ranges.
// With P = exp(scale q.k - lse) inside each row's ranges and Drow = sum(dO * O) - dlse per row,
//   dV += P^T dO,   dS = P * (dO V^T - Drow),   dQ += scale dS K,   dK += scale dS^T Q.
// One work item per (batch, query head) walks its query blocks and the same key chunks as the
// forward; dK and dV are per query head (the caller sums a GQA group's).
template <typename T>
void backward(const T* q, const T* k, const T* v, const int64_t* start, const int64_t* end, const T* out,
              const T* lse, const T* dout, const T* dlse, T* dq, T* dk, T* dv, int64_t B, int64_t H, int64_t Hkv,
              int64_t Lq, int64_t Lk, int64_t D, int64_t Dv, int64_t R, T scale, int64_t block_q, int64_t chunk) {
  const int64_t nq = (Lq + block_q - 1) / block_q;
  const int64_t group = H / Hkv;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t stop) {
    attnlab::Buffer<T> s(block_q * chunk), ds(block_q * chunk), tr(chunk * std::max(block_q, std::max(D, Dv))),
        qs(block_q * D), dqa(block_q * D), drow(block_q);
    for (int64_t bh = begin; bh < stop; ++bh) {
      const int64_t b = bh / H, h = bh % H, kvh = b * Hkv + h / group;
      const T* kp = k + kvh * Lk * D;
      const T* vp = v + kvh * Lk * Dv;
      T* dkp = dk + bh * Lk * D;
      T* dvp = dv + bh * Lk * Dv;
      std::fill(dkp, dkp + Lk * D, T(0));
      std::fill(dvp, dvp + Lk * Dv, T(0));
      for (int64_t qb = 0; qb < nq; ++qb) {
        const int64_t i0 = qb * block_q, rows = std::min(block_q, Lq - i0);
        const T* qp = q + (bh * Lq + i0) * D;
        const T* op = out + (bh * Lq + i0) * Dv;
        const T* gp = dout + (bh * Lq + i0) * Dv;
        const T* lp = lse + bh * Lq + i0;
        for (int64_t x = 0; x < rows * D; ++x) qs[x] = qp[x] * scale;
        for (int64_t r = 0; r < rows; ++r) {
          T acc = dlse ? -dlse[bh * Lq + i0 + r] : T(0);
          for (int64_t d = 0; d < Dv; ++d) acc += gp[r * Dv + d] * op[r * Dv + d];
          drow[r] = acc;
        }
        std::fill(dqa.begin(), dqa.begin() + rows * D, T(0));
        for (int64_t rr = 0; rr < R; ++rr) {
          const int64_t* st = start + i0 * R + rr;
          const int64_t* en = end + i0 * R + rr;
          const auto [lo, hi] = covered(st, en, rows, R, Lk);
          for (int64_t c0 = lo; c0 < hi; c0 += chunk) {
            const int64_t n = std::min(chunk, hi - c0);
            attnlab::transpose(kp + c0 * D, n, D, tr.data(), n);
            attnlab::gemm(rows, n, D, qs.data(), D, tr.data(), n, false, s.data(), n);  // scores
            attnlab::transpose(vp + c0 * Dv, n, Dv, tr.data(), n);
            attnlab::gemm(rows, n, Dv, gp, Dv, tr.data(), n, false, ds.data(), n);  // dO V^T
            for (int64_t r = 0; r < rows; ++r) {  // P, and dS = P (dO V^T - Drow), inside the row's range
              T* sr = s.data() + r * n;
              T* dr = ds.data() + r * n;
              const int64_t a = std::max<int64_t>(st[r * R] - c0, 0);
              const int64_t e = std::min<int64_t>(en[r * R] - c0, n);
              for (int64_t j = a; j < e; ++j) {
                sr[j] = std::exp(sr[j] - lp[r]);
                dr[j] = sr[j] * (dr[j] - drow[r]);
              }
              if (a >= e) {
                std::fill(sr, sr + n, T(0));
                std::fill(dr, dr + n, T(0));
                continue;
              }
              std::fill(sr, sr + a, T(0));
              std::fill(sr + e, sr + n, T(0));
              std::fill(dr, dr + a, T(0));
              std::fill(dr + e, dr + n, T(0));
            }
            attnlab::gemm(rows, D, n, ds.data(), n, kp + c0 * D, D, true, dqa.data(), D);  // dQ (unscaled)
            attnlab::transpose(s.data(), rows, n, tr.data(), rows);
            attnlab::gemm(n, Dv, rows, tr.data(), rows, gp, Dv, true, dvp + c0 * Dv, Dv);  // dV += P^T dO
            attnlab::transpose(ds.data(), rows, n, tr.data(), rows);
            attnlab::gemm(n, D, rows, tr.data(), rows, qs.data(), D, true, dkp + c0 * D, D);  // dK += dS^T (scale Q)
          }
        }
        T* dqp = dq + (bh * Lq + i0) * D;
        for (int64_t x = 0; x < rows * D; ++x) dqp[x] = dqa[x] * scale;
      }
    }
    attnlab::gemm_done();
  });
}

}  // namespace

namespace {

// The sizes of a range_attention call, after checking q, k, v and the ranges (made contiguous, the
// ranges int64).
struct Sizes {
  int64_t B, H, Hkv, Lq, Lk, D, Dv, R;
};

Sizes checked(torch::Tensor& q, torch::Tensor& k, torch::Tensor& v, torch::Tensor& start, torch::Tensor& end) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, L, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  start = start.to(torch::kInt64).contiguous();
  end = end.to(torch::kInt64).contiguous();
  const Sizes n{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3),
                start.dim() == 2 ? start.size(1) : 1};
  TORCH_CHECK(start.size(0) == n.Lq && start.sizes() == end.sizes() && start.dim() <= 2 && n.R >= 1,
              "start/end must be (Lq,) or (Lq, R): R ranges per query");
  TORCH_CHECK(k.size(0) == n.B && v.size(0) == n.B && v.size(1) == n.Hkv && v.size(2) == n.Lk && k.size(3) == n.D,
              "k, v shapes do not match q");
  TORCH_CHECK(n.Hkv > 0 && n.H % n.Hkv == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(start.ge(0).all().item<bool>() && end.le(n.Lk).all().item<bool>(), "ranges must lie in [0, Lk]");
  return n;
}

}  // namespace

std::vector<torch::Tensor> range_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor start,
                                           torch::Tensor end, double scale, int64_t block_q, int64_t chunk) {
  const Sizes n = checked(q, k, v, start, end);
  const int64_t B = n.B, H = n.H, Hkv = n.Hkv, Lq = n.Lq, Lk = n.Lk, D = n.D, Dv = n.Dv, R = n.R;
  TORCH_CHECK(block_q > 0 && chunk > 0, "block_q and chunk must be positive");
  auto out = torch::empty({B, H, Lq, Dv}, q.options());
  auto lse = torch::empty({B, H, Lq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "range_attention", [&] {
    forward<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                      start.data_ptr<int64_t>(), end.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                      lse.data_ptr<scalar_t>(), B, H, Hkv, Lq, Lk, D, Dv, R, static_cast<scalar_t>(scale),
                      block_q, chunk);
  });
  return {out, lse};
}

// The gradients (dq, dk, dv) of range_attention's (out, lse) for dout and dlse (undefined: zero);
// dk, dv per query head (B, H, Lk, D|Dv): the caller sums each GQA group's.
std::vector<torch::Tensor> range_attention_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                    torch::Tensor start, torch::Tensor end, torch::Tensor out,
                                                    torch::Tensor lse, torch::Tensor dout,
                                                    c10::optional<torch::Tensor> dlse, double scale, int64_t block_q,
                                                    int64_t chunk) {
  const Sizes n = checked(q, k, v, start, end);
  const int64_t B = n.B, H = n.H, Hkv = n.Hkv, Lq = n.Lq, Lk = n.Lk, D = n.D, Dv = n.Dv, R = n.R;
  const auto dt = q.scalar_type();
  TORCH_CHECK(out.scalar_type() == dt && lse.scalar_type() == dt && dout.scalar_type() == dt,
              "out, lse, dout dtypes differ from q's");
  out = out.contiguous();
  lse = lse.contiguous();
  dout = dout.contiguous();
  TORCH_CHECK(out.size(0) == B && out.size(1) == H && out.size(2) == Lq && out.size(3) == Dv &&
                  dout.sizes() == out.sizes(), "out and dout must be (B, H, Lq, Dv)");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == Lq, "lse must be (B, H, Lq)");
  TORCH_CHECK(block_q > 0 && chunk > 0, "block_q and chunk must be positive");
  torch::Tensor gl;
  if (dlse.has_value() && dlse->defined()) {
    TORCH_CHECK(dlse->sizes() == lse.sizes() && dlse->scalar_type() == dt, "dlse must be like lse");
    gl = dlse->contiguous();
  }
  auto dq = torch::empty_like(q);
  auto dk = torch::empty({B, H, Lk, D}, q.options()), dv = torch::empty({B, H, Lk, Dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "range_attention_backward", [&] {
    using T = scalar_t;
    backward<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), start.data_ptr<int64_t>(), end.data_ptr<int64_t>(),
                out.data_ptr<T>(), lse.data_ptr<T>(), dout.data_ptr<T>(), gl.defined() ? gl.data_ptr<T>() : nullptr,
                dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(), B, H, Hkv, Lq, Lk, D, Dv, R,
                static_cast<T>(scale), block_q, chunk);
  });
  return {dq, dk, dv};
}
