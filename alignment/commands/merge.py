"""`python cli.py merge RUN --out DIR`: the base with the run's adapter merged in, as a plain Hugging Face model.

A 4-bit run's adapter was trained against the dequantized nf4 weights, dequantize(quantize(W)), not against
the original W: that is what the forward pass of a 4-bit layer multiplies by. So the merge loads the base the
way the run did (quantized), dequantizes it (each layer at a time, in float32, then cast to --dtype), and adds
the LoRA update there: W' = dequantize(nf4(W)) + (alpha / r) * B A (Hu et al. 2021, eq. 3; Dettmers et al.
2023 for the nf4 storage). Merging into the original full-precision W instead would add the update to weights
the adapter never saw.

Nothing is lost on the way: `--out` may not be the base, a run, or inside either, and a directory that already
holds a model is replaced only with `--overwrite true`; merged weights that overflow `--dtype` are refused; the
model is written to a temp directory beside `--out` and renamed into place, so a kill leaves `--out` as it was.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

from alignment.errors import ConfigError
from alignment.files import RUN_CONFIG
from alignment.run.rundir import adapter_dir, base_of, holds_run, replace_dir, run_of_adapter

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def merge_adapter(
    run: str | Path,
    out: str | Path,
    *,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    base: str | None = None,
    revision: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write base + adapter, merged, to `out` (weights in `dtype`, config, generation config, tokenizer).

    The base, its revision and whether it was 4-bit come from the run's config.yaml unless given.
    """
    from peft import PeftModel

    from alignment.hub import resolve_base
    from alignment.model import load_base, load_tokenizer

    adapter = adapter_dir(run)
    base, revision, trained = base_of(adapter, base, revision)
    in_4bit = bool(trained.get("load_in_4bit", True))
    # the base of the merge and the one the run trained on (when a local directory) are never written over
    bases = [Path(resolve_base(base, revision))]
    if trained.get("base") and Path(trained["base"]).expanduser().is_dir():
        bases.append(Path(trained["base"]).expanduser())
    target = _output_dir(Path(out), adapter, bases, overwrite)
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
    _check_finite_adapter(policy, adapter)
    merged = policy.merge_and_unload().to(torch_dtype)
    _check_finite(merged, dtype)
    merged.config.dtype = torch_dtype
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_staging_debris(target)
    staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.merging-{os.getpid()}-"))
    try:
        merged.save_pretrained(staged)
        load_tokenizer(base, revision).save_pretrained(staged)
        replace_dir(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    log.info(
        "%s + %s merged (%s%s) into %s: AutoModelForCausalLM.from_pretrained(%r)",
        base, adapter, dtype, ", dequantized from nf4" if in_4bit else "", target, str(target),
    )  # fmt: skip
    return target


def _output_dir(out: Path, adapter: Path, bases: list[Path], overwrite: bool) -> Path:
    """`out`, or a ConfigError when writing there could destroy something: the base (never), a run or a directory
    inside one, a directory holding something other than a model, or a model (unless `overwrite`)."""
    target = out.expanduser().absolute()
    real = target.resolve()
    for base in [b.resolve() for b in bases]:
        if real == base or real.is_relative_to(base) or base.is_relative_to(real):
            where = "is" if real == base else "is inside" if real.is_relative_to(base) else "holds"
            raise ConfigError(f"--out {out} {where} the base of the merge ({base}): writing there would destroy "
                              "it; choose a directory of its own, e.g. --out merged/NAME")  # fmt: skip
    run = run_of_adapter(adapter.resolve())
    for directory in (real, *real.parents):
        if directory == real and holds_run(directory) or _is_run(directory):
            raise ConfigError(f"--out {out} holds something other than a model: it is a run directory, or inside "
                              f"one ({directory}); choose a directory of its own, e.g. --out merged/NAME")  # fmt: skip
    if run is not None and run.path.is_relative_to(real) or adapter.resolve().is_relative_to(real):
        raise ConfigError(f"--out {out} holds the run the adapter comes from ({adapter}): choose a directory of its "
                          "own, e.g. --out merged/NAME")  # fmt: skip
    if target.exists() and not target.is_dir() or target.is_dir() and any(target.iterdir()):
        if not _holds_model(target):
            raise ConfigError(f"--out {out} exists and holds something other than a model: choose another directory")
        if not overwrite:
            raise ConfigError(f"--out {out} already holds a model: add --overwrite true to replace it, or choose "
                              "another directory")  # fmt: skip
    return target


def _is_run(path: Path) -> bool:
    """A run directory (its config.yaml beside checkpoints/ or adapter/), not any folder with a config.yaml."""
    return (path / RUN_CONFIG).is_file() and ((path / "checkpoints").is_dir() or (path / "adapter").is_dir())


def _holds_model(path: Path) -> bool:
    """A model as save_pretrained writes one: config.json and files, no folders (which --overwrite would remove)."""
    return path.is_dir() and (path / "config.json").is_file() and not any(p.is_dir() for p in path.iterdir())


def _check_finite_adapter(policy, adapter: Path) -> None:
    """A ConfigError when the adapter itself holds inf or NaN (a run that diverged before fit stopped at it)."""
    lora = {name: p for name, p in policy.named_parameters() if "lora_" in name}
    bad = [name for name, p in lora.items() if not p.isfinite().all()]
    if bad:
        raise ConfigError(f"the adapter {adapter} holds {len(bad)} of {len(lora)} tensors that are not finite (inf "
                          "or NaN: its run diverged); nothing was written. Train it again with a lower "
                          "--model.learning_rate")  # fmt: skip


def _check_finite(merged, dtype: str) -> None:
    """A ConfigError, before anything is written, when merged weights are inf or NaN: float16 overflows past 65504."""
    tensors = merged.state_dict()
    bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if not bad:
        return
    wider = "--dtype bfloat16 (float32's range) or --dtype float32" if dtype == "float16" else "--dtype float32"
    raise ConfigError(f"--dtype {dtype}: {len(bad)} of {len(tensors)} merged tensors overflow it (inf or NaN, first: "
                      f"{bad[0]}); nothing was written. Merge with {wider}")  # fmt: skip


def _remove_staging_debris(target: Path) -> None:
    """The staging directories of earlier merges into `target` that were killed: their process is gone."""
    pattern = rf"\.{re.escape(target.name)}\.(merging-(\d+)-[a-z0-9_]{{8}}|old-(\d+))"
    for entry in target.parent.iterdir() if target.parent.is_dir() else ():
        found = re.fullmatch(pattern, entry.name)
        if found and entry.is_dir() and not entry.is_symlink() and not _alive(int(found[2] or found[3])):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
