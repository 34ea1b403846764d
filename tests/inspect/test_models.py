"""Loading real models offline, and published attention behaviours of the two test models.

Behaviours asserted (not snapshots of our own output):
* BERT-style encoders put a large share of attention on special tokens ([CLS] / [SEP]) in their
  middle layers (Clark et al., "What Does BERT Look At?", 2019; Kovaleva et al., 2019);
* an early BERT layer has a previous-token (positional) head (Clark et al., 2019);
* in decoder LMs the first token is an attention sink for most heads past the first layers
  (Xiao et al., StreamingLLM, 2023; Gu et al., "When Attention Sink Emerges", 2025);
* LLMs have massive activations at the starting token (Sun et al., "Massive Activations in
  Large Language Models", 2024).
"""
import re

import pytest
import torch

from attnlab.inspect.capture import capture
from attnlab.inspect.models import load_model

SENTENCE = ("The old lighthouse keeper walked along the rocky shore, counting the waves as the storm "
            "slowly rolled in from the sea.")


def test_load_errors_name_the_path(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_model(tmp_path)  # empty directory: not a model
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="never unpickles"):
        load_model(tmp_path)
    f = tmp_path / "weights.pt"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(f)
    with pytest.raises(TypeError, match="path"):
        load_model(3)


def test_minilm_loads_offline(minilm):
    model, tok = minilm
    assert type(model).__name__ == "BertModel" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.num_hidden_layers == 6 and model.config.num_attention_heads == 12
    assert tok.convert_ids_to_tokens(tok("hi")["input_ids"]) == ["[CLS]", "hi", "[SEP]"]


def test_smollm2_loads_from_gguf(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        nxt = model(**enc).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"  # the dequantized weights are the trained model


@pytest.fixture(scope="module")
def minilm_capture(minilm):
    model, tok = minilm
    return capture(model, SENTENCE, tokenizer=tok, metrics=("special", "prev_token"))


def test_minilm_special_tokens_take_a_large_share_in_middle_layers(minilm_capture):
    cap = minilm_capture
    n_tokens = len(cap.tokens[0])
    uniform_share = 2 / n_tokens                               # [CLS] and [SEP] out of n tokens
    middle = cap.head_metrics["special"][2:4].mean()           # layers 2-3 of 0-5, mean over heads
    assert middle > 0.3 and middle > 3 * uniform_share, float(middle)


def test_minilm_has_an_early_previous_token_head(minilm_capture):
    prev = minilm_capture.head_metrics["prev_token"][:3]       # layers 0-2
    assert prev.max() > 0.5, prev.max(1).values.tolist()


def test_smollm2_first_token_is_a_sink_and_carries_massive_activations(smollm2):
    model, tok = smollm2
    cap = capture(model, SENTENCE + " The keeper lit the lamp.", tokenizer=tok, metrics=("received",),
                  hidden_states=True)
    assert len(cap.tokens[0]) <= 64
    rate = cap.sink_rate(position=0, eps=0.3, min_layer=2)
    assert rate > 0.5, rate
    assert cap.sink_rate(position=len(cap.tokens[0]) // 2, min_layer=2) < 0.1  # a middle token is not
    assert any(r["token"] == 0 for r in cap.massive), cap.massive[:3]
