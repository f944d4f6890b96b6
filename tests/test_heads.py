"""The lean log-prob path is used only on LM heads known to be plain, and only after it agreed with the plain path.

Architectures whose logits are not `lm_head(last hidden state)` (Granite divides by `logits_scaling`, Cohere
multiplies by `logit_scale`, Gemma 2 soft-caps, MiniCPM3 divides the hidden states by hidden_size / dim_model_base)
are built tiny, with random weights and a head large enough that the scaling matters (logits of std ~8, not ~0.2).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from alignment import DPO, ORPO
from alignment.logprobs import sequence_logps, sequence_logps_from_hidden
from alignment.model import heads
from alignment.model.heads import lean_disagreement, plain_head_weight
from alignment.model.load import load_base
from tests.helpers import literal_batch

SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}  # fmt: skip
NOT_PLAIN = {
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.125}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 2.0, "head_dim": 16}),
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", {"dim_model_base": 8, "qk_nope_head_dim": 8,
                 "qk_rope_head_dim": 8, "v_head_dim": 16, "q_lora_rank": 32, "kv_lora_rank": 16,
                 "num_key_value_heads": 4}),
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


# ---- in the training module: a tiny Granite base from a local directory --------------------------------------


@pytest.fixture(scope="module")
def granite_dir(tmp_path_factory):
    """A 2-layer Granite with random weights (logits divided by 8) and the tiny byte tokenizer, saved locally."""
    from alignment.hub.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = transformers.GraniteConfig(**{**SMALL, "vocab_size": len(tokenizer)}, logits_scaling=8.0,
                                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GraniteForCausalLM(config)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    target = tmp_path_factory.mktemp("granite")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def granite_module(cls, granite_dir, lean: bool):
    module = cls(base=granite_dir, load_in_4bit=False, lean_logps=lean, **({"reference_cache": False}
                 if cls is DPO else {}))  # fmt: skip
    torch.manual_seed(0)  # the same LoRA initialisation for the lean and the plain module
    module.configure_model()
    return module


@pytest.mark.parametrize("cls", [DPO, ORPO])
@pytest.mark.parametrize("listed", [False, True], ids=["not-listed", "listed-by-mistake"])
def test_granite_takes_the_plain_path_with_a_warning(cls, listed, granite_dir, monkeypatch, caplog):
    """Not listed: refused up front. Listed by mistake: the first batch's check refuses it. Either way one
    warning, and log-probs, losses and gradients equal the plain path's."""
    if listed:
        monkeypatch.setattr(heads, "PLAIN_HEAD_MODEL_TYPES", heads.PLAIN_HEAD_MODEL_TYPES | {"granite"})
    lean, plain = granite_module(cls, granite_dir, True), granite_module(cls, granite_dir, False)
    batch = literal_batch()
    with caplog.at_level("WARNING", logger="alignment.methods.base"):
        lean_logps = lean.sequence_logps(batch, average=False)
        lean_loss, _ = lean.compute_loss(batch)
    plain_logps = plain.sequence_logps(batch, average=False)
    plain_loss, _ = plain.compute_loss(batch)
    warnings = [r.getMessage() for r in caplog.records if "lean_logps" in r.getMessage()]
    assert len(warnings) == 1 and "GraniteForCausalLM" in warnings[0], warnings
    assert ("nats per answer token" if listed else "'granite' is not among") in warnings[0]
    assert lean._lean_head_weight(batch) is None
    for got, want in zip(lean_logps, plain_logps, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean_loss, plain_loss, rtol=1e-5, atol=1e-5)
    lean_loss.backward()
    plain_loss.backward()
    plain_grads = dict(plain.policy.named_parameters())
    for name, param in lean.policy.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, plain_grads[name].grad, rtol=1e-5, atol=1e-5, msg=name)


def test_on_granite_the_lean_path_would_have_been_wrong(granite_dir):
    """What the fallback prevents: hidden @ W^T without Granite's division differs from the model's log-probs."""
    module = granite_module(ORPO, granite_dir, False)
    batch = literal_batch()
    labels = batch.labels[:, 1:]
    with torch.no_grad():
        plain = sequence_logps(module(batch.input_ids, batch.attention_mask)[:, :-1], labels)
        hidden = module.hidden_states(batch.input_ids, batch.attention_mask)[:, :-1]
        naive = sequence_logps_from_hidden(hidden, module.policy.get_base_model().lm_head.weight, labels)
    assert (naive - plain).abs().max() > 1.0


def test_the_tiny_llama_passes_the_check_and_keeps_the_lean_path(caplog):
    module = ORPO(load_in_4bit=False)
    module.configure_model()
    batch = literal_batch()
    with caplog.at_level("WARNING", logger="alignment.methods.base"):
        module.compute_loss(batch)
    assert module._lean_checked and module._lean_head_weight(batch) is module.policy.get_base_model().lm_head.weight
    assert not [r for r in caplog.records if "lean_logps" in r.getMessage()]
