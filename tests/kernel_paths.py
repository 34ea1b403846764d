"""Checks shared by the tests of the recurrent-family C++ kernels (titans, rat, aaren, agent's own): the
chunked form on the kernel against the entry's PyTorch path (the kernels turned off with
``attnlab.native.disabled()``).

tests/ is on sys.path (tests/conftest.py): ``from kernel_paths import ...``.
"""
from __future__ import annotations

import torch

from attnlab import native


def segments(m, q, k, v, cuts, per_token=(), **params):
    """``m.scan`` over the segments ``cuts[i]:cuts[i + 1]`` (per-token parameters sliced along their axis 2),
    the state carried: ``(output, final state)``."""
    state, outs = None, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        seg = {n: (x[:, :, a:b] if n in per_token else x) for n, x in params.items()}
        o, state = m.scan(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, **seg)
        outs.append(o)
    return torch.cat(outs, 2), state


def same_segments(m, q, k, v, cuts, tol, per_token=(), **params):
    """The kernel's segments equal the PyTorch path's, output and every state tensor."""
    fast, fast_state = segments(m, q, k, v, cuts, per_token, **params)
    with native.disabled():
        slow, slow_state = segments(m, q, k, v, cuts, per_token, **params)
    torch.testing.assert_close(fast, slow, atol=tol, rtol=tol)
    assert set(fast_state.tensors) == set(slow_state.tensors)
    for name in fast_state.tensors:
        torch.testing.assert_close(fast_state[name], slow_state[name], atol=tol, rtol=tol)
    return fast


def same_noncausal(m, q, k, v, tol, nan_at, **params):
    """Non-causal: the kernel equals the PyTorch path and the parallel form; a NaN key at index ``nan_at``
    (batch, head, position, channel) makes every row of that head NaN on both paths."""
    fast = m(q, k, v, causal=False, **params)
    with native.disabled():
        torch.testing.assert_close(fast, m(q, k, v, causal=False, **params), atol=tol, rtol=tol)
    torch.testing.assert_close(fast, m(q, k, v, causal=False, impl="parallel", **params), atol=tol, rtol=tol)
    k = k.clone()
    k[nan_at] = float("nan")
    assert m(q, k, v, causal=False, **params)[nan_at[:2]].isnan().all()
    with native.disabled():
        assert m(q, k, v, causal=False, **params)[nan_at[:2]].isnan().all()


def graph_nodes(fn, seen=None):
    """The names of every node of the autograd graph behind ``fn`` (a tensor's ``grad_fn``): which
    backward ran (a kernel's Function, or the PyTorch path's operations)."""
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return []
    seen.add(fn)
    return [type(fn).__name__] + [n for nxt, _ in fn.next_functions for n in graph_nodes(nxt, seen)]


def kernel_and_pytorch_gradients(run, node: str, tol: float, times=None):
    """``run() -> (tensors, graph_nodes(...))`` on the kernels and with them turned off: the kernel's backward
    ``node`` ran in the first (``times`` times, when given) and not in the second, and every tensor agrees
    within ``tol`` relative to its largest entry."""
    fast, nodes = run()
    assert nodes.count(node) == times if times is not None else node in nodes
    with native.disabled():
        slow, nodes = run()
    assert node not in nodes
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=tol * max(1.0, float(b.abs().max())), rtol=tol)
