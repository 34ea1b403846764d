"""The compiled FlexAttention path: equal to the reference, and a repeated call compiles nothing.

The conformance suite runs FlexAttention uncompiled (conftest) to stay fast; this file compiles
for real, on a handful of shapes only (each compile costs seconds on CPU).
"""
import pytest
import torch
from torch._dynamo.utils import counters

import attnlab
from attnlab.patterns import executor


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    monkeypatch.setenv("ATTNLAB_FLEX_COMPILE", "1")


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


CASES = [
    ("sliding_window", (1, 4, 300, 16), dict(window=40), True),
    ("neighborhood", (1, 2, 12, 20, 16), dict(kernel_size=(5, 7)), False),
    ("document", (2, 2, 200, 16), dict(document_lengths=(50, 120, 30)), True),
    ("alibi", (1, 4, 150, 16), dict(score_mod=attnlab.patterns.softcap(5.0)), True),
]


@pytest.mark.parametrize("name,shape,params,causal", CASES, ids=[c[0] for c in CASES])
def test_compiled_flex_matches_reference_and_caches(name, shape, params, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape) for _ in range(3))
    m = attnlab.mechanism(name)
    # the default for inference: the C++ kernels where they serve the mask (ranges, boxes), else flex
    want = "flex" if name == "alibi" else "native"
    assert m.select(m.prepare(q, k, v, causal=causal, **params)).name == want
    out = m(q, k, v, causal=causal, impl="flex", **params)
    ref = m.reference(q.double(), k.double(), v.double(), causal=causal, **params)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    before = _graphs()
    again = m(q, k, v, causal=causal, impl="flex", **params)
    assert _graphs() == before, "a repeated call with the same shape and parameters recompiled"
    assert torch.equal(out, again)


def test_gqa_and_bf16_compiled():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 256, 16, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 256, 16, dtype=torch.bfloat16) for _ in range(2))
    m = attnlab.mechanism("sliding_window")
    out = m(q, k, v, causal=True, window=40, impl="flex")
    ref = m.reference(q.double(), k.double(), v.double(), causal=True, window=40)
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


def test_flex_declines_training_on_cpu():
    q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
    m = attnlab.mechanism("sliding_window")
    assert m.select(m.prepare(q, k, v, window=8)).name != "flex"
    with pytest.raises(ValueError, match="inference-only"):
        m(q, k, v, window=8, impl="flex")
    assert executor.flex_compile_enabled()
