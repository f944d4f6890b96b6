"""Loading the base (4-bit or not) and its tokenizer, and LoRA on top."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignment.errors import ModelLoadError
from alignment.hub import resolve_base

log = logging.getLogger(__name__)


def load_tokenizer(base: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    source = resolve_base(base, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as err:
        raise ModelLoadError(f"cannot load the tokenizer of {base!r}: {err}") from err
    if tokenizer.pad_token_id is None:  # Llama-style tokenizers ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(
    base: str,
    *,
    revision: str | None = None,
    load_in_4bit: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> PreTrainedModel:
    """The frozen base: one copy, on `device`, 4-bit nf4 with double quantization when asked.

    Checkpoints that are already quantized (they carry a `quantization_config`, e.g. unsloth/*-bnb-4bit)
    load as they are.
    """
    source = resolve_base(base, revision)
    device = device or torch.device("cpu")
    config = AutoConfig.from_pretrained(source, revision=revision)
    prequantized = getattr(config, "quantization_config", None) is not None
    device_map = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}
    options = {"revision": revision, "dtype": compute_dtype, "device_map": device_map}
    if load_in_4bit and not prequantized:
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    elif prequantized and not load_in_4bit:
        log.warning("%s is stored quantized: it loads in 4-bit although load_in_4bit is false", base)
    try:
        # an explicit quantization_config=None would override the checkpoint's own: pass it only when set
        model = AutoModelForCausalLM.from_pretrained(source, **options)
    except OSError as err:
        raise ModelLoadError(f"cannot load the weights of {base!r}: {err}") from err
    model.requires_grad_(False)
    _keep_cpu_4bit_differentiable(model)
    return model


def _keep_cpu_4bit_differentiable(model: PreTrainedModel) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, the first eval-mode forward without gradients (a validation pass) converts
    the weights in place to a packed layout, and from then on every forward, training included, uses a
    kernel with no autograd support: gradients to the LoRA layers below would be silently wrong.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_lora(
    model: PreTrainedModel,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """LoRA adapters (PEFT) over a frozen base; gradient checkpointing non-reentrant (the reentrant kind breaks DDP)."""
    checkpointing_kwargs = {"use_reentrant": False}
    if getattr(model, "is_loaded_in_4bit", False):
        _upcast_for_kbit_training(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    try:
        policy = get_peft_model(model, config)
    except ValueError as err:  # e.g. target modules the base does not have
        raise ModelLoadError(f"cannot put LoRA adapters on {target_modules!r}: {err}") from err
    # from_pretrained leaves the base in eval mode, where transformers skips gradient checkpointing
    return policy.train()


def _upcast_for_kbit_training(model: PreTrainedModel) -> None:
    """fp32 for the small 16-bit weights of a 4-bit base (norms): what peft's `prepare_model_for_kbit_training`
    does for stability, except for the input embeddings and the LM head.

    peft upcasts those too, though they are frozen and their matmul runs in the compute dtype under autocast
    anyway: on Llama-3 (128k vocabulary) that is 2 x 2 GiB instead of 2 x 1 GiB, and fp32 embeddings would
    also make the whole residual stream (and every checkpointed activation) fp32.
    """
    kept = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        kept.add(id(head.weight))
    for param in model.parameters():
        is_16bit = param.dtype in (torch.float16, torch.bfloat16)
        if is_16bit and id(param) not in kept and param.__class__.__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
