"""LongCA-bench's mask set: every composed mask equals LongCA-bench's own construction (query/key
ranges with FULL or bottom-right CAUSAL areas), pair by pair; its FLOP count is the area count;
the drawn quantities stay in LongCA-bench's ranges; document lengths are long-tailed and seeded."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from attnlab import bench, reference
from attnlab.bench import flops, longca
from attnlab.patterns import executor as ex

FULL, CAUSAL = 0, 1


# --------------------------------------------------------------------------------------------
# LongCA-bench's construction, written from its generator's definitions: lists of
# (q_range, k_range, type); CAUSAL is bottom-right aligned inside its rectangle (MagiAttention).
# --------------------------------------------------------------------------------------------
def _cu(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _ranges(mask: str, L: int, p: dict):
    docs = p.get("document_lengths")
    cu = _cu(docs) if docs else None
    if mask == "full":
        return [((0, L), (0, L), FULL)]
    if mask == "causal":
        return [((0, L), (0, L), CAUSAL)]
    if mask in ("causal_document", "full_document"):
        t = CAUSAL if mask == "causal_document" else FULL
        return [((cu[i], cu[i + 1]), (cu[i], cu[i + 1]), t) for i in range(len(docs))]
    if mask == "prefix_lm_causal":
        s = p["prefix"]
        return [((0, s), (0, s), FULL), ((s, L), (0, L), CAUSAL)] if s < L else [((0, L), (0, L), FULL)]
    if mask == "prefix_lm_document":
        f, out = p["prefix"], []
        for i, n in enumerate(docs):
            s, e = cu[i], cu[i + 1]
            if f < n:
                out += [((s, s + f), (s, s + f), FULL), ((s + f, e), (s, e), CAUSAL)]
            else:
                out.append(((s, e), (s, e), FULL))
        return out
    if mask == "share_question":
        q, k, t = [], [], []
        for i in range(len(docs)):
            if i == 1:
                q[0], k[0] = (0, cu[2]), (0, cu[2])
                if len(docs) > 2:
                    q.append((cu[2], L))
                    k.append((0, cu[1]))
                    t.append(FULL)
            else:
                q.append((cu[i], cu[i + 1]))
                k.append((cu[i], cu[i + 1]))
                t.append(CAUSAL)
        return list(zip(q, k, t))
    if mask == "causal_blockwise":
        out = [((cu[i], cu[i + 1]), (cu[i], cu[i + 1]), CAUSAL) for i in range(len(docs))]
        out[-1] = (out[-1][0], (0, L), CAUSAL)
        return out
    if mask == "block_causal_document":
        b, out = p["block_size"], []
        for i, n in enumerate(docs):
            assert n % b == 0
            for j in range(n // b):
                out.append(((cu[i] + j * b, cu[i] + (j + 1) * b), (cu[i], cu[i] + (j + 1) * b), FULL))
        return out
    return None


def _dense(mask: str, L: int, p: dict) -> torch.Tensor:
    """LongCA-bench's mask as an (L, L) boolean matrix."""
    i = torch.arange(L).view(-1, 1)
    j = torch.arange(L).view(1, -1)
    if mask in ("sliding_window", "sliding_window_causal"):  # FlashAttention window (w, w) / (w, 0)
        w = p["window"]
        return (j >= i - w) & (j <= i + (0 if mask.endswith("causal") else w))
    if mask == "global_sliding_window":  # its FlexAttention kernel benchmark's rule
        w = p["window"]
        return ((i - j) <= w) & ((j - i) <= w) | (i < 2 * w) | (j < 2 * w)
    out = torch.zeros(L, L, dtype=torch.bool)
    for (qs, qe), (ks, ke), t in _ranges(mask, L, p):
        r = torch.arange(qe - qs).view(-1, 1)
        u = torch.arange(ke - ks).view(1, -1)
        area = torch.ones(qe - qs, ke - ks, dtype=torch.bool) if t == FULL else u <= r + (ke - ks) - (qe - qs)
        out[qs:qe, ks:ke] |= area
    return out


def _ours(name: str, L: int, p: dict, H: int = 2, D: int = 8):
    m = longca.mechanism(name)
    q = torch.zeros(1, H, L, D)
    call = m.prepare(q, q, q, causal=m.patterns[0] == "causal_self", **p)
    mask, _ = ex.plan(call)
    if mask is None:
        return torch.ones(L, L, dtype=torch.bool), call
    got = mask.build(ex.geometry(call, tiled_order=False))(*reference.index_grid(1, 1, L, L, "cpu"))
    return got.reshape(L, L), call


@pytest.mark.parametrize("mask", list(longca.MASKS))
@pytest.mark.parametrize("seed", [0, 3])
def test_masks_equal_longca_ranges_and_flops_count_area(mask, seed):
    L = 256 if mask == "block_causal_document" else 300
    if mask == "block_causal_document":
        p = {"document_lengths": longca.block_documents(L, 32, random.Random(seed)), "block_size": 32}
    else:
        p = longca.draw_params(mask, L, seed)
        if mask in ("sliding_window", "sliding_window_causal"):
            p = {"window": 37}  # the benchmark's 512 covers all of a 300-token test sequence
    want = _dense(mask, L, p)
    got, call = _ours(f"longca:{mask}", L, p)
    assert torch.equal(got, want), mask
    if longca.MASKS[mask]:  # listed as causal: a subset of the causal mask, run as a causal call
        assert not (want & ~torch.ones(L, L, dtype=torch.bool).tril()).any()
    # LongCA-bench's FLOP count: 4 * area * heads * head_dim forward (area = visible pairs), 3.5x with backward
    area = int(want.sum())
    assert flops.unmasked_pairs(call) == area * call.q_heads
    assert flops.count(call, "fwd") == (4 * area * call.q_heads * call.head_dim, area * call.q_heads)
    assert flops.count(call, "fwdbwd")[0] == 3.5 * 4 * area * call.q_heads * call.head_dim


@pytest.mark.parametrize("mask", ["share_question", "prefix_lm_document", "global_sliding_window",
                                  "causal_blockwise"])
def test_masked_output_is_attention_under_longca_mask(mask, single_thread):
    L, H, D = 160, 2, 8
    p = longca.draw_params(mask, L, 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    m = longca.mechanism(f"longca:{mask}")
    got = m(q, k, v, causal=m.patterns[0] == "causal_self", impl="tiled", **p)
    want = reference.attention(q, k, v, mask=_dense(mask, L, p))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_drawn_quantities_follow_longca_and_are_seeded():
    for L in (1024, 4096):
        for seed in range(5):
            d = {m: longca.draw_params(m, L, seed) for m in longca.MASKS}
            assert d == {m: longca.draw_params(m, L, seed) for m in longca.MASKS}  # deterministic
            assert 1 <= d["prefix_lm_causal"]["prefix"] <= L
            docs = d["prefix_lm_document"]["document_lengths"]
            assert sum(docs) == L and 1 <= d["prefix_lm_document"]["prefix"] <= docs[0]
            assert 1 <= d["global_sliding_window"]["window"] <= L // 3 - 1
            b = d["block_causal_document"]
            assert sum(b["document_lengths"]) == L and all(n % b["block_size"] == 0 and 1 <= n // b["block_size"] <= 8
                                                           for n in b["document_lengths"])
            assert d["sliding_window"] == {"window": longca.WINDOW}
    # one uniform per (seed, mask): the prefix keeps its share of the sequence across lengths
    a, b = (longca.draw_params("prefix_lm_causal", L, 7)["prefix"] for L in (1024, 4096))
    assert abs(a / 1024 - b / 4096) < 2 / 1024
    assert longca.draw_params("full_document", 4096, 0) != longca.draw_params("full_document", 4096, 1)


def test_document_lengths_are_long_tailed_like_the_pile():
    lengths = longca.document_lengths(10_000_000, random.Random(0))
    assert sum(lengths) == 10_000_000 and min(lengths) >= 1
    q25, q50, q90 = np.percentile(lengths[:-1], [25, 50, 90])
    assert 200 < q50 < 320 and 70 < q25 < 130 and 1300 < q90 < 2200  # Pile: ~100 / 256 / 1700 tokens
    assert max(lengths) > 20 * q50  # a long tail


def test_longca_in_the_plan():
    args = bench.parse_args(["--mechanisms", "longca,longca:share_question,dense", "--lengths", "1024",
                             "--directions", "fwd", "--patterns", "causal_cross", "--seed", "4"])
    cases = bench.plan_cases(args)
    lc = {c.mechanism: c for c in cases if c.mechanism.startswith("longca:")}
    assert set(lc) == {f"longca:{m}" for m in longca.MASKS}  # duplicates dropped later by key
    for name, c in lc.items():  # each runs at its own pattern whatever --patterns says
        assert c.pattern == ("causal_self" if longca.MASKS[name.split(":")[1]] else "noncausal_self")
        assert c.params == {k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in longca.draw_params(name.split(":")[1], 1024, 4).items()}
    assert {c.pattern for c in cases if c.mechanism == "dense"} == {"causal_cross"}
    with pytest.raises(KeyError, match="share_question"):
        longca.mechanism("longca:share_questions")
    assert bench.main(["--mechanisms", "longca:nope", "--store", "/nonexistent/x.sqlite"]) == 2
