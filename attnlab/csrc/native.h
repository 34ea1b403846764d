// attnlab's CPU kernels (forward; range_attention, linear_chunks, linear_noncausal, aaren_scan,
// rat_chunks, rat_finals, agent_noncausal and memory_chunks also backward):
// declarations shared by the kernels and the bindings.
#pragma once
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <new>
#include <vector>

std::vector<torch::Tensor> range_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor start,
                                           torch::Tensor end, double scale, int64_t block_q, int64_t chunk);

std::vector<torch::Tensor> range_attention_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                    torch::Tensor start, torch::Tensor end, torch::Tensor out,
                                                    torch::Tensor lse, torch::Tensor dout,
                                                    c10::optional<torch::Tensor> dlse, double scale, int64_t block_q,
                                                    int64_t chunk);

std::vector<torch::Tensor> box_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor boxes,
                                         std::vector<int64_t> shape, std::vector<int64_t> tile, double scale);

torch::Tensor linear_chunks(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor state,
                            c10::optional<torch::Tensor> log_decay, c10::optional<torch::Tensor> log_gates,
                            int64_t chunk, c10::optional<double> normalize_eps, int64_t feature, int64_t taylor_dim,
                            double q_scale, c10::optional<torch::Tensor> centre, double centre_scale, int64_t count0,
                            bool reverse, bool strict, c10::optional<torch::Tensor> add_to);

std::vector<torch::Tensor> memory_chunks(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                         std::vector<torch::Tensor> ws, std::vector<torch::Tensor> g,
                                         torch::Tensor keep_w, torch::Tensor keep_s, torch::Tensor from_s,
                                         torch::Tensor w_grad, torch::Tensor s_grad, int64_t chunk, int64_t pos0,
                                         int64_t activation, bool traced);
std::vector<torch::Tensor> memory_chunks_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                  std::vector<torch::Tensor> trace, std::vector<torch::Tensor> g,
                                                  torch::Tensor keep_w, torch::Tensor keep_s, torch::Tensor from_s,
                                                  torch::Tensor w_grad, torch::Tensor s_grad, int64_t chunk,
                                                  int64_t pos0, int64_t activation, torch::Tensor dout,
                                                  std::vector<torch::Tensor> d_ws, std::vector<torch::Tensor> d_g);

std::vector<torch::Tensor> rat_chunks(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor gk,
                                      torch::Tensor gv, torch::Tensor past_k, torch::Tensor past_v,
                                      torch::Tensor carry_k, torch::Tensor carry_v, int64_t chunk, int64_t pos0,
                                      double scale, c10::optional<torch::Tensor> lse);

std::vector<torch::Tensor> rat_chunks_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor gk,
                                               torch::Tensor gv, torch::Tensor carry_k, torch::Tensor carry_v,
                                               int64_t past, int64_t chunk, int64_t pos0, double scale,
                                               torch::Tensor out, torch::Tensor fin_k, torch::Tensor fin_v,
                                               torch::Tensor lse, torch::Tensor dout, torch::Tensor d_fin_k,
                                               torch::Tensor d_fin_v, torch::Tensor d_last_k, torch::Tensor d_last_v);

torch::Tensor aaren_scan(torch::Tensor query, torch::Tensor k, torch::Tensor v, torch::Tensor m, torch::Tensor u,
                         torch::Tensor w, double scale, bool causal, c10::optional<torch::Tensor> trace);

std::vector<torch::Tensor> aaren_scan_backward(torch::Tensor query, torch::Tensor k, torch::Tensor v,
                                               torch::Tensor out, torch::Tensor trace, torch::Tensor dout,
                                               torch::Tensor du, torch::Tensor dw, torch::Tensor m0, torch::Tensor u0,
                                               double scale, bool causal);

std::tuple<torch::Tensor, bool> agent_chunks(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor agents,
                                             torch::Tensor r, torch::Tensor Z, torch::Tensor U, double scale,
                                             int64_t chunk);

std::vector<torch::Tensor> linear_chunks_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                  torch::Tensor state0, c10::optional<torch::Tensor> log_decay,
                                                  c10::optional<torch::Tensor> log_gates, torch::Tensor dout,
                                                  c10::optional<torch::Tensor> d_state, int64_t chunk,
                                                  c10::optional<torch::Tensor> out, c10::optional<double> normalize_eps,
                                                  int64_t feature, int64_t taylor_dim, double q_scale,
                                                  c10::optional<torch::Tensor> centre, double centre_scale,
                                                  int64_t count0, bool reverse, bool strict,
                                                  c10::optional<torch::Tensor> final_state, bool gates_grad);

std::vector<torch::Tensor> linear_noncausal_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                     torch::Tensor dout, int64_t chunk,
                                                     c10::optional<double> normalize_eps, int64_t feature,
                                                     int64_t taylor_dim, double q_scale, double rala_scale,
                                                     bool centred, torch::Tensor saved,
                                                     c10::optional<torch::Tensor> out);

std::vector<torch::Tensor> linear_noncausal(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t chunk,
                                            c10::optional<double> normalize_eps, int64_t feature, int64_t taylor_dim,
                                            double q_scale, double rala_scale, bool centred, bool save);

torch::Tensor map_features(torch::Tensor x, int64_t feature, int64_t taylor_dim);

std::vector<torch::Tensor> agent_noncausal(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor agents,
                                           double scale, int64_t chunk, bool save);

std::vector<torch::Tensor> agent_noncausal_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                    torch::Tensor agents, torch::Tensor dout, torch::Tensor saved,
                                                    double scale, int64_t chunk);

std::vector<torch::Tensor> rat_finals(torch::Tensor k, torch::Tensor v, torch::Tensor gk, torch::Tensor gv,
                                      int64_t chunk);

std::vector<torch::Tensor> rat_finals_backward(torch::Tensor k, torch::Tensor v, torch::Tensor gk, torch::Tensor gv,
                                               int64_t chunk, torch::Tensor d_fk, torch::Tensor d_fv);

extern "C" void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
                       const double*, const int*, const double*, const int*, const double*, double*, const int*);
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);

namespace attnlab {

// Scratch memory on 64-byte boundaries. The kernels' loops are vectorized under -ffast-math, which lets
// a reduction (a dot product, a row sum) start on the first aligned element and sum in an order set by
// the data's address: buffers at a heap-chosen alignment would make two calls on the same inputs differ
// in the last bits. Tensors from torch's CPU allocator are 64-byte aligned already.
template <typename T>
struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <typename U>
  Aligned(const Aligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, Aligned<T>>;

// Row-major C (m x n, row stride ldc) = A (m x k) . B (k x n), plus C when `add`. Single-threaded:
// the kernels call it from inside torch's parallel region. Float goes to oneDNN's BRGEMM
// micro-kernel through ATen (what torch's own CPU attention kernels use; about 1.2x a BLAS sgemm
// call at these block sizes), double to BLAS dgemm (column-major: C^T = B^T A^T).
inline void gemm(int m, int n, int k, const float* a, int lda, const float* b, int ldb, bool add, float* c,
                 int ldc) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, /*is_vnni=*/false);
}

inline void gemm(int m, int n, int k, const double* a, int lda, const double* b, int ldb, bool add, double* c,
                 int ldc) {
  const char t = 'N';
  const double one = 1, beta = add ? 1 : 0;
  dgemm_(&t, &t, &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Exponents whose exp stays far inside the dtype (as attnlab/linear.py's EXP_RANGE).
template <typename T>
constexpr T kRange = std::is_same_v<T, float> ? T(60) : T(600);

// Row-major c (m x n) = a (m x k) . op(b) through BLAS (MKL; single-threaded inside torch's parallel
// region), op(b) = b (k x n) or, with `transposed_b`, b^T for b (n x k) row-major: for a transposed
// operand, or a long m, which the BRGEMM micro-kernel of gemm() is not made for.
// `alpha` and `beta`: c = alpha a op(b) + beta c.
template <typename T>
inline void blas_gemm(bool transposed_b, int m, int n, int k, const T* a, int lda, const T* b, int ldb, T* c, int ldc,
                      T alpha = 1, T beta = 0) {
  const char tb = transposed_b ? 'T' : 'N', ta = 'N';
  if constexpr (std::is_same_v<T, float>)
    sgemm_(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
  else
    dgemm_(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

#ifdef __AVX2__
// The 8 x 8 float block at src (row stride ls) transposed into dst (row stride ld): eight loads, the
// standard unpack / shuffle / lane-permute network, eight stores.
inline void transpose8x8(const float* src, int64_t ls, float* dst, int64_t ld) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ls);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// dst[c * ld_dst + r] = src[r * cols + c] for r < rows, c < cols: row-major rows laid out as the
// columns of dst (keys transposed into the B operand of a scores GEMM). Floats go 8 x 8 blocks at a
// time where AVX2 is compiled in (a scalar loop stores one float per cache line of dst).
template <typename T>
inline void transpose(const T* src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  int64_t r0 = 0, c0 = 0;
#ifdef __AVX2__
  if constexpr (std::is_same_v<T, float>) {
    r0 = rows / 8 * 8;
    c0 = cols / 8 * 8;
    for (int64_t r = 0; r < r0; r += 8)
      for (int64_t c = 0; c < c0; c += 8) transpose8x8(src + r * cols + c, cols, dst + c * ld_dst + r, ld_dst);
  }
#endif
  for (int64_t r = 0; r < rows; ++r)  // what the blocks left: the last columns, then the last rows
    for (int64_t c = r < r0 ? c0 : 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * cols + c];
}

// The chunk's rows split for the intra-chunk products: rows [0, h) see keys [0, h), rows [h, n) keys
// [0, n); below 32 rows the whole square (a split would only add call overhead).
inline int64_t split(int64_t n) { return n >= 32 ? n / 2 : n; }

// s (n x n, row stride n) = a (n x F) . b (F x n, row stride n) below the split's diagonal block:
// the block of rows [0, h) and keys [h, n) is zero, not computed.
template <typename T>
void causal_scores(int64_t n, int64_t F, const T* a, const T* b, T* s) {
  const int64_t h = split(n);
  gemm(h, h, F, a, F, b, n, false, s, n);
  for (int64_t t = 0; t < h; ++t) std::fill(s + t * n + h, s + (t + 1) * n, T(0));
  if (h < n) gemm(n - h, n, F, a + h * F, F, b, n, false, s + h * n, n);
}

// o (n x Dv) = s (n x n, zero above the split's diagonal block) . v (n x Dv), that block skipped.
template <typename T>
void causal_values(int64_t n, int64_t Dv, const T* s, const T* v, T* o) {
  const int64_t h = split(n);
  gemm(h, Dv, h, s, n, v, Dv, false, o, Dv);
  if (h < n) gemm(n - h, Dv, n, s + h * n, n, v, Dv, false, o + h * Dv, Dv);
}

// Call at the end of each thread's share of a parallel region that used gemm().
inline void gemm_done() { at::native::cpublas::brgemm_release(); }

}  // namespace attnlab
