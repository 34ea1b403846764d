"""The one training loop the quality tasks share: AdamW, warm-up + cosine, evaluation, early stop, LR sweep.

``fit`` trains one model: AdamW (betas 0.9/0.999, weight decay on matrices only), the learning rate
warmed up linearly over the first ``warmup`` fraction of ``steps`` then decayed by a cosine to 0,
gradients clipped to norm 1. Every ``eval_every`` steps (and at the end) ``evaluate(model)`` runs under
``torch.no_grad()``; training stops early once the score reaches ``target`` (Zoology stops MQAR at
accuracy 0.99). The reported score is the last evaluation.

``sweep`` runs ``fit`` for each learning rate on a freshly built model (same seed, same batches) and
keeps the best score (Zoology reports the best run of its learning-rate sweep); once one run reaches the
target (the protocol's "solved") the remaining learning rates are not tried, and ``lrs_tried`` says so.

``Task`` (configuration defaults, presets, validation), ``mixer_plan`` / ``build_model`` (the task model
from a configuration, hybrid stacks included) are shared by every task here too.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU) so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class FitResult:
    score: float
    steps: int
    lr: float
    seconds: float
    reached_target: bool
    history: List[tuple] = field(default_factory=list)  # (step, score)
    model: Any = field(default=None, repr=False)  # the trained model


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))


def lr_at(step: int, steps: int, lr: float, warmup: float) -> float:
    """Linear warm-up over ``ceil(warmup * steps)`` steps, then cosine decay to 0 at ``steps``."""
    w = max(1, math.ceil(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    t = (step - w) / max(1, steps - w)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def fit(model: nn.Module, batch: Callable[[int], Any], loss: Callable[[nn.Module, Any], torch.Tensor],
        evaluate: Callable[[nn.Module], float], *, steps: int, lr: float, weight_decay: float = 0.1,
        warmup: float = 0.1, eval_every: int = 50, target: Optional[float] = None,
        higher_is_better: bool = True, clip: float = 1.0) -> FitResult:
    """Train ``model`` for up to ``steps`` steps on ``batch(step)``; see the module docstring."""
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps and eval_every must be >= 1, got steps={steps}, eval_every={eval_every}")
    opt = _optimizer(model, lr, weight_decay)
    reached = lambda s: target is not None and (s >= target if higher_is_better else s <= target)  # noqa: E731
    start, history, score, step = time.perf_counter(), [], float("nan"), 0
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, steps, lr, warmup)
        model.train()
        value = loss(model, batch(step - 1))
        if not torch.isfinite(value):
            history.append((step, float("nan")))
            score = float("nan")
            break
        opt.zero_grad(set_to_none=True)
        value.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if step % eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                score = float(evaluate(model))
            history.append((step, score))
            if reached(score):
                break
    return FitResult(score, step, lr, time.perf_counter() - start, bool(reached(score)), history, model)


@dataclass
class SweepResult:
    best: FitResult
    runs: List[FitResult]

    def metrics(self, name: str = "score") -> dict:
        """Flat, JSON-able summary: the best run's score, steps, lr, time, and every lr tried."""
        return {name: self.best.score, "steps": self.best.steps, "lr": self.best.lr,
                "train_seconds": round(sum(r.seconds for r in self.runs), 3),
                "reached_target": self.best.reached_target,
                "lrs_tried": [r.lr for r in self.runs], f"{name}_by_lr": [r.score for r in self.runs]}


def sweep(lrs: Sequence[float], run: Callable[[float], FitResult], *, higher_is_better: bool = True) -> SweepResult:
    """``run(lr)`` for each learning rate until one reaches its target; keeps the best score (NaN never wins)."""
    if not lrs:
        raise ValueError("lrs must list at least one learning rate")
    runs: List[FitResult] = []
    for lr in lrs:
        runs.append(run(float(lr)))
        if runs[-1].reached_target:
            break

    def key(r: FitResult) -> float:
        if math.isnan(r.score):
            return -math.inf
        return r.score if higher_is_better else -r.score

    return SweepResult(max(runs, key=key), runs)


# --------------------------------------------------------------------------------------------
# What every task shares: configuration defaults and validation, the model from a configuration
# --------------------------------------------------------------------------------------------
class Task:
    """A quality task. Subclasses set ``name``, ``summary``, ``defaults`` (every valid configuration key
    with its default) and ``presets`` (preset -> list of partial configurations), and implement
    ``run(mechanism, config, seed) -> dict`` on a resolved configuration.

    Model keys every task takes: ``d_model``, ``n_layers``, ``heads``, ``mlp_ratio``, ``positions``,
    ``causal``, ``params`` (the mechanism's parameters), ``impl`` (pin an implementation) and ``hybrid``
    (see :func:`mixer_plan`)."""

    name: str = ""
    summary: str = ""
    defaults: dict = {}
    presets: dict = {}

    def default_configs(self, preset: str) -> List[dict]:
        """Full configurations (defaults filled in) of ``preset``: tiny, quick, standard or full."""
        if preset not in self.presets:
            raise ValueError(f"preset must be one of {', '.join(self.presets)}, got {preset!r}")
        return [self.resolve(c) for c in self.presets[preset]]

    def resolve(self, config: Optional[dict]) -> dict:
        """``defaults`` updated with ``config`` (deep copies); an unknown key raises ValueError naming it."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name}: unknown config key(s) {', '.join(map(repr, unknown))}; valid keys: "
                             f"{', '.join(sorted(self.defaults))}")
        out = {**copy.deepcopy(self.defaults), **copy.deepcopy(config)}
        out["params"] = dict(out.get("params") or {})
        return out

    def run(self, mechanism: str, config: dict, seed: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task {self.name}: {self.summary}>"


def mixer_plan(mechanism: str, config: dict) -> tuple:
    """``(mixers, ratio, placement)`` for :func:`attnlab.models.build_hybrid`: ``mechanism`` with
    ``config["params"]`` in every layer, or with ``config["hybrid"] = {"other": NAME, "other_params": {..},
    "ratio": "a:b" (default "1:1"), "placement": "interleave" | "first" | "last"}`` ``mechanism`` as mixer A
    and ``other`` as mixer B."""
    own = (mechanism, dict(config["params"]))
    hybrid = config.get("hybrid")
    if not hybrid:
        return own, None, "interleave"
    if not isinstance(hybrid, dict) or "other" not in hybrid:
        raise ValueError(f"hybrid must be a dict with 'other' (and optional 'other_params', 'ratio', 'placement'), "
                         f"got {hybrid!r}")
    bad = sorted(set(hybrid) - {"other", "other_params", "ratio", "placement"})
    if bad:
        raise ValueError(f"hybrid: unknown key(s) {bad}; valid: other, other_params, ratio, placement")
    other = (hybrid["other"], dict(hybrid.get("other_params") or {}))
    return [own, other], hybrid.get("ratio", "1:1"), hybrid.get("placement", "interleave")


def build_model(mechanism: str, config: dict, *, seed: int, vocab: Optional[int] = None,
                input_dim: Optional[int] = None, out_dim: Optional[int] = None, max_len: int = 512) -> nn.Module:
    """The task model (:func:`attnlab.models.build_hybrid`) for ``config``'s architecture and :func:`mixer_plan`."""
    from ...models import build_hybrid

    mixers, ratio, placement = mixer_plan(mechanism, config)
    return build_hybrid(vocab, config["d_model"], config["n_layers"], config["heads"], mixers, ratio, placement,
                        causal=config["causal"], positions=config["positions"], max_len=max_len,
                        mlp_ratio=config["mlp_ratio"], input_dim=input_dim, out_dim=out_dim, impl=config["impl"],
                        seed=seed)


def head_dims(config: dict) -> tuple:
    """(heads, head_dim, value_dim) of the task model's mixers."""
    return config["heads"], config["d_model"] // config["heads"], config["d_model"] // config["heads"]


__all__ = ["FitResult", "SweepResult", "Task", "build_model", "fit", "head_dims", "lr_at", "mixer_plan", "seed_all",
           "sweep"]
