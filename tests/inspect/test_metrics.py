"""attnlab.inspect.metrics on hand-made maps with known answers, and capture's streaming metrics
against the model's own (eager, output_attentions) attention maps."""
import json
import math

import pytest
import torch

from attnlab.inspect import metrics as M

NAN = float("nan")


def close(a, b, tol=1e-6):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    torch.testing.assert_close(a, b, atol=tol, rtol=0, equal_nan=True)


@pytest.fixture
def causal3():
    """One head, causal, 3 tokens: rows sum to 1 over visible keys."""
    w = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.3, 0.3, 0.4]]).view(1, 1, 3, 3)
    vis = torch.ones(3, 3, dtype=torch.bool).tril().view(1, 1, 3, 3)
    return w, vis


def test_entropy_normalized_by_visible_keys():
    w = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0, 0, 0], [0.25] * 4, [0.5, 0.25, 0.25, 0.0], [1.0, 0, 0, 0]])
    vis = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    got = M.entropy(w.view(1, 1, 5, 4), vis.view(1, 1, 5, 4))[0, 0]
    close(got, [1.0, 0.0, 1.0, 1.5 * math.log(2) / math.log(3), NAN])  # one visible key: undefined


def test_received_is_mean_over_queries_that_see_the_key(causal3):
    w, vis = causal3
    close(M.received(w, vis)[0, 0], [(1 + 0.6 + 0.3) / 3, (0.4 + 0.3) / 2, 0.4])
    hidden = vis.clone()
    hidden[..., 2] = False  # nobody sees key 2
    assert math.isnan(M.received(w, hidden)[0, 0, 2])


def test_class_offset_distance_waad_fai(causal3):
    w, vis = causal3
    close(M.class_attention(w, vis, torch.tensor([[False, True, False]]))[0, 0], [0.0, 0.4, 0.3])
    close(M.offset_score(w, vis, -1)[0, 0], [NAN, 0.6, 0.3])
    close(M.offset_score(w, vis, 0)[0, 0], [1.0, 0.4, 0.4])
    close(M.offset_score(w, vis, 1)[0, 0], [0.0, 0.0, NAN])  # next token hidden in a causal model
    close(M.attention_distance(w, vis)[0, 0], [0.0, 0.6, 0.3 * 2 + 0.3 * 1])
    close(M.waad(w, vis, window=1)[0, 0], [0.0, 0.6, 0.3 + 0.3])
    close(M.waad(w, vis, window=10)[0, 0], [0.0, 0.6, 0.9])
    close(M.fai(w, vis)[0, 0], [(0.6 + 0.3) / 2, 0.3, NAN])
    close(M.fai(w, vis, h_lo=0, h_hi=1)[0, 0], [(1 + 0.6) / 2, (0.4 + 0.3) / 2, 0.4])


def test_cross_attention_positions_are_bottom_right():
    assert M.query_positions(2, 5).tolist() == [3, 4]
    w = torch.zeros(1, 1, 2, 5)
    w[0, 0, 0, 2] = 1.0   # query 0 sits at position 3: key 2 is its previous token
    w[0, 0, 1, 4] = 1.0   # query 1 at position 4 attends to itself
    vis = torch.ones(1, 1, 2, 5, dtype=torch.bool)
    close(M.offset_score(w, vis, -1)[0, 0], [1.0, 0.0])
    close(M.offset_score(w, vis, 0)[0, 0], [0.0, 1.0])


def test_empty_rows_are_nan_not_errors():
    w = torch.zeros(1, 2, 3, 3)
    vis = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    for f in (M.entropy, M.attention_distance, M.waad):
        assert torch.isnan(f(w, vis)).all()
    assert torch.isnan(M.received(w, vis)).all()


def test_sink_rate_and_act_sinks():
    r = torch.full((2, 2, 4), 0.1)
    r[0, 0, 0], r[0, 1, 0], r[1, 0, 0], r[1, 1, 0] = 0.5, 0.2, 0.31, NAN
    assert M.sink_rate(r, 0, eps=0.3) == pytest.approx(2 / 3)  # the NaN pair is left out
    assert M.sink_rate(r, 1) == 0.0
    a = M.act_sinks(torch.tensor([0.5, 0.05, 0.2, 0.1]), threshold=0.1)
    assert a.tolist() == [False, False, True, False]  # first token excluded, 0.1 is not > 0.1
    with pytest.raises(ValueError, match="position"):
        M.sink_rate(r, 9)


def test_head_groups_and_group_average_equal_the_mean_map_metric():
    d = torch.arange(1.0, 11.0).view(2, 5)
    local, glob = M.head_groups(d, q=0.3)
    assert d[local].tolist() == [1.0, 2.0, 3.0] and d[glob].tolist() == [8.0, 9.0, 10.0]
    # WAAD/FAI of the group's mean map == group average of per-head values (linearity)
    torch.manual_seed(0)
    L = 7
    vis = torch.ones(L, L, dtype=torch.bool).tril().view(1, 1, L, L)
    w = torch.softmax(torch.randn(2, 5, L, L).masked_fill(~vis, -math.inf), -1)  # (layers, heads, L, L)
    per_head_waad = M.waad(w, vis, window=3)         # (2, 5, L)
    per_head_fai = M.fai(w, vis)
    mean_map = w[local].mean(0).view(1, 1, L, L)
    close(M.group_average(per_head_waad, local), M.waad(mean_map, vis, window=3)[0, 0], 1e-6)
    mean_map = w[glob].mean(0).view(1, 1, L, L)
    close(M.group_average(per_head_fai, glob), M.fai(mean_map, vis)[0, 0], 1e-6)


def test_massive_activations_need_both_thresholds():
    h = torch.ones(1, 4, 8)
    h[0, 0, 3] = -5000.0   # > 100 and > 1000 x median (1)
    h[0, 2, 1] = 150.0     # > 100 but only 150 x median
    recs = M.massive_activations([torch.ones(1, 4, 8), h])
    assert [(r["layer"], r["token"], r["dim"], r["value"]) for r in recs] == [(1, 0, 3, -5000.0)]


def test_head_divergence():
    a, b = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    close(M.head_divergence(a, b), [5.0, math.sqrt(2)])
    close(M.head_divergence(a[1:], b[1:], "cosine"), [1.0])
    with pytest.raises(ValueError, match="distance"):
        M.head_divergence(a, b, "kl")


def test_token_classes():
    toks = [["Ġ,", "##.", "hello", "▁!?", "Ġ", "a."]]
    assert M.punctuation_mask(toks).tolist() == [[True, True, False, True, False, False]]

    class Tok:
        all_special_ids = [101, 102]

    assert M.special_token_mask(Tok(), torch.tensor([[101, 7, 102]])).tolist() == [[True, False, True]]


def test_bad_arguments_are_named():
    w = torch.zeros(1, 1, 2, 2)
    with pytest.raises(TypeError, match="visible"):
        M.entropy(w, torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="window"):
        M.waad(w, torch.ones(1, 1, 2, 2, dtype=torch.bool), window=0)
    with pytest.raises(ValueError, match="h_hi"):
        M.fai(w, torch.ones(1, 1, 2, 2, dtype=torch.bool), h_lo=2, h_hi=1)


# ---------------------------------------------------------------------------------------------
# capture: streaming metrics == metrics of the model's own attention maps
# ---------------------------------------------------------------------------------------------
def test_capture_matches_eager_output_attentions(minilm):
    from attnlab.inspect.capture import capture

    model, tok = minilm
    enc = tok(["Attention is all you need, they said.", "Short one."], return_tensors="pt", padding=True)
    cap = capture(model, enc, tokenizer=tok, store="fp16")
    # independent reference: transformers' eager attention maps
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(**enc, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    pad = enc["attention_mask"].bool()
    vis = (pad[:, None, None, :] & pad[:, None, :, None])
    for li, a in enumerate(att):
        for name, f in (("entropy", M.entropy), ("distance", M.attention_distance)):
            v = f(a, vis).masked_fill(~pad[:, None, :], NAN)
            want = v.transpose(0, 1).reshape(a.shape[1], -1).nanmean(-1)
            close(cap.head_metrics[name][li], want, 1e-4)
        prev = M.offset_score(a, vis, -1).masked_fill(~pad[:, None, :], NAN)
        close(cap.head_metrics["prev_token"][li], prev.transpose(0, 1).reshape(a.shape[1], -1).nanmean(-1), 1e-4)
        close(cap.position_metrics["received"][li], M.received(a, vis).nanmean(0), 1e-4)
        close(cap.maps[li].float() * pad[:, None, :, None], a * pad[:, None, :, None], 2e-3)  # fp16 storage
    assert cap.tokens[0][0] == "[CLS]" and cap.kv_group == [1] * 6 and cap.heads == list(range(12))
    json.dumps(cap.as_dict())  # JSON-ready (NaN -> None)


def test_capture_filters_and_topk(minilm):
    from attnlab.inspect.capture import TopK, capture

    model, tok = minilm
    cap = capture(model, "a b c d e f g", tokenizer=tok, layers=[1, 4], heads=[0, 5], store=("topk", 3),
                  metrics=("entropy", "received"))
    assert cap.layers == [1, 4] and cap.heads == [0, 5]
    assert cap.head_metrics["entropy"].shape == (2, 2) and set(cap.head_metrics) == {"entropy"}
    t = cap.maps[4]
    assert isinstance(t, TopK) and t.values.shape == (1, 2, 9, 3)
    dense = t.dense(9)
    assert torch.all(dense.sum(-1) <= 1.001) and torch.all(dense.sum(-1) > 0.3)
    with pytest.raises(ValueError, match="layers"):
        capture(model, "a", tokenizer=tok, layers=[6])
    with pytest.raises(ValueError, match="unknown metrics"):
        capture(model, "a", tokenizer=tok, metrics=("entropy", "nope"))
    with pytest.raises(ValueError, match="store"):
        capture(model, "a", tokenizer=tok, store="int8")


def test_capture_of_attnlab_module_model():
    """A plain torch model of AttnlabAttention layers is inspectable with the same capture."""
    from attnlab.inspect.capture import capture
    from attnlab.inspect.hooks import AttnlabAttention

    torch.manual_seed(0)
    model = torch.nn.Sequential(AttnlabAttention(16, 4, "sliding_window", window=2, causal=True),
                                AttnlabAttention(16, 4, "dense", kv_heads=2, causal=True))
    cap = capture(model, torch.randn(1, 8, 16), metrics=("distance", "received", "next_token"))
    assert cap.layers == [0, 1] and cap.kv_group == [1, 2]
    # a window of 2 (this query and the one before) cannot look further back than 1 position
    assert float(cap.head_metrics["distance"][0].max()) <= 1.0 + 1e-6
    assert torch.all(cap.head_metrics["next_token"] == 0)  # causal


def test_head_divergence_map_is_zero_before_the_hidden_span():
    """Hiding keys [5, 8) cannot change a causal model's queries before position 5."""
    from attnlab.inspect.capture import head_divergence_map
    from attnlab.inspect.hooks import AttnlabAttention

    torch.manual_seed(0)
    model = torch.nn.Sequential(AttnlabAttention(16, 2, causal=True), AttnlabAttention(16, 2, causal=True))
    x = torch.randn(1, 10, 16)
    before = head_divergence_map(model, x, (5, 8), queries=(0, 5))
    after = head_divergence_map(model, x, (5, 8))
    assert before.shape == (2, 2) and torch.all(before == 0)
    assert torch.all(after > 0)
