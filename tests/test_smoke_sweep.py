"""sweeps/smoke.yaml end to end on a real local Ray (what `make smoke` runs, at one epoch of 512 examples per run): every kind of
trial, W&B's lineage across the graph, and the report of the real output."""

import json
from pathlib import Path

import pytest

from flatray import sweep
from flatray.sweep import graph as sweepfile
from flatray.tracking import read_offline_runs


# The whole smoke graph end to end (minutes): CI runs it in its second stage, `make test-faults`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    import ray

    storage = tmp_path_factory.mktemp("smoke")
    code = sweep.main(["sweeps/smoke.yaml", "--set", f"storage={storage}", "--set", "defaults.train.epochs=1",
                       "--set", "defaults.data.max_train_samples=512"])
    ray.shutdown()
    root = storage / "smoke"
    trials = {}
    for folder in root.iterdir():
        if (folder / "summary.json").exists():
            trials[folder.name] = (json.loads((folder / "trial.json").read_text()),
                                   json.loads((folder / "summary.json").read_text()))
    return code, root, trials


def test_every_planned_trial_ran_and_finished(smoke):
    code, root, trials = smoke
    assert code == 0
    counts = {}
    for record, summary in trials.values():
        assert summary["status"] == "done", (record["experiment"], summary.get("error"))
        counts[record["experiment"]] = counts.get(record["experiment"], 0) + 1
    assert counts == sweep.plan(sweepfile.load("sweeps/smoke.yaml"))
    by_id = {tid: record for tid, (record, _) in trials.items()}
    for record, summary in trials.values():
        if record["kind"] == "imp":
            parent = by_id[record["parents"][0]]
            assert parent["experiment"] == ("full" if record["level"] == 1 else "imp")
            assert summary["metrics"]["sparsity"] == pytest.approx(0.2 * record["level"], abs=1e-3)
            assert record["point"] == parent["point"]  # the chain keeps its dense run's optimizer
        if record["kind"] == "transfer":
            assert by_id[record["parents"][0]]["level"] == 2 and record["config"]["task"] == "toy-topic"
            assert summary["metrics"]["sparsity"] == pytest.approx(0.4, abs=1e-3)


def test_wandb_lineage_follows_the_graph(smoke):
    _, root, trials = smoke
    runs = {r["config"]["flatray"]["id"]: r for r in read_offline_runs(str(root / "wandb"))
            if r["job_type"] != "report"}
    assert sorted(runs) == sorted(trials)
    for tid, (record, _) in trials.items():
        run = runs[tid]
        assert (run["group"], run["job_type"]) == ("smoke", record["kind"])
        for parent in record["parents"]:  # every input is an output of the parent trial
            logged = {(a["name"], a["digest"]) for a in runs[parent]["logged_artifacts"]}
            used = {(a["name"], a["digest"]) for a in run["used_artifacts"]}
            assert used and used <= logged
    transfer = next(tid for tid, (r, _) in trials.items() if r["kind"] == "transfer")
    assert [a["type"] for a in runs[transfer]["used_artifacts"]] == ["mask"]  # ticket -> transfer


def test_the_report_of_the_real_sweep(smoke):
    _, root, trials = smoke
    report = root / "report"
    for name in ("README.md", "imp_sparsity.png", "imp_sparsity.csv", "ptq.csv", "cofi.csv", "squat_bits.csv",
                 "sharpness.csv", "transfer_heatmap.png", "trials.csv"):
        assert (report / name).exists(), name
    text = (report / "README.md").read_text()
    assert f"{len(trials)} trials, {len(trials)} finished" in text
    reports = [r for r in read_offline_runs(str(root / "wandb")) if r["job_type"] == "report"]
    assert len(reports) == 1 and reports[0]["group"] == "smoke"
