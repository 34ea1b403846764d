"""Head importance and pruning curves (Michel et al. 2019, "Are Sixteen Heads Really Better than One?").

A gate ``xi_{l,h}`` (initialised to 1) multiplies the output of head ``h`` in layer ``l``:

    MHA_l(x) = sum_h xi_{l,h} * Att_{l,h}(x) W^O_{l,h}        Att_{l,h}(x) = P_{l,h} V_{l,h}

and the importance of a head is the expected absolute gradient of the loss with respect to its gate,

    I_{l,h} = E_x | d L(x) / d xi_{l,h} |          (at xi = 1)

which is the first-order Taylor estimate of the loss change when the head is removed. Michel et
al. then normalize per layer with the l2 norm (after Molchanov et al. 2017):
``I_{l,h} <- I_{l,h} / ||I_{l,:}||_2``. :class:`HeadImportance` keeps both forms.

Because ``Att_{l,h}`` is linear in the weights ``P_{l,h}``, the gate is applied to the weights
through :func:`attnlab.inspect.hooks.attention_hooks` (``P_{l,h} <- xi_{l,h} P_{l,h}``): the same
function of ``xi`` as a gate on the head outputs in front of the output projection, for every
model the hooks support (the tests check it against a gate on Llama's ``o_proj`` input). For
grouped-query attention the gate is per query head.

**Pruning curves**: heads are removed (``xi = 0``) in ascending order of importance, ranked
over the whole model as in the paper, and the loss is measured after removing each fraction of
the heads; the same for random orders (seeded, averaged). Michel et al. find that pruning by
importance keeps the model's quality far longer than pruning at random. Areas under the curves
(trapezoid rule over the fractions, lower = less damage) summarise the comparison.

**Objectives** (:class:`Objective`, :func:`objective_for`). ``loss_fn(model, batch)`` returns
the loss of one example, or a 1-D tensor of per-example losses (each gets its own gradient:
Michel's expectation is over examples, of the absolute gradient). The pruning curves use
``curve_fn``:

* causal LMs (:func:`lm_objective`): the next-token cross-entropy, for both;
* encoders without a task head, e.g. sentence embedders such as all-MiniLM-L6-v2
  (:func:`embedding_objective`): no task loss exists, so the damage measured is the change of
  the text's sentence embeddings ``e(s) = normalize(mean-pool(last hidden states))``:
  ``curve_fn = D = mean_s (1 - cos(e_xi(s), e_1(s)))``. Its gradient at ``xi = 1`` is zero (a
  minimum), so the importance uses Michel's form with random Gaussian probes ``z_s ~ N(0, I)``:
  ``L_z = sum_s <z_s, e_xi(s)>`` and ``I_{l,h} = E_z |dL_z/dxi_{l,h}|
  = sqrt(2/pi) * sqrt(sum_s ||d e(s)/d xi_{l,h}||^2)``: up to a constant, the first-order size
  of the embedding change when the head is removed (the leading term of ``D`` is
  ``1/2 ||d e/d xi||^2``). The expectation over ``z`` is estimated with ``probes`` seeded draws.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .streaming import next_token_nll

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def lm_loss(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy of ``batch["input_ids"]`` (padding excluded via ``attention_mask``)."""
    return next_token_nll(model, batch["input_ids"], batch.get("attention_mask"))


def mean_pool(model, inputs: dict) -> torch.Tensor:
    """Mean of the last hidden states over the non-padding tokens, ``(B, d)`` (sentence-transformers' pooling)."""
    hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def embedding_probe_loss(model, batch: dict) -> torch.Tensor:
    """``L_k = sum_s <z_ks, e(s)>`` for each probe ``k``: the sentence embeddings of ``batch["inputs"]``
    projected on ``batch["probes"]`` ``(probes, sentences, d)``; returns ``(probes,)``."""
    e = torch.nn.functional.normalize(mean_pool(model, batch["inputs"]), dim=-1)
    return torch.einsum("ksd,sd->k", batch["probes"].to(e.dtype), e)


def embedding_distortion(model, batch: dict) -> torch.Tensor:
    """``mean_s (1 - cos(e(s), target(s)))`` against the unpruned embeddings ``batch["targets"]``."""
    e = torch.nn.functional.normalize(mean_pool(model, batch["inputs"]), dim=-1)
    return (1.0 - (e * batch["targets"]).sum(-1)).clamp_min(0.0).mean()


def split_sentences(text: str) -> List[str]:
    """Sentences of ``text``: split after ``.``, ``!`` or ``?`` followed by white space, or at blank lines."""
    parts = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    return [p.strip() for p in parts if p and p.strip()]


def lm_batches(input_ids: torch.Tensor, *, chunk: int = 128) -> List[dict]:
    """One batch per ``chunk``-token piece of a ``(1, L)`` token sequence (pieces shorter than 2 are dropped)."""
    ids = input_ids.reshape(-1)
    pieces = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    return [{"input_ids": p.unsqueeze(0)} for p in pieces if len(p) > 1]


@dataclass
class Objective:
    """What importance and pruning curves measure on a text: batches, the two losses, a description."""

    batches: List[dict]
    loss_fn: LossFn        # differentiated for the importance
    curve_fn: LossFn       # measured along the pruning curves
    description: str


def lm_objective(tokenizer, text: str, *, max_tokens: int = 512, chunk: int = 128) -> Objective:
    """Next-token cross-entropy on the first ``max_tokens`` tokens of ``text``, in ``chunk``-token examples."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
    if ids.shape[1] < 2:
        raise ValueError(f"lm_objective: the text has {ids.shape[1]} token(s); a next-token loss needs at least 2")
    return Objective(lm_batches(ids, chunk=chunk), lm_loss, lm_loss, "next-token cross-entropy (nats)")


def embedding_objective(model, tokenizer, text: str, *, probes: int = 8, seed: int = 0, max_sentences: int = 64,
                        max_tokens: int = 128) -> Objective:
    """Sentence-embedding change for encoders (see the module docstring); one batch with every probe.

    The sentences are :func:`split_sentences` of ``text`` (a one-sentence text is cut into pieces
    of 8 words); the targets are the unpruned model's embeddings, computed here.
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"embedding_objective: probes must be an int >= 1, got {probes!r}")
    pieces = split_sentences(text)
    if len(pieces) < 2:
        words = text.split()
        pieces = [" ".join(words[i:i + 8]) for i in range(0, len(words), 8)]
    pieces = pieces[:max_sentences]
    if not pieces:
        raise ValueError("embedding_objective: the text is empty")
    inputs = dict(tokenizer(pieces, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens))
    with torch.no_grad():
        targets = torch.nn.functional.normalize(mean_pool(model, inputs), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    batches = [{"inputs": inputs, "targets": targets, "probes": torch.randn(probes, *targets.shape, generator=gen)}]
    return Objective(batches, embedding_probe_loss, embedding_distortion,
                     f"sentence-embedding change 1 - cos over {len(pieces)} sentence(s); importance from "
                     f"{probes} random probes")


def objective_for(model, tokenizer, text: str, **kw) -> Objective:
    """:func:`lm_objective` for a causal LM (a model that can generate), :func:`embedding_objective` otherwise."""
    can = getattr(model, "can_generate", None)
    if callable(can) and can():
        return lm_objective(tokenizer, text, **kw)
    if not hasattr(model, "config") or not callable(model):
        raise TypeError(f"objective_for: model must be a transformers model, got {type(model).__name__}")
    return embedding_objective(model, tokenizer, text, **kw)


# ---------------------------------------------------------------------------------------------
# Gates
# ---------------------------------------------------------------------------------------------
def head_counts(model) -> Tuple[int, int]:
    """``(layers, query heads per layer)``: attention modules the hooks see, heads from the config."""
    from .hooks import attention_modules

    n_layers = len(attention_modules(model))
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not n_layers or not heads:
        raise ValueError(f"{type(model).__name__}: cannot tell its attention layers and heads "
                         f"({n_layers} attention modules, config.num_attention_heads={heads!r})")
    return n_layers, int(heads)


@contextmanager
def head_gates(model, gate: torch.Tensor):
    """Multiply head ``h`` of layer ``l``'s attention weights (hence its output) by ``gate[l, h]``."""
    n_layers, n_heads = head_counts(model)
    if not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (n_layers, n_heads):
        raise ValueError(f"head_gates: gate must be a tensor of shape (layers, heads) = {(n_layers, n_heads)}, got "
                         f"{tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__}")
    from .hooks import attention_hooks

    def hook(site, weights):
        return weights * gate[site.layer].to(weights.dtype).view(1, -1, 1, 1)

    with attention_hooks(model, hook):
        yield


@contextmanager
def _frozen(model):
    """Parameters temporarily without ``requires_grad``: gradients reach the gates only."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _check_batches(batches, who: str) -> list:
    if isinstance(batches, dict):
        batches = [batches]
    batches = list(batches)
    if not batches or not all(isinstance(b, dict) for b in batches):
        raise ValueError(f"{who}: batches must be a non-empty list of dicts of model inputs")
    return batches


@dataclass
class HeadImportance:
    """``raw[l, h] = E |dL/dxi|`` and ``normalized`` (per-layer l2) importance, ``(layers, heads)``."""

    raw: torch.Tensor
    normalized: torch.Tensor
    loss: float          # mean of the differentiated losses (unpruned model)
    samples: int         # number of gradients averaged

    def as_dict(self) -> dict:
        return {"raw": self.raw.tolist(), "normalized": self.normalized.tolist(), "loss": self.loss,
                "samples": self.samples}


def head_importance(model, batches, loss_fn: LossFn = lm_loss, *, progress=None) -> HeadImportance:
    """Michel et al.'s importance of every head: mean over samples of ``|dL/dxi|`` at ``xi = 1``.

    ``loss_fn(model, batch)`` returns one sample's loss (a scalar) or several samples' losses (a
    1-D tensor, e.g. one per probe; each gets its own gradient, from one forward pass).
    ``progress(done, total)`` is called after each batch.
    """
    batches = _check_batches(batches, "head_importance")
    if not callable(loss_fn):
        raise TypeError(f"head_importance: loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
    n_layers, n_heads = head_counts(model)
    total = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    losses = []
    was_training = model.training
    model.eval()
    try:
        with _frozen(model), torch.enable_grad():
            for i, batch in enumerate(batches):
                gate = torch.ones(n_layers, n_heads, requires_grad=True)
                with head_gates(model, gate):
                    loss = loss_fn(model, batch)
                if loss.dim() > 1:
                    raise ValueError(f"head_importance: loss_fn must return a scalar or a 1-D tensor of per-sample "
                                     f"losses, got shape {tuple(loss.shape)}")
                parts = loss.reshape(-1)
                for k in range(len(parts)):
                    (grad,) = torch.autograd.grad(parts[k], gate, retain_graph=k + 1 < len(parts))
                    total += grad.abs().double()
                losses.extend(parts.detach().tolist())
                if progress is not None:
                    progress(i + 1, len(batches))
    finally:
        model.train(was_training)
    raw = (total / len(losses)).float()
    norm = raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return HeadImportance(raw=raw, normalized=norm, loss=sum(losses) / len(losses), samples=len(losses))


# ---------------------------------------------------------------------------------------------
# Pruning curves
# ---------------------------------------------------------------------------------------------
def mean_loss(model, batches, loss_fn: LossFn = lm_loss, *, pruned: Sequence[int] = ()) -> float:
    """Mean loss over ``batches`` with the heads ``pruned`` (flat indices ``l * heads + h``) removed."""
    n_layers, n_heads = head_counts(model)
    gate = torch.ones(n_layers * n_heads)
    if len(pruned):
        gate[torch.as_tensor(list(pruned), dtype=torch.long)] = 0.0
    with torch.no_grad(), head_gates(model, gate.view(n_layers, n_heads)):
        return sum(float(loss_fn(model, b)) for b in batches) / len(batches)


def _auc(xs: Sequence[float], ys: Sequence[float]) -> float:
    return float(sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:])))


@dataclass
class PruningCurves:
    """Loss after removing each fraction of heads: by ascending importance and at random (mean, min, max)."""

    fractions: List[float]
    importance: List[float]
    random: List[float]
    random_min: List[float]
    random_max: List[float]
    random_orders: int
    seed: int

    @property
    def auc_importance(self) -> float:
        return _auc(self.fractions, self.importance)

    @property
    def auc_random(self) -> float:
        return _auc(self.fractions, self.random)

    def as_dict(self) -> dict:
        return {"fractions": self.fractions, "importance": self.importance, "random": self.random,
                "random_min": self.random_min, "random_max": self.random_max, "random_orders": self.random_orders,
                "seed": self.seed, "auc_importance": self.auc_importance, "auc_random": self.auc_random}


def pruning_curves(model, scores: torch.Tensor, batches, loss_fn: LossFn = lm_loss, *,
                   fractions: Optional[Sequence[float]] = None, random_orders: int = 3, seed: int = 0,
                   progress=None) -> PruningCurves:
    """Loss on ``batches`` as heads are removed by ascending ``scores`` vs in ``random_orders`` random orders.

    ``scores`` is ``(layers, heads)`` (e.g. :attr:`HeadImportance.normalized`); ``fractions``
    (default 0, 0.1, ..., 0.9) are shares of all heads, rounded to whole heads.
    ``progress(done, total)`` is called after each evaluation.
    """
    batches = _check_batches(batches, "pruning_curves")
    n_layers, n_heads = head_counts(model)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (n_layers, n_heads):
        raise ValueError(f"pruning_curves: scores must be a tensor of shape (layers, heads) = {(n_layers, n_heads)}, "
                         f"got {tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if isinstance(random_orders, bool) or not isinstance(random_orders, int) or random_orders < 1:
        raise ValueError(f"pruning_curves: random_orders must be an int >= 1, got {random_orders!r}")
    fractions = [i / 10 for i in range(10)] if fractions is None else [float(f) for f in fractions]
    if not fractions or any(not 0.0 <= f <= 1.0 for f in fractions) or fractions != sorted(fractions):
        raise ValueError(f"pruning_curves: fractions must be increasing numbers in [0, 1], got {fractions}")
    total = n_layers * n_heads
    counts = [round(f * total) for f in fractions]
    gen = torch.Generator().manual_seed(seed)
    orders = [scores.flatten().argsort(stable=True)] + [torch.randperm(total, generator=gen)
                                                         for _ in range(random_orders)]
    cache: Dict[int, float] = {}  # 0 heads removed: the same for every order
    steps, done = len(orders) * len(counts), 0
    curves = []
    for order in orders:
        curve = []
        for n in counts:
            if n == 0 and 0 in cache:
                value = cache[0]
            else:
                value = mean_loss(model, batches, loss_fn, pruned=order[:n].tolist())
                if n == 0:
                    cache[0] = value
            curve.append(value)
            done += 1
            if progress is not None:
                progress(done, steps)
        curves.append(curve)
    rand = curves[1:]
    return PruningCurves(fractions=fractions, importance=curves[0],
                         random=[sum(c) / len(c) for c in zip(*rand)], random_min=[min(c) for c in zip(*rand)],
                         random_max=[max(c) for c in zip(*rand)], random_orders=random_orders, seed=seed)
