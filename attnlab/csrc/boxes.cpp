// Exact attention on a 2-D or 3-D grid where every query sees one box of keys (CPU, forward).
//
// out[b, h, i] = softmax_j(scale * q_i . k_j) v_j  over keys j whose grid coordinates lie in
// [lo[i][a], hi[i][a]) on every axis a
//
// Tokens are in raster order over `shape` (padded to three axes with leading 1s); the boxes are
// shared by every batch and head. This covers neighborhood attention without dilation (any
// kernel, stride or per-axis causality, clamped borders), window and halo attention. Queries are
// taken in tiles of `tile` (a box of the grid); a tile gathers the union of its queries' boxes
// (keys transposed for the scores GEMM, values for the output GEMM), computes every score of the
// union in one GEMM, exponentiates only inside each query's own box, and multiplies by the values
// in a second GEMM. Work items (batch, head, tile) run in parallel on torch's thread pool.
//
// Returns (out, lse): lse = -inf and out = 0 for a query with an empty box.
#include "native.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Box = std::array<int64_t, 6>;  // lo0, lo1, lo2, hi0, hi1, hi2

template <typename T>
void forward(const T* q, const T* k, const T* v, const int64_t* boxes, T* out, T* lse, int64_t B, int64_t H,
             int64_t Hkv, const std::array<int64_t, 3>& shape, const std::array<int64_t, 3>& tile, int64_t D,
             int64_t Dv, T scale, int64_t max_keys) {
  const int64_t N = shape[0] * shape[1] * shape[2];
  std::array<int64_t, 3> tiles;
  for (int a = 0; a < 3; ++a) tiles[a] = (shape[a] + tile[a] - 1) / tile[a];
  const int64_t ntiles = tiles[0] * tiles[1] * tiles[2], group = H / Hkv, T_max = tile[0] * tile[1] * tile[2];
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, B * H * ntiles, 1, [&](int64_t begin, int64_t stop) {
    std::vector<T> qs(T_max * D), kt(D * max_keys), vb(max_keys * Dv), s(T_max * max_keys), o(T_max * Dv);
    std::vector<int64_t> rows(T_max);
    for (int64_t item = begin; item < stop; ++item) {
      const int64_t ti = item % ntiles, bh = item / ntiles, b = bh / H, h = bh % H;
      const int64_t kvh = b * Hkv + h / group;
      const std::array<int64_t, 3> t0 = {(ti / (tiles[1] * tiles[2])) * tile[0], ((ti / tiles[2]) % tiles[1]) * tile[1],
                                         (ti % tiles[2]) * tile[2]};
      // the tile's queries (raster indices) and the union of their boxes
      int64_t m = 0;
      Box u = {shape[0], shape[1], shape[2], 0, 0, 0};
      for (int64_t z = t0[0]; z < std::min(t0[0] + tile[0], shape[0]); ++z)
        for (int64_t y = t0[1]; y < std::min(t0[1] + tile[1], shape[1]); ++y)
          for (int64_t x = t0[2]; x < std::min(t0[2] + tile[2], shape[2]); ++x) {
            const int64_t i = (z * shape[1] + y) * shape[2] + x;
            rows[m++] = i;
            const int64_t* bx = boxes + i * 6;
            if (bx[0] < bx[3] && bx[1] < bx[4] && bx[2] < bx[5])
              for (int a = 0; a < 3; ++a) {
                u[a] = std::min(u[a], bx[a]);
                u[a + 3] = std::max(u[a + 3], bx[a + 3]);
              }
          }
      const std::array<int64_t, 3> ext = {std::max<int64_t>(u[3] - u[0], 0), std::max<int64_t>(u[4] - u[1], 0),
                                          std::max<int64_t>(u[5] - u[2], 0)};
      const int64_t n = ext[0] * ext[1] * ext[2];
      TORCH_CHECK(n <= max_keys, "a query tile's boxes span ", n, " keys, more than max_keys=", max_keys);
      const T* qp = q + bh * N * D;
      const T* kp = k + kvh * N * D;
      const T* vp = v + kvh * N * Dv;
      T* op = out + bh * N * Dv;
      T* lp = lse + bh * N;
      if (n == 0) {
        for (int64_t r = 0; r < m; ++r) {
          std::fill(op + rows[r] * Dv, op + (rows[r] + 1) * Dv, T(0));
          lp[rows[r]] = neg_inf;
        }
        continue;
      }
      for (int64_t r = 0; r < m; ++r)
        for (int64_t d = 0; d < D; ++d) qs[r * D + d] = qp[rows[r] * D + d] * scale;
      int64_t j = 0;  // gather the union's keys (transposed) and values, raster order within the union
      for (int64_t z = u[0]; z < u[3]; ++z)
        for (int64_t y = u[1]; y < u[4]; ++y) {
          const int64_t first = (z * shape[1] + y) * shape[2] + u[2];
          attnlab::transpose(kp + first * D, ext[2], D, kt.data() + j, n);
          std::copy(vp + first * Dv, vp + (first + ext[2]) * Dv, vb.data() + j * Dv);
          j += ext[2];
        }
      attnlab::gemm(m, n, D, qs.data(), D, kt.data(), n, false, s.data(), n);
      std::vector<T> sums(m);
      for (int64_t r = 0; r < m; ++r) {
        T* sr = s.data() + r * n;
        const int64_t* bx = boxes + rows[r] * 6;
        const bool empty = !(bx[0] < bx[3] && bx[1] < bx[4] && bx[2] < bx[5]);
        T mx = neg_inf;
        if (!empty)
          for (int64_t z = bx[0]; z < bx[3]; ++z)
            for (int64_t y = bx[1]; y < bx[4]; ++y) {
              const T* seg = sr + ((z - u[0]) * ext[1] + (y - u[1])) * ext[2] - u[2];
              for (int64_t x = bx[2]; x < bx[5]; ++x) mx = std::max(mx, seg[x]);
            }
        // exponentiate inside the box, zero elsewhere: walk the row's segments in order
        T sum = 0;
        int64_t done = 0;
        if (!empty)
          for (int64_t z = bx[0]; z < bx[3]; ++z)
            for (int64_t y = bx[1]; y < bx[4]; ++y) {
              const int64_t a = ((z - u[0]) * ext[1] + (y - u[1])) * ext[2] + bx[2] - u[2];
              const int64_t e = a + bx[5] - bx[2];
              std::fill(sr + done, sr + a, T(0));
              for (int64_t x = a; x < e; ++x) {
                const T p = std::exp(sr[x] - mx);
                sr[x] = p;
                sum += p;
              }
              done = e;
            }
        std::fill(sr + done, sr + n, T(0));
        sums[r] = sum;
        lp[rows[r]] = sum > 0 ? mx + std::log(sum) : neg_inf;
      }
      attnlab::gemm(m, Dv, n, s.data(), n, vb.data(), Dv, false, o.data(), Dv);
      for (int64_t r = 0; r < m; ++r) {
        const T inv = sums[r] > 0 ? T(1) / sums[r] : T(0);
        for (int64_t d = 0; d < Dv; ++d) op[rows[r] * Dv + d] = o[r * Dv + d] * inv;
      }
    }
    attnlab::gemm_done();
  });
}

}  // namespace

std::vector<torch::Tensor> box_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor boxes,
                                         std::vector<int64_t> shape, std::vector<int64_t> tile, double scale,
                                         int64_t max_keys) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, N, D), N in raster order");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(!shape.empty() && shape.size() <= 3 && tile.size() == shape.size(), "shape and tile: 1 to 3 axes");
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  boxes = boxes.to(torch::kInt64).contiguous();
  std::array<int64_t, 3> sh = {1, 1, 1}, ti = {1, 1, 1};
  const size_t pad = 3 - shape.size();
  for (size_t a = 0; a < shape.size(); ++a) {
    sh[pad + a] = shape[a];
    ti[pad + a] = std::max<int64_t>(1, tile[a]);
  }
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), Hkv = k.size(1), Dv = v.size(3);
  TORCH_CHECK(N == sh[0] * sh[1] * sh[2] && k.size(2) == N && v.size(2) == N, "q, k, v must have prod(shape) tokens");
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && k.size(3) == D, "k, v shapes do not match q");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == N && boxes.size(1) == 6, "boxes must be (N, 6): lo0..2, hi0..2");
  auto out = torch::empty({B, H, N, Dv}, q.options());
  auto lse = torch::empty({B, H, N}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "box_attention", [&] {
    forward<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                      boxes.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), B, H, Hkv, sh,
                      ti, D, Dv, static_cast<scalar_t>(scale), max_keys);
  });
  return {out, lse};
}
