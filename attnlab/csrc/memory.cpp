// Titans' neural memory, chunked form (CPU, forward): the mathematics of attnlab/memory.py's `chunk`,
// fused so that each (batch, head) pair walks its chunks with its MLP's weights W, their momentum S
// and the chunk-start weights G in cache (a few hundred KB per head), instead of every step passing
// over all heads' weights in memory.
//
// Per run of n <= C tokens sharing G (a chunk, or the partial chunks at the ends of a segment), with
// the run's coefficients (memory.coefficients: keep_w, keep_s, from_s (n), w_grad, s_grad (n x n)):
//   gradients at G:  Z_0 = K, P_l = Z_{l-1} G_{l-1}, Z_l = act(P_l); D_last = 2 (Z_last G_last - V),
//                    D_{l-1} = (D_l G_l^T) * act'(P_l)             (token j's gradient: Z_l[j]^T D_l[j])
//   retrieval:       x_0 = Q, a_l = [keep_w x_l | from_s x_l] [W_l; S_l] - ((x_l Z_l^T) * w_grad) D_l,
//                    x_{l+1} = act(a_l); the output is the last layer's a
//   update:          W_l <- keep_w[n-1] W_l + from_s[n-1] S_l - Z_l^T (w_grad[n-1] * D_l)
//                    S_l <- keep_s[n-1] S_l - Z_l^T (s_grad[n-1] * D_l)
// W_l and S_l of a layer are stacked ([W_l; S_l], (2 in) x out) so that the retrieval reads both in one
// GEMM. G is W itself for runs that start at a chunk boundary; a segment starting inside a chunk
// reads the given G for its first run, and when a segment ends inside a chunk that started in it,
// that chunk's start weights are copied into G (the state's chunk-start copy).
#include "native.h"
#include "simd.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using attnlab::LANES;

enum Activation { SILU = 0, GELU = 1, TANH = 2 };

template <typename V>
V abs_of(V a) {
  return a < 0 ? -a : a;
}

// Elementwise over `count` values: out = act(pre), or with `grad` out *= act'(pre). NaN stays NaN.
template <typename T>
void activate(int kind, const T* pre, T* out, int64_t count, bool grad) {
  using V = typename attnlab::Vec<T>::V;
  constexpr int N = LANES<T>;
  int64_t i = 0;
  if (kind != GELU) {  // silu and tanh through one exponential of a non-positive argument
    const T f = kind == SILU ? T(1) : T(2);
    auto lanes = [&](V a, V e, V o) {
      V r;
      if (kind == SILU) {  // s = sigmoid(a); silu = a s, silu' = s (1 + a (1 - s))
        const V s = a >= 0 ? T(1) / (T(1) + e) : e / (T(1) + e);
        r = grad ? o * (s * (T(1) + a * (T(1) - s))) : a * s;
      } else {  // tanh(|a|) = (1 - e) / (1 + e), e = exp(-2|a|); tanh' = 1 - tanh^2
        V t = (T(1) - e) / (T(1) + e);
        t = a >= 0 ? t : -t;
        r = grad ? o * (T(1) - t * t) : t;
      }
      return attnlab::keep_nan<T>(a, r);
    };
    for (; i + N <= count; i += N) {
      const V a = attnlab::load<T>(pre + i);
      const V o = grad ? attnlab::load<T>(out + i) : V{};
      attnlab::store<T>(out + i, lanes(a, attnlab::exp_nonpositive(-f * abs_of(a)), o));
    }
    if (i < count) {  // the tail through a padded vector
      V a{}, o{};
      for (int64_t j = i; j < count; ++j) a[j - i] = pre[j], o[j - i] = grad ? out[j] : T(0);
      const V r = lanes(a, attnlab::exp_nonpositive(-f * abs_of(a)), o);
      for (int64_t j = i; j < count; ++j) out[j] = r[j - i];
    }
    return;
  }
  const T rsqrt2 = T(0.70710678118654752440), rsqrt2pi = T(0.39894228040143267794);
  for (; i < count; ++i) {  // exact (erf) GELU: a Phi(a); its derivative Phi(a) + a phi(a)
    const T a = pre[i], cdf = T(0.5) * (1 + std::erf(a * rsqrt2));
    out[i] = grad ? out[i] * (cdf + a * rsqrt2pi * std::exp(T(-0.5) * a * a)) : a * cdf;
  }
}

struct Layers {
  std::vector<int64_t> in, out;  // (in, out) of every layer
  int64_t depth() const { return static_cast<int64_t>(in.size()); }
};

// Coefficients of run r for (batch b, head h): pointers into (Bc, Hc, R, C[, C]) tensors (R = 1: one set
// for every run, as with constant rates, where a shorter run's are the leading rows and columns).
template <typename T>
struct Coef {
  const T *keep_w, *keep_s, *from_s, *w_grad, *s_grad;
  int64_t Bc, Hc, R, C;  // R: runs or 1
  const T* at(const T* base, int64_t b, int64_t h, int64_t r, int64_t size) const {
    return base + (((Bc == 1 ? 0 : b) * Hc + (Hc == 1 ? 0 : h)) * R + (R == 1 ? 0 : r)) * size;
  }
};

template <typename T>
void walk(const T* q, const T* k, const T* v, const std::vector<T*>& WS, const std::vector<T*>& G, const Coef<T>& co,
          const Layers& dims, T* out, int64_t B, int64_t H, int64_t L, int64_t C, int64_t pos0, int kind) {
  const int64_t d = dims.depth(), D = dims.in[0], Dv = dims.out[d - 1];
  int64_t widest = 0;
  for (int64_t l = 0; l < d; ++l) widest = std::max({widest, dims.in[l], dims.out[l]});
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t stop) {
    // per layer: Z (inputs), P (pre-activations of layers >= 1), Dl (errors); x2 ([keep_w x | from_s x]),
    // pre and y (a retrieval layer's pre-activation and activation), s (n x n), zt (-Z^T), dw and ds
    // (the errors weighted for the W and S updates): scratch for one layer at a time
    std::vector<attnlab::Buffer<T>> Z(d), P(d), Dl(d);
    for (int64_t l = 0; l < d; ++l) {
      Z[l].resize(C * dims.in[l]);
      if (l) P[l].resize(C * dims.in[l]);
      Dl[l].resize(C * dims.out[l]);
    }
    attnlab::Buffer<T> x2(C * 2 * widest), pre(C * widest), y(C * widest), s(C * C), zt(C * widest), dw(C * widest),
        ds(C * widest);
    for (int64_t bh = begin; bh < stop; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      std::vector<T*> W(d), S(d), Gh(d);
      for (int64_t l = 0; l < d; ++l) {
        const int64_t size = dims.in[l] * dims.out[l];
        W[l] = WS[l] + bh * 2 * size;
        S[l] = W[l] + size;
        Gh[l] = G.empty() ? nullptr : G[l] + bh * size;
      }
      bool g_is_w = pos0 % C == 0;
      int64_t t0 = 0;
      for (int64_t r = 0; t0 < L; ++r) {
        const int64_t n = std::min(L - t0, C - (pos0 + t0) % C);
        const bool ends_chunk = (pos0 + t0 + n) % C == 0;
        const std::vector<T*>& g = g_is_w ? W : Gh;
        const T* kr = k + (bh * L + t0) * D;
        const T* vr = v + (bh * L + t0) * Dv;
        // gradients at g
        for (int64_t l = 0; l < d; ++l) {
          const int64_t a = dims.in[l], o = dims.out[l];
          const T* zin = kr;
          if (l) {
            activate(kind, P[l].data(), Z[l].data(), n * a, false);
            zin = Z[l].data();
          } else {
            std::copy(kr, kr + n * a, Z[0].data());
          }
          T* dst = l + 1 < d ? P[l + 1].data() : Dl[d - 1].data();
          attnlab::gemm(n, o, a, zin, a, g[l], o, false, dst, o);
        }
        for (int64_t i = 0; i < n * Dv; ++i) Dl[d - 1][i] = 2 * (Dl[d - 1][i] - vr[i]);
        for (int64_t l = d - 1; l > 0; --l) {
          const int64_t a = dims.in[l], o = dims.out[l];
          attnlab::blas_gemm(true, n, a, o, Dl[l].data(), o, g[l], o, Dl[l - 1].data(), a);
          activate(kind, P[l].data(), Dl[l - 1].data(), n * a, true);
        }
        // retrieval
        const T* kw = co.at(co.keep_w, b, h, r, C);
        const T* ks = co.at(co.keep_s, b, h, r, C);
        const T* fs = co.at(co.from_s, b, h, r, C);
        const T* wg = co.at(co.w_grad, b, h, r, C * C);
        const T* sg = co.at(co.s_grad, b, h, r, C * C);
        const T* xin = q + (bh * L + t0) * D;
        for (int64_t l = 0; l < d; ++l) {
          const int64_t a = dims.in[l], o = dims.out[l];
          for (int64_t t = 0; t < n; ++t)
            for (int64_t i = 0; i < a; ++i) {
              x2[t * 2 * a + i] = kw[t] * xin[t * a + i];
              x2[t * 2 * a + a + i] = fs[t] * xin[t * a + i];
            }
          attnlab::blas_gemm(true, n, n, a, xin, a, Z[l].data(), a, s.data(), n);
          for (int64_t t = 0; t < n; ++t)
            for (int64_t j = 0; j < n; ++j) s[t * n + j] = j <= t ? -s[t * n + j] * wg[t * C + j] : T(0);
          T* dst = l + 1 < d ? pre.data() : out + (bh * L + t0) * Dv;
          attnlab::gemm(n, o, 2 * a, x2.data(), 2 * a, W[l], o, false, dst, o);
          attnlab::gemm(n, o, n, s.data(), n, Dl[l].data(), o, true, dst, o);
          if (l + 1 < d) {
            activate(kind, dst, y.data(), n * o, false);
            xin = y.data();
          }
        }
        // the chunk-start weights of a chunk this segment will not finish
        if (!ends_chunk && g_is_w && !G.empty())
          for (int64_t l = 0; l < d; ++l) std::copy(W[l], W[l] + dims.in[l] * dims.out[l], Gh[l]);
        // update: W <- keep_w W + from_s S - Z^T (w_grad * D), S <- keep_s S - Z^T (s_grad * D)
        const T kwn = kw[n - 1], ksn = ks[n - 1], fsn = fs[n - 1];
        for (int64_t l = 0; l < d; ++l) {
          const int64_t a = dims.in[l], o = dims.out[l];
          T* Wl = W[l];
          T* Sl = S[l];
          for (int64_t j = 0; j < n; ++j)
            for (int64_t c = 0; c < o; ++c) {
              dw[j * o + c] = wg[(n - 1) * C + j] * Dl[l][j * o + c];
              ds[j * o + c] = sg[(n - 1) * C + j] * Dl[l][j * o + c];
            }
          for (int64_t j = 0; j < n; ++j)
            for (int64_t i = 0; i < a; ++i) zt[i * n + j] = -Z[l][j * a + i];
          for (int64_t i = 0; i < a * o; ++i) {
            Wl[i] = kwn * Wl[i] + fsn * Sl[i];
            Sl[i] = ksn * Sl[i];
          }
          attnlab::gemm(a, o, n, zt.data(), n, dw.data(), o, true, Wl, o);
          attnlab::gemm(a, o, n, zt.data(), n, ds.data(), o, true, Sl, o);
        }
        g_is_w = ends_chunk;  // (a run that does not end its chunk is the segment's last)
        t0 += n;
      }
    }
    attnlab::gemm_done();
  });
}

}  // namespace

// q, k: (B, H, L, D); v: (B, H, L, Dv); ws: per layer a contiguous (B, H, 2, in, out) tensor [W; S],
// updated in place; g: per layer the chunk-start weights (B, H, in, out), contiguous and writable, read
// when pos0 is inside a chunk and written when the segment ends inside a chunk it started (empty
// when chunk == 1); keep_w, keep_s, from_s: (Bc, Hc, R, C); w_grad, s_grad: (Bc, Hc, R, C, C) for the
// R runs of the segment or R = 1 for all (Bc in {1, B}, Hc in {1, H}); activation: 0 silu, 1 gelu, 2 tanh.
torch::Tensor memory_chunks(torch::Tensor q, torch::Tensor k, torch::Tensor v, std::vector<torch::Tensor> ws,
                            std::vector<torch::Tensor> g, torch::Tensor keep_w, torch::Tensor keep_s,
                            torch::Tensor from_s, torch::Tensor w_grad, torch::Tensor s_grad, int64_t chunk,
                            int64_t pos0, int64_t activation) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4, "q, k must be (B, H, L, D), v (B, H, L, Dv)");
  TORCH_CHECK(chunk > 0 && pos0 >= 0 && activation >= 0 && activation <= 2, "bad chunk, pos0 or activation");
  TORCH_CHECK(!ws.empty() && (g.empty() || g.size() == ws.size()), "ws: one tensor per layer; g: none or as many");
  const auto dt = q.scalar_type();
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2);
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == L, "v must be (B, H, L, Dv)");
  Layers dims;
  for (size_t l = 0; l < ws.size(); ++l) {
    const auto& w = ws[l];
    TORCH_CHECK(w.is_contiguous() && w.scalar_type() == dt && w.dim() == 5 && w.size(0) == B && w.size(1) == H &&
                    w.size(2) == 2, "ws[", l, "] must be a contiguous (B, H, 2, in, out) tensor of q's dtype");
    TORCH_CHECK(l == 0 ? w.size(3) == q.size(3) : w.size(3) == ws[l - 1].size(4), "ws[", l, "]: layer sizes differ");
    if (!g.empty())
      TORCH_CHECK(g[l].is_contiguous() && g[l].scalar_type() == dt && g[l].dim() == 4 && g[l].size(0) == B &&
                      g[l].size(1) == H && g[l].size(2) == w.size(3) && g[l].size(3) == w.size(4),
                  "g[", l, "] must be a contiguous (B, H, in, out) tensor of q's dtype");
    dims.in.push_back(w.size(3));
    dims.out.push_back(w.size(4));
  }
  TORCH_CHECK(dims.out.back() == v.size(3), "the last layer's width must be v's");
  const bool needs_g = pos0 % chunk != 0 || (pos0 + L) % chunk != 0;
  TORCH_CHECK(!needs_g || !g.empty(), "g is needed when the segment starts or ends inside a chunk");
  int64_t runs = 0;
  for (int64_t t0 = 0; t0 < L; ++runs) t0 += std::min(L - t0, chunk - (pos0 + t0) % chunk);
  for (const auto* c : {&keep_w, &keep_s, &from_s, &w_grad, &s_grad}) {
    const bool square = c == &w_grad || c == &s_grad;
    TORCH_CHECK(c->is_contiguous() && c->scalar_type() == dt && c->dim() == (square ? 5 : 4) &&
                    (c->size(0) == 1 || c->size(0) == B) && (c->size(1) == 1 || c->size(1) == H) &&
                    c->size(0) == keep_w.size(0) && c->size(1) == keep_w.size(1) &&
                    (c->size(2) == runs || c->size(2) == 1) && c->size(2) == keep_w.size(2) &&
                    c->size(3) == chunk && (!square || c->size(4) == chunk),
                "coefficients must be contiguous (Bc, Hc, R, C[, C]) of q's dtype, R = ", runs, " runs");
  }
  auto out = torch::empty({B, H, L, v.size(3)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "memory_chunks", [&] {
    using T = scalar_t;
    std::vector<T*> wp, gp;
    for (auto& w : ws) wp.push_back(w.data_ptr<T>());
    for (auto& x : g) gp.push_back(x.data_ptr<T>());
    Coef<T> co{keep_w.data_ptr<T>(), keep_s.data_ptr<T>(), from_s.data_ptr<T>(), w_grad.data_ptr<T>(),
               s_grad.data_ptr<T>(), keep_w.size(0), keep_w.size(1), keep_w.size(2), chunk};
    walk<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), wp, gp, co, dims, out.data_ptr<T>(), B, H, L, chunk,
            pos0, static_cast<int>(activation));
  });
  return out;
}
