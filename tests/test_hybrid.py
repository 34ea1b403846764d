"""attnlab.models: hybrid layer plans, forward shapes, backward, causality, validation, the three forms
(parallel / chunked / recurrent forward) and incremental decoding (prefill + step == forward)."""
import pytest
import torch

import attnlab
from attnlab.models import build_hybrid, layer_plan, training_impl

A, B = "sliding_window", "dense"


def names(plan):
    return [n for n, _ in plan]


@pytest.mark.parametrize("placement, want", [
    ("interleave", [A, A, A, B, A, A, A, B]),  # N x (3 linear then 1 full), the Systematic Analysis layout
    ("first", [B, B, A, A, A, A, A, A]),
    ("last", [A, A, A, A, A, A, B, B]),
])
def test_layer_plan_3_to_1(placement, want):
    assert names(layer_plan(8, [A, B], "3:1", placement)) == want


@pytest.mark.parametrize("ratio, placement, want", [
    ("1:1", "interleave", [A, B, A, B]),
    ("1:3", "interleave", [A, B, B, B]),
    ((2, 1), "first", [B, A, A]),
    ("2:1", "last", [A, A, B]),
])
def test_layer_plan_ratios(ratio, placement, want):
    n = len(want)
    plan = layer_plan(n, [A, B], ratio, placement)
    assert names(plan) == want
    a, b = (int(x) for x in (ratio.split(":") if isinstance(ratio, str) else ratio))
    assert names(plan).count(B) * a == names(plan).count(A) * b


def test_layer_plan_single_and_explicit():
    assert layer_plan(3, (A, {"window": 4})) == [(A, {"window": 4})] * 3
    assert names(layer_plan(2, B)) == [B, B]
    assert names(layer_plan(3, [A, B, A])) == [A, B, A]
    plan = layer_plan(4, [(A, {"window": 2}), B], "1:1")
    assert plan[0] == (A, {"window": 2}) and plan[1] == (B, {})


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_layers=6, mixers=[A, B], ratio="3:1"), "n_layers"),
    (dict(n_layers=0, mixers=B), "n_layers"),
    (dict(n_layers=4, mixers=[A, B], ratio="3-1"), "ratio"),
    (dict(n_layers=4, mixers=[A, B], ratio="3:0"), "ratio"),
    (dict(n_layers=4, mixers=[A, B, B], ratio="2:1:1"), "ratio"),
    (dict(n_layers=4, mixers=B, ratio="3:1"), "ratio"),
    (dict(n_layers=4, mixers=[A, B], ratio="1:1", placement="middle"), "placement"),
    (dict(n_layers=3, mixers=[A, B]), "mixers"),
    (dict(n_layers=2, mixers=[A, 3]), r"mixers\[1\]"),
])
def test_layer_plan_errors_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        layer_plan(**kwargs)


def test_build_hybrid_places_mechanisms():
    model = build_hybrid(11, 16, 4, 2, [(A, {"window": 3}), B], "1:1", "last", max_len=20)
    assert [b.mixer.mech.name for b in model.blocks] == [A, A, B, B]
    assert model.blocks[0].mixer.static == {"window": 3}
    assert model.plan == layer_plan(4, [(A, {"window": 3}), B], "1:1", "last")


def test_forward_shapes_tokens_and_features():
    model = build_hybrid(13, 16, 2, 4, [A, B], "1:1", max_len=10, mlp_ratio=2, seed=0)
    x = torch.randint(0, 13, (3, 9))
    assert model(x).shape == (3, 9, 13)
    assert model.features(x).shape == (3, 9, 16)
    reg = build_hybrid(None, 16, 1, 2, B, input_dim=5, out_dim=1, positions="none")
    assert reg(torch.randn(2, 7, 5)).shape == (2, 7, 1)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.randint(0, 13, (1, 11)))
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(1, 5, 16))


def test_seed_makes_initialization_reproducible():
    a = build_hybrid(7, 8, 2, 2, [A, B], "1:1", seed=3).state_dict()
    b = build_hybrid(7, 8, 2, 2, [A, B], "1:1", seed=3).state_dict()
    c = build_hybrid(7, 8, 2, 2, [A, B], "1:1", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("mixers, ratio", [(B, None), ([(A, {"window": 2}), B], "1:1"), ("alibi", None)])
def test_backward_reaches_every_parameter(mixers, ratio):
    torch.manual_seed(0)
    model = build_hybrid(9, 16, 2, 2, mixers, ratio, max_len=12, seed=1)
    x = torch.randint(0, 9, (2, 12))
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for block in model.blocks:
        assert block.mixer.qkv.weight.grad.abs().sum() > 0


def test_training_impl_has_a_backward_on_cpu():
    q = k = v = torch.randn(1, 2, 8, 4)
    # SDPA first when it serves; a score modifier rules it out and CPU FlexAttention is inference-only: tiled.
    assert training_impl(attnlab.mechanism("dense"), q, k, v, True, {}) == "sdpa"
    assert training_impl(attnlab.mechanism(A), q, k, v, True, {"window": 3}) == "sdpa"
    assert training_impl(attnlab.mechanism("alibi"), q, k, v, True, {}) == "tiled"
    assert training_impl(attnlab.mechanism("tiled"), q, k, v, True, {}) == "tiled"


@pytest.mark.parametrize("mixers, ratio", [(B, None), ([(A, {"window": 3}), B], "1:1"), ("alibi", None)])
def test_causal_model_ignores_later_tokens(mixers, ratio):
    model = build_hybrid(17, 16, 2, 2, mixers, ratio, max_len=16, seed=0).eval()
    x = torch.randint(0, 17, (2, 16))
    with torch.no_grad():
        full = model(x)
        for i in (0, 5, 11):
            y = x.clone()
            y[:, i + 1:] = torch.randint(0, 17, y[:, i + 1:].shape)
            y[:, i + 1:] = (y[:, i + 1:] + 1) % 17  # surely different
            torch.testing.assert_close(model(y)[:, :i + 1], full[:, :i + 1], rtol=0, atol=1e-5)


def test_noncausal_model_sees_later_tokens():
    model = build_hybrid(17, 16, 1, 2, B, causal=False, max_len=8, seed=0).eval()
    x = torch.randint(0, 17, (1, 8))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 17
    with torch.no_grad():
        assert (model(x)[:, 0] - model(y)[:, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(vocab=0), ValueError, "vocab"),
    (dict(vocab=None), ValueError, "input_dim"),
    (dict(input_dim=3), ValueError, "input_dim"),
    (dict(d_model=10, heads=4), ValueError, "heads"),
    (dict(positions="rope"), ValueError, "positions"),
    (dict(mlp_ratio=-1), ValueError, "mlp_ratio"),
    (dict(causal=1), TypeError, "causal"),
    (dict(mixers="densee"), KeyError, "densee"),
    (dict(mixers=(A, {"windw": 3})), TypeError, "windw"),
    (dict(mixers=(A, {"window": 0})), ValueError, "window"),
    (dict(mixers="prefix_lm"), ValueError, "causal_self"),  # defines noncausal_self only
    (dict(mixers="neighborhood"), ValueError, "sequence"),  # a grid mechanism
    (dict(impl="bogus"), ValueError, "impl"),
])
def test_build_hybrid_validation(kwargs, exc, match):
    args = dict(vocab=5, d_model=8, n_layers=1, heads=2, mixers=B)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        build_hybrid(**args)


# ---- generic hooks for entries with extra inputs -------------------------------------------
def _toy(name, run, params=(), extras=None):
    from attnlab.catalogue import Implementation, Mechanism

    return Mechanism(name=name, family="test", paper="-", summary="-", formula="-", layout="sequence",
                     patterns=("causal_self", "noncausal_self"), params=tuple(params),
                     impls=(Implementation("reference", run),), gqa=False, extras=extras or {})


def _gated(call, q, k, v):
    """Causal softmax attention whose values are scaled by a per-token gate (B, H, L, 1)."""
    return attnlab.reference.attention(q, k, v * call.params["gate"], causal=call.causal)


def test_tensor_params_become_learned_parameters():
    from attnlab.models import TokenMixer

    table = torch.randn(2, 9)
    mixer = TokenMixer(16, 2, "relative_bias", {"table": table})
    assert set(dict(mixer.named_parameters())) >= {"learned.table"} and mixer.static == {}
    mixer(torch.randn(2, 6, 16)).sum().backward()
    assert mixer.learned["table"].grad.abs().sum() > 0
    assert torch.equal(table, table.clone())  # the given tensor is copied, not trained in place


def test_from_input_hook_computes_per_token_parameters():
    from attnlab.catalogue import Param
    from attnlab.models import TokenMixer

    gate = Param("gate", "tensor", None, "per-token value gate (B, H, L, 1)", per_token=True)
    toy = _toy("toy_gated", _gated, (gate,), {"from_input": {"gate": (torch.sigmoid, 1)}})
    mixer = TokenMixer(16, 2, toy)
    assert mixer.from_input["gate"].out_features == 2  # heads x width 1
    x = torch.randn(3, 7, 16)
    params = mixer.call_params(x)
    assert params["gate"].shape == (3, 2, 7, 1) and ((params["gate"] > 0) & (params["gate"] < 1)).all()
    mixer(x).sum().backward()
    assert mixer.from_input["gate"].weight.grad.abs().sum() > 0
    y = x.clone()
    y[:, 4:] = torch.randn(3, 3, 16)  # the gates of later tokens cannot reach earlier outputs
    torch.testing.assert_close(mixer(y)[:, :4], mixer(x)[:, :4])
    fixed = TokenMixer(16, 2, toy, {"gate": torch.ones(1, 1, 7, 1)})  # given: used (learned), not computed
    assert len(fixed.from_input) == 0 and "gate" in fixed.learned


def test_shared_query_hook_uses_one_learned_query_per_head():
    from attnlab.models import TokenMixer

    def run(call, q, k, v):
        if not torch.equal(q, q[:, :, :1].expand_as(q)):
            raise ValueError("q must repeat one query along the length axis")
        return attnlab.reference.attention(q, k, v, causal=call.causal)

    mixer = TokenMixer(16, 4, _toy("toy_shared", run, extras={"shared_query": "one query per head"}))
    assert mixer.query.shape == (4, 4) and mixer.qkv.out_features == 32  # k and v only
    mixer(torch.randn(2, 5, 16)).sum().backward()
    assert mixer.query.grad.abs().sum() > 0


def test_unsupported_mixers_are_value_and_not_implemented_errors():
    from attnlab.models import UnsupportedMixer

    for mixers in ("prefix_lm", "neighborhood"):
        with pytest.raises(UnsupportedMixer) as e:
            build_hybrid(5, 8, 1, 2, mixers)
        assert isinstance(e.value, ValueError) and isinstance(e.value, NotImplementedError)



# ---- three forms and incremental decoding ----------------------------------------------------
VOCAB, LEN, PREFIX = 13, 11, 5
SW = (A, {"window": 3})


def _decode(model, x, prefix):
    """Logits of prefill(x[:, :prefix]) then step() per remaining token, and the cache after each token."""
    with torch.no_grad():
        if prefix:
            logits, cache = model.prefill(x[:, :prefix])
            outs, caches = [logits], [cache]
        else:
            cache, outs, caches = None, [], []
        for t in range(prefix, x.shape[1]):
            logits_t, cache = model.step(x[:, t], cache)
            outs.append(logits_t[:, None])
            caches.append(cache)
    return torch.cat(outs, dim=1), caches


HYBRIDS = [  # (A, B, ratio, placement): chunk sizes that do not divide the lengths
    (("lightning", {"chunk_size": 3}), "dense", "3:1", "interleave"),
    (("retention", {"chunk_size": 4}), SW, "1:1", "first"),
    (("gla", {"chunk_size": 3}), "dense", "1:1", "last"),  # gates computed from the input (from_input)
    (("based", {"window": 3, "feature_dim": 4, "chunk_size": 4}), SW, "3:1", "last"),
    ("linear", SW, "1:1", "interleave"),
    (("aaren", {"chunk_size": 3}), SW, "1:1", "interleave"),  # one learned query per head (shared_query)
]


def _ids(hybrids):
    name = lambda spec: spec if isinstance(spec, str) else spec[0]  # noqa: E731
    return [f"{name(a)}+{name(b)}-{r}-{p}" for a, b, r, p in hybrids]


@pytest.mark.parametrize("a, b, ratio, placement", HYBRIDS, ids=_ids(HYBRIDS))
def test_prefill_and_step_equal_the_full_forward(a, b, ratio, placement):
    n_layers = 4 if ratio == "3:1" else 2
    model = build_hybrid(VOCAB, 8, n_layers, 2, [a, b], ratio, placement, max_len=16, mlp_ratio=1,
                         seed=0).double().eval()
    x = torch.randint(0, VOCAB, (2, LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
    decoded, caches = _decode(model, x, PREFIX)
    torch.testing.assert_close(decoded, full, rtol=0, atol=1e-12)
    assert [c.length for c in caches] == list(range(PREFIX, LEN + 1))
    from_scratch, _ = _decode(model, x[:1], 0)  # step from the first token (cache=None), batch of one
    torch.testing.assert_close(from_scratch, full[:1], rtol=0, atol=1e-12)
    with torch.no_grad():  # prefill continuing a cache: segments equal the whole
        first, cache = model.prefill(x[:, :3])
        rest, cache = model.prefill(x[:, 3:], cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=0, atol=1e-12)


def test_features_model_decodes_with_positions_and_per_token_tensors():
    """Features in (input_dim), no learned positions, and a *given* per-token tensor (RAT's gates, learned,
    covering max_len positions): sliced at the absolute positions in forward, prefill and step alike."""
    gates = torch.rand(1, 2, 16, 1, generator=torch.Generator().manual_seed(2))
    model = build_hybrid(None, 8, 2, 2, [("rat", {"chunk": 3, "gates": gates}), "dense"], "1:1", input_dim=3,
                         out_dim=2, positions="none", max_len=16, seed=0).double().eval()
    x = torch.randn(2, LEN, 3, dtype=torch.float64)
    with torch.no_grad():
        full = model(x)
    decoded, _ = _decode(model, x, PREFIX)
    torch.testing.assert_close(decoded, full, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="gates"):
        model(torch.randn(1, 17, 3, dtype=torch.float64))  # beyond the 16 positions the gates cover


@pytest.mark.parametrize("name, params", [
    (A, {"window": 2}), ("sink_window", {"window": 2, "sinks": 1}), ("strided", {"stride": 3}),
    ("head_sharded", {"block_size": 2, "local_blocks": 2, "vert_stride": 2}), ("alibi", {}), ("softcap", {}),
    ("relative_bias", {"table": torch.randn(2, 31)}), ("tiled", {}), ("inline", {}), ("titans", {}),
    ("agent", {"agents": torch.randn(1, 2, 3, 4)}), ("rat", {"chunk": 3}),
])
def test_every_decodable_entry_decodes_exactly(name, params):
    """Softmax entries through the causal_cross call against the KV cache (bottom-right aligned: relative
    biases and windows must count from the absolute position), recurrent ones through their State."""
    model = build_hybrid(VOCAB, 8, 1, 2, (name, params), max_len=16, mlp_ratio=0, seed=0).double().eval()
    x = torch.randint(0, VOCAB, (2, LEN), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x)
    decoded, caches = _decode(model, x, PREFIX)
    torch.testing.assert_close(decoded, full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("a, b, ratio, placement", HYBRIDS[:4], ids=_ids(HYBRIDS[:4]))
def test_three_forms_agree(a, b, ratio, placement):
    from attnlab.models import FORMS

    n_layers = 4 if ratio == "3:1" else 2
    model = build_hybrid(VOCAB, 8, n_layers, 2, [a, b], ratio, placement, max_len=16, seed=0).double().eval()
    x = torch.randint(0, VOCAB, (2, LEN), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        parallel = model(x, form="parallel")
        for form in FORMS:
            torch.testing.assert_close(model(x, form=form), parallel, rtol=0, atol=1e-12)
    # the forms really differ per layer: recurrent entries run that form, softmax entries their default
    q = k = v = torch.randn(2, 2, LEN, 4, dtype=torch.float64)
    for block in model.blocks:
        mixer = block.mixer
        params = mixer.call_params(torch.randn(2, LEN, 8, dtype=torch.float64))
        for form in ("parallel", "chunked", "recurrent"):
            want = form if mixer.mech.recurrence is not None else training_impl(mixer.mech, q, k, v, True, params)
            assert mixer.implementation(q, k, v, params, form) == want
    with pytest.raises(ValueError, match="form"):
        model(x, form="tiled")


def test_cache_memory_constant_for_states_growing_for_kv():
    name, params = "lightning", {"chunk_size": 3}
    model = build_hybrid(VOCAB, 8, 4, 2, [(name, params), "dense"], "3:1", max_len=16, seed=0).double().eval()
    assert model.decode_kinds() == ["state", "state", "state", "kv"]
    x = torch.randint(0, VOCAB, (2, LEN))
    _, caches = _decode(model, x, 2)
    mech = attnlab.mechanism(name)
    state_floats = 2 * mech.state_size(2, 4, 4, **mech.normalize_params(params))  # batch 2, 2 heads of dim 4
    for c in caches:
        assert c.floats()[:3] == [state_floats] * 3  # the catalogue's state size, whatever the length
        assert c.floats()[3] == 2 * 2 * 2 * c.length * 4  # k and v: B x H x t x d each


def test_step_leaves_the_given_cache_usable():
    model = build_hybrid(VOCAB, 8, 2, 2, ["gla", "dense"], "1:1", max_len=16, seed=0).double().eval()
    x = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        _, cache = model.prefill(x[:, :4])
        a, _ = model.step(x[:, 4], cache)
        b, _ = model.step(x[:, 4], cache)  # the same cache again: a branch, not a continuation
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_decoding_errors():
    from attnlab.models import UnsupportedMixer

    model = build_hybrid(VOCAB, 8, 2, 2, ["retention", "dense"], "1:1", max_len=8, seed=0)
    x = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        _, cache = model.prefill(x)
        with pytest.raises(ValueError, match=r"x_t must be token ids of shape \(B,\)"):
            model.step(x[:, :2], cache)
        with pytest.raises(ValueError, match="x_t must be token ids"):
            model.step(torch.zeros(2), cache)
        with pytest.raises(ValueError, match="batch of 2"):
            model.step(x[:1, 0], cache)
        with pytest.raises(TypeError, match="cache must be a DecodeCache"):
            model.step(x[:, 0], {"length": 6})
        _, cache = model.prefill(x[:, :2], cache)  # positions 6, 7: max_len 8 reached
        with pytest.raises(ValueError, match="max_len 8"):
            model.step(x[:, 0], cache)
        with pytest.raises(UnsupportedMixer, match="non-causal"):
            build_hybrid(VOCAB, 8, 1, 2, "retention", causal=False).prefill(x)
        unsupported = build_hybrid(VOCAB, 8, 2, 2, ["retention", ("shifted_sparse", {"group_size": 2})], "1:1",
                                   max_len=8)
        with pytest.raises(UnsupportedMixer, match="layer 1: shifted_sparse .*causal_cross"):
            unsupported.step(x[:, 0])
        unsupported(x)  # its forward still works
    feats = build_hybrid(None, 8, 1, 2, "dense", input_dim=3, out_dim=1)
    with pytest.raises(ValueError, match=r"x_t must be features of shape \(B, 3\)"):
        feats.step(torch.randn(2, 1, 3))
