"""How far a merged model's logits are from the model trained: the run's 4-bit base with its adapter on top.

Merges RUN (`cli.py merge`) in each of `--dtypes` (float32 and bfloat16 unless named), then runs the nf4 base with
the adapter and each merged model over the first N bundled docstring prompts, chat-formatted, and prints per merge
the largest absolute difference of the logits over every position, and the share of positions whose top-1 token is
the same. A half-precision merge is run twice: computed in float32 (the rounding of its stored weights alone) and
in its own dtype (what loading it as it is computes). A few minutes for SmolLM2-135M on a busy 2-core CPU:

    python cli.py fit --config dpo_smollm2.yaml --trainer.default_root_dir runs/dpo-smollm2 --trainer.max_steps 16 \
        --data.limit 80 --data.val_fraction 0.2 --data.batch_size 4 --data.max_length 96 --model.learning_rate 5e-4
    python scripts/merge_precision.py runs/dpo-smollm2 [--prompts 8] [--dtypes float32 bfloat16 float16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignment.commands.merge import merge_adapter  # noqa: E402
from alignment.model import load_base, load_tokenizer  # noqa: E402

PROMPTS = ROOT / "alignment" / "assets" / "docstring_prompts.jsonl"


def logits(model, batches: list[torch.Tensor]) -> torch.Tensor:
    """The logits at every position of every prompt, in float32: (positions, V)."""
    with torch.no_grad():
        return torch.cat([model.eval()(ids).logits[0].float() for ids in batches])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"]
    )
    args = parser.parse_args()
    base = yaml.safe_load((args.run / "config.yaml").read_text())["model"]["init_args"]["base"]
    tokenizer = load_tokenizer(base)
    questions = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()[: args.prompts]]
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions
    ]
    batches = [torch.tensor([chat["input_ids"]]) for chat in chats]  # one prompt a batch: no padding
    trained = logits(PeftModel.from_pretrained(load_base(base, load_in_4bit=True), args.run / "adapter"), batches)
    positions = trained.shape[0]
    largest = trained.abs().max().item()
    print(f"{base}, {args.run}: {len(questions)} prompts, {positions} positions, |logits| up to {largest:.3g}")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(d, c) for d in args.dtypes for c in dict.fromkeys((torch.float32, getattr(torch, d)))]
        for dtype, compute in runs:
            out = Path(tmp) / dtype
            if not out.exists():
                merge_adapter(args.run, out, dtype=dtype)
            merged = logits(AutoModelForCausalLM.from_pretrained(out, dtype=compute), batches)
            diff = (merged - trained).abs().max().item()
            agree = (merged.argmax(-1) == trained.argmax(-1)).float().mean().item()
            print(f"merged {dtype}, computed in {str(compute).removeprefix('torch.')}: max |logit diff| {diff:.3g}, "
                  f"top-1 agreement {agree:.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
