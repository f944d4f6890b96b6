"""Our trainer and TRL's on the same workload, run alternately, one process each; prints median ratios.

Throughput: N rounds, each runs `bench.py` (ours) and the TRL reference script with the same flags, the
order swapped every round so that drift in a shared machine's load falls on both alike:

    python benchmarks/versus_trl.py --trl-python /tmp/trlvenv/bin/python --rounds 5 \\
        -- --algo dpo --size tiny --steps 12 --warm 3 --bs 4 --prompt-len 128 --completion-len 384

Memory against length (`--seq-lens`): one process per system and length, 2 steps, peak accelerator memory
(peak resident memory on a CPU), printed as a markdown table:

    python benchmarks/versus_trl.py --trl-python /tmp/trlvenv/bin/python --seq-lens 512,1024,2048,4096 \\
        -- --algo orpo --size tiny-128k --bs 1 --prompt-len 128

docs/performance.md's table, every workload in WORKLOADS (ours packed: padding-free, shared prompts; two rows also with
selective checkpointing), against TRL right for right (its DPO adapters kept in fp32, bitsandbytes' CPU packing off)
and, for DPO, TRL as shipped too, N alternated rounds each, one command:

    python benchmarks/versus_trl.py --trl-python python --rounds 3 --table

Flags after `--` go to both scripts (they share --algo --size --steps --warm --bs --prompt-len
--completion-len --vary --no-4bit --no-gc --precompute-ref); `--ours="..."` adds flags for ours only
(with `=`, as its value starts with `--`). `--trl-fp32-adapters` (DPO): TRL's DPO trainer with its LoRA adapters
cast back to fp32, as ours and TRL's ORPO keep them (see trl_reference_pass.py: in bf16 they are slow on a CPU
without native bf16). `--trl-no-cpu-packing`: TRL's 4-bit weights are never repacked for bitsandbytes' CPU
inference kernel, which on AVX512-BF16 CPUs gives wrong LoRA gradients after TRL's no-grad reference pass
(tests/test_cpu_packing.py); ours never packs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL_SCRIPT = HERE.parents[1] / "shared" / "bench" / "trl_anchor.py"
TRL_REFERENCE_PASS = HERE / "trl_reference_pass.py"  # the script above, with TRL's reference pass timed

# docs/performance.md's table (--table): name -> (flags for both, flags for ours only, TRL's variants); a variant is
# (label, TRL's DPO adapters cast to fp32, bitsandbytes' CPU packing left on). Right for right is TRL with fp32
# adapters and the packing off: on AVX512-BF16 CPUs the packed kernel trains on wrong LoRA gradients
# (tests/test_cpu_packing.py), so TRL as shipped is a row of its own, never the ratio we claim.
SMOLLM2 = ["--size", "smollm2", "--bs", "4", "--prompt-len", "64", "--completion-len", "192", "--vary",
           "--steps", "4", "--warm", "1"]  # fmt: skip
TINY = ["--size", "tiny", "--bs", "4", "--prompt-len", "32", "--completion-len", "96", "--steps", "12", "--warm", "3"]
PACKED = ["--padding-free", "--shared-prompt"]  # ours: no padding, each pair's prompt once
SELECTIVE = [*PACKED, "--selective-gc"]  # and checkpointed layers keep their products' outputs
RIGHT = ("TRL right for right (fp32 adapters, no CPU packing)", True, False)
SHIPPED = ("TRL as shipped (bf16 adapters, CPU packing)", False, True)
WORKLOADS = {
    "DPO, reference precomputed, smollm2, 64+192 varied": (
        ["--algo", "dpo", "--precompute-ref", *SMOLLM2], PACKED, [RIGHT, SHIPPED]),
    "ORPO, smollm2, 64+192 varied": (["--algo", "orpo", *SMOLLM2], PACKED, [RIGHT]),
    "DPO, reference precomputed, smollm2, 64+192 varied, selective checkpointing": (
        ["--algo", "dpo", "--precompute-ref", *SMOLLM2], SELECTIVE, [RIGHT]),
    "ORPO, smollm2, 64+192 varied, selective checkpointing": (["--algo", "orpo", *SMOLLM2], SELECTIVE, [RIGHT]),
    "DPO, reference precomputed, tiny, 32+96": (
        ["--algo", "dpo", "--precompute-ref", *TINY], PACKED, [RIGHT, SHIPPED]),
    "ORPO, tiny, 32+96": (["--algo", "orpo", *TINY], PACKED, [RIGHT]),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    common = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trl-python", default=None, help="the python that has trl installed; none: ours only")
    ap.add_argument("--trl-script", default=str(TRL_SCRIPT))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--table", action="store_true", help="every workload: docs/performance.md's table")
    ap.add_argument("--seq-lens", default=None, help="comma list of tokens per sequence: the memory table")
    ap.add_argument("--ours", default="", help="extra flags for bench.py only, one quoted string")
    ap.add_argument("--against-ours", default=None, help="compare with bench.py under these flags: --against-ours=...")
    ap.add_argument("--trl-fp32-adapters", action="store_true", help="DPO: TRL's adapters cast back to fp32")
    ap.add_argument("--trl-no-cpu-packing", action="store_true",
                    help="TRL's 4-bit weights never repacked for bitsandbytes' CPU inference kernel (AVX512-BF16 "
                         "CPUs), which gives wrong LoRA gradients once a no-grad forward has packed them")  # fmt: skip
    return ap.parse_args(own), common


def run(system: str, args: argparse.Namespace, flags: list[str]) -> dict:
    """One process; its RESULT line, parsed (the last one when it printed several), with the REFERENCE line's
    figures of TRL's reference pass when it printed one."""
    if system == "ours":
        command = [sys.executable, str(HERE / "bench.py"), *flags, *shlex.split(args.ours)]
    elif args.against_ours is not None:  # a lever measured against ourselves
        command = [sys.executable, str(HERE / "bench.py"), *flags, *shlex.split(args.against_ours)]
    elif "--precompute-ref" in flags or args.trl_fp32_adapters:  # the same script, wrapped: see trl_reference_pass
        fp32 = ["--fp32-adapters"] if args.trl_fp32_adapters else []
        command = [args.trl_python, str(TRL_REFERENCE_PASS), "--trl-script", args.trl_script, *fp32, *flags,
                   *trl_only(args)]  # fmt: skip
    else:
        command = [args.trl_python, args.trl_script, *flags, *trl_only(args)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # both systems alike: see bench.py
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = done.stdout.splitlines()
    results = [line[len("RESULT ") :] for line in lines if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        raise SystemExit(f"{system} failed ({done.returncode}): {shlex.join(command)}\n{done.stderr[-3000:]}")
    result = json.loads(results[-1])
    for line in lines:
        if line.startswith("REFERENCE "):
            result |= {k: v for k, v in json.loads(line[len("REFERENCE ") :]).items() if k.startswith("reference")}
    return result


def trl_only(args: argparse.Namespace) -> list[str]:
    return ["--no-cpu-packing"] if args.trl_no_cpu_packing else []


def _systems(args: argparse.Namespace) -> list[str]:
    if args.against_ours is not None:
        return ["ours", "other"]
    return ["ours", "trl"] if args.trl_python else ["ours"]


def memory_of(result: dict) -> float | None:
    if result.get("oom"):
        return None
    return result["peak_mem_gib"] if result.get("peak_mem_gib") is not None else result["peak_rss_gib"]


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}, n {len(values)})"


def throughput(args: argparse.Namespace, flags: list[str]) -> dict:
    systems = _systems(args)
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for round_ in range(args.rounds):
        for system in systems if round_ % 2 == 0 else systems[::-1]:
            result = run(system, args, flags)
            results[system].append(result)
            reference = result.get("reference_pairs_per_s")
            print(f"round {round_} {system}: {result['tokens_per_s']:,.1f} tokens/s, {result['step_s']:.4f} s/step, "
                  f"memory {memory_of(result):.3f} GiB"
                  + (f", reference pass {reference:.3f} pairs/s" if reference else ""), flush=True)  # fmt: skip
    summary = {f"{s}_tokens_per_s": statistics.median(r["tokens_per_s"] for r in results[s]) for s in systems}
    if len(systems) == 2:
        pairs = list(zip(results["ours"], results[systems[1]], strict=True))
        speed = [ours["tokens_per_s"] / other["tokens_per_s"] for ours, other in pairs]
        memory = [memory_of(ours) / memory_of(other) for ours, other in pairs]
        other = "TRL" if args.against_ours is None else f"ours {args.against_ours}"
        print(f"tokens/s ours/{other}: " + spread(speed))
        print(f"peak memory ours/{other}: " + spread(memory))
        summary |= {"speed_ratio": statistics.median(speed), "speed_ratio_min": min(speed),
                    "speed_ratio_max": max(speed), "memory_ratio": statistics.median(memory),
                    "memory_ratio_min": min(memory), "memory_ratio_max": max(memory)}  # fmt: skip
        reference = [o["reference_pairs_per_s"] / t["reference_pairs_per_s"] for o, t in pairs
                     if o.get("reference_pairs_per_s") and t.get("reference_pairs_per_s")]  # fmt: skip
        if reference:
            print(f"reference pass pairs/s ours/{other}: " + spread(reference))
            summary |= {"reference_ratio": statistics.median(reference), "reference_ratio_min": min(reference),
                        "reference_ratio_max": max(reference)}  # fmt: skip
    return summary


def machine() -> str:
    """The CPU model, its widest vector instructions (AVX2 or AVX-512, and native bf16: two CPUs sold under one
    name can differ in both, and the ratios with them), its count of logical cores, and the GPU when there is one."""
    model, vectors = "unknown CPU", ""
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        model = names[0] if names else model
        flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
        widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        bf16 = {"avx512_bf16", "amx_bf16"} & flags
        vectors = f", {widest}, " + (f"bf16 ({', '.join(sorted(bf16))})" if bf16 else "no native bf16")
    described = f"{model}{vectors}, {os.cpu_count()} cores"
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
                         ) if shutil.which("nvidia-smi") else None  # fmt: skip
    return described + (f", {gpu.stdout.strip()}" if gpu and gpu.returncode == 0 and gpu.stdout.strip() else "")


def table(args: argparse.Namespace) -> dict:
    """Every workload of WORKLOADS, `args.rounds` alternated rounds each; one markdown table of the medians."""
    rows, summaries = [], {}
    own_flags, trl_fp32, trl_packing = args.ours, args.trl_fp32_adapters, args.trl_no_cpu_packing
    for name, (flags, ours_only, variants) in WORKLOADS.items():
        for label, fp32_adapters, cpu_packing in variants:
            print(f"== {name}; {label}", flush=True)
            args.ours = shlex.join([*ours_only, *shlex.split(own_flags)])
            args.trl_fp32_adapters = trl_fp32 or (fp32_adapters and "dpo" in flags)
            args.trl_no_cpu_packing = not cpu_packing
            s = summaries[f"{name}; {label}"] = throughput(args, flags)
            rows.append(
                f"| {name} | {label} | {s['ours_tokens_per_s']:,.1f} | {s['trl_tokens_per_s']:,.1f} | "
                f"{s['speed_ratio']:.2f} ({s['speed_ratio_min']:.2f}, {s['speed_ratio_max']:.2f}) | "
                f"{s['memory_ratio']:.2f} ({s['memory_ratio_min']:.2f}, {s['memory_ratio_max']:.2f}) |"
            )
            if "reference_ratio" in s:
                rows.append(
                    f"| {name}: the reference pass, pairs/s | {label} | | | {s['reference_ratio']:.2f} "
                    f"({s['reference_ratio_min']:.2f}, {s['reference_ratio_max']:.2f}) | |"
                )
    args.ours, args.trl_fp32_adapters, args.trl_no_cpu_packing = own_flags, trl_fp32, trl_packing
    threads = {name: os.environ.get(name, default) for name, default in
               (("OMP_NUM_THREADS", "unset"), ("OMP_WAIT_POLICY", "PASSIVE"))}  # fmt: skip
    print(
        f"\n{args.rounds} alternated rounds, median (min, max) of ours / TRL; {machine()}, "
        + ", ".join(f"{k}={v}" for k, v in threads.items())
        + "\n"
    )
    print("| workload | TRL | ours tokens/s | TRL tokens/s | tokens/s ours / TRL | peak memory ours / TRL |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return summaries


def memory_table(args: argparse.Namespace, flags: list[str]) -> dict:
    prompt_len = int(_flag(flags, "--prompt-len", "128"))
    flags = _drop_values(flags, ("--steps", "--warm", "--completion-len")) + ["--steps", "2", "--warm", "1"]
    systems = _systems(args)
    lengths = [int(x) for x in args.seq_lens.split(",")]
    table: dict[str, list[float | None]] = {s: [] for s in systems}
    on_gpu = False
    for length in lengths:
        for system in systems:
            result = run(system, args, flags + ["--completion-len", str(length - prompt_len)])
            table[system].append(memory_of(result))
            on_gpu = result.get("peak_mem_gib") is not None
    unit = "GiB, peak accelerator memory" if on_gpu else "GiB, peak resident memory of the process (CPU)"
    print(f"\n| tokens per sequence | {' | '.join(map(str, lengths))} |")
    print(f"| --- |{' --- |' * len(lengths)}")
    for system, values in table.items():
        cells = " | ".join("OOM" if v is None else f"{v:.2f}" for v in values)
        print(f"| {system} {_flag(flags, '--algo', 'dpo')} | {cells} |")
    print(f"\n{unit}")
    return {"seq_lens": lengths, **table}


def _flag(flags: list[str], name: str, default: str) -> str:
    return flags[flags.index(name) + 1] if name in flags else default


def _drop_values(flags: list[str], names: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in names:
            skip = True
        else:
            out.append(flag)
    return out


def main(argv: list[str] | None = None) -> None:
    args, flags = parse_args(argv)
    if args.table and not args.trl_python:
        raise SystemExit("--table compares with TRL: name its python with --trl-python")
    if args.table:
        summary = table(args)
    elif args.seq_lens:
        summary = memory_table(args, flags)
    else:
        summary = throughput(args, flags)
        summary["machine"] = machine()
        print(f"machine: {summary['machine']}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
