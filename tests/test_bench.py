"""benchmarks/bench.py runs the reference workload on the tiny size and prints a parseable RESULT line."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.mark.slow
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
    assert result["tokens_per_s"] * result["step_s"] == pytest.approx(2 * 2 * 24)  # bs x (chosen + rejected) x 24
    assert result["tokens_per_s"] > 0 and result["step_s"] > 0 and result["peak_rss_gib"] > 0
    assert result["peak_mem_gib"] is None and result["mfu"] is None  # a CPU, and no --peak-flops
    # tiny: 2 layers x (q 64x64 + k, v 64x32 + o 64x64 + 3 MLP 64x128) + head 1024x64 = 139,264 matmul weights;
    # 6 of them per token: forward, backward, recomputed forward (no reference forward: it is cached)
    assert result["flops_per_token"] == 6 * 139_264
    assert result["last_loss"] is not None and abs(result["last_loss"] - 0.6931) < 0.01  # ln 2 near the start


# ---- the workload is the TRL reference script's: the same pairs, the same count of tokens ---------------------

sys.path.insert(0, str(BENCH.parent))
import bench  # noqa: E402

# where versus_trl.py finds the reference script: beside the checkout, in ../shared/bench
ANCHOR = Path(bench.__file__).resolve().parents[2] / "shared" / "bench" / "trl_anchor.py"


def test_varied_lengths_are_uniform_between_a_quarter_and_the_whole_and_seeded():
    rows = bench.make_pairs(200, 1024, 64, 192, vary=True)
    prompts = [len(r["prompt"].split()) for r in rows]
    answers = [len(r[k].split()) for r in rows for k in ("chosen", "rejected")]
    assert min(prompts) == 16 and max(prompts) == 64 and min(answers) == 48 and max(answers) == 192
    assert len(set(answers)) > 100  # every answer draws its own length
    assert rows == bench.make_pairs(200, 1024, 64, 192, vary=True)
    fixed = bench.make_pairs(3, 1024, 8, 16)
    assert bench.mean_pair_tokens(fixed) == 2 * (8 + 16)


def test_mean_pair_tokens_of_the_reference_rows():
    # the figure the reference script gives for these arguments (trl_anchor.mean_pair_tokens(make_pairs(...)))
    rows = bench.make_pairs(12, 49152, 64, 192, vary=True)
    assert bench.mean_pair_tokens(rows) == pytest.approx(4135 / 12)


@pytest.mark.skipif(not ANCHOR.exists(), reason="the TRL reference script is not beside this checkout")
@pytest.mark.parametrize("vary", [False, True])
def test_pairs_and_token_count_equal_the_reference_scripts(vary):
    spec = importlib.util.spec_from_file_location("trl_anchor", ANCHOR)
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)
    theirs = anchor.make_pairs(40, 49152, 64, 192, vary=vary)
    ours = bench.make_pairs(40, 49152, 64, 192, vary=vary)
    assert ours == theirs.to_list()
    assert bench.mean_pair_tokens(ours) == anchor.mean_pair_tokens(theirs)
    assert bench.SIZES["smollm2"] == anchor.SIZES["smollm2"]


@pytest.mark.slow
def test_varied_packed_run_counts_the_real_tokens_of_its_pairs():
    command = [sys.executable, str(BENCH), "--algo", "orpo", "--size", "tiny", "--steps", "2", "--warm", "1",
               "--bs", "2", "--prompt-len", "8", "--completion-len", "16", "--vary", "--padding-free",
               "--shared-prompt"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["vary"] is True and result["padding_free"] is True and result["shared_prompt"] is True
    # counted as the reference script counts, the prompt twice a pair, though packed once
    rows = bench.make_pairs(2 * (2 + 2), 1024, 8, 16, vary=True)  # the rows the run trained on
    assert bench.mean_pair_tokens(rows) < 2 * (8 + 16)  # varied: fewer than the fixed lengths give
    assert result["tokens_per_s"] * result["step_s"] == pytest.approx(2 * bench.mean_pair_tokens(rows))


REFERENCE_PASS = BENCH.parent / "trl_reference_pass.py"


@pytest.mark.slow
@pytest.mark.skipif(not ANCHOR.exists(), reason="the TRL reference script is not beside this checkout")
def test_trl_dpo_keeps_qlora_adapters_in_bf16_and_fp32_adapters_casts_them_back():
    pytest.importorskip("trl")
    command = [sys.executable, str(REFERENCE_PASS), "--fp32-adapters", "--algo", "dpo", "--precompute-ref",
               "--size", "tiny", "--steps", "2", "--warm", "1", "--bs", "2", "--prompt-len", "8",
               "--completion-len", "16"]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    adapters = [json.loads(line[len("ADAPTERS ") :]) for line in lines if line.startswith("ADAPTERS ")]
    # tiny: 2 layers x 7 linear layers x (A, B), all made bf16 by TRL's constructor, all cast back
    assert adapters == [{"cast_to_float32": {"torch.bfloat16": 28}}]
    assert any(line.startswith("RESULT ") for line in lines) and any(line.startswith("REFERENCE ") for line in lines)


def test_table_compares_with_trl_right_for_right_and_shows_trl_as_shipped(monkeypatch):
    """Every TRL run of the table has bitsandbytes' CPU packing off, except the rows labelled as shipped; DPO's
    right-for-right rows cast TRL's adapters to fp32."""
    import versus_trl

    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        result = {"tokens_per_s": 10.0, "step_s": 1.0, "peak_rss_gib": 1.0}
        return subprocess.CompletedProcess(command, 0, stdout="RESULT " + json.dumps(result) + "\n", stderr="")

    monkeypatch.setattr(versus_trl.subprocess, "run", fake_run)
    summaries = versus_trl.table(versus_trl.parse_args(["--trl-python", "python", "--rounds", "1", "--table"])[0])
    trl = [c for c in commands if c[0] == "python"]
    assert len(trl) == len(summaries) == sum(len(v[2]) for v in versus_trl.WORKLOADS.values())
    shipped = [c for c in trl if "--no-cpu-packing" not in c]
    assert shipped and all("--algo" in c and c[c.index("--algo") + 1] == "dpo" for c in shipped)
    assert all("--fp32-adapters" not in c for c in shipped)
    right_dpo = [c for c in trl if "--no-cpu-packing" in c and c[c.index("--algo") + 1] == "dpo"]
    assert right_dpo and all("--fp32-adapters" in c for c in right_dpo)
    assert len(shipped) + len([c for c in trl if "--no-cpu-packing" in c]) == len(trl)
