"""Inspect attention in real models (transformers on disk) and in attnlab modules.

* :mod:`.models` - offline loading of safetensors / GGUF checkpoints (:func:`load_model`);
* :mod:`.hooks` - :func:`attention_hooks`, the one hook point every capture, metric and
  intervention goes through (a :class:`Site` per attention call, post-softmax weights), and
  :class:`AttnlabAttention`, a torch module mixing tokens with any catalogue mechanism;
* :mod:`.capture` - streaming per-(layer, head) metrics, optional stored maps (:func:`capture`);
* :mod:`.metrics` - the metrics, each a pure function with its formula;
* :mod:`.interventions` - reversible, composable hooks (ablation, ACT, ZeroTuning, VAR, SoftPAG)
  and mask modifiers (sliding window + sinks, hidden spans).

Importing this package does not import transformers; loading a model does.
"""
from .capture import Capture, capture, head_divergence_map, waad_fai
from .hooks import AttnlabAttention, Site, attention_hooks, attention_modules
from .models import load_model, minilm_path, smollm2_path

__all__ = ["AttnlabAttention", "Capture", "Site", "attention_hooks", "attention_modules", "capture",
           "head_divergence_map", "load_model", "minilm_path", "smollm2_path", "waad_fai"]
