"""torch.profiler over one training step of TRL's trainer on the reference workload, grouped as ours.

Runs the TRL reference script (`../shared/bench/trl_anchor.py` from the repository root) unchanged, its step timer
replaced by one that also profiles the optimizer step after --warm, and prints, as `bench.py --profile` does for
ours, the operators' table by self CPU time, `GROUPS {json}` (self CPU seconds by what the operators do:
`profile_groups.py`) and `PRODUCTS {json}` (the largest matrix products by shape). Same flags as the script; right
for right with ours on a CPU: `--fp32-adapters --no-cpu-packing`, one thread:

    OMP_NUM_THREADS=1 python benchmarks/profile_trl.py --algo dpo --precompute-ref --fp32-adapters --no-cpu-packing \\
        --size smollm2 --bs 4 --prompt-len 64 --completion-len 192 --vary --steps 2 --warm 1

`--no-profile`: no profiler, the step's CPU time alone (`STEP_CPU_S`). `--trl-script` names the reference script
when it is not in ../shared/bench.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench.py, for both systems alike

import profile_groups  # noqa: E402
from trl_reference_pass import load_script, script_and_flags  # noqa: E402


def profiling_timer(timer_class, vocab_size: int, profile: bool = True):
    """The reference script's Timer, profiling the step after its `warm` steps (unless not `profile`), and printing
    `STEP_CPU_S`: the process's CPU seconds a step over the steps after `warm` (as bench.py's `step_cpu_s`: on a
    shared machine it varies less than the wall time)."""

    class ProfilingTimer(timer_class):
        profiler = None
        cpu_start = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == self.warm and self.cpu_start is None:
                self.cpu_start = time.process_time()
            if state.global_step == self.warm and self.profiler is None and profile:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       record_shapes=True)  # fmt: skip
                self.profiler.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            if state.global_step > self.warm and state.global_step == args.max_steps:
                steps = state.global_step - self.warm
                print(f"STEP_CPU_S {(time.process_time() - self.cpu_start) / steps:.3f}", flush=True)
            if self.profiler is not None and state.global_step == self.warm + 1:
                self.profiler.__exit__(None, None, None)
                print(f"PROFILED_STEP_S {time.perf_counter() - self.started:.3f}", flush=True)
                profile_groups.report(self.profiler, lora_rank=16, vocab_size=vocab_size)

    return ProfilingTimer


def main() -> None:
    script, argv = script_and_flags(sys.argv[1:])
    anchor = load_script(script)
    size = argv[argv.index("--size") + 1] if "--size" in argv else "tiny"
    profile = "--no-profile" not in argv
    argv = [flag for flag in argv if flag != "--no-profile"]
    anchor.Timer = profiling_timer(anchor.Timer, anchor.SIZES[size]["vocab_size"], profile)
    sys.argv = [str(script), *argv]
    anchor.main()


if __name__ == "__main__":
    main()
