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
