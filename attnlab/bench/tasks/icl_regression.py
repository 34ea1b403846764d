"""In-context linear regression (He, Pan, Chen & Yang, "In-Context Linear Regression Demystified:
Training Dynamics and Mechanistic Interpretability of Multi-Head Softmax Attention", ICML 2025): the model
reads ``n`` pairs ``(x_i, y_i)`` and a query ``x_q`` and predicts ``y_q``; its MSE against the context
length is reported beside the Bayes-optimal (ridge) predictor's on the same sequences.

**Generator** (:func:`icl_data`, the authors' ``LinearReg``): per sequence ``beta ~ N(0, I_d / d)``,
``x_i, x_q ~ N(0, I_d)``, ``y = beta^T x + eps`` with ``eps ~ N(0, noise_std^2)`` (the query's target
is noisy too). Tokens are ``z_i = (x_i, y_i)`` (``d + 1`` features) and the query token is ``(x_q, 0)``,
last; the prediction is read from the model's output at the query position (the authors' model has no
positional encoding: ``positions="none"``).

**Optimum** (:func:`ridge_predict`): with that prior the posterior mean of ``beta`` is the ridge
estimate ``beta_hat = (X^T X + lambda I)^(-1) X^T y`` with ``lambda = d * noise_std^2``, so
``x_q^T beta_hat`` has the least expected squared error of any predictor; ``lambda = 0`` is
least squares (minimum-norm when ``n < d``).

**Training**: fresh sequences every step (the authors sample online); each step's context length is
drawn uniformly from ``[min_train_context, n_ctx]`` (``min_train_context = n_ctx`` trains at one length as
the paper does), so the MSE-against-length curve is in distribution. The learning-rate sweep keeps the
lowest MSE at ``n_ctx``.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .train import Task, build_model, fit, seed_all, sweep


def icl_data(num: int, dim: int, n: int, noise_std: float, generator: torch.Generator,
             dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z, x, y)``: tokens ``z`` of shape ``(num, n + 1, dim + 1)`` (query last, its y slot 0), covariates
    ``x`` ``(num, n + 1, dim)`` and responses ``y`` ``(num, n + 1)`` (``y[:, -1]`` is the target)."""
    if n < 0 or dim < 1 or num < 1:
        raise ValueError(f"icl_data: need num >= 1, dim >= 1 and n >= 0, got num={num}, dim={dim}, n={n}")
    if not noise_std >= 0:
        raise ValueError(f"icl_data: noise_std must be >= 0, got {noise_std!r}")
    kw = dict(generator=generator, dtype=torch.float64)
    x = torch.randn(num, n + 1, dim, **kw)
    beta = torch.randn(num, dim, **kw) / math.sqrt(dim)
    y = torch.einsum("bld,bd->bl", x, beta) + noise_std * torch.randn(num, n + 1, **kw)
    z = torch.cat([x, y[..., None]], dim=-1)
    z[:, -1, -1] = 0.0
    return z.to(dtype), x.to(dtype), y.to(dtype)


def ridge_predict(x: torch.Tensor, y: torch.Tensor, x_query: torch.Tensor, lam: float) -> torch.Tensor:
    """``x_q^T (X^T X + lam I)^(-1) X^T y`` per batch element; ``lam = 0``: minimum-norm least squares.

    ``x`` ``(B, n, d)``, ``y`` ``(B, n)``, ``x_query`` ``(B, d)``; ``n = 0`` predicts 0 (the prior mean).
    """
    B, n, d = x.shape
    if n == 0:
        return torch.zeros(B, dtype=x.dtype)
    if lam > 0:
        gram = x.transpose(1, 2) @ x + lam * torch.eye(d, dtype=x.dtype)
        beta = torch.linalg.solve(gram, (x.transpose(1, 2) @ y[..., None]))[..., 0]
    else:
        beta = (torch.linalg.pinv(x) @ y[..., None])[..., 0]
    return (x_query * beta).sum(-1)


def bayes_lambda(dim: int, noise_std: float) -> float:
    """The ridge penalty of the posterior mean under ``beta ~ N(0, I/d)``: ``d * noise_std^2``."""
    return dim * noise_std ** 2


class ICLRegression(Task):
    name = "icl_regression"
    summary = "in-context linear regression: MSE against context length beside the ridge (Bayes) optimum"
    defaults = dict(
        dim=5, n_ctx=40, noise_std=0.01, min_train_context=1, eval_lengths=None, num_test=1_000, batch_size=64,
        steps=1_000, eval_every=200, lrs=[1e-3], target=None,
        d_model=64, n_layers=2, heads=4, mlp_ratio=2, positions="none", causal=True, params={}, impl=None,
        hybrid=None,
    )
    presets = {
        "tiny": [dict(dim=3, n_ctx=8, num_test=200, batch_size=32, steps=60, eval_every=30, d_model=32,
                      heads=2)],
        "quick": [dict(dim=5, n_ctx=20, num_test=500, batch_size=32, steps=400)],
        "standard": [dict(dim=5, n_ctx=40, steps=3_000, lrs=[5e-4, 1e-3])],
        "full": [dict(dim=d, n_ctx=8 * d, steps=6_000, lrs=[3e-4, 1e-3, 3e-3], d_model=m)
                 for d in (5, 10) for m in (64, 128)],
    }

    @staticmethod
    def lengths(c: dict) -> List[int]:
        """The evaluated context lengths: ``n_ctx`` plus ``eval_lengths``, or plus 1, 2, 4, ... and ``dim``."""
        if c["eval_lengths"]:
            return sorted({int(n) for n in c["eval_lengths"]} | {c["n_ctx"]})
        grid = {c["n_ctx"], min(c["dim"], c["n_ctx"])}
        n = 1
        while n < c["n_ctx"]:
            grid.add(n)
            n *= 2
        return sorted(grid)

    def run(self, mechanism: str, config: dict, seed: int) -> dict:
        c = config
        dim, n_ctx, sigma = c["dim"], c["n_ctx"], float(c["noise_std"])
        if not 1 <= c["min_train_context"] <= n_ctx:
            raise ValueError(f"icl_regression: min_train_context must be in [1, n_ctx={n_ctx}], got "
                             f"{c['min_train_context']}")
        lengths = self.lengths(c)
        if min(lengths) < 0:
            raise ValueError(f"icl_regression: eval_lengths must be >= 0, got {c['eval_lengths']}")
        max_len = max(lengths + [n_ctx]) + 1
        if c["positions"] == "learned" and max(lengths) > n_ctx:
            raise ValueError(f"icl_regression: eval_lengths beyond n_ctx ({n_ctx}) need positions='none' (learned "
                             f"positions are untrained there), got {max(lengths)}")
        lam = bayes_lambda(dim, sigma)
        test_gen = torch.Generator().manual_seed(seed + 1_000_003)
        tests = {}
        for n in lengths:
            z, x, y = icl_data(c["num_test"], dim, n, sigma, test_gen)
            ridge = ridge_predict(x[:, :-1].double(), y[:, :-1].double(), x[:, -1].double(), lam)
            tests[n] = (z, y[:, -1], float(((ridge - y[:, -1].double()) ** 2).mean()))

        def predict(model, z):
            return model.head(model.features(z)[:, -1])[:, 0]

        def batches():  # fresh sequences every step; every learning rate sees the same ones
            gen = torch.Generator().manual_seed(seed)

            def batch(step: int):
                n = int(torch.randint(c["min_train_context"], n_ctx + 1, (1,), generator=gen))
                z, _, y = icl_data(c["batch_size"], dim, n, sigma, gen)
                return z, y[:, -1]
            return batch

        def loss(model, b):
            return F.mse_loss(predict(model, b[0]), b[1])

        def mse(model, n: int) -> float:
            z, target, _ = tests[n]
            return float(((predict(model, z) - target) ** 2).mean())

        def one(lr: float):
            seed_all(seed)
            model = build_model(mechanism, c, seed=seed, input_dim=dim + 1, out_dim=1, max_len=max_len)
            return fit(model, batches(), loss, lambda m: mse(m, n_ctx), steps=c["steps"], lr=lr,
                       eval_every=c["eval_every"], target=c["target"], higher_is_better=False)

        best = sweep(c["lrs"], one, higher_is_better=False)
        model = best.best.model.eval()
        out = best.metrics("mse")
        with torch.no_grad():
            per_length = {n: mse(model, n) for n in lengths}
        ridge = tests[n_ctx][2]
        out.update(ridge_mse=ridge, mse_ratio=out["mse"] / ridge if ridge > 0 else None, ridge_lambda=lam,
                   context_lengths=lengths, null_mse=1.0 + sigma ** 2)
        for n in lengths:
            out[f"mse_n{n}"] = per_length[n]
            out[f"ridge_mse_n{n}"] = tests[n][2]
        return out


TASK = ICLRegression()
