"""The lean log-prob path is used only on LM heads known to be plain, and only after it agreed with the plain path.

Architectures whose logits are not `lm_head(last hidden state)` (Granite divides by `logits_scaling`, Cohere
multiplies by `logit_scale`, Gemma 2 soft-caps, MiniCPM3 scales the hidden states by hidden_size / dim_model_base) are built tiny, with random
weights and a head large enough that the scaling matters (logits of std ~8 instead of ~0.2).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from alignment import heads
from alignment.heads import lean_disagreement, plain_head_weight
from alignment.model import load_base
from tests.helpers import literal_batch

SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}  # fmt: skip
NOT_PLAIN = {
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.125}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 2.0, "head_dim": 16}),
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", {"dim_model_base": 8, "qk_nope_head_dim": 8,
                 "qk_rope_head_dim": 8, "v_head_dim": 16, "q_lora_rank": 32, "kv_lora_rank": 16, "num_key_value_heads": 4}),
}  # fmt: skip


def tiny(model_type: str) -> transformers.PreTrainedModel:
    config_name, model_name, extra = NOT_PLAIN[model_type]
    config = getattr(transformers, config_name)(**{**SMALL, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=1.0)
    return model.requires_grad_(False)


def check_inputs():
    batch = literal_batch()
    return batch.input_ids, batch.attention_mask, batch.labels[:, 1:]


def test_a_plain_llama_head_is_allowed_and_the_paths_agree():
    model = load_base("tiny", load_in_4bit=False)
    weight, why_not = plain_head_weight(model)
    assert weight is model.lm_head.weight and why_not == ""
    assert lean_disagreement(model, weight, *check_inputs()) is None


@pytest.mark.parametrize("model_type", sorted(NOT_PLAIN))
def test_scaled_or_capped_heads_are_not_allowed(model_type):
    model = tiny(model_type)
    assert model.config.model_type == model_type
    weight, why_not = plain_head_weight(model)
    assert weight is None and repr(model_type) in why_not


@pytest.mark.parametrize("model_type", sorted(NOT_PLAIN))
def test_the_first_batch_check_catches_a_scaled_head_that_slipped_through(model_type, monkeypatch):
    """Were the list wrong, the check on the first batch still sees the lean log-probs are not the model's."""
    monkeypatch.setattr(heads, "PLAIN_HEAD_MODEL_TYPES", heads.PLAIN_HEAD_MODEL_TYPES | {model_type})
    model = tiny(model_type)
    weight, _ = plain_head_weight(model)
    assert weight is model.get_output_embeddings().weight
    message = lean_disagreement(model, weight, *check_inputs())
    assert message is not None and "nats per answer token" in message


def test_the_check_runs_without_dropout_or_gradients_and_restores_modes():
    model = load_base("tiny", load_in_4bit=False)
    model.config.attention_dropout = 0.9  # dropout this large would make two forwards disagree
    model.train()
    model.model.norm.eval()  # a module left in eval mode by its owner stays so
    weight, _ = plain_head_weight(model)
    assert lean_disagreement(model, weight, *check_inputs()) is None
    assert model.training and model.model.layers[0].training and not model.model.norm.training


def test_a_head_with_a_bias_or_trained_is_not_plain():
    model = load_base("tiny", load_in_4bit=False)
    model.lm_head.weight.requires_grad_(True)
    assert plain_head_weight(model) == (None, "its LM head is trained")
    model.lm_head.weight.requires_grad_(False)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features), requires_grad=False)
    assert plain_head_weight(model)[0] is None
