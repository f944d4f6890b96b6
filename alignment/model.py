"""Loading the base: hub name or local path, 4-bit or not, LoRA on top; and the tiny offline model."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import socket
import tempfile
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from alignment.errors import ModelLoadError
from alignment.gguf import gguf_source, is_gguf

log = logging.getLogger(__name__)

TINY = "tiny"  # base name of the offline model: a 2-layer Llama with random weights and a byte tokenizer
TINY_VERSION = 1  # bump when the tiny model or tokenizer changes, so cached copies are rebuilt


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNMENT_CACHE", Path.home() / ".cache" / "alignment"))


def resolve_base(base: str, revision: str | None = None) -> str:
    """What to load from: a local directory, or the hub name when the hub can be reached.

    Without the hub, a name found in the local Hugging Face cache resolves to its snapshot directory, so nothing
    after this tries the network (and waits through its retries); a name not there fails at once.
    """
    if base == TINY:
        return str(build_tiny_model())
    if is_gguf(base):  # a llama.cpp file, or a model a Python package ships: converted once, then a directory
        return str(gguf_source(base, cache_dir()))
    path = Path(base).expanduser()
    if path.exists():
        check_model_dir(base, path)
        return str(path)
    if looks_like_path(base):  # not a hub name: saying "not in the Hugging Face cache" would mislead
        raise ModelLoadError(f"--model.base {base}: no such directory")
    if hub_reachable():
        return base
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(base, revision=revision, local_files_only=True)
    except Exception as err:  # not cached, or not even a valid repo id: the same answer for the user
        raise ModelLoadError(
            f"cannot load model {base!r}: it is not a local directory and is not in the Hugging Face cache, "
            "and the hub cannot be reached (offline, or HF_HUB_OFFLINE=1). Download it on a machine with network "
            f"(`hf download {base} --local-dir DIR`) and pass the local copy: --model.base DIR"
        ) from err


def looks_like_path(base: str) -> bool:
    """A path, not a hub name (`org/name`): starts like one, has more than one `/`, or has the OS's own separator."""
    return base.startswith(("/", ".", "~")) or base.count("/") > 1 or (os.sep != "/" and os.sep in base)


def check_model_dir(base: str, path: Path) -> None:
    """One clear line for a local base that is not a model: a file, an empty directory, a PEFT adapter."""
    if not path.is_dir():
        raise ModelLoadError(f"--model.base {base}: a file, not a model directory (or a .gguf file)")
    if not any(path.iterdir()):
        raise ModelLoadError(
            f"--model.base {base}: the directory is empty; it should hold a model (config.json, "
            "weights, tokenizer), e.g. from `hf download NAME --local-dir DIR`"
        )
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        try:
            named = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            named = None
        raise ModelLoadError(
            f"--model.base {base}: this is a PEFT adapter, not a base model; its base is named in "
            f"{adapter_config} (base_model_name_or_path: {named!r}): pass that as --model.base"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"--model.base {base}: no config.json in this directory: it is not a model directory")


def hub_reachable() -> bool:
    """Whether the hub answers; asked once per process (start-up checks the model and the data several times)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    return _answers(endpoint.hostname or "huggingface.co", port)


@functools.lru_cache(maxsize=8)
def _answers(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


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
            "correct; use bitsandbytes 0.49-0.50 or update alignment/model.py"
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
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """LoRA adapters (PEFT) over a frozen base; gradient checkpointing non-reentrant (the reentrant kind breaks DDP)."""
    checkpointing_kwargs = {"use_reentrant": False}
    if getattr(model, "is_loaded_in_4bit", False):
        _upcast_for_kbit_training(model)
    if gradient_checkpointing:
        _enable_checkpointing(model, checkpointing_kwargs)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    try:
        policy = get_peft_model(model, config)
    except ValueError as err:  # e.g. target modules the base does not have
        raise ModelLoadError(f"cannot put LoRA adapters on {target_modules!r}: {err}") from err
    # from_pretrained leaves the base in eval mode, where transformers skips gradient checkpointing
    return policy.train()


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


# ---- the tiny offline model ---------------------------------------------------------------------------------

_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (one byte = one token): any text, no download, exact lengths."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[4:]})
    # like Llama's tokenizer: BOS in front of plain encodes (the data pipeline relies on seeing that)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(root: Path | None = None) -> Path:
    """Write (once) a seeded random 2-layer Llama and its tokenizer to the cache; return the directory."""
    target = (root or cache_dir()) / f"tiny-llama-v{TINY_VERSION}"
    if (target / "config.json").exists():
        return target
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    # write aside, then rename: concurrent processes (DDP ranks, parallel tests) never see half a model
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target
