"""Shared test set-up.

``ATTNLAB_FLEX_COMPILE=0`` (set before attnlab is imported) makes the FlexAttention backend run
uncompiled, so the conformance suite checks its block-mask logic in milliseconds instead of paying
``torch.compile`` for every shape; a test of the compiled kernel sets it back to ``1`` itself
(``attnlab.patterns.executor.flex_compile_enabled`` reads the variable on every call).
"""
import os

os.environ.setdefault("ATTNLAB_FLEX_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # Uncompiled flex_attention warns that it is unfused; that is the point here.
    config.addinivalue_line("filterwarnings", "ignore:.*flex_attention called without torch.compile.*:UserWarning")


@pytest.fixture
def single_thread():
    """Tiny tensors: intra-op threads only add overhead (and thrash on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
