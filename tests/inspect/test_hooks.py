"""attention_hooks: the weights equal the reference oracle, a no-op hook leaves real models'
outputs unchanged, the model is switched back on exit (also on error), layer filters, order."""
import pytest
import torch

from attnlab import reference
from attnlab.inspect import hooks as H
from attnlab.inspect.hooks import AttnlabAttention, attention_hooks, softmax_weights

TEXT = "The quick brown fox jumps over the lazy dog. It was a sunny day."


def noop(site, w):
    return None


# ---------------------------------------------------------------------------------------------
# the computation
# ---------------------------------------------------------------------------------------------
def test_softmax_weights_equal_reference_with_gqa_and_empty_rows():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 7, 8)
    vis = torch.rand(2, 1, 5, 7) > 0.4
    vis[0, 0, 2] = False  # a fully masked row
    q.requires_grad_(True)
    p = softmax_weights(q, k, vis, 0.3)
    _, ref = reference.attention(q, k, torch.randn(2, 2, 7, 4), mask=vis, scale=0.3, return_weights=True)
    torch.testing.assert_close(p, ref, atol=1e-6, rtol=1e-6)
    assert torch.all(p[0, :, 2] == 0) and not torch.isnan(p).any()
    p.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("mech,kw,shape,causal", [
    ("dense", {}, (2, 7, 32), False),
    ("sliding_window", {"window": 3}, (2, 9, 32), True),
    ("alibi", {}, (1, 6, 32), True),
    ("neighborhood", {"kernel_size": 3}, (1, 4, 5, 32), False),
])
def test_attnlab_module_noop_hook_and_mechanism_mask(mech, kw, shape, causal):
    torch.manual_seed(0)
    m = AttnlabAttention(32, 4, mech, kv_heads=2, causal=causal, **kw)
    x = torch.randn(*shape)
    ref = m(x)
    sites = []
    with attention_hooks(m, lambda s, w: sites.append((s, w))):
        out = m(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    (site, w), = sites
    assert site.layer == 0 and site.kv_group == 2 and site.query.shape[1] == 4 and site.key.shape[1] == 2
    # the hooked weights are the mechanism's reference probabilities (its own mask included)
    if mech != "alibi":  # (alibi adds its score modifier on top)
        torch.testing.assert_close(w, softmax_weights(site.query, site.key, site.visible, site.scaling))
    assert torch.all(w[~site.visible.expand(w.shape)] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    if mech == "sliding_window":
        i = torch.arange(9)
        d = i[:, None] - i[None, :]
        assert torch.equal(site.visible[0, 0], (d >= 0) & (d < 3))


def test_replacement_weights_change_the_output_as_specified():
    """Uniform weights over all keys: every position outputs the mean value vector."""
    torch.manual_seed(0)
    m = AttnlabAttention(8, 2, bias=False)
    x = torch.randn(1, 5, 8)

    def uniform(site, w):
        return torch.full_like(w, 1 / w.shape[-1])

    with attention_hooks(m, uniform):
        out = m(x)
    v = m.v(x).view(1, 5, 2, 4).mean(1, keepdim=True).expand(1, 5, 2, 4).reshape(1, 5, 8)
    torch.testing.assert_close(out, m.o(v), atol=1e-6, rtol=0)


def test_fully_masked_rows_give_zero_weights_never_nan(minilm):
    model, tok = minilm
    enc = tok(TEXT, return_tensors="pt")
    seen = []

    def hide_all_from_query_3(site):
        vis = site.visible.expand(site.shape).clone()
        vis[:, :, 3] = False
        return vis

    with torch.no_grad(), attention_hooks(model, lambda s, w: seen.append(w), mask_mod=hide_all_from_query_3):
        out = model(**enc).last_hidden_state
    assert all(torch.all(w[:, :, 3] == 0) for w in seen) and len(seen) == 6
    assert torch.isfinite(out).all()


def test_hook_order_nesting_and_layer_filter(minilm):
    model, tok = minilm
    enc = tok("hello world", return_tensors="pt")
    log = []
    with torch.no_grad():
        with attention_hooks(model, lambda s, w: log.append(("outer", s.layer)), layers=[1, 3]):
            with attention_hooks(model, lambda s, w: log.append(("inner", s.layer)), layers=[3, 5]):
                model(**enc)
            assert model.config._attn_implementation == "attnlab"
        assert model.config._attn_implementation == "sdpa"
    assert log == [("outer", 1), ("outer", 3), ("inner", 3), ("inner", 5)]
    assert not H._ACTIVE and not H._SWITCHED


def test_restored_after_an_error(minilm):
    model, tok = minilm
    enc = tok("hello", return_tensors="pt")

    def boom(site, w):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), attention_hooks(model, boom):
        model(**enc)
    assert model.config._attn_implementation == "sdpa" and not H._ACTIVE and not H._SWITCHED
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), attention_hooks(model, boom, backend="eager"):
        model(**enc)
    import transformers.models.bert.modeling_bert as mb

    assert mb.eager_attention_forward.__module__ == mb.__name__  # the module function is back


def test_bad_arguments(minilm):
    model, _ = minilm
    with pytest.raises(TypeError, match="hook #1"):
        with attention_hooks(model, noop, "not callable"):
            pass
    with pytest.raises(ValueError, match=r"layers must hold attention-module indices in \[0, 5\]"):
        with attention_hooks(model, noop, layers=[6]):
            pass
    with pytest.raises(ValueError, match="backend"):
        with attention_hooks(model, noop, backend="flash"):
            pass
    with pytest.raises(ValueError, match="no attention module"):
        with attention_hooks(torch.nn.Linear(2, 2), noop):
            pass
    m = AttnlabAttention(8, 2)
    with pytest.raises(ValueError, match="must return None or weights of shape"):
        with attention_hooks(m, lambda s, w: w[..., :1]):
            m(torch.randn(1, 3, 8))
    with pytest.raises(TypeError, match="mask_mod .* must return a bool tensor"):
        with attention_hooks(m, mask_mod=lambda s: s.visible.float()):
            m(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="mechanism"):
        AttnlabAttention(8, 2, "no_such_mechanism")
    with pytest.raises(TypeError, match="unknown parameter"):
        AttnlabAttention(8, 2, "sliding_window", windw=3)


# ---------------------------------------------------------------------------------------------
# real models: a no-op hook leaves the outputs unchanged
# ---------------------------------------------------------------------------------------------
def _as_double(model):
    for p in model.parameters():
        p.data = p.data.double()


def _as_float(model):
    for p in model.parameters():
        p.data = p.data.float()


def test_minilm_noop_equality_both_backends_with_padding(minilm):
    model, tok = minilm
    enc = tok([TEXT, "Short."], return_tensors="pt", padding=True)
    keep = enc["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        for backend in ("interface", "eager"):
            with attention_hooks(model, noop, backend=backend):
                assert model.config._attn_implementation == ("attnlab" if backend == "interface" else "eager")
                out = model(**enc).last_hidden_state
            torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=0)
        # a model class that does not support attention backends gets the eager fallback automatically
        model._supports_attention_backend = False
        try:
            with attention_hooks(model, noop):
                assert model.config._attn_implementation == "eager"
                out = model(**enc).last_hidden_state
        finally:
            del model._supports_attention_backend
        torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=0)
        _as_double(model)
        try:
            ref64 = model(**enc).last_hidden_state
            with attention_hooks(model, noop):
                out64 = model(**enc).last_hidden_state
        finally:
            _as_float(model)
    torch.testing.assert_close(out64[keep], ref64[keep], atol=1e-10, rtol=0)


def test_smollm2_noop_equality_and_sites(smollm2):
    model, tok = smollm2
    enc = tok(TEXT, return_tensors="pt")
    L = enc["input_ids"].shape[1]
    sites = []
    with torch.no_grad():
        ref = model(**enc).logits
        with attention_hooks(model, lambda s, w: sites.append((s.layer, tuple(s.query.shape), tuple(s.key.shape),
                                                                s.kv_group, s.visible[0, 0].clone()))):
            out = model(**enc).logits
        with attention_hooks(model, noop, backend="eager"):
            out_eager_backend = model(**enc).logits
        assert torch.equal(out_eager_backend, out)  # same computation, additive float mask instead of bool
        # transformers' own eager path differs from its sdpa path by float32 round-off amplified over
        # 30 layers (this model has activations of ~2e4); the hooked model must be no further away
        model.set_attn_implementation("eager")
        try:
            eager = model(**enc).logits
        finally:
            model.set_attn_implementation("sdpa")
        spread = float((eager - ref).abs().max())
        assert float((out - ref).abs().max()) <= max(1e-5, 2 * spread)
        _as_double(model)
        try:
            ref64 = model(**enc).logits
            with attention_hooks(model, noop):
                out64 = model(**enc).logits
        finally:
            _as_float(model)
    torch.testing.assert_close(out64, ref64, atol=1e-10, rtol=0)
    assert [s[0] for s in sites] == list(range(30))
    layer, qs, ks, group, vis = sites[0]
    assert qs == (1, 9, L, 64) and ks == (1, 3, L, 64) and group == 3
    assert torch.equal(vis, torch.ones(L, L, dtype=torch.bool).tril())
