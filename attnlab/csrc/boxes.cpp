// Exact attention on a 2-D or 3-D grid where every query sees one box of keys (CPU, forward).
//
// out[b, h, i] = softmax_j(scale * q_i . k_j) v_j  over keys j whose grid coordinates lie in
// [lo[i][a], hi[i][a]) on every axis a
//
// Tokens are in raster order over `shape` (padded to three axes with leading 1s); the boxes are
// shared by every batch and head. This covers neighborhood attention without dilation (any
// kernel, stride or per-axis causality, clamped borders), window and halo attention.
//
// Why not GEMMs on gathered blocks: a 23x23 neighbourhood seen from an 8x8 query tile is a
// 30x30 union, so a tile GEMM computes 1.7x the scores it needs, and gathering the union costs
// as much again. Here a tile is a handful of queries (at most 8, e.g. 2x2 for a 23x23 kernel:
// a 24x24 union, 92% of it needed) and the products are register-blocked micro-kernels that read
// keys and values where they lie, without gathering:
// - keys are transposed once per call to (D, N), so each row of the union's last axis is a
//   contiguous run of lanes; the union is cut into "slots" of one vector of lanes each
//   (8 floats / 4 doubles), and the scores kernel computes M queries x NV slots per pass over D;
// - each query's softmax runs over its own box only (lanes outside it masked), with a
//   polynomial exponential on whole vectors;
// - the values kernel adds p * v row by row, the values read in place (they are contiguous).
// Work items (batch, head, tile) run in parallel on torch's thread pool.
//
// Returns (out, lse): lse = -inf and out = 0 for a query with an empty box.
#include "native.h"
#include "simd.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace {

using attnlab::exp_nonpositive;
using attnlab::LANES;
using attnlab::load;
using attnlab::load_wide;
using attnlab::store;
using attnlab::store_wide;
using attnlab::Vec;
using attnlab::WIDE;

#ifdef __AVX512F__
constexpr int ACCUMULATORS = 24;  // vector registers a micro-kernel may keep as accumulators (of 32)
#else
constexpr int ACCUMULATORS = 12;  // (of 16)
#endif

// One slot: LANES consecutive keys of one row of the union (a run along the last axis) from raster
// index `base`, of which the first `valid` are in the union.
struct Slot {
  int64_t base, valid;
};

// The union of a tile's boxes: origin `lo`, extent `ext` per axis; its slots are its rows (the first
// two axes, raster order) times `per_row` slots each.
struct Union {
  std::array<int64_t, 3> lo, ext;
  int64_t per_row;
};

// s[m * lds + v * LANES + lane] = q_m . k[slot_v.base + lane] for M queries and NV slots: q_m is
// qs[m * D ...], keys are read from kt (D rows of ldk). Lanes past a slot's `valid` read the next
// grid row (or the padding past the last key); the softmax masks them.
template <typename T, int M, int NV>
inline void scores(const T* qs, int64_t D, const T* kt, int64_t ldk, const Slot* slot, T* s, int64_t lds) {
  using V = typename Vec<T>::V;
  V acc[M][NV];
  const T* kp[NV];
  for (int v = 0; v < NV; ++v) kp[v] = kt + slot[v].base;
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = V{};
  for (int64_t d = 0; d < D; ++d) {
    V kv[NV];
    for (int v = 0; v < NV; ++v) kv[v] = load<T>(kp[v] + d * ldk);
    for (int m = 0; m < M; ++m) {
      const V qb = V{} + qs[m * D + d];
      for (int v = 0; v < NV; ++v) acc[m][v] += qb * kv[v];
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) store<T>(s + m * lds + v * LANES<T>, acc[m][v]);
}

// o[m * Dv + c ...] (+)= sum over slots and their valid lanes of p_m * v[key, c ...] for DV wide
// vectors of columns from c: p_m is p[m * ldp + slot * LANES + lane].
template <typename T, int M, int DV>
inline void values(const T* p, int64_t ldp, const Slot* slot, int64_t nslots, const T* v, int64_t Dv, int64_t c,
                   T* o) {
  using W = typename Vec<T>::W;
  W acc[M][DV];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < DV; ++j) acc[m][j] = W{};
  for (int64_t s = 0; s < nslots; ++s) {
    const T* vr = v + slot[s].base * Dv + c;
    const T* ps = p + s * LANES<T>;
    for (int64_t lane = 0; lane < slot[s].valid; ++lane, vr += Dv) {
      W vv[DV];
      for (int j = 0; j < DV; ++j) vv[j] = load_wide<T>(vr + j * WIDE<T>);
      for (int m = 0; m < M; ++m) {
        const W pb = W{} + ps[m * ldp + lane];
        for (int j = 0; j < DV; ++j) acc[m][j] += pb * vv[j];
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < DV; ++j) store_wide<T>(o + m * Dv + c + j * WIDE<T>, acc[m][j]);
}

// The columns of `values` not covered by whole wide vectors, one scalar at a time.
template <typename T>
inline void values_tail(int M, const T* p, int64_t ldp, const Slot* slot, int64_t nslots, const T* v, int64_t Dv,
                        int64_t c, T* o) {
  for (int m = 0; m < M; ++m)
    for (int64_t col = c; col < Dv; ++col) {
      T acc = 0;
      for (int64_t s = 0; s < nslots; ++s)
        for (int64_t lane = 0; lane < slot[s].valid; ++lane)
          acc += p[m * ldp + s * LANES<T> + lane] * v[(slot[s].base + lane) * Dv + col];
      o[m * Dv + col] = acc;
    }
}

template <typename T, int M, int DV>
inline void values_all(const T* p, int64_t ldp, const Slot* slot, int64_t nslots, const T* v, int64_t Dv, T* o) {
  int64_t c = 0;
  for (; c + DV * WIDE<T> <= Dv; c += DV * WIDE<T>) values<T, M, DV>(p, ldp, slot, nslots, v, Dv, c, o);
  for (; c + WIDE<T> <= Dv; c += WIDE<T>) values<T, M, 1>(p, ldp, slot, nslots, v, Dv, c, o);
  if (c < Dv) values_tail<T>(M, p, ldp, slot, nslots, v, Dv, c, o);
}

// Softmax of one query's scores (its row of s: the union's slots) over the keys of its box; writes
// the probabilities (0 outside the box) in place and returns (max, sum); sum = 0 for an empty box.
// The box cuts the same lanes from every row of the union it covers: one mask per slot of a row.
template <typename T>
inline std::pair<T, T> softmax(T* s, const Union& u, const int64_t* box) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  using E = typename Vec<T>::E;
  constexpr int L = LANES<T>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t row_len = u.per_row * L, rows = u.ext[0] * u.ext[1];
  const int64_t z0 = std::max(box[0], u.lo[0]) - u.lo[0], z1 = std::min(box[3], u.lo[0] + u.ext[0]) - u.lo[0];
  const int64_t y0 = std::max(box[1], u.lo[1]) - u.lo[1], y1 = std::min(box[4], u.lo[1] + u.ext[1]) - u.lo[1];
  const int64_t x0 = std::max(box[2], u.lo[2]) - u.lo[2], x1 = std::min(box[5], u.lo[2] + u.ext[2]) - u.lo[2];
  if (z0 >= z1 || y0 >= y1 || x0 >= x1) {
    std::fill(s, s + rows * row_len, T(0));
    return {neg_inf, T(0)};
  }
  const int64_t k0 = x0 / L, k1 = (x1 + L - 1) / L;  // the slots of a row the box touches
  I lane;
  for (int i = 0; i < L; ++i) lane[i] = i;
  auto in = [&](int64_t k) { return (lane >= E(x0 - k * L)) & (lane < E(x1 - k * L)); };
  auto visible = [&](int64_t r) {
    const int64_t z = r / u.ext[1], y = r % u.ext[1];
    return z >= z0 && z < z1 && y >= y0 && y < y1;
  };
  V mv = V{} + neg_inf;
  for (int64_t r = 0; r < rows; ++r) {
    if (!visible(r)) continue;
    for (int64_t k = k0; k < k1; ++k) {
      const V x = in(k) ? load<T>(s + r * row_len + k * L) : V{} + neg_inf;
      mv = x > mv ? x : mv;
    }
  }
  T mx = neg_inf;
  for (int i = 0; i < L; ++i) mx = std::max(mx, mv[i]);
  V sv = V{};
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * row_len;
    if (!visible(r)) {
      std::fill(sr, sr + row_len, T(0));
      continue;
    }
    std::fill(sr, sr + k0 * L, T(0));
    for (int64_t k = k0; k < k1; ++k) {
      const V e = in(k) ? exp_nonpositive(load<T>(sr + k * L) - mx) : V{};
      store<T>(sr + k * L, e);
      sv += e;
    }
    std::fill(sr + k1 * L, sr + row_len, T(0));
  }
  T sum = 0;
  for (int i = 0; i < L; ++i) sum += sv[i];
  return {mx, sum};
}

// One query tile between its passes: its queries (raster indices; a partial tile repeats its last
// one, with no weight), the slots of the union of their boxes, the scaled queries and the scores.
template <typename T, int M>
struct Tile {
  std::array<int64_t, M> rows;
  int real = 0;
  int64_t nslots = 0, n = 0;  // slots, and slots padded to a whole number of scores passes
  Union u;
  std::array<T, M> sums;
  std::vector<Slot> slots;
  attnlab::Buffer<T> qs, s, o;
};

// Queries go in tiles of `tile` (at most 8 queries, register-blocked), and tiles in groups of
// GROUP_COLUMNS queries along the last axis whose scores passes are interleaved row by row of keys:
// neighbouring tiles' unions share most key rows, and a row's transposed keys (D lines of a few
// lanes) stay in L1 from one tile to the next. Measured with 23x23 neighbourhoods on a 64x128
// grid: 15% faster than tile after tile, which streams every tile's union from L2.
constexpr int64_t GROUP_COLUMNS = 8;

template <typename T, int M>
void forward(const T* q, const T* kt, int64_t ldk, const T* v, const int64_t* boxes, T* out, T* lse, int64_t B,
             int64_t H, int64_t Hkv, const std::array<int64_t, 3>& shape, const std::array<int64_t, 3>& tile,
             int64_t D, int64_t Dv, T scale) {
  constexpr int L = LANES<T>;
  constexpr int NV = std::max(1, std::min(6, ACCUMULATORS / M));  // slots per scores pass
  constexpr int DV = std::max(1, std::min(4, ACCUMULATORS / M));  // wide vectors per values pass
  const int64_t N = shape[0] * shape[1] * shape[2], heads_per_kv = H / Hkv;
  std::array<int64_t, 3> tiles;
  for (int a = 0; a < 3; ++a) tiles[a] = (shape[a] + tile[a] - 1) / tile[a];
  const int64_t G = std::max<int64_t>(1, GROUP_COLUMNS / tile[2]), groups = (tiles[2] + G - 1) / G;
  const int64_t items_per_head = tiles[0] * tiles[1] * groups;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, B * H * items_per_head, 1, [&](int64_t begin, int64_t stop) {
    std::vector<Tile<T, M>> work(G);
    for (auto& t : work) {
      t.qs.resize(M * D);
      t.o.resize(M * Dv);
    }
    for (int64_t item = begin; item < stop; ++item) {
      const int64_t bh = item / items_per_head, it = item % items_per_head;
      const int64_t kvh = (bh / H) * Hkv + (bh % H) / heads_per_kv, row = it / groups;
      const int64_t z0 = (row / tiles[1]) * tile[0], y0 = (row % tiles[1]) * tile[1];
      const T* qp = q + bh * N * D;
      T* op = out + bh * N * Dv;
      T* lp = lse + bh * N;
      int64_t active = 0, most = 0;
      for (int64_t j = 0; j < G && ((it % groups) * G + j) < tiles[2]; ++j) {
        const int64_t x0 = ((it % groups) * G + j) * tile[2];
        Tile<T, M>& t = work[active];
        int m = 0;  // the tile's queries and the union of their boxes
        std::array<int64_t, 6> u = {shape[0], shape[1], shape[2], 0, 0, 0};
        for (int64_t z = z0; z < std::min(z0 + tile[0], shape[0]); ++z)
          for (int64_t y = y0; y < std::min(y0 + tile[1], shape[1]); ++y)
            for (int64_t x = x0; x < std::min(x0 + tile[2], shape[2]); ++x) {
              const int64_t i = (z * shape[1] + y) * shape[2] + x;
              t.rows[m++] = i;
              const int64_t* bx = boxes + i * 6;
              if (bx[0] < bx[3] && bx[1] < bx[4] && bx[2] < bx[5])
                for (int a = 0; a < 3; ++a) {
                  u[a] = std::min(u[a], bx[a]);
                  u[a + 3] = std::max(u[a + 3], bx[a + 3]);
                }
            }
        t.real = m;
        for (; m < M; ++m) t.rows[m] = t.rows[t.real - 1];
        const int64_t cols = u[5] - u[2];
        if (u[3] <= u[0] || u[4] <= u[1] || cols <= 0) {  // every box empty
          for (int r = 0; r < t.real; ++r) {
            std::fill(op + t.rows[r] * Dv, op + (t.rows[r] + 1) * Dv, T(0));
            lp[t.rows[r]] = neg_inf;
          }
          continue;
        }
        const int64_t per_row = (cols + L - 1) / L;
        const int64_t padded = ((u[3] - u[0]) * (u[4] - u[1]) * per_row + NV - 1) / NV * NV;
        if (static_cast<int64_t>(t.slots.size()) < padded) {
          t.slots.resize(padded);
          t.s.resize(M * padded * L);
        }
        int64_t n = 0;
        for (int64_t z = u[0]; z < u[3]; ++z)
          for (int64_t y = u[1]; y < u[4]; ++y)
            for (int64_t x = u[2]; x < u[5]; x += L)
              t.slots[n++] = {(z * shape[1] + y) * shape[2] + x, std::min<int64_t>(L, u[5] - x)};
        t.nslots = n;
        for (; n < padded; ++n) t.slots[n] = {t.slots[n - 1].base, 0};  // padding: no valid lane
        t.u = {{u[0], u[1], u[2]}, {u[3] - u[0], u[4] - u[1], cols}, per_row};
        t.n = n;
        for (int r = 0; r < M; ++r)
          for (int64_t d = 0; d < D; ++d) t.qs[r * D + d] = qp[t.rows[r] * D + d] * scale;
        most = std::max(most, n);
        ++active;
      }
      const T* kp = kt + kvh * D * ldk;
      for (int64_t g = 0; g < most; g += NV)
        for (int64_t j = 0; j < active; ++j) {
          Tile<T, M>& t = work[j];
          if (g < t.n) scores<T, M, NV>(t.qs.data(), D, kp, ldk, &t.slots[g], t.s.data() + g * L, t.n * L);
        }
      for (int64_t j = 0; j < active; ++j) {
        Tile<T, M>& t = work[j];
        const int64_t lds = t.n * L;
        for (int r = 0; r < M; ++r) {
          T* sr = t.s.data() + r * lds;
          if (r >= t.real) {  // a repeated query: no weight, its output is discarded
            std::fill(sr, sr + lds, T(0));
            continue;
          }
          const auto ms = softmax<T>(sr, t.u, boxes + t.rows[r] * 6);
          t.sums[r] = ms.second;
          lp[t.rows[r]] = ms.second > 0 ? ms.first + std::log(ms.second) : neg_inf;
        }
        values_all<T, M, DV>(t.s.data(), lds, t.slots.data(), t.nslots, v + kvh * N * Dv, Dv, t.o.data());
        for (int r = 0; r < t.real; ++r) {
          const T inv = t.sums[r] > 0 ? T(1) / t.sums[r] : T(0);
          for (int64_t d = 0; d < Dv; ++d) op[t.rows[r] * Dv + d] = t.o[r * Dv + d] * inv;
        }
      }
    }
  });
}

// kt[bh][d][i] = k[bh][i][d], rows of ldk (>= N + LANES, the tail zero) so every slot's lanes read
// inside the buffer.
template <typename T>
void transpose_keys(const T* k, T* kt, int64_t BH, int64_t N, int64_t D, int64_t ldk) {
  constexpr int64_t BLOCK = 64;
  const int64_t blocks = (N + BLOCK - 1) / BLOCK;
  at::parallel_for(0, BH * blocks, 1, [&](int64_t begin, int64_t stop) {
    for (int64_t item = begin; item < stop; ++item) {
      const int64_t bh = item / blocks, i0 = (item % blocks) * BLOCK, n = std::min(BLOCK, N - i0);
      attnlab::transpose(k + (bh * N + i0) * D, n, D, kt + bh * D * ldk + i0, ldk);
      if (i0 + n == N)
        for (int64_t d = 0; d < D; ++d) std::fill(kt + (bh * D + d) * ldk + N, kt + (bh * D + d + 1) * ldk, T(0));
    }
  });
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& boxes,
         torch::Tensor& out, torch::Tensor& lse, const std::array<int64_t, 3>& shape,
         const std::array<int64_t, 3>& tile, double scale) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), Hkv = k.size(1), Dv = v.size(3);
  // rows padded past N by a slot, and off a multiple of 4 KiB so the D rows a pass reads do not
  // compete for the same cache sets
  int64_t ldk = (N + LANES<T> + 15) / 16 * 16;
  if ((ldk * sizeof(T)) % 4096 == 0) ldk += 16;
  auto kt_tensor = torch::empty({B * Hkv, D, ldk}, k.options());
  T* kt = kt_tensor.data_ptr<T>();
  transpose_keys<T>(k.data_ptr<T>(), kt, B * Hkv, N, D, ldk);
  const int M = static_cast<int>(tile[0] * tile[1] * tile[2]);
  auto go = [&](auto m) {
    forward<T, decltype(m)::value>(q.data_ptr<T>(), kt, ldk, v.data_ptr<T>(), boxes.data_ptr<int64_t>(),
                                   out.data_ptr<T>(), lse.data_ptr<T>(), B, H, Hkv, shape, tile, D, Dv,
                                   static_cast<T>(scale));
  };
  switch (M) {
    case 1: go(std::integral_constant<int, 1>{}); break;
    case 2: go(std::integral_constant<int, 2>{}); break;
    case 3: go(std::integral_constant<int, 3>{}); break;
    case 4: go(std::integral_constant<int, 4>{}); break;
    case 5: go(std::integral_constant<int, 5>{}); break;
    case 6: go(std::integral_constant<int, 6>{}); break;
    case 7: go(std::integral_constant<int, 7>{}); break;
    case 8: go(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "box_attention: a query tile holds 1 to 8 queries, got ", M);
  }
}

}  // namespace

std::vector<torch::Tensor> box_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor boxes,
                                         std::vector<int64_t> shape, std::vector<int64_t> tile, double scale) {
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
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "box_attention",
                             [&] { run<scalar_t>(q, k, v, boxes, out, lse, sh, ti, scale); });
  return {out, lse};
}
