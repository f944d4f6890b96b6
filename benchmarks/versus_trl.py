"""Our trainer and TRL's on the same workload, run alternately, one process each; prints median ratios.

Throughput: N rounds, each runs `bench.py` (ours) and the TRL reference script with the same flags, the
order swapped every round so that drift in a shared machine's load falls on both alike:

    python benchmarks/versus_trl.py --trl-python /tmp/trlvenv/bin/python --rounds 5 \\
        -- --algo dpo --size tiny --steps 12 --warm 3 --bs 4 --prompt-len 128 --completion-len 384

Memory against length (`--seq-lens`): one process per system and length, 2 steps, peak accelerator memory
(peak resident memory on a CPU), printed as a markdown table:

    python benchmarks/versus_trl.py --trl-python /tmp/trlvenv/bin/python --seq-lens 512,1024,2048,4096 \\
        -- --algo orpo --size tiny-128k --bs 1 --prompt-len 128

Flags after `--` go to both scripts (they share --algo --size --steps --warm --bs --prompt-len
--completion-len --no-4bit --no-gc --precompute-ref); `--ours "..."` adds flags for ours only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL_SCRIPT = HERE.parents[1] / "shared" / "bench" / "trl_anchor.py"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    common = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trl-python", default=None, help="the python that has trl installed; none: ours only")
    ap.add_argument("--trl-script", default=str(TRL_SCRIPT))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq-lens", default=None, help="comma list of tokens per sequence: the memory table")
    ap.add_argument("--ours", default="", help="extra flags for bench.py only, one quoted string")
    ap.add_argument("--against-ours", default=None, help="compare with bench.py under these flags: --against-ours=...")
    return ap.parse_args(own), common


def run(system: str, args: argparse.Namespace, flags: list[str]) -> dict:
    """One process; its RESULT line, parsed (the last one when it printed several)."""
    if system == "ours":
        command = [sys.executable, str(HERE / "bench.py"), *flags, *shlex.split(args.ours)]
    elif args.against_ours is not None:  # a lever measured against ourselves
        command = [sys.executable, str(HERE / "bench.py"), *flags, *shlex.split(args.against_ours)]
    else:
        command = [args.trl_python, args.trl_script, *flags]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    results = [line[len("RESULT ") :] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        raise SystemExit(f"{system} failed ({done.returncode}): {shlex.join(command)}\n{done.stderr[-3000:]}")
    return json.loads(results[-1])


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
            print(f"round {round_} {system}: {result['tokens_per_s']:,.0f} tokens/s, {result['step_s']:.4f} s/step, "
                  f"memory {memory_of(result):.3f} GiB", flush=True)  # fmt: skip
    summary = {f"{s}_tokens_per_s": statistics.median(r["tokens_per_s"] for r in results[s]) for s in systems}
    if len(systems) == 2:
        pairs = list(zip(results["ours"], results[systems[1]], strict=True))
        speed = [ours["tokens_per_s"] / other["tokens_per_s"] for ours, other in pairs]
        memory = [memory_of(ours) / memory_of(other) for ours, other in pairs]
        other = "TRL" if args.against_ours is None else f"ours {args.against_ours}"
        print(f"tokens/s ours/{other}: " + spread(speed))
        print(f"peak memory ours/{other}: " + spread(memory))
        summary |= {"speed_ratio": statistics.median(speed), "speed_ratio_min": min(speed),
                    "speed_ratio_max": max(speed), "memory_ratio": statistics.median(memory)}  # fmt: skip
    return summary


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
    summary = memory_table(args, flags) if args.seq_lens else throughput(args, flags)
    print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
