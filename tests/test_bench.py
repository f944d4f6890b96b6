"""benchmarks/bench.py runs the reference workload on the tiny size and prints a parseable RESULT line."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_bench_prints_a_result_with_throughput_memory_and_flops():
    command = [sys.executable, str(BENCH), "--algo", "dpo", "--size", "tiny", "--steps", "3", "--warm", "1",
               "--bs", "2", "--prompt-len", "8", "--completion-len", "16", "--precompute-ref"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["system"] == "ours" and result["algo"] == "dpo" and result["seq"] == 24
    assert result["timed_steps"] == 2
    assert result["tokens_per_s"] > 0 and result["step_s"] > 0 and result["peak_rss_gib"] > 0
    assert result["peak_mem_gib"] is None and result["mfu"] is None  # a CPU, and no --peak-flops
    # tiny: 2 layers x (q 64x64 + k, v 64x32 + o 64x64 + 3 MLP 64x128) + head 1024x64 = 139,264 matmul weights;
    # 6 of them per token: forward, backward, recomputed forward (no reference forward: it is cached)
    assert result["flops_per_token"] == 6 * 139_264
    assert result["last_loss"] is not None and abs(result["last_loss"] - 0.6931) < 0.01  # ln 2 near the start
