"""The TRL reference script with the time of TRL's reference pass (`precompute_ref_log_probs`) measured.

TRL's DPOTrainer computes the reference log-probs of the whole training set in its constructor, which the reference
script does not time. This runs the script unchanged, with `DPOTrainer._precompute_ref_logps` wrapped in a timer,
and prints one more line, `REFERENCE {json}`: the pairs it computed and the seconds it took. Same flags as the
script (pass --algo dpo --precompute-ref); `--trl-script` names it when it is not in ../shared/bench:

    python benchmarks/trl_reference_pass.py --algo dpo --precompute-ref --size smollm2 --steps 3 --warm 1 --bs 4 \\
        --prompt-len 64 --completion-len 192 --vary

`--fp32-adapters`: TRL 1.16's DPOTrainer stores the LoRA adapters of a quantized model in bf16 (its constructor
casts them, after the QLoRA paper), its ORPO trainer and ours keep them in fp32. On a CPU without native bf16
products (AVX2 only) its LoRA products ran 8 to 20 times slower a row than ours in fp32 (one step profiled);
this flag casts the adapters back to fp32 once the constructor is done (before the optimizer is made), so that
DPO's figures compare like with like.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

TRL_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "bench" / "trl_anchor.py"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location("trl_anchor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed_precompute(precompute):
    def wrapper(self, dataset, name, batch_size):
        started = time.perf_counter()
        out = precompute(self, dataset, name, batch_size)
        seconds = time.perf_counter() - started
        result = {"system": "trl", "split": name, "reference_pairs": len(dataset), "reference_s": seconds,
                  "reference_pairs_per_s": len(dataset) / seconds}  # fmt: skip
        print("REFERENCE " + json.dumps(result), flush=True)
        return out

    return wrapper


def fp32_adapters(init):
    """DPOTrainer.__init__, then its trainable parameters (the adapters) back in fp32; prints `ADAPTERS {json}`: how
    many it cast, from which dtypes."""

    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        cast: dict[str, int] = {}
        for param in self.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                cast[str(param.dtype)] = cast.get(str(param.dtype), 0) + 1
                param.data = param.data.float()
        print("ADAPTERS " + json.dumps({"cast_to_float32": cast}), flush=True)

    return wrapper


def script_and_flags(argv: list[str]) -> tuple[Path, list[str]]:
    """The reference script (`--trl-script PATH`, else TRL_SCRIPT) and the flags left for it."""
    if "--trl-script" not in argv:
        return TRL_SCRIPT, argv
    at = argv.index("--trl-script")
    return Path(argv[at + 1]), argv[:at] + argv[at + 2 :]


def main() -> None:
    script, argv = script_and_flags(sys.argv[1:])
    anchor = load_script(script)
    from trl import DPOTrainer

    DPOTrainer._precompute_ref_logps = timed_precompute(DPOTrainer._precompute_ref_logps)
    if "--fp32-adapters" in argv:
        argv.remove("--fp32-adapters")
        DPOTrainer.__init__ = fp32_adapters(DPOTrainer.__init__)
    sys.argv = [str(script), *argv]
    anchor.main()


if __name__ == "__main__":
    main()
