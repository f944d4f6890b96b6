"""Throughput and peak memory of our DPO / ORPO training on a synthetic QLoRA workload.

The workload is the one of the shared TRL reference script (`trl_anchor.py`): a word-level tokenizer (one
word = one token, so lengths are exact), a randomly initialised Llama of the chosen size, nf4 double-quant
base, LoRA r16 alpha 32 on all linear layers, lr 5e-6 cosine, beta 0.1, gradient clipping at 1.0 (TRL's
default), gradient checkpointing unless --no-gc, bf16-mixed on a GPU and fp32 on a CPU. It drives the real
`alignment.DPO` / `alignment.ORPO` through a Lightning `Trainer`, times the optimizer steps after --warm,
and prints one line per length: `RESULT {json}`.

    python benchmarks/bench.py --algo dpo --size tinyllama --steps 30 --warm 5 --bs 4 \\
        --prompt-len 128 --completion-len 384 --precompute-ref

With `--devices 2 --strategy fsdp_qlora` (or ddp) every process prints its own RESULT line: its peak RSS, and
tokens_per_s of all processes together (--bs pairs per process and step).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that wait for each other sleep instead of spinning: on cores shared with other processes, a spinning
# thread holds a core its partner needs, and every parallel region waits for a descheduled thread (a 2-thread tiny
# ORPO step went from 0.13 s to 7.9 s on 2 busy cores; 1 thread: 0.5 s). Read by libgomp when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's `alignment`, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))  # profile_groups, beside this file

import lightning as L  # noqa: E402
import profile_groups  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from alignment import DPO, ORPO, PreferenceDataModule  # noqa: E402
from alignment.methods.reference_cache import filled  # noqa: E402
from alignment.run import fsdp  # noqa: E402, F401  (registers --strategy fsdp_qlora)

SIZES = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    # a tiny body under a 128k vocabulary: on a CPU its peak memory is mostly logits
    "tiny-128k": dict(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2),
    # Llama-3-8B's widths and vocabulary, 4 layers: the logits are what grow with length
    "llama3-4l": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                      num_attention_heads=32, num_key_value_heads=8),
    # TinyLlama-1.1B's architecture
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4),
    # SmolLM2-135M's architecture (30 thin layers, tied embeddings): a real model's shape a CPU can train
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}  # fmt: skip
H100_BF16_PEAK = 798e12  # dense bf16 matmul FLOP/s measured on the H100 of the reference figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algo", choices=["dpo", "orpo"], default="dpo")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warm", type=int, default=5, help="steps before the timed ones")
    ap.add_argument("--bs", type=int, default=4, help="pairs per step (per process)")
    ap.add_argument("--devices", type=int, default=1, help="processes (CPU) or GPUs")
    ap.add_argument("--strategy", default="auto", help="Lightning strategy: auto, ddp, fsdp_qlora")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--completion-len", default="384", help="comma list: one run per length")
    ap.add_argument("--no-4bit", action="store_true", help="full-precision base")
    ap.add_argument("--no-gc", action="store_true", help="no gradient checkpointing")
    ap.add_argument(
        "--selective-gc",
        action="store_true",
        help="ours: selective gradient checkpointing (the products' and attention's outputs kept, the rest recomputed)",
    )
    ap.add_argument("--vary", action="store_true", help="each prompt and answer length uniform in [len/4, len], seeded")
    ap.add_argument("--precompute-ref", action="store_true", help="DPO: reference log-probs from the cache")
    # left out: the trainer's default (on, for DPO without per-token options and ORPO); given: passed to it
    ap.add_argument(
        "--padding-free",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ours: sequences packed into one row, no padding (default: the trainer's)",
    )
    ap.add_argument(
        "--shared-prompt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ours, with --padding-free: each pair's prompt packed once for both answers (default: the trainer's)",
    )
    ap.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="ours on a CPU: bf16-mixed precision (autocast: the products in bf16, adapters fp32), as on a GPU",
    )
    ap.add_argument("--plain-logps", action="store_true", help="full (2B, T, V) logits, not the lean path")
    ap.add_argument("--logits-chunk-size", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's table of the first timed step")
    ap.add_argument("--peak-flops", type=float, default=None, help=f"for MFU; default {H100_BF16_PEAK:g} on an H100")
    return ap.parse_args(argv)


# ---- the synthetic workload ----------------------------------------------------------------------------------


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word-level: "w<i>" is token i, so a text of k words is exactly k tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3} | {f"w{i}": i for i in range(4, vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def write_base(size: str, root: Path) -> Path:
    """A seeded random Llama of `size` and its tokenizer, saved in bf16 like a hub checkpoint."""
    spec = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(**spec, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root)
    make_tokenizer(spec["vocab_size"]).save_pretrained(root)
    return root


def make_pairs(
    n: int, vocab_size: int, prompt_len: int, completion_len: int, *, seed: int = 0, vary: bool = False
) -> list[dict[str, str]]:
    """n pairs of random words, drawn as the TRL reference script draws them (the same rows for the same
    arguments): a prompt of prompt_len words and two answers of completion_len; with `vary`, each prompt and
    answer has its own length, uniform in [len // 4, len]."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(4, vocab_size)}" for _ in range(k))

    def size(k: int) -> int:
        return rng.randint(max(1, k // 4), k) if vary else k

    # the draws go in the reference's order: prompt length, prompt words, chosen length, chosen words, ...
    rows = []
    for _ in range(n):
        prompt = words(size(prompt_len))
        chosen = " " + words(size(completion_len))
        rejected = " " + words(size(completion_len))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def mean_pair_tokens(rows: list[dict[str, str]]) -> float:
    """Mean real (unpadded) tokens of a pair: the prompt twice, the chosen and the rejected answer. The unit of
    tokens_per_s, as the reference script counts it (without --vary: 2 * (prompt_len + completion_len))."""
    return sum(2 * len(r["prompt"].split()) + len(r["chosen"].split()) + len(r["rejected"].split())
               for r in rows) / len(rows)  # fmt: skip


def write_pairs(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---- timing ------------------------------------------------------------------------------------------------


class StepTimer(L.Callback):
    """Wall time of the optimizer steps after `warm` (and the process's CPU time over them: on a shared machine it
    varies less than the wall time), and the accelerator's peak memory from the first step on."""

    def __init__(self, warm: int):
        self.warm, self.start, self.end, self.timed = warm, None, None, 0
        self.cpu_start, self.cpu_end = 0.0, 0.0
        self.fit_start, self.train_start, self.reference_pairs = None, None, 0

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # kernels are asynchronous: a step ends when the GPU is done
        return time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the base is loaded (configure_model), before any reference pass: the load's transients
        # are not counted, the training's are
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.fit_start = self._now()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the DPO reference pass ran in between (the module's on_fit_start): its time and the pairs it filled
        self.train_start = self._now()
        table = pl_module.reference.tables.get("train") if hasattr(pl_module, "reference") else None
        self.reference_pairs = int(filled(table).sum()) if table is not None else 0
        if self.warm == 0:
            self.start, self.cpu_start = self._now(), time.process_time()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.warm:
            self.start, self.cpu_start = self._now(), time.process_time()
        elif step > self.warm:
            self.end, self.timed, self.cpu_end = self._now(), step - self.warm, time.process_time()


class StepProfiler(L.Callback):
    """torch.profiler over the optimizer step after `warm`: its table (operators by self CPU time), then the
    operators' time in groups and the largest products (`profile_groups.py`, the same as `profile_trl.py` prints)."""

    def __init__(self, warm: int, vocab_size: int, rows: int = 30):
        self.warm, self.vocab_size, self.rows, self.profiler, self.done = warm, vocab_size, rows, None, False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step == self.warm and self.profiler is None and not self.done:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
            self.profiler.__enter__()
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.profiler is not None and trainer.global_step == self.warm + 1:
            self.profiler.__exit__(None, None, None)
            print(f"PROFILED_STEP_S {time.perf_counter() - self.started:.3f}", flush=True)
            profile_groups.report(self.profiler, lora_rank=16, vocab_size=self.vocab_size, rows=self.rows)
            self.profiler, self.done = None, True


# ---- one run -----------------------------------------------------------------------------------------------


def checkpointing(args: argparse.Namespace) -> bool | str:
    return False if args.no_gc else "selective" if args.selective_gc else True


def build_module(args: argparse.Namespace, base: Path, cache_dir: Path) -> L.LightningModule:
    common = dict(
        base=str(base), load_in_4bit=not args.no_4bit, lora_r=16, lora_alpha=32, lora_dropout=0.0,
        lora_target_modules="all-linear", gradient_checkpointing=checkpointing(args), learning_rate=5e-6,
        lr_scheduler="cosine", beta=0.1, lean_logps=not args.plain_logps, logits_chunk_size=args.logits_chunk_size,
    )  # fmt: skip
    # only given when asked: a version without the setting (or with other defaults) still runs the rest
    common.update({k: v for k, v in [("padding_free", args.padding_free), ("shared_prompt", args.shared_prompt)]
                   if v is not None})  # fmt: skip
    if args.algo == "orpo":
        return ORPO(**common)
    if "reference_cache" in inspect.signature(DPO.__init__).parameters:
        # each run fills its own cache (before the first step, so outside the timing), never reuses one
        return DPO(**common, reference_cache=args.precompute_ref, reference_cache_dir=str(cache_dir))
    if args.precompute_ref:
        raise SystemExit("--precompute-ref: this version of alignment.DPO has no reference cache")
    return DPO(**common)


def train_flops_per_token(module: L.LightningModule, args: argparse.Namespace) -> float:
    """Model FLOPs per trained token, the count of the reference figures: N = parameters in matmuls (every
    linear layer and the LM head, not the input embeddings), 2N for the forward, 2N for the backward to the
    activations (frozen base: no weight gradients; LoRA's own FLOPs, ~1%, not counted), 2N more for the
    recomputed forward with gradient checkpointing (not with selective checkpointing, which keeps the products'
    outputs), and 2N for a live reference forward (DPO without the cache). Attention's score/value products are
    not counted, and the LM head counts at every position even where the lean path skips it: the count says what
    the model needs, not what this code does."""
    model = module.policy.get_base_model()
    # the base's matrices: not LoRA's, not the norms' vectors
    frozen = sum(_stored_numel(p) for p in model.parameters() if not p.requires_grad and p.dim() == 2)
    n = frozen - model.get_input_embeddings().weight.numel()
    passes = (
        4 + (2 if checkpointing(args) is True else 0) + (2 if args.algo == "dpo" and not args.precompute_ref else 0)
    )
    return passes * n


def _stored_numel(param: torch.Tensor) -> int:
    # a 4-bit weight is stored packed, two values a byte: its logical size is in quant_state
    state = getattr(param, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else param.numel()


def run_one(args: argparse.Namespace, completion_len: int, work: Path) -> dict:
    vocab = SIZES[args.size]["vocab_size"]
    base = work / "base"
    if not base.exists():
        write_base(args.size, base)
    rows = make_pairs(args.bs * args.devices * (args.steps + 2), vocab, args.prompt_len, completion_len, vary=args.vary)
    pairs = write_pairs(work / f"pairs-{completion_len}.jsonl", rows)
    data = PreferenceDataModule(
        str(pairs), tokenizer=str(base), use_chat_template=False, val_fraction=0.0, batch_size=args.bs,
        max_length=args.prompt_len + completion_len + 8, max_prompt_length=None, pad_to_multiple_of=8,
    )  # fmt: skip
    module = build_module(args, base, work / f"reference-{completion_len}")
    cuda = torch.cuda.is_available()
    timer = StepTimer(args.warm)
    trainer = L.Trainer(
        accelerator="auto", devices=args.devices, strategy=args.strategy, use_distributed_sampler=False,
        precision="bf16-mixed" if cuda or args.cpu_bf16 else "32-true", max_steps=args.steps,
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1,
        callbacks=[timer] + ([StepProfiler(args.warm, vocab)] if args.profile else []), default_root_dir=str(work),
    )  # fmt: skip
    L.seed_everything(0, verbose=False)
    started = time.perf_counter()
    try:
        trainer.fit(module, data)
    except torch.OutOfMemoryError:
        return dict(system="ours", algo=args.algo, size=args.size, bs=args.bs, seq=args.prompt_len + completion_len,
                    oom=True)  # fmt: skip
    total_s = time.perf_counter() - started
    return summarize(args, completion_len, mean_pair_tokens(rows), module, trainer, timer, total_s)


def summarize(args, completion_len, pair_tokens: float, module, trainer, timer: StepTimer, total_s: float) -> dict:
    seq = args.prompt_len + completion_len
    seconds = timer.end - timer.start
    # real chosen + rejected tokens (prompt included), as the reference, of every process
    tokens = timer.timed * args.bs * trainer.world_size * pair_tokens
    tokens_per_s = tokens / seconds
    cuda = torch.cuda.is_available()
    reference_s = timer.train_start - timer.fit_start
    peak_flops = args.peak_flops or (H100_BF16_PEAK if cuda and "H100" in torch.cuda.get_device_name() else None)
    flops = train_flops_per_token(module, args)
    return dict(
        system="ours", algo=args.algo, size=args.size, four_bit=not args.no_4bit, bs=args.bs, seq=seq, vary=args.vary,
        strategy=args.strategy, rank=trainer.global_rank, world_size=trainer.world_size,
        gradient_checkpointing=checkpointing(args), precompute_ref=args.precompute_ref, lean_logps=not args.plain_logps,
        precision=str(trainer.precision), padding_free=bool(module.hparams.get("padding_free")),
        shared_prompt=bool(module.hparams.get("shared_prompt")), timed_steps=timer.timed, step_s=seconds / timer.timed,
        step_cpu_s=(timer.cpu_end - timer.cpu_start) / timer.timed,
        tokens_per_s=tokens_per_s, total_s=total_s,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        flops_per_token=flops, mfu=tokens_per_s * flops / peak_flops if peak_flops else None,
        reference_pairs=timer.reference_pairs, reference_s=reference_s if timer.reference_pairs else None,
        reference_pairs_per_s=timer.reference_pairs / reference_s if timer.reference_pairs else None,
        last_loss=float(trainer.callback_metrics["loss"]) if "loss" in trainer.callback_metrics else None,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.steps <= args.warm:
        raise SystemExit(f"--steps {args.steps} must exceed --warm {args.warm}")
    with tempfile.TemporaryDirectory(prefix="alignment-bench-") as work:
        for completion_len in [int(x) for x in args.completion_len.split(",")]:
            print("RESULT " + json.dumps(run_one(args, completion_len, Path(work))), flush=True)


if __name__ == "__main__":
    main()
