// Titans' neural memory, chunked form (CPU, forward and backward): the mathematics of
// attnlab/memory.py's `chunk`, fused so that each (batch, head) pair walks its chunks with its MLP's
// weights W, their momentum S and the chunk-start weights G in cache (a few hundred KB per head),
// instead of every step passing over all heads' weights in memory.
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
// The backward (walk_backward) walks the runs in reverse from each run's starting [W; S], which the
// forward saves when asked (the trace: (L / C) P floats per head), and recomputes the rest of the run.
#include "native.h"
#include "simd.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using attnlab::LANES;

enum Activation { SILU = 0, GELU = 1, TANH = 2 };
// What activate() writes: the activation, or the incoming values times its first or second derivative.
enum Mode { VALUE = 0, GRAD = 1, GRAD2 = 2 };

template <typename V>
V abs_of(V a) {
  return a < 0 ? -a : a;
}

// Elementwise over `count` values: out = act(pre) (VALUE), out *= act'(pre) (GRAD) or out *= act''(pre)
// (GRAD2, the backward's second-order term). NaN stays NaN.
//   silu: s = sigmoid(a), a s; s (1 + a (1 - s)); s (1 - s) (2 + a (1 - 2 s))
//   tanh: t; 1 - t^2; -2 t (1 - t^2)
//   gelu: a Phi(a); Phi(a) + a phi(a); phi(a) (2 - a^2)
template <typename T>
void activate(int kind, const T* pre, T* out, int64_t count, int mode) {
  using V = typename attnlab::Vec<T>::V;
  constexpr int N = LANES<T>;
  int64_t i = 0;
  if (kind != GELU) {  // silu and tanh through one exponential of a non-positive argument
    const T f = kind == SILU ? T(1) : T(2);
    auto lanes = [&](V a, V e, V o) {
      V r;
      if (kind == SILU) {
        const V s = a >= 0 ? T(1) / (T(1) + e) : e / (T(1) + e);
        r = mode == VALUE  ? a * s
            : mode == GRAD ? o * (s * (T(1) + a * (T(1) - s)))
                           : o * (s * (T(1) - s) * (T(2) + a * (T(1) - T(2) * s)));
      } else {  // tanh(|a|) = (1 - e) / (1 + e), e = exp(-2|a|)
        V t = (T(1) - e) / (T(1) + e);
        t = a >= 0 ? t : -t;
        r = mode == VALUE ? t : mode == GRAD ? o * (T(1) - t * t) : o * (T(-2) * t * (T(1) - t * t));
      }
      return attnlab::keep_nan<T>(a, r);
    };
    for (; i + N <= count; i += N) {
      const V a = attnlab::load<T>(pre + i);
      const V o = mode != VALUE ? attnlab::load<T>(out + i) : V{};
      attnlab::store<T>(out + i, lanes(a, attnlab::exp_nonpositive(-f * abs_of(a)), o));
    }
    if (i < count) {  // the tail through a padded vector
      V a{}, o{};
      for (int64_t j = i; j < count; ++j) a[j - i] = pre[j], o[j - i] = mode != VALUE ? out[j] : T(0);
      const V r = lanes(a, attnlab::exp_nonpositive(-f * abs_of(a)), o);
      for (int64_t j = i; j < count; ++j) out[j] = r[j - i];
    }
    return;
  }
  const T rsqrt2 = T(0.70710678118654752440), rsqrt2pi = T(0.39894228040143267794);
  for (; i < count; ++i) {  // exact (erf) GELU
    const T a = pre[i], cdf = T(0.5) * (1 + std::erf(a * rsqrt2)), pdf = rsqrt2pi * std::exp(T(-0.5) * a * a);
    out[i] = mode == VALUE ? a * cdf : mode == GRAD ? out[i] * (cdf + a * pdf) : out[i] * (pdf * (2 - a * a));
  }
}

struct Layers {
  std::vector<int64_t> in, out;  // (in, out) of every layer
  int64_t depth() const { return static_cast<int64_t>(in.size()); }
  int64_t widest() const {
    int64_t w = 0;
    for (size_t l = 0; l < in.size(); ++l) w = std::max({w, in[l], out[l]});
    return w;
  }
};

// The segment's runs: `n` tokens from `t0` sharing one G, which is the run's starting W when `g_is_w`
// (the run starts a chunk) and the given G otherwise (the segment starts inside a chunk); `ends`: the
// run ends its chunk (all but maybe the last).
struct Run {
  int64_t t0, n;
  bool g_is_w, ends;
};

std::vector<Run> runs_of(int64_t L, int64_t C, int64_t pos0) {
  std::vector<Run> runs;
  bool g_is_w = pos0 % C == 0;
  for (int64_t t0 = 0; t0 < L;) {
    const int64_t n = std::min(L - t0, C - (pos0 + t0) % C);
    const bool ends = (pos0 + t0 + n) % C == 0;
    runs.push_back({t0, n, g_is_w, ends});
    g_is_w = ends;
    t0 += n;
  }
  return runs;
}

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

// One thread's buffers for runs of up to C tokens, per layer l (in, out): the gradients' Z (C x in),
// P (C x in, l >= 1), Dl (C x out) and, for the backward, E (C x in, l >= 1: the errors before act').
template <typename T>
struct Errors {
  std::vector<attnlab::Buffer<T>> Z, P, Dl, E;
  Errors(const Layers& dims, int64_t C, bool backward) : Z(dims.depth()), P(dims.depth()), Dl(dims.depth()),
                                                         E(dims.depth()) {
    for (int64_t l = 0; l < dims.depth(); ++l) {
      Z[l].resize(C * dims.in[l]);
      Dl[l].resize(C * dims.out[l]);
      if (l) P[l].resize(C * dims.in[l]);
      if (l && backward) E[l].resize(C * dims.in[l]);
    }
  }

  // The n tokens' gradients at g: Z_0 = K, P_l = Z_{l-1} g_{l-1}, Z_l = act(P_l); D_last = 2 (Z_last g_last - V),
  // E_l = D_l g_l^T, D_{l-1} = E_l * act'(P_l) (E kept for the backward)
  void compute(int kind, const Layers& dims, const std::vector<const T*>& g, const T* kr, const T* vr, int64_t n) {
    const int64_t d = dims.depth(), Dv = dims.out[d - 1];
    std::copy(kr, kr + n * dims.in[0], Z[0].data());
    for (int64_t l = 0; l < d; ++l) {
      const int64_t a = dims.in[l], o = dims.out[l];
      if (l) activate(kind, P[l].data(), Z[l].data(), n * a, VALUE);
      attnlab::gemm(n, o, a, Z[l].data(), a, g[l], o, false, l + 1 < d ? P[l + 1].data() : Dl[d - 1].data(), o);
    }
    for (int64_t i = 0; i < n * Dv; ++i) Dl[d - 1][i] = 2 * (Dl[d - 1][i] - vr[i]);
    for (int64_t l = d - 1; l > 0; --l) {
      const int64_t a = dims.in[l], o = dims.out[l];
      T* e = E[l].empty() ? Dl[l - 1].data() : E[l].data();
      attnlab::blas_gemm(true, n, a, o, Dl[l].data(), o, g[l], o, e, a);
      if (e != Dl[l - 1].data()) std::copy(e, e + n * a, Dl[l - 1].data());
      activate(kind, P[l].data(), Dl[l - 1].data(), n * a, GRAD);
    }
  }
};

// One retrieval layer of n tokens from x (n x a): x2 = [keep_w x | from_s x] (n x 2a), s = -((x Z^T) * w_grad)
// on and below the diagonal, 0 above (n x n), and with `dst` the layer's output x2 [W; S] + s D (n x o).
template <typename T>
void retrieve(const T* x, const T* Z, const T* D, const T* WS, const T* kw, const T* fs, const T* wg, int64_t n,
              int64_t C, int64_t a, int64_t o, T* x2, T* s, T* dst) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < a; ++i) {
      x2[t * 2 * a + i] = kw[t] * x[t * a + i];
      x2[t * 2 * a + a + i] = fs[t] * x[t * a + i];
    }
  attnlab::blas_gemm(true, n, n, a, x, a, Z, a, s, n);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < n; ++j) s[t * n + j] = j <= t ? -s[t * n + j] * wg[t * C + j] : T(0);
  if (!dst) return;
  attnlab::gemm(n, o, 2 * a, x2, 2 * a, WS, o, false, dst, o);
  attnlab::gemm(n, o, n, s, n, D, o, true, dst, o);
}

// Row-major c (m x n) (+)= a^T b for a (k x m), b (k x n): a transposed into `scratch` (m x k) first.
template <typename T>
void gemm_tn(int64_t m, int64_t n, int64_t k, const T* a, const T* b, bool add, T* c, T* scratch) {
  attnlab::transpose(a, k, m, scratch, k);
  attnlab::gemm(m, n, k, scratch, k, b, n, add, c, n);
}

template <typename T>
void walk(const T* q, const T* k, const T* v, const std::vector<T*>& WS, const std::vector<T*>& G, const Coef<T>& co,
          const Layers& dims, T* out, int64_t B, int64_t H, int64_t L, int64_t C, int64_t pos0, int kind,
          const std::vector<T*>& trace) {
  const int64_t d = dims.depth(), D = dims.in[0], Dv = dims.out[d - 1], widest = dims.widest();
  const std::vector<Run> runs = runs_of(L, C, pos0);
  const int64_t R = static_cast<int64_t>(runs.size());
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t stop) {
    // one layer at a time: x2 ([keep_w x | from_s x]), pre and y (a retrieval layer's pre-activation and
    // activation), s (n x n), zt (-Z^T), dw and ds (the errors weighted for the W and S updates)
    Errors<T> e(dims, C, false);
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
      for (int64_t r = 0; r < R; ++r) {
        const Run& run = runs[r];
        const int64_t n = run.n;
        if (!trace.empty())  // the run's starting [W; S] for the backward
          for (int64_t l = 0; l < d; ++l) {
            const int64_t size2 = 2 * dims.in[l] * dims.out[l];
            std::copy(W[l], W[l] + size2, trace[l] + (bh * R + r) * size2);
          }
        const std::vector<const T*> g(run.g_is_w ? W.begin() : Gh.begin(), run.g_is_w ? W.end() : Gh.end());
        e.compute(kind, dims, g, k + (bh * L + run.t0) * D, v + (bh * L + run.t0) * Dv, n);
        const T* kw = co.at(co.keep_w, b, h, r, C);
        const T* ks = co.at(co.keep_s, b, h, r, C);
        const T* fs = co.at(co.from_s, b, h, r, C);
        const T* wg = co.at(co.w_grad, b, h, r, C * C);
        const T* sg = co.at(co.s_grad, b, h, r, C * C);
        const T* xin = q + (bh * L + run.t0) * D;
        for (int64_t l = 0; l < d; ++l) {
          T* dst = l + 1 < d ? pre.data() : out + (bh * L + run.t0) * Dv;
          retrieve(xin, e.Z[l].data(), e.Dl[l].data(), W[l], kw, fs, wg, n, C, dims.in[l], dims.out[l], x2.data(),
                   s.data(), dst);
          if (l + 1 < d) {
            activate(kind, dst, y.data(), n * dims.out[l], VALUE);
            xin = y.data();
          }
        }
        // the chunk-start weights of a chunk this segment will not finish
        if (!run.ends && run.g_is_w && !G.empty())
          for (int64_t l = 0; l < d; ++l) std::copy(W[l], W[l] + dims.in[l] * dims.out[l], Gh[l]);
        // update: W <- keep_w W + from_s S - Z^T (w_grad * D), S <- keep_s S - Z^T (s_grad * D)
        const T kwn = kw[n - 1], ksn = ks[n - 1], fsn = fs[n - 1];
        for (int64_t l = 0; l < d; ++l) {
          const int64_t a = dims.in[l], o = dims.out[l];
          T* Wl = W[l];
          T* Sl = S[l];
          const T* Dll = e.Dl[l].data();
          for (int64_t j = 0; j < n; ++j)
            for (int64_t c = 0; c < o; ++c) {
              dw[j * o + c] = wg[(n - 1) * C + j] * Dll[j * o + c];
              ds[j * o + c] = sg[(n - 1) * C + j] * Dll[j * o + c];
            }
          for (int64_t j = 0; j < n; ++j)
            for (int64_t i = 0; i < a; ++i) zt[i * n + j] = -e.Z[l][j * a + i];
          for (int64_t i = 0; i < a * o; ++i) {
            Wl[i] = kwn * Wl[i] + fsn * Sl[i];
            Sl[i] = ksn * Sl[i];
          }
          attnlab::gemm(a, o, n, zt.data(), n, dw.data(), o, true, Wl, o);
          attnlab::gemm(a, o, n, zt.data(), n, ds.data(), o, true, Sl, o);
        }
      }
    }
    attnlab::gemm_done();
  });
}

// The backward of walk(), one reverse pass over the runs per (batch, head). Each run's starting [W; S] comes
// from the forward's trace; its gradients at G (Z, P, E, D) and its retrieval (each layer's input X, the
// pre-activations A, x2 and s) are recomputed; then, with dWS the gradient of the run's final [W; S]:
//   update:     dD_l = -(w_grad[n-1] * (Z_l dW_l) + s_grad[n-1] * (Z_l dS_l)),
//               dZ_l = -((w_grad[n-1] * D_l) dW_l^T + (s_grad[n-1] * D_l) dS_l^T),
//               dW <- keep_w[n-1] dW, dS <- keep_s[n-1] dS + from_s[n-1] dW          (now the run's start)
//   retrieval:  layer l's output gradient da (dout, or dX_{l+1} * act'(A_l)):
//               d[W; S]_l += x2^T da, dX_l = keep_w * (da W^T) + from_s * (da S^T) + dM Z_l,
//               dD_l += s^T da, dZ_l += dM^T X_l, dM = -(da D_l^T) * w_grad (lower triangle); dq = dX_0
//   gradients:  for l = 1 .. d-1: h = dD_{l-1} * act'(P_l): dD_l += h G_l, dG_l += h^T D_l,
//               dP_l = dD_{l-1} * E_l * act''(P_l); then dY = 2 dD_last (dv = -dY) back through the MLP:
//               dG_l += Z_l^T dY_l, dZ_l += dY_l G_l^T, dY_{l-1} = dP_l + dZ_l * act'(P_l); dk = dZ_0
// with dG going into dW when the run's G is its starting W, else into the given G's gradient.
template <typename T>
void walk_backward(const T* q, const T* k, const T* v, const std::vector<const T*>& trace,
                   const std::vector<const T*>& G, const Coef<T>& co, const Layers& dims, int64_t B, int64_t H,
                   int64_t L, int64_t C, int64_t pos0, int kind, const T* dout, const std::vector<const T*>& d_ws,
                   const std::vector<const T*>& d_g, T* dq, T* dk, T* dv, const std::vector<T*>& d_ws0,
                   const std::vector<T*>& d_g0) {
  const int64_t d = dims.depth(), D = dims.in[0], Dv = dims.out[d - 1], widest = dims.widest();
  const std::vector<Run> runs = runs_of(L, C, pos0);
  const int64_t R = static_cast<int64_t>(runs.size());
  // the final G is the last run's starting W when the segment ends inside a chunk it started, else the given G
  const bool g_copied = !runs.back().ends && runs.back().g_is_w && !G.empty();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t stop) {
    Errors<T> e(dims, C, true);
    std::vector<attnlab::Buffer<T>> X(d), A(d), x2(d), s(d), dZ(d), dD(d), dP(d);
    for (int64_t l = 0; l < d; ++l) {
      const int64_t a = dims.in[l], o = dims.out[l];
      X[l].resize(C * a);
      A[l].resize(C * o);
      x2[l].resize(C * 2 * a);
      s[l].resize(C * C);
      dZ[l].resize(C * a);
      dD[l].resize(C * o);
      dP[l].resize(C * a);
    }
    attnlab::Buffer<T> t1(C * widest), t2(C * widest), tt(2 * widest * C), r2(C * 2 * widest), nn(C * C),
        nt(C * C), da(C * widest), dX(C * widest);
    for (int64_t bh = begin; bh < stop; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      std::vector<T*> dWS(d), dG(d);
      for (int64_t l = 0; l < d; ++l) {
        const int64_t size = dims.in[l] * dims.out[l];
        dWS[l] = d_ws0[l] + bh * 2 * size;
        std::copy(d_ws[l] + bh * 2 * size, d_ws[l] + (bh + 1) * 2 * size, dWS[l]);
        if (G.empty()) continue;
        dG[l] = d_g0[l] + bh * size;
        if (g_copied || d_g.empty())
          std::fill(dG[l], dG[l] + size, T(0));
        else
          std::copy(d_g[l] + bh * size, d_g[l] + (bh + 1) * size, dG[l]);
      }
      for (int64_t r = R - 1; r >= 0; --r) {
        const Run& run = runs[r];
        const int64_t n = run.n, t0 = run.t0;
        std::vector<const T*> WS(d), g(d);
        for (int64_t l = 0; l < d; ++l) {
          const int64_t size = dims.in[l] * dims.out[l];
          WS[l] = trace[l] + (bh * R + r) * 2 * size;
          g[l] = run.g_is_w ? WS[l] : G[l] + bh * size;
        }
        e.compute(kind, dims, g, k + (bh * L + t0) * D, v + (bh * L + t0) * Dv, n);
        const T* kw = co.at(co.keep_w, b, h, r, C);
        const T* ks = co.at(co.keep_s, b, h, r, C);
        const T* fs = co.at(co.from_s, b, h, r, C);
        const T* wg = co.at(co.w_grad, b, h, r, C * C);
        const T* sg = co.at(co.s_grad, b, h, r, C * C);
        // the retrieval's layer inputs and pre-activations
        const T* qr = q + (bh * L + t0) * D;
        for (int64_t l = 0; l < d; ++l) {
          const int64_t a = dims.in[l], o = dims.out[l];
          const T* x = l ? X[l].data() : qr;
          retrieve(x, e.Z[l].data(), e.Dl[l].data(), WS[l], kw, fs, wg, n, C, a, o, x2[l].data(), s[l].data(),
                   l + 1 < d ? A[l].data() : nullptr);
          if (l + 1 < d) activate(kind, A[l].data(), X[l + 1].data(), n * o, VALUE);
        }
        // the update's backward, with dWS the gradient of the run's final [W; S]
        const T kwn = kw[n - 1], ksn = ks[n - 1], fsn = fs[n - 1];
        for (int64_t l = 0; l < d; ++l) {
          const int64_t a = dims.in[l], o = dims.out[l], size = a * o;
          T* dW = dWS[l];
          T* dS = dW + size;
          const T* Dll = e.Dl[l].data();
          attnlab::gemm(n, o, a, e.Z[l].data(), a, dW, o, false, t1.data(), o);
          attnlab::gemm(n, o, a, e.Z[l].data(), a, dS, o, false, t2.data(), o);
          for (int64_t j = 0; j < n; ++j) {
            const T cw = wg[(n - 1) * C + j], cs = sg[(n - 1) * C + j];
            for (int64_t c = 0; c < o; ++c) {
              dD[l][j * o + c] = -(cw * t1[j * o + c] + cs * t2[j * o + c]);
              t1[j * o + c] = cw * Dll[j * o + c];
              t2[j * o + c] = cs * Dll[j * o + c];
            }
          }
          attnlab::blas_gemm(true, n, a, o, t1.data(), o, dW, o, dZ[l].data(), a, T(-1), T(0));
          attnlab::blas_gemm(true, n, a, o, t2.data(), o, dS, o, dZ[l].data(), a, T(-1), T(1));
          for (int64_t i = 0; i < size; ++i) {
            dS[i] = ksn * dS[i] + fsn * dW[i];
            dW[i] = kwn * dW[i];
          }
        }
        // the retrieval's backward, last layer first
        for (int64_t l = d - 1; l >= 0; --l) {
          const int64_t a = dims.in[l], o = dims.out[l];
          const T* g_out = dout + (bh * L + t0) * Dv;
          if (l + 1 < d) {
            std::copy(dX.data(), dX.data() + n * o, da.data());
            activate(kind, A[l].data(), da.data(), n * o, GRAD);
            g_out = da.data();
          }
          gemm_tn<T>(2 * a, o, n, x2[l].data(), g_out, true, dWS[l], tt.data());
          attnlab::blas_gemm(true, n, 2 * a, o, g_out, o, WS[l], o, r2.data(), 2 * a);
          for (int64_t t = 0; t < n; ++t)
            for (int64_t i = 0; i < a; ++i) dX[t * a + i] = kw[t] * r2[t * 2 * a + i] + fs[t] * r2[t * 2 * a + a + i];
          attnlab::blas_gemm(true, n, n, o, g_out, o, e.Dl[l].data(), o, nn.data(), n);
          for (int64_t t = 0; t < n; ++t)
            for (int64_t j = 0; j < n; ++j) nn[t * n + j] = j <= t ? -nn[t * n + j] * wg[t * C + j] : T(0);
          gemm_tn<T>(n, o, n, s[l].data(), g_out, true, dD[l].data(), nt.data());
          attnlab::gemm(n, a, n, nn.data(), n, e.Z[l].data(), a, true, dX.data(), a);
          gemm_tn<T>(n, a, n, nn.data(), l ? X[l].data() : qr, true, dZ[l].data(), nt.data());
        }
        std::copy(dX.data(), dX.data() + n * D, dq + (bh * L + t0) * D);
        // the gradients' backward, into G: the run's starting W, or the given G
        std::vector<T*> dg(d);
        for (int64_t l = 0; l < d; ++l) dg[l] = run.g_is_w ? dWS[l] : dG[l];
        for (int64_t l = 1; l < d; ++l) {
          const int64_t a = dims.in[l], o = dims.out[l];
          const T* prev = dD[l - 1].data();
          std::copy(prev, prev + n * a, t1.data());
          activate(kind, e.P[l].data(), t1.data(), n * a, GRAD);  // h
          for (int64_t i = 0; i < n * a; ++i) dP[l][i] = prev[i] * e.E[l][i];
          activate(kind, e.P[l].data(), dP[l].data(), n * a, GRAD2);
          attnlab::gemm(n, o, a, t1.data(), a, g[l], o, true, dD[l].data(), o);
          gemm_tn<T>(a, o, n, t1.data(), e.Dl[l].data(), true, dg[l], tt.data());
        }
        T* dY = dD[d - 1].data();  // the last error's gradient becomes the output's: dY = 2 dD, dv = -dY
        for (int64_t i = 0; i < n * Dv; ++i) {
          dY[i] *= 2;
          dv[(bh * L + t0) * Dv + i] = -dY[i];
        }
        for (int64_t l = d - 1; l >= 0; --l) {
          const int64_t a = dims.in[l], o = dims.out[l];
          gemm_tn<T>(a, o, n, e.Z[l].data(), dY, true, dg[l], tt.data());
          attnlab::blas_gemm(true, n, a, o, dY, o, g[l], o, dZ[l].data(), a, T(1), T(1));
          if (l) {
            activate(kind, e.P[l].data(), dZ[l].data(), n * a, GRAD);
            for (int64_t i = 0; i < n * a; ++i) dP[l][i] += dZ[l][i];
            dY = dP[l].data();
          }
        }
        std::copy(dZ[0].data(), dZ[0].data() + n * D, dk + (bh * L + t0) * D);
        if (r == R - 1 && g_copied)  // the final G's gradient: the last run's starting W
          for (int64_t l = 0; l < d; ++l) {
            const int64_t size = dims.in[l] * dims.out[l];
            for (int64_t i = 0; i < size; ++i) dWS[l][i] += d_g[l][bh * size + i];
          }
      }
    }
    attnlab::gemm_done();
  });
}

// The shared checks of memory_chunks and its backward (q, k, v made contiguous): the layers' sizes from ws
// (per layer (B, H, 2, in, out), or (B, H, R, 2, in, out) with `traced`).
Layers check(torch::Tensor& q, torch::Tensor& k, torch::Tensor& v, const std::vector<torch::Tensor>& ws,
             const std::vector<torch::Tensor>& g, const std::vector<torch::Tensor>& coefficients, int64_t chunk,
             int64_t pos0, int64_t activation, bool traced) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4, "q, k must be (B, H, L, D), v (B, H, L, Dv)");
  TORCH_CHECK(chunk > 0 && pos0 >= 0 && activation >= 0 && activation <= 2, "bad chunk, pos0 or activation");
  TORCH_CHECK(!ws.empty() && (g.empty() || g.size() == ws.size()), "ws: one tensor per layer; g: none or as many");
  const auto dt = q.scalar_type();
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), R = static_cast<int64_t>(runs_of(L, chunk, pos0).size());
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == L, "v must be (B, H, L, Dv)");
  TORCH_CHECK(L > 0, "the segment must hold tokens");
  Layers dims;
  const int64_t x = traced ? 1 : 0;  // a trace has the runs' axis before [W; S]
  for (size_t l = 0; l < ws.size(); ++l) {
    const auto& w = ws[l];
    TORCH_CHECK(w.is_contiguous() && w.scalar_type() == dt && w.dim() == 5 + x && w.size(0) == B && w.size(1) == H &&
                    (!traced || w.size(2) == R) && w.size(2 + x) == 2,
                "ws[", l, "] must be a contiguous (B, H, ", traced ? "R, " : "", "2, in, out) tensor of q's dtype");
    const int64_t in = w.size(3 + x), out = w.size(4 + x);
    TORCH_CHECK(in == (l == 0 ? q.size(3) : dims.out.back()), "ws[", l, "]: layer sizes differ");
    if (!g.empty())
      TORCH_CHECK(g[l].is_contiguous() && g[l].scalar_type() == dt && g[l].dim() == 4 && g[l].size(0) == B &&
                      g[l].size(1) == H && g[l].size(2) == in && g[l].size(3) == out,
                  "g[", l, "] must be a contiguous (B, H, in, out) tensor of q's dtype");
    dims.in.push_back(in);
    dims.out.push_back(out);
  }
  TORCH_CHECK(dims.out.back() == v.size(3), "the last layer's width must be v's");
  const bool needs_g = pos0 % chunk != 0 || (pos0 + L) % chunk != 0;
  TORCH_CHECK(!needs_g || !g.empty(), "g is needed when the segment starts or ends inside a chunk");
  TORCH_CHECK(coefficients.size() == 5, "five coefficient tensors");
  const auto& kw = coefficients[0];
  for (size_t i = 0; i < 5; ++i) {
    const auto& c = coefficients[i];
    const bool square = i >= 3;
    TORCH_CHECK(c.is_contiguous() && c.scalar_type() == dt && c.dim() == (square ? 5 : 4) &&
                    (c.size(0) == 1 || c.size(0) == B) && (c.size(1) == 1 || c.size(1) == H) &&
                    c.size(0) == kw.size(0) && c.size(1) == kw.size(1) && (c.size(2) == R || c.size(2) == 1) &&
                    c.size(2) == kw.size(2) && c.size(3) == chunk && (!square || c.size(4) == chunk),
                "coefficients must be contiguous (Bc, Hc, R, C[, C]) of q's dtype, R = ", R, " runs");
  }
  return dims;
}

template <typename T>
Coef<T> coef_of(const std::vector<torch::Tensor>& c, int64_t chunk) {
  return {c[0].data_ptr<T>(), c[1].data_ptr<T>(), c[2].data_ptr<T>(), c[3].data_ptr<T>(), c[4].data_ptr<T>(),
          c[0].size(0), c[0].size(1), c[0].size(2), chunk};
}

template <typename T, typename P = T*>
std::vector<P> pointers(const std::vector<torch::Tensor>& xs) {
  std::vector<P> out;
  for (const auto& x : xs) out.push_back(x.data_ptr<T>());
  return out;
}

}  // namespace

// q, k: (B, H, L, D); v: (B, H, L, Dv); ws: per layer a contiguous (B, H, 2, in, out) tensor [W; S],
// updated in place; g: per layer the chunk-start weights (B, H, in, out), contiguous and writable, read
// when pos0 is inside a chunk and written when the segment ends inside a chunk it started (empty
// when chunk == 1); keep_w, keep_s, from_s: (Bc, Hc, R, C); w_grad, s_grad: (Bc, Hc, R, C, C) for the
// R runs of the segment or R = 1 for all (Bc in {1, B}, Hc in {1, H}); activation: 0 silu, 1 gelu, 2 tanh;
// traced: also return, per layer, the trace (B, H, R, 2, in, out): each run's starting [W; S] (for
// memory_chunks_backward). Returns [out (B, H, L, Dv), trace...].
std::vector<torch::Tensor> memory_chunks(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                         std::vector<torch::Tensor> ws, std::vector<torch::Tensor> g,
                                         torch::Tensor keep_w, torch::Tensor keep_s, torch::Tensor from_s,
                                         torch::Tensor w_grad, torch::Tensor s_grad, int64_t chunk, int64_t pos0,
                                         int64_t activation, bool traced) {
  const std::vector<torch::Tensor> co{keep_w, keep_s, from_s, w_grad, s_grad};
  const Layers dims = check(q, k, v, ws, g, co, chunk, pos0, activation, false);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), R = static_cast<int64_t>(runs_of(L, chunk, pos0).size());
  std::vector<torch::Tensor> outs{torch::empty({B, H, L, v.size(3)}, q.options())};
  if (traced)
    for (int64_t l = 0; l < dims.depth(); ++l)
      outs.push_back(torch::empty({B, H, R, 2, dims.in[l], dims.out[l]}, q.options()));
  const std::vector<torch::Tensor> trace(outs.begin() + 1, outs.end());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "memory_chunks", [&] {
    using T = scalar_t;
    walk<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), pointers<T>(ws), pointers<T>(g), coef_of<T>(co, chunk),
            dims, outs[0].data_ptr<T>(), B, H, L, chunk, pos0, static_cast<int>(activation), pointers<T>(trace));
  });
  return outs;
}

// The gradients of memory_chunks: trace as its forward filled it, g the chunk-start weights as given to it
// (before the forward), the coefficients as given; dout (B, H, L, Dv), d_ws per layer the gradient of the
// final [W; S] (B, H, 2, in, out), d_g none or per layer that of the final g. Returns dq, dk, dv, then per
// layer the gradient of the initial [W; S], then (with g) per layer that of the given g.
std::vector<torch::Tensor> memory_chunks_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                  std::vector<torch::Tensor> trace, std::vector<torch::Tensor> g,
                                                  torch::Tensor keep_w, torch::Tensor keep_s, torch::Tensor from_s,
                                                  torch::Tensor w_grad, torch::Tensor s_grad, int64_t chunk,
                                                  int64_t pos0, int64_t activation, torch::Tensor dout,
                                                  std::vector<torch::Tensor> d_ws, std::vector<torch::Tensor> d_g) {
  const std::vector<torch::Tensor> co{keep_w, keep_s, from_s, w_grad, s_grad};
  const Layers dims = check(q, k, v, trace, g, co, chunk, pos0, activation, true);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = dims.depth();
  TORCH_CHECK(dout.sizes() == v.sizes() && dout.scalar_type() == q.scalar_type(), "dout must be like v");
  dout = dout.contiguous();
  TORCH_CHECK(d_ws.size() == static_cast<size_t>(d) && (d_g.empty() || d_g.size() == g.size()),
              "d_ws: one per layer; d_g: none or one per layer of g");
  std::vector<torch::Tensor> d_ws0, d_g0;
  for (int64_t l = 0; l < d; ++l) {
    d_ws[l] = d_ws[l].contiguous();
    TORCH_CHECK(d_ws[l].sizes() == torch::IntArrayRef({B, H, 2, dims.in[l], dims.out[l]}) &&
                    d_ws[l].scalar_type() == q.scalar_type(), "d_ws[", l, "] must be (B, H, 2, in, out)");
    d_ws0.push_back(torch::empty_like(d_ws[l]));
    if (g.empty()) continue;
    d_g0.push_back(torch::empty_like(g[l]));
    if (d_g.empty()) continue;
    d_g[l] = d_g[l].contiguous();
    TORCH_CHECK(d_g[l].sizes() == g[l].sizes() && d_g[l].scalar_type() == q.scalar_type(), "d_g[", l,
                "] must be like g");
  }
  auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "memory_chunks_backward", [&] {
    using T = scalar_t;
    walk_backward<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), pointers<T, const T*>(trace),
                     pointers<T, const T*>(g), coef_of<T>(co, chunk), dims, B, H, L, chunk, pos0,
                     static_cast<int>(activation), dout.data_ptr<T>(), pointers<T, const T*>(d_ws),
                     pointers<T, const T*>(d_g), dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(),
                     pointers<T>(d_ws0), pointers<T>(d_g0));
  });
  std::vector<torch::Tensor> grads{dq, dk, dv};
  grads.insert(grads.end(), d_ws0.begin(), d_ws0.end());
  grads.insert(grads.end(), d_g0.begin(), d_g0.end());
  return grads;
}
