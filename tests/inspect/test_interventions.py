"""Interventions: exact formulas on hand-made rows, row sums, reversibility on real models,
and a defined composition order."""
import math

import pytest
import torch

from attnlab.inspect import interventions as I
from attnlab.inspect.hooks import AttnlabAttention, Site, attention_hooks, softmax_weights

TEXT = "The quick brown fox jumps over the lazy dog. It was a sunny day."


def site_for(w, visible, layer=0):
    B, Hq, Lq, Lk = w.shape
    return Site(layer, None, torch.zeros(B, Hq, Lq, 4), torch.zeros(B, Hq, Lk, 4), torch.zeros(B, Hq, Lk, 4),
                visible, 0.5, 1)


def causal_weights(B=2, H=3, L=6, seed=0):
    torch.manual_seed(seed)
    vis = torch.ones(L, L, dtype=torch.bool).tril().view(1, 1, L, L)
    w = torch.softmax(torch.randn(B, H, L, L).masked_fill(~vis, -math.inf), -1)
    return w, vis


ALL = [
    I.HeadAblation(None, "mean"),
    I.SinkCalibration(beta=0.4, threshold=0.1),
    I.InitialTokenScaling(2.5),
    I.SinkRedistribution(sinks=(0,), p=0.6, rho=0.9, summ=0.0),
    I.IdentityInterpolation(0.3),
]


@pytest.mark.parametrize("it", ALL, ids=lambda it: type(it).__name__)
def test_row_sums_stay_one_over_visible_keys(it):
    w, vis = causal_weights()
    w[:, :, 1:, 0] += 3.0  # make key 0 a sink, renormalize
    w = (w * vis) / (w * vis).sum(-1, keepdim=True)
    new = it(site_for(w, vis), w)
    torch.testing.assert_close(new.sum(-1), torch.ones(new.shape[:-1]), atol=1e-6, rtol=0)
    assert torch.all(new[~vis.expand_as(new)].abs() < 1e-7)  # nothing moves to hidden keys
    assert not torch.equal(new, w)


def test_zero_ablation_only_chosen_heads():
    w, vis = causal_weights()
    new = I.HeadAblation({0: [1]}, "zero")(site_for(w, vis), w)
    assert torch.all(new[:, 1] == 0) and torch.equal(new[:, [0, 2]], w[:, [0, 2]])
    assert I.HeadAblation({1: [1]})(site_for(w, vis, layer=0), w) is None  # other layer: untouched


def test_act_calibration_formula():
    w = torch.tensor([0.5, 0.3, 0.2]).view(1, 1, 1, 3)
    vis = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    new = I.SinkCalibration(beta=0.4, sinks=[1])(site_for(w, vis), w)[0, 0, 0]
    gone = 0.3 * 0.6
    torch.testing.assert_close(new, torch.tensor([0.5 + gone * 5 / 7, 0.12, 0.2 + gone * 2 / 7]))
    # detection: key 2 receives > 0.1 on average, key 0 (initial token) is never calibrated
    w2 = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.4, 0.1, 0.5]]).view(1, 1, 3, 3)
    vis2 = torch.ones(3, 3, dtype=torch.bool).tril().view(1, 1, 3, 3)
    out = I.SinkCalibration(beta=0.0, threshold=0.45)(site_for(w2, vis2), w2)[0, 0]
    # received: key0 0.633 (excluded), key1 0.3, key2 0.5 > 0.45 -> key 2 is the sink
    torch.testing.assert_close(out[2], torch.tensor([0.8, 0.2, 0.0]))
    torch.testing.assert_close(out[:2], w2[0, 0, :2])


def test_zerotuning_formula():
    w = torch.tensor([0.5, 0.25, 0.25]).view(1, 1, 1, 3)
    new = I.InitialTokenScaling(2.0)(site_for(w, torch.ones(1, 1, 1, 3, dtype=torch.bool)), w)
    torch.testing.assert_close(new[0, 0, 0], torch.tensor([1.0, 0.25, 0.25]) / 1.5)


def test_var_formula_and_row_selection():
    vis = torch.ones(1, 1, 2, 4, dtype=torch.bool)
    # row 0: sink share 0.4 <= rho -> changed; row 1: sink share 0.8 > rho -> kept
    w = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.8, 0.1, 0.05, 0.05]]).view(1, 1, 2, 4)
    new = I.SinkRedistribution(sinks=(0,), p=0.5, rho=0.5, summ=0.2, region=(1, 3))(site_for(w, vis), w)[0, 0]
    # region = keys 1, 2; row 0: region mass 0.5 >= summ, sink share in region 0 -> changed;
    # (1-p) * 0.4 = 0.2 goes to keys 1, 2 in ratio 3:2; key 3 (outside the region) unchanged
    torch.testing.assert_close(new[0], torch.tensor([0.2, 0.3 + 0.12, 0.2 + 0.08, 0.1]))
    torch.testing.assert_close(new[1], w[0, 0, 1])  # region mass 0.15 < summ
    new = I.SinkRedistribution(sinks=(0,), p=0.5, rho=0.5, summ=0.2)(site_for(w, vis), w)[0, 0]
    assert not torch.equal(new[0], w[0, 0, 0]) and torch.equal(new[1], w[0, 0, 1])  # 0.8 share > rho


def test_softpag_formula_cross_attention_identity():
    w = torch.full((1, 1, 2, 4), 0.25)
    new = I.IdentityInterpolation(0.5)(site_for(w, torch.ones(1, 1, 2, 4, dtype=torch.bool)), w)[0, 0]
    # queries sit at positions 2 and 3 (bottom-right)
    torch.testing.assert_close(new, torch.tensor([[0.125, 0.125, 0.625, 0.125], [0.125, 0.125, 0.125, 0.625]]))


@pytest.mark.parametrize("causal", [False, True])
def test_mean_ablation_gives_the_mean_head_output(causal):
    """Bidirectional: every position gets the head's mean output; causal: the prefix mean."""
    torch.manual_seed(0)
    m = AttnlabAttention(8, 2, bias=False, causal=causal)
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        v, q, k = (f(x).view(1, 5, 2, 4).transpose(1, 2) for f in (m.v, m.q, m.k))
        vis = torch.ones(5, 5, dtype=torch.bool)
        vis = (vis.tril() if causal else vis).view(1, 1, 5, 5)
        o = softmax_weights(q, k, vis, 0.5) @ v                         # (1, 2, 5, 4)
        want = o.clone()
        counts = torch.arange(1, 6).view(5, 1).float()
        want[:, 1] = o[:, 1].cumsum(1) / counts if causal else o[:, 1].mean(1, keepdim=True)
        with I.HeadAblation({0: [1]}, "mean").apply(m):
            out = m(x)
    torch.testing.assert_close(out, m.o(want.transpose(1, 2).reshape(1, 5, 8)), atol=1e-6, rtol=0)


def test_composition_order_is_entry_order():
    torch.manual_seed(0)
    m = AttnlabAttention(8, 2)
    x = torch.randn(1, 6, 8)
    a, b = I.IdentityInterpolation(0.5), I.InitialTokenScaling(3.0)
    seen = {}

    def record(key):
        return lambda site, w: seen.__setitem__(key, (site, w))

    with torch.no_grad():
        with attention_hooks(m, record("plain")):
            m(x)
        with I.apply(m, a, b), attention_hooks(m, record("ab")):
            m(x)
        with b.apply(m), a.apply(m), attention_hooks(m, record("ba")):
            m(x)
    site, w = seen["plain"]
    torch.testing.assert_close(seen["ab"][1], b(site, a(site, w)))
    torch.testing.assert_close(seen["ba"][1], a(site, b(site, w)))
    assert not torch.allclose(seen["ab"][1], seen["ba"][1])


def test_mask_mods():
    w = torch.zeros(1, 1, 4, 6)
    site = site_for(w, torch.ones(6, 6, dtype=torch.bool).tril()[2:].view(1, 1, 4, 6))
    vis = I.window_mask(2, sinks=1)(site)[0, 0].int()
    # queries at positions 2..5 see themselves, the previous key and key 0
    assert vis.tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 1, 1]]
    hid = I.hide_span(1, 3)(site)[0, 0].int()
    assert hid[:, 1:3].sum() == 0 and hid[:, 0].tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="window"):
        I.window_mask(0)
    with pytest.raises(ValueError, match="start"):
        I.hide_span(3, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        I.HeadAblation(None, "random")
    with pytest.raises(ValueError, match="beta"):
        I.SinkCalibration(beta=1.5)
    with pytest.raises(ValueError, match="gamma"):
        I.InitialTokenScaling(-1)
    with pytest.raises(ValueError, match="alpha"):
        I.IdentityInterpolation(2)
    with pytest.raises(ValueError, match="region"):
        I.SinkRedistribution(region=(5, 2))
    with pytest.raises(ValueError, match=r"\(layer, head\) pairs"):
        I.HeadAblation([(0, 1, 2)])
    with pytest.raises(ValueError, match="head 40 does not exist"):
        m = AttnlabAttention(8, 2)
        with I.HeadAblation({0: [40]}).apply(m):
            m(torch.randn(1, 3, 8))


# ---------------------------------------------------------------------------------------------
# real models: the model runs, the intervention acts, leaving restores the exact outputs
# ---------------------------------------------------------------------------------------------
def test_reversible_on_minilm(minilm):
    model, tok = minilm
    enc = tok(TEXT, return_tensors="pt")
    its = [I.HeadAblation({2: [0, 3]}), I.HeadAblation({1: None}, "mean"), I.SinkCalibration({3: None}),
           I.InitialTokenScaling(0.5, heads={0: [1, 2]}), I.SinkRedistribution(p=0.5, rho=1.0),
           I.IdentityInterpolation(0.7, heads=[(5, 0), (5, 11)])]
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        for it in its:
            with it.apply(model):
                changed = model(**enc).last_hidden_state
            assert torch.isfinite(changed).all()
            assert not torch.allclose(changed, ref, atol=1e-4), type(it).__name__
            assert torch.equal(model(**enc).last_hidden_state, ref), type(it).__name__
        with I.apply(model, *its):
            assert torch.isfinite(model(**enc).last_hidden_state).all()
        assert torch.equal(model(**enc).last_hidden_state, ref)


def test_sink_calibration_and_window_on_smollm2(smollm2):
    model, tok = smollm2
    enc = tok(TEXT, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
        with I.SinkCalibration(heads={l: None for l in range(2, 30)}).apply(model):
            act = model(**enc).logits
        with attention_hooks(model, mask_mod=I.window_mask(4, sinks=1)):
            win = model(**enc).logits
        with attention_hooks(model):
            full = model(**enc).logits  # same computation path, full mask
        again = model(**enc).logits
    assert torch.isfinite(act).all() and torch.isfinite(win).all()
    assert not torch.allclose(act, ref, atol=1e-3) and not torch.allclose(win, ref, atol=1e-3)
    # the first 4 queries see all their keys in a window of 4: their logits are unchanged
    assert torch.equal(win[:, :4], full[:, :4]) and not torch.allclose(win[:, 4:], full[:, 4:], atol=1e-3)
    assert torch.equal(again, ref)
