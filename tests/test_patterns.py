"""Semantics of the pattern definitions, checked against independent brute-force re-statements.

Each expected mask below is written from the papers' / reference code's procedure (Swin's roll and
region mask, MaxViT's grid partition, HaloNet's pad-and-unfold, LongLoRA's roll, NATTEN's window
start, ...) with python loops, numpy or plain torch ops, not from attnlab's formulas; the library's
masks are materialized on index grids and compared entry by entry.
"""
from __future__ import annotations

import itertools
import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlab
from attnlab import patterns as P
from attnlab import tiled
from attnlab.patterns import blocks, executor
from attnlab.patterns.base import Geometry, Mask
from attnlab.patterns.neighborhood import neighborhood
from attnlab.reference import index_grid

pytestmark = pytest.mark.usefixtures("single_thread")


def materialize(mask: Mask, Lq: int, Lk: int = None, *, shape=None, heads: int = 1) -> np.ndarray:
    """The library's mask as a (heads, Lq, Lk) numpy bool array (raster order for grids)."""
    Lk = Lq if Lk is None else Lk
    fn = mask.build(Geometry(1, heads, Lq, Lk, shape, None))
    return fn(*index_grid(1, heads, Lq, Lk, "cpu")).expand(1, heads, Lq, Lk)[0].numpy()


def brute(Lq, Lk, rule, heads=1) -> np.ndarray:
    """(heads, Lq, Lk) array of rule(h, i, j) with i the query's absolute position (bottom-right aligned)."""
    off = Lk - Lq
    return np.array([[[bool(rule(h, i + off, j)) for j in range(Lk)] for i in range(Lq)] for h in range(heads)])


def grid_coords(shape):
    return list(itertools.product(*[range(n) for n in shape]))


def brute_grid(shape, rule) -> np.ndarray:
    """(1, L, L) array of rule(coord_q, coord_k) over a grid in raster order."""
    cs = grid_coords(shape)
    return np.array([[[bool(rule(a, b)) for b in cs] for a in cs]])


def same_group_mask(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids[:, None] == ids[None, :])[None]


# --------------------------------------------------------------------------------------------
# Sequence masks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Lq,Lk", [(11, 11), (5, 11), (1, 7)])
def test_sliding_window_sink_prefix_strided(Lq, Lk):
    for w in (1, 3, 20):
        assert (materialize(P.sliding_window(w), Lq, Lk) == brute(Lq, Lk, lambda h, i, j: abs(i - j) < w)).all()
        causal = P.sliding_window(w) & P.causal()
        assert (materialize(causal, Lq, Lk) == brute(Lq, Lk, lambda h, i, j: i - w < j <= i)).all()
    for s, w in ((0, 2), (2, 3), (4, 1)):
        want = brute(Lq, Lk, lambda h, i, j: j < s or abs(i - j) < w)
        assert (materialize(P.sink_window(s, w), Lq, Lk) == want).all()
        want = brute(Lq, Lk, lambda h, i, j: j <= i and (j < s or j > i - w))  # StreamingLLM: sinks + recent
        assert (materialize(P.sink_window(s, w) & P.causal(), Lq, Lk) == want).all()
    for p in (0, 3, 30):
        want = brute(Lq, Lk, lambda h, i, j: j < p or j <= i)
        assert (materialize(P.prefix_lm(p), Lq, Lk) == want).all()
    for l in (1, 3, 4):
        want = brute(Lq, Lk, lambda h, i, j: abs(i - j) < l or (i - j) % l == 0)
        assert (materialize(P.strided(l), Lq, Lk) == want).all()
        for c in range(1, l + 1):
            want = brute(Lq, Lk, lambda h, i, j: i // l == j // l or j % l >= l - c)
            assert (materialize(P.strided(l, "fixed", c), Lq, Lk) == want).all()


def test_document_block_diagonal_lengths_and_offsets():
    lengths = (3, 1, 5, 2)
    ids = np.repeat(np.arange(len(lengths)), lengths)
    assert (materialize(P.document(lengths), 11) == same_group_mask(ids)).all()
    m = attnlab.mechanism("document")
    q, k, v = torch.randn(3, 1, 2, 11, 4, dtype=torch.float64)
    a = m(q, k, v, impl="tiled", document_lengths=lengths)
    b = m(q, k, v, impl="tiled", document_offsets=[0, 3, 4, 9, 11])
    c = m(q, k, v, impl="reference", document_lengths=torch.tensor(lengths))
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-12)
    # each document is an independent attention call
    for s, e in ((0, 3), (3, 4), (4, 9), (9, 11)):
        alone = attnlab.mechanism("dense")(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], impl="reference")
        assert torch.allclose(a[:, :, s:e], alone, atol=1e-12)
    with pytest.raises(ValueError, match="sum to the sequence length 11"):
        m(q, k, v, document_lengths=(3, 3))
    with pytest.raises(ValueError, match="exactly one of"):
        m(q, k, v, document_lengths=lengths, document_offsets=[0, 11])
    with pytest.raises(ValueError, match="increase strictly"):
        m(q, k, v, document_offsets=[0, 5, 5, 11])


def test_segment_stream():
    src, tgt = (2, 3, 1), (1, 2, 2)
    seg = [s for s, n in enumerate(src) for _ in range(n)]
    n_src = sum(src)
    tseg = [t for t, n in enumerate(tgt) for _ in range(n)]

    def rule(h, i, j):
        if i < n_src:  # source token: sources of its own and earlier segments, never targets
            return j < n_src and seg[j] <= seg[i]
        t = tseg[i - n_src]
        return (j < n_src and seg[j] <= t) or (j >= n_src and j <= i)

    L = n_src + sum(tgt)
    assert (materialize(P.segment_stream(src, tgt), L) == brute(L, L, rule)).all()
    assert (materialize(P.segment_stream(src), n_src) == brute(n_src, n_src, rule)).all()


def longlora_groups(L, G, cyclic):
    """Group id of every original position for the shifted heads, LongLoRA's two procedures."""
    half = G // 2
    if cyclic:  # roll path: tokens rolled by -G/2, then cut into groups of G
        rolled = torch.roll(torch.arange(L), -half)  # rolled[t] = original token at rolled position t
        ids = torch.empty(L, dtype=torch.long)
        ids[rolled] = torch.arange(L) // G
        return ids.numpy()
    bounds = [0] + list(range(half, L, G)) + [L]  # flash path: cu_seqlens shifted by G/2
    return np.searchsorted(np.array(bounds), np.arange(L), side="right") - 1


@pytest.mark.parametrize("L,G", [(16, 4), (12, 6), (15, 4)])
def test_shifted_sparse_is_longlora(L, G):
    H = 4
    for cyclic in ((False, True) if L % G == 0 else (False,)):
        got = materialize(P.shifted_sparse(G, H, cyclic), L, heads=H)
        plain = same_group_mask(np.arange(L) // G)[0]
        shifted = same_group_mask(longlora_groups(L, G, cyclic))[0]
        for h in range(H):
            assert (got[h] == (plain if h < H // 2 else shifted)).all(), (h, cyclic)
    if L % G == 0:
        a = materialize(P.shifted_sparse(G, H, True), L, heads=H)[H - 1]
        b = materialize(P.shifted_sparse(G, H, False), L, heads=H)[H - 1]
        half = G // 2
        head, tail = np.arange(L) < half, np.arange(L) >= L - half  # the wrapped group: first + last half-group
        diff = a != b
        assert diff.any() and (diff == (head[:, None] & tail[None]) | (tail[:, None] & head[None])).all()


def test_head_sharded_brute_force_and_coverage():
    bs, local, vs, step, off, group = 2, 1, 3, 1, 1, 2
    H = 6

    def rule(h, i, j):
        r, c, g = i // bs, j // bs, h // group
        return (c + g * step + off) % vs == 0 or abs(r - c) < local

    L = 14
    assert (materialize(P.head_sharded(bs, local, vs, step, off, group), L, heads=H) == brute(L, L, rule, H)).all()
    # the entry's default head_step: with kv_heads >= vert_stride the shards' union is every block
    m = attnlab.mechanism("head_sharded")
    for hkv, covered in ((3, True), (4, True), (2, False)):
        q = torch.zeros(1, hkv * 2, 24, 4)
        kv = torch.zeros(1, hkv, 24, 4)
        call = m.prepare(q, kv, kv, block_size=2, local_blocks=1, vert_stride=3)
        mask, _ = m.spec(call)
        full = materialize(mask, 24, heads=hkv * 2)
        assert full.any(0).all() == covered, hkv
        assert (full[0::2] == full[1::2]).all()  # query heads of one kv head share its shard (GQA)


# --------------------------------------------------------------------------------------------
# Neighborhood attention (NATTEN)
# --------------------------------------------------------------------------------------------
def natten_window_start(index, length, kernel_size, dilation):
    """NATTEN (0.17 CPU kernels) non-causal window start for an odd kernel, written out again here:
    within the query's dilation group, a centred window shifted inwards at the borders."""
    ns = kernel_size // 2
    group, c = index % dilation, index // dilation
    n_g = len(range(group, length, dilation))
    start = max(c - ns, 0) + ((n_g - c - ns - 1) if c + ns >= n_g else 0)
    return start * dilation + group


def na1d(n, k, s=1, d=1, causal=False):
    return neighborhood((k,), (s,), (d,), (causal,), (n,))


@pytest.mark.parametrize("n", [5, 9, 13])
def test_neighborhood_matches_natten_window_start(n):
    for k in (1, 3, 5):
        for d in (1, 2, 3):
            if k * d > n:
                continue
            got = materialize(na1d(n, k, d=d), n)[0]
            for i in range(n):
                start = natten_window_start(i, n, k, d)
                want = set(range(start, start + k * d, d))
                assert set(np.flatnonzero(got[i])) == want, (n, k, d, i)


@pytest.mark.parametrize("shape,kernel,dilation", [((9,), (4,), (2,)), ((7, 6), (3, 4), (2, 1)),
                                                   ((4, 5, 6), (3, 2, 5), (1, 2, 1))])
def test_neighborhood_sees_exactly_kernel_keys(shape, kernel, dilation):
    ones = (1,) * len(shape)
    got = materialize(neighborhood(kernel, ones, dilation, (False,) * len(shape), shape), math.prod(shape),
                      shape=shape)[0]
    assert (got.sum(1) == math.prod(kernel)).all()
    cs = grid_coords(shape)
    for qi, kj in zip(*np.nonzero(got)):  # only keys of the query's dilation group, within reach
        for a in range(len(shape)):
            assert cs[qi][a] % dilation[a] == cs[kj][a] % dilation[a]
            assert abs(cs[qi][a] - cs[kj][a]) < kernel[a] * dilation[a]
    # stride 1, odd kernel, away from the borders: the window is centred on the query
    if all(k % 2 for k in kernel):
        for qi, c in enumerate(cs):
            if all(kernel[a] // 2 * dilation[a] <= c[a] < shape[a] - kernel[a] // 2 * dilation[a]
                   for a in range(len(shape))):
                for kj in np.flatnonzero(got[qi]):
                    assert all(abs(c[a] - cs[kj][a]) <= kernel[a] // 2 * dilation[a] for a in range(len(shape)))


def test_neighborhood_causal():
    n, k = 10, 3
    for d in (1, 2):
        got = materialize(na1d(n, k, d=d, causal=True), n)[0]
        for i in range(n):
            c = i // d
            want = {j for j in range(n) if j % d == i % d and max(c - k + 1, 0) <= j // d <= c}
            assert set(np.flatnonzero(got[i])) == want
            assert len(want) == min(c + 1, k)


def test_gna_stride_groups_share_windows():
    # hand-checked: n=12, k=4, s=2: groups {0,1},{2,3},... share the window of their centre (right) query
    got = materialize(na1d(12, 4, s=2), 12)[0]
    want_start = {0: 0, 1: 0, 2: 1, 3: 1, 4: 3, 5: 3, 6: 5, 7: 5, 8: 7, 9: 7, 10: 8, 11: 8}
    for i, s0 in want_start.items():
        assert list(np.flatnonzero(got[i])) == list(range(s0, s0 + 4)), i
    for shape, k, s, d in (((13,), (5,), (3,), (1,)), ((11,), (3,), (2,), (2,)), ((7, 9), (3, 4), (3, 2), (2, 1))):
        m = materialize(neighborhood(k, s, d, (False,) * len(shape), shape), math.prod(shape), shape=shape)[0]
        cs = grid_coords(shape)
        key = [tuple((c[a] % d[a], (c[a] // d[a]) // s[a]) for a in range(len(shape))) for c in cs]
        for i, j in itertools.combinations(range(len(cs)), 2):
            if key[i] == key[j]:
                assert (m[i] == m[j]).all()
        assert (m.sum(1) == math.prod(k)).all()


@pytest.mark.parametrize("shape,k", [((12,), (4,)), ((6, 8), (3, 4)), ((4, 4, 6), (2, 2, 3))])
def test_stride_equal_kernel_is_window(shape, k):
    n = len(shape)
    na = neighborhood(k, k, (1,) * n, (False,) * n, shape)
    L = math.prod(shape)
    assert (materialize(na, L, shape=shape) == materialize(P.window(k), L, shape=shape)).all()


# --------------------------------------------------------------------------------------------
# Vision masks
# --------------------------------------------------------------------------------------------
def partition_ids(index_grid_: torch.Tensor, size) -> np.ndarray:
    """Window id of every token: Swin/MaxViT window_partition of a grid of token indices."""
    H, W = index_grid_.shape
    wins = index_grid_.view(H // size[0], size[0], W // size[1], size[1]).permute(0, 2, 1, 3).reshape(-1,
                                                                                                  size[0] * size[1])
    ids = torch.empty(H * W, dtype=torch.long)
    for w, toks in enumerate(wins):
        ids[toks] = w
    return ids.numpy()


def test_window_is_window_partition():
    shape, size = (6, 8), (3, 4)
    ids = partition_ids(torch.arange(48).view(shape), size)
    assert (materialize(P.window(size), 48, shape=shape) == same_group_mask(ids)).all()
    # non-divisible grid: Swin pads to a multiple and masks the padding -> smaller border windows
    shape = (7, 5)
    padded = torch.full((9, 8), -1)
    padded[:7, :5] = torch.arange(35).view(shape)
    wins = padded.view(3, 3, 2, 4).permute(0, 2, 1, 3).reshape(6, 12)
    ids = np.empty(35, dtype=int)
    for w, toks in enumerate(wins):
        ids[toks[toks >= 0].numpy()] = w
    assert (materialize(P.window((3, 4)), 35, shape=shape) == same_group_mask(ids)).all()
    assert (materialize(P.window((4,)), 10, shape=(10,)) == same_group_mask(np.arange(10) // 4)).all()


@pytest.mark.parametrize("shape,size,shift", [((8, 8), (4, 4), (2, 2)), ((8, 8), (4, 4), (2, 1)),
                                              ((12, 8), (4, 4), (1, 3)), ((6, 9), (3, 3), (1, 1))])
def test_shifted_window_is_swin_roll_and_region_mask(shape, size, shift):
    """Swin (timm SwinTransformerBlock): roll by -shift, window partition, mask pairs from different regions."""
    H, W = shape
    idx = torch.arange(H * W).view(H, W)
    rolled = torch.roll(idx, shifts=(-shift[0], -shift[1]), dims=(0, 1))  # rolled[r] = original token there
    img_mask = torch.zeros(H, W, dtype=torch.long)
    cnt = 0
    for hs in (slice(0, -size[0]), slice(-size[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -size[1]), slice(-size[1], -shift[1]), slice(-shift[1], None)):
            img_mask[hs, ws] = cnt
            cnt += 1
    win = partition_ids(torch.arange(H * W).view(H, W), size)  # window of each rolled position
    region = img_mask.flatten().numpy()
    win_of, region_of = np.empty(H * W, dtype=int), np.empty(H * W, dtype=int)
    win_of[rolled.flatten().numpy()] = win
    region_of[rolled.flatten().numpy()] = region
    want = same_group_mask(win_of) & same_group_mask(region_of)
    got = materialize(P.shifted_window(size, shift), H * W, shape=shape)
    assert (got == want).all()


@pytest.mark.parametrize("L,w,s", [(12, 4, 2), (10, 4, 2), (11, 4, 1), (7, 3, 2)])
def test_shifted_window_1d_with_swin_padding(L, w, s):
    """Swin pads to a multiple of the window *before* rolling; padded tokens are then not keys."""
    Lp = -(-L // w) * w
    rolled = torch.roll(torch.arange(Lp), -s).numpy()  # padded tokens have indices >= L
    region = np.zeros(Lp, dtype=int)
    region[Lp - w:Lp - s], region[Lp - s:] = 1, 2
    win_of, region_of = np.empty(Lp, dtype=int), np.empty(Lp, dtype=int)
    win_of[rolled] = np.arange(Lp) // w
    region_of[rolled] = region
    want = (same_group_mask(win_of) & same_group_mask(region_of))[:, :L, :L]
    assert (materialize(P.shifted_window((w,), (s,)), L, shape=(L,)) == want).all()


@pytest.mark.parametrize("shape,block,halo", [((12,), (4,), (1,)), ((8, 8), (4, 4), (1, 2)), ((6, 9), (3, 3), (2, 0))])
def test_halo_is_pad_and_unfold(shape, block, halo):
    """HaloNet: pad the grid by the halo, cut (block + 2 halo) windows at stride block; padding is no key."""
    idx = torch.arange(math.prod(shape)).view(shape).float()
    padded = idx
    for a in range(len(shape)):
        pad = [0, 0] * len(shape)
        pad[2 * (len(shape) - 1 - a):2 * (len(shape) - 1 - a) + 2] = [halo[a], halo[a]]
        padded = torch.nn.functional.pad(padded, pad, value=-1.0)
    win = padded
    for a in range(len(shape)):
        win = win.unfold(a, block[a] + 2 * halo[a], block[a])  # (blocks..., window...)
    L = math.prod(shape)
    want = np.zeros((1, L, L), dtype=bool)
    for blk in itertools.product(*[range(n // b) for n, b in zip(shape, block)]):
        keys = win[blk].flatten()
        keys = keys[keys >= 0].long().numpy()
        queries = idx[tuple(slice(b * s, (b + 1) * s) for b, s in zip(blk, block))].flatten().long().numpy()
        want[0][np.ix_(queries, keys)] = True
    assert (materialize(P.halo(block, halo), L, shape=shape) == want).all()


@pytest.mark.parametrize("shape,g", [((12,), (3,)), ((6, 8), (2, 4)), ((4, 6, 6), (2, 3, 2))])
def test_grid_is_maxvit_grid_partition(shape, g):
    """MaxViT grid_partition: view(G, S/G) per axis, the windows are the S/G-indexed slices."""
    n = len(shape)
    idx = torch.arange(math.prod(shape)).view([x for s, gg in zip(shape, g) for x in (gg, s // gg)])
    perm = [2 * a + 1 for a in range(n)] + [2 * a for a in range(n)]  # window dims first, then in-window
    wins = idx.permute(perm).reshape(-1, math.prod(g))
    ids = np.empty(math.prod(shape), dtype=int)
    for w, toks in enumerate(wins):
        ids[toks.numpy()] = w
    assert (materialize(P.grid(g, shape), math.prod(shape), shape=shape) == same_group_mask(ids)).all()


@pytest.mark.parametrize("T,k", [(4, 1), (5, 2), (3, 0), (4, 4)])
def test_tile3d_kept_tiles(T, k):
    shape = (T, 2, 3)
    L = math.prod(shape)
    m = materialize(P.tile3d(k), L, shape=shape)[0]
    per = L // T
    tiles = m.reshape(T, per, T, per)
    assert (tiles.all((1, 3)) == tiles.any((1, 3))).all()  # every frame x frame tile is kept whole or dropped
    kept = tiles.any((1, 3))
    assert kept.sum() == k * T + (T - k) * (k + 1)
    want = np.array([[fi == fj or fi < k or fj < k for fj in range(T)] for fi in range(T)])
    assert (kept == want).all()


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------
def test_mask_composition():
    a, b = P.sliding_window(3), P.prefix_lm(4)
    ma, mb = materialize(a, 12), materialize(b, 12)
    assert (materialize(a & b, 12) == (ma & mb)).all()
    assert (materialize(a | b, 12) == (ma | mb)).all()
    assert (materialize(~a, 12) == ~ma).all()
    assert (materialize(~(a | b) & P.causal(), 12) == (~(ma | mb) & np.tril(np.ones((12, 12), bool)))).all()
    assert len({(a & b).key, (a | b).key, (b & a).key, (~a).key, a.key}) == 5
    assert (a & b).build(Geometry(1, 1, 12, 12)) is (a & b).build(Geometry(1, 1, 12, 12))  # cached build
    shifted = P.shifted_sparse(4, 2)
    assert (a & shifted).per_head and not (a & b).per_head


def test_score_mod_sum_applies_left_to_right():
    geom = Geometry(1, 4, 6, 6)
    s = torch.randn(1, 4, 6, 6, dtype=torch.float64) * 5
    idx = index_grid(1, 4, 6, 6, "cpu")
    cap, al = P.softcap(2.0), P.alibi(4)
    i, j = idx[2], idx[3]
    slopes = P.alibi_slopes(4).double().view(1, 4, 1, 1)
    want = 2.0 * torch.tanh(s / 2.0) - slopes * (i - j).abs()
    assert torch.allclose((cap + al).build(geom)(s, *idx), want)
    want = 2.0 * torch.tanh((s - slopes * (i - j).abs()) / 2.0)
    assert torch.allclose((al + cap).build(geom)(s, *idx), want)
    table = torch.randn(4, 5)
    both = P.relative_bias(table) + cap
    assert both.tensors == (table,) and both.per_head
    # composed with a mask, through every backend that takes score modifiers
    q, k, v = torch.randn(3, 1, 4, 9, 8)
    outs = [P.masked_attention(q, k, v, P.sliding_window(3), cap + al, impl=i) for i in ("reference", "tiled", "flex")]
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[0], outs[2], atol=1e-5)


# --------------------------------------------------------------------------------------------
# Block structure and the GNA tile simulator
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Lq,Lk,bq,bk", [(13, 17, 4, 5), (8, 8, 8, 8), (1, 9, 2, 4), (20, 7, 3, 7)])
def test_block_structure_counts(Lq, Lk, bq, bk, monkeypatch):
    gen = torch.Generator().manual_seed(Lq * 100 + Lk)
    dense = torch.rand(2, 3, Lq, Lk, generator=gen) < 0.3
    dense[:, :, : Lq // 3] = False  # some empty tiles
    dense[0, 1, :, : Lk // 2] = True  # some full tiles

    def mod(b, h, q, kv):
        return dense[b, h, q.clamp(max=Lq - 1), kv.clamp(max=Lk - 1)] & (q < Lq) & (kv < Lk)

    for budget in (1 << 24, 7):  # the default, and one query row-chunk per block
        monkeypatch.setattr(blocks, "_ROW_BUDGET", budget)
        st_ = blocks.compute(mod, 2, 3, Lq, Lk, bq, bk)
        nq, nk = math.ceil(Lq / bq), math.ceil(Lk / bk)
        assert st_.grid == (nq, nk) and st_.pairs == int(dense.sum())
        for b, h, r, c in itertools.product(range(2), range(3), range(nq), range(nk)):
            tile = dense[b, h, r * bq:(r + 1) * bq, c * bk:(c + 1) * bk]
            assert bool(st_.any[b, h, r, c]) == bool(tile.any())
            assert bool(st_.full[b, h, r, c]) == bool(tile.all())
        for b, h, r in itertools.product(range(2), range(3), range(nq)):
            visited = [c for c in range(nk) if dense[b, h, r * bq:(r + 1) * bq, c * bk:(c + 1) * bk].any()]
            n = int(st_.kv_num[b, h, r])
            assert n == len(visited) and st_.kv_idx[b, h, r, :n].tolist() == visited
        assert st_.visited_tiles() == int(st_.any.sum()) and st_.partial_tiles() == int((st_.any & ~st_.full).sum())


def test_simulate_tiles():
    full = P.simulate_tiles(P.full(), (16,), 4, 4)
    assert full.tile_speedup == 1.0 and full.flop_speedup == 1.0 and full.tiles_partial == 0
    # causal, L=8, tiles of 2: 4x4 tiles, 10 on or below the diagonal, the 4 diagonal ones partly masked
    r = P.simulate_tiles(P.causal(), (8,), 2, 2)
    assert (r.tiles_total, r.tiles_visited, r.tiles_partial, r.pairs_visible, r.pairs_total) == (16, 10, 4, 36, 64)
    assert r.tile_speedup == pytest.approx(1.6) and r.flop_speedup == pytest.approx(64 / 36)
    # 2x2 windows on a 4x4 grid with 2x2 tiles: the tiles are the windows -> 4 full tiles of 16
    r = P.simulate_tiles(P.window((2, 2)), (4, 4), (2, 2), (2, 2))
    assert (r.tiles_visited, r.tiles_partial, r.pairs_visible) == (4, 0, 64)
    assert r.tile_speedup == 4.0 and r.flop_speedup == 4.0
    # the same windows in raster order (1-D tiles of 4 tokens = one row each) are all partial
    r = P.simulate_tiles(P.window((2, 2)), (4, 4), (1, 4), (1, 4))
    assert (r.tiles_visited, r.tiles_partial) == (8, 8)
    na = neighborhood((3, 3), (3, 3), (1, 1), (False, False), (6, 6))  # blocked NA = 3x3 windows
    r = P.simulate_tiles(na, (6, 6), (3, 3), (3, 3))
    assert (r.tiles_visited, r.tiles_partial, r.tile_speedup) == (4, 0, 4.0)
    with pytest.raises(ValueError, match="tile_q"):
        P.simulate_tiles(P.full(), (4, 4), 4, 4)


# --------------------------------------------------------------------------------------------
# Partial results and empty rows
# --------------------------------------------------------------------------------------------
def _lt(n):
    return Mask(f"kv<{n}", lambda g: (lambda b, h, q, kv: kv < n), ("test-lt", n))


def _ge(n):
    return Mask(f"kv>={n}", lambda g: (lambda b, h, q, kv: kv >= n), ("test-ge", n))


def test_merge_of_disjoint_key_sets_is_the_whole():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 12, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, 20, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    whole, whole_lse = P.masked_attention(q, k, v, causal=True, impl="reference", return_lse=True)
    # causal cross: row i sees keys <= i + 8, so rows 0 and 1 see nothing of the second set
    a = P.masked_attention(q, k, v, _lt(10), causal=True, impl="tiled", return_lse=True)
    b = P.masked_attention(q, k, v, _ge(10), causal=True, impl="tiled", return_lse=True)
    empty = P.masked_attention(q, k, v, _lt(0), causal=True, impl="reference", return_lse=True)
    assert torch.isneginf(b[1][:, :, :2]).all() and (b[0][:, :, :2] == 0).all()
    assert torch.isneginf(empty[1]).all() and (empty[0] == 0).all()
    out, lse = tiled.merge([a, b, empty])
    assert torch.allclose(out, whole, atol=1e-12) and torch.allclose(lse, whole_lse, atol=1e-12)
    # differentiable: the merged output's gradient is the whole's
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (gm,) = torch.autograd.grad((out * g).sum(), q)
    (gw,) = torch.autograd.grad((whole * g).sum(), q)
    assert torch.allclose(gm, gw, atol=1e-10)
    # three-way split over interleaved key sets, in another order
    odd = Mask("odd", lambda g: (lambda b, h, q, kv: kv % 2 == 1), ("test-odd",))
    parts = [P.masked_attention(q, k, v, m_, causal=True, impl="tiled", return_lse=True)
             for m_ in (odd, ~odd & _lt(10), ~odd & _ge(10))]
    out3, lse3 = tiled.merge(parts[::-1])
    assert torch.allclose(out3, whole, atol=1e-12) and torch.allclose(lse3, whole_lse, atol=1e-12)
    none_out, none_lse = tiled.merge([empty, empty])
    assert (none_out == 0).all() and torch.isneginf(none_lse).all() and not none_out.isnan().any()
    with pytest.raises(ValueError, match="at least one"):
        tiled.merge([])


@pytest.mark.parametrize("block", [128, 4])
def test_fully_masked_rows_give_zeros_and_neg_inf_lse(block, monkeypatch):
    monkeypatch.setattr(executor, "BLOCK", block)  # 4: whole query blocks see no key (no tile visited)
    rows = Mask("rows>=5", lambda g: (lambda b, h, q, kv: q >= 5), ("test-rows", 5))
    mask = rows & P.sliding_window(3)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 12, 8, generator=gen) for _ in range(3))
    ref = P.masked_attention(q, k, v, mask, impl="reference")
    for impl in ("reference", "tiled", "sdpa", "flex"):
        for dtype in (torch.float32, torch.float64):
            if impl == "flex" and dtype == torch.float64:
                continue
            x = [t.to(dtype) for t in (q, k, v)]
            out = P.masked_attention(*x, mask, impl=impl)
            assert not out.isnan().any(), impl
            assert (out[:, :, :5] == 0).all(), impl
            assert torch.allclose(out.float(), ref, atol=2e-5), impl
            if impl != "sdpa":
                _, lse = P.masked_attention(*x, mask, impl=impl, return_lse=True)
                assert torch.isneginf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all(), impl
    # gradients through empty rows are zero, never NaN
    for impl in ("reference", "tiled", "sdpa"):
        x = [t.double().requires_grad_(True) for t in (q, k, v)]
        out = P.masked_attention(*x, mask, impl=impl)
        grads = torch.autograd.grad(out.sum(), x)
        assert all(torch.isfinite(g_).all() for g_ in grads), impl
        assert (grads[0][:, :, :5] == 0).all(), impl
    # the dense entry: a boolean mask that hides every key from some rows, through each implementation
    dense = attnlab.mechanism("dense")
    bool_mask = torch.ones(12, 12, dtype=torch.bool)
    bool_mask[:3] = False
    for impl in ("sdpa", "tiled", "reference"):
        for bias in (None, torch.randn(12)):
            out = dense(q, k, v, mask=bool_mask, bias=bias, causal=True, impl=impl)
            assert not out.isnan().any() and (out[:, :, :3] == 0).all(), (impl, bias is None)


# --------------------------------------------------------------------------------------------
# Property tests: the tiled (block-sparse) implementation equals the reference
# --------------------------------------------------------------------------------------------
PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _qkv(seed, Lq, Lk, grid=None):
    """q (1, 2, *, 4), k (1, 1, *, 4), v (1, 1, *, 3): GQA with two query heads per kv head."""
    gen = torch.Generator().manual_seed(seed)
    qs, ks = (grid, grid) if grid is not None else ((Lq,), (Lk,))
    return (torch.randn(1, 2, *qs, 4, generator=gen, dtype=torch.float64),
            torch.randn(1, 1, *ks, 4, generator=gen, dtype=torch.float64),
            torch.randn(1, 1, *ks, 3, generator=gen, dtype=torch.float64))


def _agree(mech_name, q, k, v, block, **kw):
    m = attnlab.mechanism(mech_name)
    with mock.patch.object(executor, "BLOCK", block):
        got = m(q, k, v, impl="tiled", **kw)
    want = m(q, k, v, impl="reference", **kw)
    assert torch.allclose(got, want, atol=1e-10, rtol=0), (mech_name, kw, float((got - want).abs().max()))


blocks_st = st.sampled_from([4, 8, 16, 128])


@PROPS
@given(L=st.integers(1, 60), lq=st.integers(1, 60), w=st.integers(1, 70), causal=st.booleans(), block=blocks_st,
       seed=st.integers(0, 10))
def test_property_sliding_window(L, lq, w, causal, block, seed):
    lq = min(lq, L)
    _agree("sliding_window", *_qkv(seed, lq, L), block, window=w, causal=causal)


@PROPS
@given(L=st.integers(1, 60), sinks=st.integers(0, 70), w=st.integers(1, 70), causal=st.booleans(), block=blocks_st,
       seed=st.integers(0, 10))
def test_property_sink_window(L, sinks, w, causal, block, seed):
    _agree("sink_window", *_qkv(seed, L, L), block, sinks=sinks, window=w, causal=causal)


@PROPS
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6), causal=st.booleans(), block=blocks_st,
       seed=st.integers(0, 10))
def test_property_document(lengths, causal, block, seed):
    L = sum(lengths)
    _agree("document", *_qkv(seed, L, L), block, document_lengths=lengths, causal=causal)


@st.composite
def na_axis(draw, max_n=24):
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, n))
    d = draw(st.integers(1, n // k))
    s = draw(st.integers(1, k))
    return n, k, d, s


@PROPS
@given(axes=st.lists(na_axis(), min_size=1, max_size=1), causal=st.booleans(), block=blocks_st,
       seed=st.integers(0, 10))
def test_property_neighborhood_1d(axes, causal, block, seed):
    (n, k, d, s), = axes
    _agree("neighborhood", *_qkv(seed, 0, 0, grid=(n,)), block, kernel_size=k, dilation=d, stride=s, causal=causal)


@PROPS
@given(axes=st.lists(na_axis(max_n=9), min_size=2, max_size=2), causal=st.sampled_from([None, True, "axis"]),
       block=blocks_st, seed=st.integers(0, 10))
def test_property_neighborhood_2d(axes, causal, block, seed):
    shape = tuple(a[0] for a in axes)
    kw = dict(kernel_size=tuple(a[1] for a in axes), dilation=tuple(a[2] for a in axes),
              stride=tuple(a[3] for a in axes))
    if causal == "axis":
        kw["is_causal"] = (True, False)
    else:
        kw["causal"] = bool(causal)
    _agree("neighborhood", *_qkv(seed, 0, 0, grid=shape), block, **kw)


@PROPS
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), data=st.data(), block=blocks_st,
       seed=st.integers(0, 10))
def test_property_window(shape, data, block, seed):
    size = tuple(data.draw(st.integers(1, n + 2)) for n in shape)
    _agree("window", *_qkv(seed, 0, 0, grid=tuple(shape)), block, window_size=size)
