"""MQAR: multi-query associative recall (Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall
in Efficient Language Models", ICLR 2024), reported against the mechanism's state size (the Zoology /
BASED recall-memory plot).

**Generator** (:func:`mqar`, Zoology's ``multiquery_ar``): vocabulary ``V``, length ``L``, ``N`` pairs.

- keys: ``N`` distinct tokens from ``[1, V/2)``; values: ``N`` distinct tokens from ``[V/2, V)``;
- the first ``2N`` tokens are the pairs ``k_1 v_1 k_2 v_2 ... k_N v_N``;
- the ``L - 2N`` remaining positions hold the queries: with ``S = (L - 2N) // 2`` slots, ``N`` distinct
  gaps ``g`` are drawn from ``{0, .., S-1}`` without replacement with ``p(g) ∝ (g + 1)^(a - 1)``,
  ``a = power_a = 0.01`` (short gaps far more likely, like repeated bigrams in text); key ``k_i`` is
  placed at position ``2N + 2 g_i``; every other position is token 0 (or, with
  ``random_non_queries=True``, a uniform token of ``[0, V)``);
- labels are ``-100`` (ignored) everywhere except at the query positions, where they are the key's value.

Sampling ``N`` gaps without replacement with those weights uses the Gumbel-top-k trick, which has the
same distribution as NumPy's sequential ``choice(..., replace=False, p=p)`` that Zoology calls.
Zoology asserts ``V > L``; nothing in the task needs it, so it is not required here (``V = 256`` with
``L = 256`` is a configuration of this benchmark).

**Model and training** (Zoology's Figure 2 protocol, scaled to CPU): 2 layers, 1 head, no MLP (its
state mixer is the identity), learned positions, cross-entropy on the query positions only, the best of
a small learning-rate sweep, early stop at accuracy 0.99. Accuracy = fraction of query positions whose
argmax over the whole vocabulary is the value.

**State size** (:func:`state_size`): floats per layer the mechanism keeps to decode the next token.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ...catalogue import Mechanism, mechanism as _lookup
from .train import Task, build_model, fit, head_dims, mixer_plan, seed_all, sweep

IGNORE = -100


def gap_probabilities(slots: int, power_a: float = 0.01) -> np.ndarray:
    """``p(g) ∝ (g + 1)^(a - 1)`` for ``g = 0 .. slots - 1`` (Zoology's power law over query gaps)."""
    p = power_a * np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def mqar(num_examples: int, vocab: int, seq_len: int, num_kv_pairs: int, seed: int, power_a: float = 0.01,
         random_non_queries: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)``, both ``(num_examples, seq_len)`` int64; see the module docstring."""
    for name, val in (("num_examples", num_examples), ("vocab", vocab), ("seq_len", seq_len),
                      ("num_kv_pairs", num_kv_pairs)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"mqar: {name} must be a positive int, got {val!r}")
    if seq_len % 2:
        raise ValueError(f"mqar: seq_len must be even (key/value and query slots are pairs), got {seq_len}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"mqar: seq_len ({seq_len}) must be >= 4 * num_kv_pairs ({4 * num_kv_pairs}): 2N tokens of "
                         f"pairs plus N query slots of 2 tokens")
    if num_kv_pairs > vocab // 2 - 1:
        raise ValueError(f"mqar: num_kv_pairs ({num_kv_pairs}) must be <= vocab // 2 - 1 = {vocab // 2 - 1} "
                         f"distinct keys in [1, vocab/2)")
    if not (isinstance(power_a, (int, float)) and 0 < power_a <= 1):
        raise ValueError(f"mqar: power_a must be in (0, 1], got {power_a!r}")
    rng = np.random.default_rng(seed)
    n, N, half = num_examples, num_kv_pairs, vocab // 2
    context = 2 * N
    keys = np.stack([rng.choice(np.arange(1, half), N, replace=False) for _ in range(n)])
    values = np.stack([rng.choice(np.arange(half, vocab), N, replace=False) for _ in range(n)])

    slots = (seq_len - context) // 2
    logp = np.log(gap_probabilities(slots, power_a))
    gumbel = -np.log(-np.log(rng.random((n, slots))))
    gaps = np.argsort(-(logp + gumbel), axis=1)[:, :N]  # N distinct gaps, weighted, without replacement

    inputs = np.zeros((n, seq_len), dtype=np.int64)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    pos = context + 2 * gaps
    np.put_along_axis(inputs, pos, keys, axis=1)
    np.put_along_axis(labels, pos, values, axis=1)
    if random_non_queries:
        filler = inputs == 0
        inputs[filler] = rng.integers(0, vocab, size=int(filler.sum()))
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def _mechanism(mech) -> Mechanism:
    return _lookup(mech) if isinstance(mech, str) else mech


def state_size(mech, heads: int, head_dim: int, value_dim: int, seq_len: int,
               params: Optional[Mapping[str, Any]] = None) -> float:
    """Floats per layer that ``mech`` keeps to decode token ``seq_len + 1`` (the Zoology/BASED x-axis).

    - an entry that states its own (``Mechanism.state_size``: linear and recurrent entries):
      ``mech.state_size(heads, head_dim, value_dim, **params)``;
    - a softmax entry: the KV cache of the keys a new query can see,
      ``heads * n * (head_dim + value_dim)`` (``= 2 * heads * n * head_dim`` when ``value_dim == head_dim``)
      with ``n = seq_len``, or for windowed entries ``n = min(seq_len, window + sinks)`` (``window`` and
      ``sinks`` are the entry's parameters, defaults included: ``sliding_window``, ``sink_window``).
    """
    m = _mechanism(mech)
    params = dict(params or {})
    if m.state_size is not None:
        return float(m.state_size(heads, head_dim, value_dim, **params))
    resolved = m.normalize_params(params)
    n = seq_len
    if "window" in resolved and isinstance(resolved["window"], int):
        n = min(seq_len, resolved["window"] + int(resolved.get("sinks") or 0))
    return float(heads * n * (head_dim + value_dim))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of labelled positions (label != -100) whose argmax is the label."""
    mask = labels != IGNORE
    return float((logits.argmax(-1)[mask] == labels[mask]).float().mean())


#: Zoology's (sequence length, key-value pairs) settings (Figure 2).
LENGTHS_PAIRS = [(64, 4), (128, 8), (256, 16)]


class MQAR(Task):
    name = "mqar"
    summary = "multi-query associative recall (Zoology): accuracy against state size"
    defaults = dict(
        vocab=8192, seq_len=64, num_kv_pairs=4, power_a=0.01, random_non_queries=False,
        num_train=20_000, num_test=1_000, batch_size=64, steps=1_500, eval_every=100, eval_batch=500,
        lrs=[1e-3, 3e-3], target=0.99,
        d_model=64, n_layers=2, heads=1, mlp_ratio=0, positions="learned", causal=True, params={}, impl=None,
        hybrid=None,
    )
    presets = {
        # seconds: a tiny vocabulary and sequence, dense attention learns it within a few hundred steps
        "tiny": [dict(vocab=64, seq_len=16, num_kv_pairs=2, num_train=2_000, num_test=200, batch_size=32,
                      steps=300, eval_every=50, lrs=[3e-3], d_model=32)],
        # tens of seconds: dense attention reaches 0.99 after ~600 steps here (early stop)
        "quick": [dict(vocab=256, seq_len=64, num_kv_pairs=4, num_train=10_000, num_test=300, steps=800,
                       lrs=[3e-3], d_model=64)],
        "standard": [dict(vocab=v, seq_len=L, num_kv_pairs=N, d_model=d)
                     for v in (256, 8192) for (L, N) in LENGTHS_PAIRS[:2] for d in (64, 128)],
        "full": [dict(vocab=v, seq_len=L, num_kv_pairs=N, d_model=d, steps=4_000, num_train=50_000,
                      lrs=[1e-4 * 10 ** (2 * i / 3) for i in range(4)])  # Zoology: np.logspace(-4, -2, 4)
                 for v in (256, 8192) for (L, N) in LENGTHS_PAIRS for d in (64, 128, 256)],
    }

    def run(self, mechanism: str, config: dict, seed: int) -> dict:
        c = config
        gen = dict(vocab=c["vocab"], seq_len=c["seq_len"], num_kv_pairs=c["num_kv_pairs"], power_a=c["power_a"],
                   random_non_queries=c["random_non_queries"])
        x_train, y_train = mqar(c["num_train"], seed=seed, **gen)
        x_test, y_test = mqar(c["num_test"], seed=seed + 1_000_003, **gen)  # a different stream: unseen examples
        per_epoch = max(1, c["num_train"] // c["batch_size"])

        def batches():  # epochs over the training set, reshuffled each epoch; the same for every learning rate
            order, perm = torch.Generator().manual_seed(seed), []

            def batch(step: int):
                epoch, i = divmod(step, per_epoch)
                while len(perm) <= epoch:
                    perm.append(torch.randperm(c["num_train"], generator=order))
                idx = perm[epoch][i * c["batch_size"]:(i + 1) * c["batch_size"]]
                return x_train[idx], y_train[idx]
            return batch

        def loss(model, b):  # the head runs on the query positions only (the others carry no label)
            x, y = b
            mask = y != IGNORE
            return F.cross_entropy(model.head(model.features(x)[mask]), y[mask])

        def evaluate(model) -> float:
            hits = total = 0
            for i in range(0, c["num_test"], c["eval_batch"]):
                x, y = x_test[i:i + c["eval_batch"]], y_test[i:i + c["eval_batch"]]
                mask = y != IGNORE
                hits += int((model.head(model.features(x)[mask]).argmax(-1) == y[mask]).sum())
                total += int(mask.sum())
            return hits / total

        def one(lr: float):
            seed_all(seed)
            model = build_model(mechanism, c, seed=seed, vocab=c["vocab"], max_len=c["seq_len"])
            return fit(model, batches(), loss, evaluate, steps=c["steps"], lr=lr, eval_every=c["eval_every"],
                       target=c["target"])

        result = sweep(c["lrs"], one)
        heads, hd, vd = head_dims(c)
        per_layer = state_size(mechanism, heads, hd, vd, c["seq_len"], c["params"])
        out = result.metrics("accuracy")
        out.update(state_size=per_layer, state_size_model=model_state_size(mechanism, c),
                   chance=1.0 / (c["vocab"] - c["vocab"] // 2),
                   num_queries=int((y_test != IGNORE).sum()))
        return out


def model_state_size(mechanism: str, c: dict) -> float:
    """Sum over the task model's layers of :func:`state_size` (a hybrid stack mixes two mechanisms)."""
    from ...models import layer_plan

    heads, hd, vd = head_dims(c)
    plan = layer_plan(c["n_layers"], *mixer_plan(mechanism, c))
    return math.fsum(state_size(name, heads, hd, vd, c["seq_len"], p) for name, p in plan)


TASK = MQAR()
