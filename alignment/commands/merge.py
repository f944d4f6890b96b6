"""`python cli.py merge RUN --out DIR`: the base with the run's adapter merged in, as a plain Hugging Face model.

A 4-bit run's adapter was trained against the dequantized nf4 weights, dequantize(quantize(W)), not against
the original W: that is what the forward pass of a 4-bit layer multiplies by. So the merge loads the base the
way the run did (quantized), dequantizes it (each layer at a time, in float32, then cast to --dtype), and adds
the LoRA update there: W' = dequantize(nf4(W)) + (alpha / r) * B A (Hu et al. 2021, eq. 3; Dettmers et al.
2023 for the nf4 storage). Merging into the original full-precision W instead would add the update to weights
the adapter never saw.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

from alignment.errors import ConfigError
from alignment.run.rundir import adapter_dir, base_of

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def merge_adapter(
    run: str | Path,
    out: str | Path,
    *,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    base: str | None = None,
    revision: str | None = None,
) -> Path:
    """Write base + adapter, merged, to `out` (weights in `dtype`, config, generation config, tokenizer).

    The base, its revision and whether it was 4-bit come from the run's config.yaml unless given.
    """
    from peft import PeftModel

    from alignment.model import load_base, load_tokenizer

    adapter = adapter_dir(run)
    base, revision, trained = base_of(adapter, base, revision)
    in_4bit = bool(trained.get("load_in_4bit", True))
    target = _output_dir(out)
    torch_dtype = DTYPES[dtype]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # 4-bit: the layers stay packed until dequantized one by one; float32 keeps that dequantization exact
    load_dtype = torch.float32 if in_4bit else torch_dtype
    model = load_base(base, revision=revision, load_in_4bit=in_4bit, compute_dtype=load_dtype, device=device)
    if getattr(model, "hf_quantizer", None) is not None:  # quantized on load, or stored quantized
        model = model.dequantize(dtype=torch_dtype)
    try:
        policy = PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(f"the adapter {adapter} does not fit the base {base!r}: {err}") from err
    merged = policy.merge_and_unload().to(torch_dtype)
    merged.config.dtype = torch_dtype
    merged.save_pretrained(target)
    load_tokenizer(base, revision).save_pretrained(target)
    log.info(
        "%s + %s merged (%s%s) into %s: AutoModelForCausalLM.from_pretrained(%r)",
        base, adapter, dtype, ", dequantized from nf4" if in_4bit else "", target, str(target),
    )  # fmt: skip
    return target


def _output_dir(out: str | Path) -> Path:
    """`out`, refused when it already holds files other than a model (a run directory, say)."""
    target = Path(out)
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file()):
        raise ConfigError(f"--out {target} exists and holds something other than a model: choose another directory")
    target.mkdir(parents=True, exist_ok=True)
    return target
