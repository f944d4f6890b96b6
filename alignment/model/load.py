"""Loading the base (4-bit or not) and its tokenizer, and LoRA on top."""

from __future__ import annotations

import json
import logging
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import torch
import yaml
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PreTrainedModel,
)

from alignment.errors import ModelLoadError
from alignment.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_CONFIG, check_safetensors
from alignment.hub import resolve_base

log = logging.getLogger(__name__)

POLICY_ADAPTER = "default"  # peft's name for the adapter a PeftModel is built with: the one trained and saved
REFERENCE_ADAPTER = "reference"  # a frozen copy of the adapter training started from: DPO's reference


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
    for weights in sorted(Path(source).glob("*.safetensors")):  # a local directory's (a hub name has none here)
        check_safetensors(weights, f"copy or download the base {base} again")
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


# Not a documented bitsandbytes setting: an instance attribute set in `Linear4bit.__init__` and read in its forward,
# there from bitsandbytes 0.49 (with the packed CPU kernel it switches off; checked on 0.49 and 0.50, absent in 0.47
# and 0.48). Assigning a renamed attribute would not fail, so it is looked up first.
CPU_PACKING_FLAG = "support_avx512bf16_for_cpu"
CPU_PACKING_SINCE = "0.49"


def _keep_cpu_4bit_differentiable(model: PreTrainedModel) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, the first eval-mode forward without gradients (a validation pass) converts
    the weights in place to a packed layout, and from then on every forward, training included, uses a
    kernel with no autograd support: gradients to the LoRA layers below would be silently wrong.
    Raises RuntimeError when a bitsandbytes that has that kernel has no such switch: never a silent no-op.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    if layers and not all(hasattr(layer, CPU_PACKING_FLAG) for layer in layers):
        installed = _version("bitsandbytes")
        if Version(installed) < Version(CPU_PACKING_SINCE):
            return  # no packed CPU kernel yet: nothing to switch off
        raise RuntimeError(
            f"bitsandbytes {installed}: Linear4bit has no {CPU_PACKING_FLAG!r}, which keeps 4-bit CPU gradients "
            "correct; use bitsandbytes 0.49-0.50 or update alignment/model/load.py"
        )
    for layer in layers:
        setattr(layer, CPU_PACKING_FLAG, False)


def _version(package: str) -> str:
    return version(package)


def add_lora(
    model: PreTrainedModel,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    gradient_checkpointing: bool | Literal["selective"] = False,
) -> PeftModel:
    """LoRA adapters (PEFT) over a frozen base; gradient checkpointing non-reentrant (the reentrant kind breaks DDP),
    "selective": see `selective_checkpointing`."""
    _prepare_for_lora(model, gradient_checkpointing)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    try:
        policy = get_peft_model(model, config)
    except ValueError as err:  # e.g. target modules the base does not have
        raise ModelLoadError(f"cannot put LoRA adapters on {target_modules!r}: {err}") from err
    # from_pretrained leaves the base in eval mode, where transformers skips gradient checkpointing
    return policy.train()


def load_lora(
    model: PreTrainedModel,
    adapter: str,
    *,
    reference: bool = False,
    gradient_checkpointing: bool | Literal["selective"] = False,
) -> PeftModel:
    """The LoRA adapter saved in `adapter` over a frozen base, trainable (`POLICY_ADAPTER`); with `reference`, a
    second, frozen copy of it beside (`REFERENCE_ADAPTER`): one base, two small adapters."""
    _prepare_for_lora(model, gradient_checkpointing)
    try:
        policy = PeftModel.from_pretrained(model, adapter, adapter_name=POLICY_ADAPTER, is_trainable=True)
        if reference:  # left inactive and frozen; `PreferenceModule.reference_model` switches to it
            policy.load_adapter(adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:  # e.g. target modules or shapes the base does not have
        raise ModelLoadError(f"--model.adapter {adapter}: does not fit the base: {err}") from err
    return policy.train()


def _prepare_for_lora(model: PreTrainedModel, gradient_checkpointing: bool | Literal["selective"]) -> None:
    if getattr(model, "is_loaded_in_4bit", False):
        _upcast_for_kbit_training(model)
    if gradient_checkpointing:  # non-reentrant: the reentrant kind breaks DDP (and selective needs it)
        kwargs = {"use_reentrant": False}
        if gradient_checkpointing == "selective":
            kwargs["context_fn"] = selective_checkpointing
        _enable_checkpointing(model, kwargs)


# what a selectively checkpointed layer keeps: the outputs of its attention and of its matrix products (the
# 4-bit base's are bitsandbytes' own op), except products over an inner dimension of at most _CHEAP_INNER: a
# LoRA B matrix's (rank r), as wide as the layer's output yet cheap to redo
_KEPT_ATTENTION = {
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
}
_PRODUCTS = {"aten::mm": 0, "aten::bmm": 0, "aten::addmm": 1}  # the left operand's position
_CHEAP_INNER = 256


def _keep_products_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    name = op.name()
    keep = name in _KEPT_ATTENTION or name == "bitsandbytes::gemm_4bit"
    if name in _PRODUCTS:
        keep = args[_PRODUCTS[name]].shape[-1] > _CHEAP_INNER
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpointing():
    """Selective activation checkpointing (PyTorch's `create_selective_checkpoint_contexts`): a checkpointed layer
    keeps the outputs of its matrix products and of its attention from the forward, and its recomputation in
    backward redoes only the rest (norms, activations, rotary embeddings, LoRA's rank-r products), not the base's
    products, which are most of a layer's time. The gradients are the same; the kept outputs cost memory: about
    24 KB a token a layer for SmolLM2-135M in fp32 (its 7 projections' outputs and the attention's)."""
    return create_selective_checkpoint_contexts(_keep_products_and_attention)


def read_adapter(adapter: str, base: str, revision: str | None = None) -> dict:
    """The adapter_config.json of `adapter`, a PEFT LoRA adapter directory with its weights, trained on `base`;
    a ModelLoadError naming --model.adapter otherwise."""
    path = Path(adapter).expanduser()
    flag = f"--model.adapter {adapter}"
    if not path.is_dir():
        raise ModelLoadError(f"{flag}: no such directory (expected a PEFT adapter, e.g. runs/NAME/adapter)")
    if not (path / ADAPTER_CONFIG).is_file():
        hint = f": pass {path / 'adapter'}" if (path / "adapter" / ADAPTER_CONFIG).is_file() else ""
        raise ModelLoadError(f"{flag}: not a PEFT adapter directory (no {ADAPTER_CONFIG}){hint}")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{flag}: {ADAPTER_CONFIG} is not readable JSON: {err}") from err
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise ModelLoadError(f"{flag}: a {kind or 'unknown'} adapter; only LoRA adapters can be trained here")
    weights = adapter_weights(path)
    if weights is None:
        raise ModelLoadError(f"{flag}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}) in the directory")
    if weights.suffix == ".safetensors":
        check_safetensors(weights, "copy the adapter again from where it came from, or train it again")
    named = config.get("base_model_name_or_path")
    if named is None:
        log.warning("%s names no base (base_model_name_or_path): assuming it was trained on %s", flag, base)
    elif not _same_base(path, named, base, revision):
        raise ModelLoadError(
            f"{flag} was trained on {named!r} (base_model_name_or_path in its {ADAPTER_CONFIG}), not on "
            f"--model.base {base}: pass the base it was trained on"
        )
    return config


def adapter_weights(adapter: str | Path) -> Path | None:
    """The weights file of a PEFT adapter directory, or None."""
    return next((Path(adapter) / f for f in ADAPTER_WEIGHTS if (Path(adapter) / f).is_file()), None)


def _same_base(adapter: Path, named: str, base: str, revision: str | None) -> bool:
    """Whether `named` (an adapter's base_model_name_or_path) is `base`. PEFT records the path the weights were
    loaded from: for "tiny" or a gguf file, the directory they resolve to; offline, a hub snapshot's directory.
    The run that saved the adapter (its config.yaml) names the base as given."""
    if _run_base(adapter) == base:
        return True
    source = resolve_base(base, revision)
    if named in (base, source) or _hub_name(named) in (base, _hub_name(source)):
        return True
    return Path(named).exists() and Path(named).resolve() == Path(source).resolve()


def _run_base(adapter: Path) -> str | None:
    """`model.init_args.base` of the run that exported `adapter` (its config.yaml, beside adapter/), or None."""
    file = adapter.parent / RUN_CONFIG
    try:
        config = yaml.safe_load(file.read_text()) if file.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    args = ((config or {}).get("model") or {}).get("init_args") if isinstance(config, dict) else None
    return args.get("base") if isinstance(args, dict) else None


def _hub_name(source: str) -> str:
    """`org/name` for a hub cache snapshot (`.../models--org--name/snapshots/<commit>`), else `source`."""
    parts = Path(source).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return source


def _enable_checkpointing(model: PreTrainedModel, kwargs: dict) -> None:
    """`activation_checkpointing_enable`: transformers 5's name for `gradient_checkpointing_enable` (gone in v6)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
