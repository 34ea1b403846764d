"""attnlab.bench.tasks: generators (MQAR, ListOps, in-context regression), the ridge optimum, state sizes,
a tiny training run, the conformance column and run_task's interface."""
import dataclasses
import json
import random

import numpy as np
import pytest
import torch

import attnlab
from attnlab.bench.tasks import PRESETS, TASKS, run_task
from attnlab.bench.tasks import conformance_column as cc
from attnlab.bench.tasks import icl_regression as icl
from attnlab.bench.tasks import listops as lo
from attnlab.bench.tasks import mqar as mq
from attnlab.catalogue import PATTERNS, Implementation, Mechanism


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


# ---------------------------------------------------------------------------------------------
# MQAR
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V, L, N", [(256, 64, 4), (8192, 128, 8), (256, 256, 16)])
def test_mqar_layout(V, L, N):
    x, y = mq.mqar(200, V, L, N, seed=1)
    assert x.shape == y.shape == (200, L) and x.dtype == y.dtype == torch.int64
    keys, values = x[:, 0:2 * N:2], x[:, 1:2 * N:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert all(len(set(r.tolist())) == N for r in keys) and all(len(set(r.tolist())) == N for r in values)
    for row in range(x.shape[0]):
        pairs = dict(zip(keys[row].tolist(), values[row].tolist()))
        labelled = (y[row] != mq.IGNORE).nonzero().flatten().tolist()
        assert len(labelled) == N  # every key is queried exactly once
        assert sorted(x[row, labelled].tolist()) == sorted(pairs)
        for pos in labelled:
            assert pos >= 2 * N and (pos - 2 * N) % 2 == 0  # a query slot after the pairs
            assert pairs[int(x[row, pos])] == int(y[row, pos])  # label = the key's value
        rest = [p for p in range(2 * N, L) if p not in labelled]
        assert (x[row, rest] == 0).all()  # random_non_queries=False: zeros elsewhere


def test_mqar_random_non_queries_keeps_pairs_and_labels():
    x0, y0 = mq.mqar(50, 64, 32, 4, seed=3)
    x1, y1 = mq.mqar(50, 64, 32, 4, seed=3, random_non_queries=True)
    assert torch.equal(y0, y1) and torch.equal(x0[:, :8], x1[:, :8])
    filler = (x0 == 0)
    assert torch.equal(x1[~filler], x0[~filler]) and ((x1 >= 0) & (x1 < 64)).all()
    assert (x1[filler] != 0).float().mean() > 0.9


def test_mqar_gap_distribution_is_the_power_law():
    # One pair: the query's gap g (slot index after the pairs) has exactly p(g) ∝ (g + 1)^(a - 1).
    slots, n = 12, 40_000
    x, y = mq.mqar(n, 64, 2 + 2 * slots, 1, seed=0)
    gaps = ((y != mq.IGNORE).nonzero()[:, 1] - 2) // 2
    freq = np.bincount(gaps.numpy(), minlength=slots) / n
    p = mq.gap_probabilities(slots, 0.01)
    assert np.all(np.diff(p) < 0) and p[0] / p[-1] == pytest.approx(slots ** 0.99)
    assert np.abs(freq - p).max() < 0.01
    # Several pairs: distinct gaps, still skewed towards short gaps (first half of the slots).
    x, y = mq.mqar(4000, 256, 64, 4, seed=1)
    g = ((y != mq.IGNORE).nonzero()[:, 1] - 8) // 2
    assert (g < 14).float().mean() > 0.6


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=63), "seq_len"), (dict(num_kv_pairs=17), "seq_len"), (dict(vocab=8), "num_kv_pairs"),
    (dict(power_a=0.0), "power_a"), (dict(num_examples=0), "num_examples"),
])
def test_mqar_validation(kwargs, match):
    args = dict(num_examples=4, vocab=256, seq_len=64, num_kv_pairs=4, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mq.mqar(**args)


def test_state_size_rule():
    # softmax: the KV cache, 2 x heads x L x head_dim; windowed: the keys a query can still see
    assert mq.state_size("dense", 2, 16, 16, 64) == 2 * 2 * 64 * 16
    assert mq.state_size("sliding_window", 2, 16, 16, 64, {"window": 8}) == 2 * 2 * 8 * 16
    assert mq.state_size("sliding_window", 1, 16, 16, 64) == 2 * 64 * 16  # default window 512 > L
    assert mq.state_size("sink_window", 1, 8, 8, 64, {"sinks": 2, "window": 4}) == 2 * 6 * 8
    own = dataclasses.replace(attnlab.mechanism("dense"), name="toy_state",
                              state_size=lambda h, d, dv, **p: h * d * dv + p.get("extra", 0))
    assert mq.state_size(own, 2, 4, 3, 1000, {"extra": 1}) == 25


def test_mqar_tiny_training_learns_with_dense_attention():
    cfg = TASKS["mqar"].default_configs("tiny")[0]
    out = TASKS["mqar"].run("dense", cfg, seed=0)
    assert out["chance"] == 1 / 32
    assert out["accuracy"] > 0.5, out  # far above chance (1/32) within ~300 steps
    assert out["state_size"] == 2 * cfg["heads"] * cfg["seq_len"] * cfg["d_model"]
    assert out["state_size_model"] == 2 * out["state_size"]


# ---------------------------------------------------------------------------------------------
# ListOps
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr, value", [
    ("7", 7),
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 3 [MAX 8 2 ] [SM 5 6 ] ]", 1),
    ("[SM 7 8 9 ]", 4),
    ("[MED 9 1 5 ]", 5),
    ("[MED 1 5 3 8 ]", 4),  # int(np.median) of an even count: mean of 3 and 5
    ("[MED 1 2 ]", 1),  # int(1.5)
    ("[MED 2 [SM 9 9 ] 7 [MAX 0 1 ] ]", 4),  # args 2 8 7 1 -> (2 + 7) / 2 = 4.5 -> 4
])
def test_listops_evaluator(expr, value):
    assert lo.evaluate(expr.split()) == value


@pytest.mark.parametrize("expr", ["[MAX 2 ]]", "[MIN 3", "3 4", "[MAX ]", "[FIRST 1 2 ]", ""])
def test_listops_evaluator_rejects_malformed(expr):
    with pytest.raises(ValueError, match="tokens"):
        lo.evaluate(expr.split())


def test_listops_generator_limits():
    trees, labels = lo.listops(300, 10, 60, seed=0, max_depth=10, max_args=10)
    assert len({" ".join(t) for t in trees}) == 300
    assert labels == [lo.evaluate(t) for t in trees] and len(set(labels)) > 5
    for t in trees:
        assert 10 < len(t) < 60 and t[-1] == lo.END
        assert sum(x in lo.OPERATORS for x in t) == t.count(lo.END)
        depth, args = lo.depth_and_args(t)
        assert depth <= 10 and args <= 10
    rng = random.Random(0)
    shallow = [lo.generate_tree(rng, max_depth=2, max_args=3) for _ in range(300)]
    for t in shallow:  # depth 1 may be an operator, depth 2 (= max_depth) is always a digit
        assert lo.depth_and_args(t)[0] <= 2 and lo.depth_and_args(t)[1] <= 3
    assert any(len(t) > 1 for t in shallow) and any(len(t) == 1 for t in shallow)


def test_listops_pooling_ignores_padding():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    lengths = torch.tensor([2, 4])
    torch.testing.assert_close(lo.pool(h, lengths, "last"), torch.stack([h[0, 1], h[1, 3]]))
    torch.testing.assert_close(lo.pool(h, lengths, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))


# ---------------------------------------------------------------------------------------------
# In-context linear regression
# ---------------------------------------------------------------------------------------------
def test_icl_data_is_linear_with_query_last():
    g = torch.Generator().manual_seed(0)
    z, x, y = icl.icl_data(50, 4, 10, 0.0, g, dtype=torch.float64)
    assert z.shape == (50, 11, 5) and (z[:, -1, -1] == 0).all() and torch.equal(z[:, :-1, -1], y[:, :-1])
    beta = torch.linalg.lstsq(x[:, :-1], y[:, :-1, None]).solution[..., 0]  # noiseless: exact recovery
    torch.testing.assert_close((x[:, -1] * beta).sum(-1), y[:, -1])
    assert beta.pow(2).sum(-1).mean() == pytest.approx(1.0, abs=0.3)  # beta ~ N(0, I/d)


@pytest.mark.parametrize("n, d, lam", [(10, 4, 0.7), (3, 5, 0.2), (8, 3, 0.0), (2, 5, 0.0)])
def test_ridge_matches_numpy_lstsq(n, d, lam):
    rng = np.random.default_rng(n + d)
    X, y, xq = rng.normal(size=(3, n, d)), rng.normal(size=(3, n)), rng.normal(size=(3, d))
    got = icl.ridge_predict(torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(xq), lam).numpy()
    for b in range(3):  # ridge = least squares on [X; sqrt(lam) I], [y; 0] (minimum-norm when rank-deficient)
        A = np.vstack([X[b], np.sqrt(lam) * np.eye(d)])
        beta = np.linalg.lstsq(A, np.concatenate([y[b], np.zeros(d)]), rcond=None)[0]
        assert got[b] == pytest.approx(xq[b] @ beta, rel=1e-9, abs=1e-9)


def test_bayes_ridge_beats_other_penalties():
    g = torch.Generator().manual_seed(0)
    d, sigma = 5, 0.5
    _, x, y = icl.icl_data(20_000, d, 5, sigma, g, dtype=torch.float64)
    best = icl.bayes_lambda(d, sigma)

    def mse(lam):
        return float(((icl.ridge_predict(x[:, :-1], y[:, :-1], x[:, -1], lam) - y[:, -1]) ** 2).mean())

    assert mse(best) < min(mse(best / 10), mse(best * 10), mse(0.0))


def test_icl_lengths_grid():
    c = TASKS["icl_regression"].resolve({"dim": 5, "n_ctx": 20})
    assert TASKS["icl_regression"].lengths(c) == [1, 2, 4, 5, 8, 16, 20]
    assert TASKS["icl_regression"].lengths({**c, "eval_lengths": [3, 40]}) == [3, 20, 40]


# ---------------------------------------------------------------------------------------------
# Conformance column
# ---------------------------------------------------------------------------------------------
def _toy(name, run, patterns=PATTERNS, step=None, params=(), extras=None):
    impls = (Implementation("reference", run),)
    if step is not None:
        impls += (Implementation("recurrent", run),)
    m = Mechanism(name=name, family="test", paper="-", summary="-", formula="-", layout="sequence",
                  patterns=patterns, impls=impls, gqa=False, params=tuple(params), extras=extras or {})
    if step is not None:
        m.step = step
    return m


def _leaky(call, q, k, v):  # ignores causal=True: sees the future
    return torch.softmax(q @ k.transpose(-1, -2) * call.scale, -1) @ v


def _linear(call, q, k, v):  # causal unnormalized linear attention, o_i = sum_{j <= i} (q_i . k_j) g_j v_j
    s = q @ k.transpose(-1, -2)
    if call.causal:
        s = s.masked_fill(~attnlab.reference.causal_mask(q.shape[2], k.shape[2], q.device), 0.0)
    gate = call.params.get("gate")
    return s @ (v if gate is None else gate * v)


def _linear_step(state, q, k, v, skip_current=False, gate=None):
    S = torch.zeros(*q.shape[:2], q.shape[-1], v.shape[-1], dtype=q.dtype) if state is None else state
    new = S + k[..., :, None] * (v if gate is None else gate * v)[..., None, :]
    o = torch.einsum("bhd,bhde->bhe", q, S if skip_current else new)
    return o, new


@pytest.mark.parametrize("name, params", [("dense", {}), ("sliding_window", {"window": 3})])
def test_conformance_column_true_for_causal_softmax(name, params):
    col = cc.conformance_column(name, params)
    assert col["causal_consistent"] is True and col["incremental_equal"] is True, col["detail"]


def test_conformance_column_false_for_a_non_causal_mixer():
    col = cc.conformance_column(_toy("leaky", _leaky))
    assert col["causal_consistent"] is False and col["incremental_equal"] is False, col["detail"]
    assert "prefix" in col["detail"] or "perturb" in col["detail"]


def test_conformance_column_recurrent_step():
    good = _toy("toy_linear", _linear, ("causal_self",), step=_linear_step)
    col = cc.conformance_column(good)
    assert col["causal_consistent"] is True and col["incremental_equal"] is True, col["detail"]
    assert "recurrent step" in col["detail"]
    bad = _toy("toy_linear_bad", _linear, ("causal_self",),
               step=lambda s, q, k, v: _linear_step(s, q, k, v, skip_current=True))
    assert cc.conformance_column(bad)["incremental_equal"] is False
    none = _toy("toy_linear_nostep", _linear, ("causal_self",))
    col = cc.conformance_column(none)
    assert col["incremental_equal"] is None and "no incremental form" in col["detail"]


def test_conformance_column_slices_per_token_parameters():
    # A gate per key token (B, H, L, 1), computed from the input (the hook a task model uses): decoding
    # must slice it to the token (recurrent step) or to the keys so far (KV cache).
    from attnlab.catalogue import Param

    gate = Param("gate", "tensor", None, "per-token value gate", per_token=True)
    hooks = {"from_input": {"gate": (torch.sigmoid, 1)}}
    stepper = _toy("toy_gated_step", _linear, ("causal_self",), step=_linear_step, params=(gate,), extras=hooks)
    col = cc.conformance_column(stepper)
    assert col["incremental_equal"] is True and "recurrent step" in col["detail"], col["detail"]
    cached = _toy("toy_gated_cache", _linear, ("causal_self", "causal_cross"), params=(gate,), extras=hooks)
    col = cc.conformance_column(cached)
    assert col["incremental_equal"] is True and "KV cache" in col["detail"], col["detail"]
    wrong = _toy("toy_gated_wrong", _linear, ("causal_self",), params=(gate,), extras=hooks,
                 step=lambda s, q, k, v, gate: _linear_step(s, q, k, v, gate=torch.sigmoid(gate)))
    assert cc.conformance_column(wrong)["incremental_equal"] is False


# ---------------------------------------------------------------------------------------------
# run_task and the presets (the interface attnlab bench relies on)
# ---------------------------------------------------------------------------------------------
def test_presets_resolve_for_every_task():
    assert set(TASKS) == {"mqar", "listops", "icl_regression"}
    for task in TASKS.values():
        for preset in PRESETS:
            configs = task.default_configs(preset)
            assert configs and all(set(c) == set(task.defaults) for c in configs)
        with pytest.raises(ValueError, match="preset"):
            task.default_configs("huge")
    full = TASKS["mqar"].default_configs("full")
    assert {(c["vocab"], c["seq_len"], c["num_kv_pairs"]) for c in full} == {
        (v, L, N) for v in (256, 8192) for L, N in ((64, 4), (128, 8), (256, 16))}
    assert all(c["n_layers"] == 2 and c["target"] == 0.99 for c in full) and len({c["d_model"] for c in full}) > 1


@pytest.mark.parametrize("task, mechanism, params", [("listops", "sliding_window", {"window": 4}),
                                                     ("icl_regression", "dense", {})])
def test_run_task_returns_flat_jsonable_metrics(task, mechanism, params):
    cfg = TASKS[task].default_configs("tiny")[0]
    cfg["params"] = params
    out = run_task(task, mechanism, cfg, seed=0)
    json.dumps(out)
    assert not any(isinstance(v, dict) for v in out.values())
    assert out["causal_consistent"] is True and out["incremental_equal"] is True
    for key in ("steps", "lr", "conformance_detail"):
        assert key in out
    if task == "listops":
        assert 0 <= out["accuracy"] <= 1 and 0 < out["majority_baseline"] < 1
    else:
        n = cfg["n_ctx"]
        assert out["mse"] == out[f"mse_n{n}"] and out["ridge_mse"] == out[f"ridge_mse_n{n}"]
        assert out["ridge_mse"] < out["ridge_mse_n1"]  # more context, better optimum


def test_run_task_hybrid_config():
    cfg = TASKS["mqar"].default_configs("tiny")[0]
    cfg.update(steps=2, eval_every=1, hybrid={"other": "dense", "ratio": "1:1"}, params={"window": 2})
    out = run_task("mqar", "sliding_window", cfg, seed=0)
    assert out["state_size_model"] == out["state_size"] + 2 * 1 * 16 * 32  # window-2 layer + a dense layer


@pytest.mark.parametrize("args, exc, match", [
    (("nope", "dense", {}, 0), ValueError, "task"),
    (("mqar", "densee", {}, 0), KeyError, "densee"),
    (("mqar", "dense", {"vocabulary": 3}, 0), ValueError, "vocabulary"),
    (("mqar", "dense", {}, -1), ValueError, "seed"),
    (("mqar", "dense", [1], 0), TypeError, "config"),
])
def test_run_task_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        run_task(*args)
