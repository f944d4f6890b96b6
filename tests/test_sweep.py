"""`sweep`: grid parsing, run names, settings checked before training, and (slow) a resumable two-run sweep."""

import csv
import json
import re

import pytest

from alignment.commands.sweep import (
    MARKER,
    Axis,
    SweepRun,
    check_run_dirs,
    check_settings,
    combinations,
    parse_grid,
    run_name,
)
from alignment.errors import ConfigError
from alignment.usage import main


def test_grid_values_and_combinations():
    axes = parse_grid(["model.beta=0.05,0.1", "--trainer.max_epochs=1", "model.lora_target_modules=[q_proj,v_proj]"])
    assert axes == [Axis("model.beta", ["0.05", "0.1"]), Axis("trainer.max_epochs", ["1"]),
                    Axis("model.lora_target_modules", ["[q_proj,v_proj]"])]  # fmt: skip
    assert [c["model.beta"] for c in combinations(axes)] == ["0.05", "0.1"]
    assert len(combinations(parse_grid(["a.x=1,2,3", "b.y=4,5"]))) == 6


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("model.beta", "expected KEY=V1,V2"),
        ("model.beta=", "expected KEY=V1,V2"),
        ("model.beta=0.1,,0.2", "expected KEY=V1,V2"),
        ("=0.1", "expected KEY=V1,V2"),
        ("trainer.default_root_dir=a,b", "sets trainer.default_root_dir itself"),
    ],
)
def test_bad_grid_syntax_is_named(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid([spec])


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["model.beta=0.1", "model.beta=0.2"])


def test_run_names_come_from_the_values():
    assert run_name({"model.beta": "0.05", "trainer.max_epochs": "1"}) == "beta-0.05_max_epochs-1"
    assert run_name({"model.lr_scheduler": "cosine", "data.path": "data/pairs.jsonl"}) == (
        "lr_scheduler-cosine_path-data-pairs.jsonl-16d143a3"  # sha256("data/pairs.jsonl")[:8]: "/" is not kept
    )
    assert run_name({"a.seed": "1", "b.seed": "2"}) == "a.seed-1_b.seed-2"  # the same last part: whole keys


def test_run_names_are_unique_and_stable():
    assert run_name({"seed_everything": "1"}) == "seed_everything-1"
    assert run_name({"seed_everything": "-1"}) == "seed_everything--1"
    values = ["1", "-1", "a b", "a_b", "a-b", "a/b", "[q_proj,v_proj]", "[q_proj, v_proj]", "é", "%"]
    names = [run_name({"model.x": v}) for v in values]
    assert len(set(names)) == len(values), names
    assert names == [run_name({"model.x": v}) for v in values]  # the same values, the same names
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    # "_" joins the parts, so a value holding it cannot shift into the next key's part
    assert run_name({"a.x": "1_y-2", "b.y": "3"}) != run_name({"a.x": "1", "b.y": "2_y-3"})


def sweep_run(path, **values):
    return SweepRun(values, path, ["fit"])


def test_a_taken_run_directory_is_refused_before_anything_trains(tmp_path, capsys):
    check_run_dirs([sweep_run(tmp_path / "empty")])  # missing: free
    (tmp_path / "empty").mkdir()
    check_run_dirs([sweep_run(tmp_path / "empty")])  # empty: free
    with pytest.raises(ConfigError, match="would share the run directory"):
        check_run_dirs([sweep_run(tmp_path / "x", a="1"), sweep_run(tmp_path / "x", a="2")])

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / MARKER).write_text(json.dumps({"values": {"model.beta": "0.1"}, "status": "failed (exit 1)"}))
    check_run_dirs([sweep_run(mine, **{"model.beta": "0.1"})])  # this sweep's run of the same values
    with pytest.raises(ConfigError, match=r"holds the sweep run of \{'model.beta': '0.1'\}"):
        check_run_dirs([sweep_run(mine, **{"model.beta": "0.2"})])

    out = tmp_path / "sweep"
    other = out / "beta-0.1"  # a fit run of someone else, where the sweep would put model.beta=0.1
    other.mkdir(parents=True)
    (other / "metrics.csv").write_text("step,train/loss\n0,0.69\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", "configs/demo_dpo.yaml", "--grid", "model.beta=0.05,0.1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "beta-0.1 holds something that is not a run of this sweep" in err
    assert sorted(p.name for p in out.iterdir()) == ["beta-0.1"]  # nothing ran, not even the free beta-0.05
    assert sorted(p.name for p in other.iterdir()) == ["metrics.csv"]


def test_unknown_keys_and_bad_values_fail_before_training(tmp_path, capsys):
    config = "configs/demo_dpo.yaml"
    check_settings(config, [], combinations(parse_grid(["model.beta=0.1,0.2", "trainer.max_epochs=1"])))
    with pytest.raises(ConfigError, match=r"--grid model\.betta=0\.1: .*betta"):
        check_settings(config, [], combinations(parse_grid(["model.betta=0.1"])))
    with pytest.raises(ConfigError, match=r"--grid trainer\.max_epochs=two: .*trainer\.max_epochs"):
        check_settings(config, [], combinations(parse_grid(["trainer.max_epochs=1,two"])))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", config, "--grid", "model.beta", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "expected KEY=V1,V2" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def table_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def last_logged(metrics_csv, column):
    with open(metrics_csv) as f:
        return float([row[column] for row in csv.DictReader(f) if row.get(column)][-1])


@pytest.mark.slow
def test_sweep_runs_each_combination_once_and_resumes_an_interrupted_one(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--config", "demo_dpo.yaml", "--grid", "model.beta=0.05,0.2", "--grid", "trainer.max_epochs=1",
            "--out", str(out), "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"]  # fmt: skip
    main(args)

    rows = table_rows(out / "sweep.csv")
    assert [r["run"] for r in rows] == ["beta-0.05_max_epochs-1", "beta-0.2_max_epochs-1"]
    assert [r["model.beta"] for r in rows] == ["0.05", "0.2"] and {r["status"] for r in rows} == {"finished"}
    for row in rows:
        run = out / row["run"]
        assert (run / "adapter" / "adapter_config.json").is_file()
        for column in ("train/rewards/chosen", "val/rewards/margins", "val/rewards/accuracies"):
            assert float(row[column]) == pytest.approx(last_logged(run / "metrics.csv", column))
        assert (out / "sweep.md").read_text().count(row["run"]) == 1

    logs = {r["run"]: (out / r["run"] / "fit.log").stat().st_mtime_ns for r in rows}
    main(args)  # a rerun: both finished, neither trains again
    assert {r["status"] for r in table_rows(out / "sweep.csv")} == {"finished (earlier)"}
    assert {r["run"]: (out / r["run"] / "fit.log").stat().st_mtime_ns for r in rows} == logs

    # as if the second run had been stopped after its last checkpoint, before the sweep recorded it as done
    second = out / rows[1]["run"]
    marker = json.loads((second / MARKER).read_text())
    (second / MARKER).write_text(json.dumps(marker | {"status": "running"}))
    main(args)
    statuses = [r["status"] for r in table_rows(out / "sweep.csv")]
    assert statuses == ["finished (earlier)", "finished"]
    assert "Restoring states from the checkpoint path" in (second / "fit.log").read_text()  # --ckpt_path last

    # as if the first run had been trained with other arguments: it starts over in its own directory
    first = out / rows[0]["run"]
    marker = json.loads((first / MARKER).read_text())
    (first / MARKER).write_text(json.dumps(marker | {"args": [*marker["args"], "--model.beta", "0.3"]}))
    main(args)
    statuses = [r["status"] for r in table_rows(out / "sweep.csv")]
    assert statuses == ["finished", "finished (earlier)"]
    assert "Restoring states" not in (first / "fit.log").read_text()


# ---- sweep --evaluate: each run's figures against the base -------------------------------------------------------


def test_evaluation_columns_from_hand_made_records(tmp_path):
    """evaluate.jsonl of tests/test_evaluate.py's records (base, dpo, orpo): each run's row gains its win share
    against the base and its preference accuracy; a run not evaluated gets empty cells."""
    from alignment.commands.compare import BASE
    from alignment.commands.sweep import write_table
    from alignment.commands.sweep_evaluation import BASE as SWEEP_BASE
    from alignment.commands.sweep_evaluation import SweepEvaluation, read_figures
    from alignment.judging import wilson_interval
    from tests.test_evaluate import records

    assert SWEEP_BASE == BASE
    folder = tmp_path / "evaluate"
    folder.mkdir()
    (folder / "evaluate.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    runs = [sweep_run(tmp_path / name, **{"model.beta": beta}) for name, beta in
            [("dpo", "0.1"), ("orpo", "0.2"), ("failed", "0.3")]]  # fmt: skip
    runs[2].status = "failed (exit 1, see fit.log)"
    evaluation = SweepEvaluation({"prompts": "p.jsonl", "judge": "tiny", "pairs": "pairs.jsonl"})
    read_figures(evaluation, folder, {runs[0].path: "dpo", runs[1].path: "orpo"})
    write_table(runs, ["model.beta"], tmp_path, evaluation)

    rows = {r["run"]: r for r in table_rows(tmp_path / "sweep.csv")}
    # dpo beat the base on both prompts (d = 1, 2 for dpo); orpo tied on one (d = 0) and lost the other (d = -1.5)
    dpo, orpo = rows["dpo"], rows["orpo"]
    assert [dpo[f"vs_base/{k}"] for k in ("wins", "ties", "losses")] == ["2", "0", "0"]
    assert [orpo[f"vs_base/{k}"] for k in ("wins", "ties", "losses")] == ["0", "1", "1"]
    for row, wins in ((dpo, 2), (orpo, 0)):
        found = [float(row[f"vs_base/win_rate{end}"]) for end in ("", "_low", "_high")]
        assert found == pytest.approx([wins / 2, *wilson_interval(wins, 2)])
    # mean log-prob per token, chosen over rejected: dpo (-8/4 > -14/5, -9/4 < -7/5), orpo both
    assert float(dpo["preference_accuracy"]) == 0.5 and float(orpo["preference_accuracy"]) == 1.0
    assert float(dpo["preference_accuracy_low"]) == pytest.approx(wilson_interval(1, 2)[0])
    evaluated = [c for c in rows["failed"] if c.startswith(("vs_base/", "preference_accuracy"))]
    assert len(evaluated) == 9 and all(rows["failed"][c] == "" for c in evaluated)
    markdown = (tmp_path / "sweep.md").read_text()
    assert "| vs_base/win_rate |" in markdown and "the base's preference accuracy 0.0% (95% interval" in markdown

    without_pairs = SweepEvaluation({"prompts": "p.jsonl", "judge": "tiny"})
    read_figures(without_pairs, folder, {runs[0].path: "dpo"})
    write_table(runs, ["model.beta"], tmp_path, without_pairs)
    assert not any(c.startswith("preference") for c in table_rows(tmp_path / "sweep.csv")[0])
    write_table(runs, ["model.beta"], tmp_path)  # no --evaluate: the table as it was
    assert not any(c.startswith(("vs_base", "preference")) for c in table_rows(tmp_path / "sweep.csv")[0])


def test_adapter_names_of_runs():
    from pathlib import Path

    from alignment.commands.sweep_evaluation import adapter_names

    paths = [Path("s/beta-0.05_max_epochs-1"), Path("s/beta-0-05_max_epochs-1"), Path("t/beta-0.05_max_epochs-1")]
    assert list(adapter_names(paths).values()) == ["beta-0-05_max_epochs-1", "beta-0-05_max_epochs-1-1",
                                                   "beta-0-05_max_epochs-1-2"]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--judge", "tiny"], "--judge goes with --evaluate"),
        (["--pairs", "x.jsonl"], "--pairs goes with --evaluate"),
        (["--max-new-tokens", "4"], "--max-new-tokens goes with --evaluate"),
        (["--evaluate", "missing.jsonl", "--judge", "tiny"], "--evaluate missing.jsonl: no such file"),
        (["--evaluate", "README.md", "--judge", "tiny"], "--evaluate README.md: "),
        (["--evaluate", "PROMPTS"], "--evaluate: win-rates against the base need a --judge"),
        (["--evaluate", "PROMPTS", "--judge", "tiny", "--pairs", "missing.jsonl"], "--pairs missing.jsonl: no such"),
        (["--evaluate", "PROMPTS", "--judge", "tiny", "--tie-margin", "0.5"], "--tie-margin must be within"),
    ],
)
def test_evaluation_mistakes_are_one_line_before_training(tmp_path, capsys, flags, named):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n")
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", "demo_dpo.yaml", "--grid", "model.beta=0.1", "--out", str(out),
              *[str(prompts) if f == "PROMPTS" else f for f in flags]])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and named in err, err
    assert not out.exists()  # nothing trained


@pytest.mark.slow
def test_sweep_evaluate_adds_each_runs_figures_against_the_base(tmp_path):
    """One run of the demo, evaluated by the tiny judge (pairwise: its records are the judgements of both orders):
    every cell of its row is what evaluate.jsonl's records give, recomputed here from them; a rerun trains nothing
    and generates nothing (answers cached)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from alignment.judging import accuracy, tally, verdict
    from tests.helpers import write_jsonl

    root = Path(__file__).resolve().parents[1]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("What is 2 + 2?", "Hi")])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{i} + 1?", "chosen": str(i + 1), "rejected": "1 1"}
                                                    for i in range(3)])  # fmt: skip
    out, cache = tmp_path / "sweep", tmp_path / "cache"
    command = [sys.executable, str(root / "cli.py"), "sweep", "--config", "demo_dpo.yaml", "--grid", "model.beta=0.1",
               "--out", str(out), "--data.limit", "16", "--trainer.max_steps", "2", "--evaluate", str(prompts),
               "--judge", "tiny", "--judge-mode", "pairwise", "--pairs", str(pairs),
               "--max-new-tokens", "4"]  # fmt: skip
    env = {**os.environ, "ALIGNMENT_CACHE": str(cache)}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    [row] = table_rows(out / "sweep.csv")
    assert row["run"] == "beta-0.1" and row["status"] == "finished"
    records = [json.loads(line) for line in (out / "evaluate" / "evaluate.jsonl").read_text().splitlines()]
    name = "beta-0-1"  # the run's name in the evaluation ('.' is not allowed in an adapter name)
    assert records[0]["models"] == ["base", name] and records[0]["judge"] == "tiny"
    orders = {(r["prompt"], r["first"]): (r["p_first"], r["p_second"]) for r in records if r["kind"] == "judgement"}
    versus = tally([verdict(orders[(p, name)], orders[(p, "base")]) for p in (0, 1)], records[0]["tie_margin"])
    assert [int(row[f"vs_base/{k}"]) for k in ("wins", "ties", "losses")] == [versus.wins, versus.ties, versus.losses]
    assert [float(row[f"vs_base/win_rate{end}"]) for end in ("", "_low", "_high")] == pytest.approx(versus.share("win"))
    logps = [r for r in records if r["kind"] == "logps" and r["model"] == name]
    expected = accuracy(r["chosen_mean"] > r["rejected_mean"] for r in logps)[:3]
    assert len(logps) == 3 and [float(row[f"preference_accuracy{end}"]) for end in ("", "_low", "_high")] == (
        pytest.approx(expected)
    )
    marker = json.loads((out / "beta-0.1" / MARKER).read_text())["evaluation"]
    assert marker["model"] == name and marker["vs_base/wins"] == versus.wins
    assert "| vs_base/win_rate |" in (out / "sweep.md").read_text()

    answers = {p: p.stat().st_mtime_ns for p in (cache / "generations").iterdir()}
    assert len(answers) == 2  # the base's answers and the run's
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert table_rows(out / "sweep.csv")[0]["status"] == "finished (earlier)"
    assert {p: p.stat().st_mtime_ns for p in (cache / "generations").iterdir()} == answers  # nothing generated
    assert "judging" not in result.stderr  # every judgement found in the evaluation's records
    assert table_rows(out / "sweep.csv")[0] | {"status": "finished"} == row
