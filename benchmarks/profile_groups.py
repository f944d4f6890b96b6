"""One profiled training step's operators in groups that explain a step's time, the same for ours and TRL's.

`groups(profiler, lora_rank, vocab_size)` sums torch.profiler's self CPU time by what each operator does: the base's
matrix products (the dequantized 4-bit weights', forward and the input gradients of backward), LoRA's (an operand of
width `lora_rank`), the LM head's (an operand of a quarter of `vocab_size` or more: the head, or a chunk of its
vocabulary), the 4-bit dequantization, attention, the log-softmax, the optimizer, copies and casts, and the
elementwise rest. Products are told apart by their operands' shapes, so the profiler must record them
(`record_shapes=True`). Only torch is imported: TRL's python runs it too.
"""

from __future__ import annotations

import json

import torch

PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::dot", "aten::mv"}
ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "math_attention")
SOFTMAX = ("log_softmax", "logsumexp", "softmax", "nll_loss", "cross_entropy")
OPTIMIZER = ("adam", "_foreach", "clip_grad", "norm", "addcdiv", "lerp")
COPIES = {"copy_", "_to_copy", "to", "clone", "cat", "index", "index_select", "gather", "scatter", "scatter_add_",
          "contiguous", "masked_fill", "masked_fill_", "empty", "empty_strided", "empty_like", "zeros", "zeros_like",
          "fill_", "zero_", "stack", "repeat", "repeat_interleave", "index_put_", "_index_put_impl_", "index_add_",
          "masked_select", "nonzero", "where", "new_zeros", "new_empty", "ones", "ones_like", "tril_"}  # fmt: skip


def group_of(name: str, shapes: list, lora_rank: int, vocab_size: int) -> str:
    lowered = name.lower()
    if name in PRODUCTS:
        dims = {d for shape in shapes if isinstance(shape, list) for d in shape}
        if dims and max(dims) >= vocab_size // 4:  # the head whole, or a chunk of its vocabulary (TRL's)
            return "products: LM head"
        if lora_rank in dims:
            return "products: LoRA"
        return "products: base (dequantized 4-bit)"
    if "dequantize" in lowered or "bitsandbytes" in lowered or "4bit" in lowered:
        return "4-bit dequantization"
    if any(k in lowered for k in ATTENTION):
        return "attention"
    if any(k in lowered for k in SOFTMAX):
        return "log-softmax, loss"
    if any(k in lowered for k in OPTIMIZER):
        return "optimizer, clipping"
    if lowered.removeprefix("aten::") in COPIES:
        return "copies, casts, indexing"
    if lowered.startswith("aten::"):
        return "elementwise, reductions"
    return "other (autograd, checkpointing, Python-side ops)"


def groups(profiler: torch.profiler.profile, *, lora_rank: int, vocab_size: int) -> dict[str, float]:
    """Self CPU seconds per group, largest first, with the total."""
    totals: dict[str, float] = {}
    for event in profiler.key_averages(group_by_input_shape=True):
        group = group_of(event.key, event.input_shapes or [], lora_rank, vocab_size)
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total / 1e6
    ordered = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
    ordered["total"] = sum(totals.values())
    return ordered


def products(profiler: torch.profiler.profile, rows: int = 12) -> list[dict]:
    """The largest matrix products by operand shapes: name, shapes, calls, self CPU ms."""
    found = [
        {"op": e.key, "shapes": e.input_shapes, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 1)}
        for e in profiler.key_averages(group_by_input_shape=True)
        if e.key in PRODUCTS
    ]
    return sorted(found, key=lambda r: -r["self_ms"])[:rows]


def report(profiler: torch.profiler.profile, *, lora_rank: int, vocab_size: int, rows: int = 30) -> None:
    """The operators' table (by self CPU time), then `GROUPS {json}` and `PRODUCTS {json}` lines."""
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)
    print("GROUPS " + json.dumps(groups(profiler, lora_rank=lora_rank, vocab_size=vocab_size)), flush=True)
    print("PRODUCTS " + json.dumps(products(profiler)), flush=True)
