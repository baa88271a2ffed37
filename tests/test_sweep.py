"""The sweep engine on a real local Ray: Tune trials for every run, children released by their own parent's end,
retries, resume, dry runs of every sweep file in the repository."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flatray import storage, sweep
from flatray.sweep import graph as sweepfile


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


def summaries(root: Path) -> dict[str, dict]:
    out = {}
    for folder in root.iterdir():
        if (folder / "trial.json").exists():
            out[folder.name] = {"trial": json.loads((folder / "trial.json").read_text()),
                                "summary": storage.read_json(str(folder / "summary.json")),
                                "attempts": storage.read_lines(str(folder / "attempts.jsonl"))}
    return out


def by_experiment(trials: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for t in trials.values():
        out.setdefault(t["trial"]["experiment"], []).append(t)
    return out


GRAPH = """
name: graph
storage: {storage}
wandb: {{mode: offline}}
defaults:
  model: tiny-bert
  task: toy
  train: {{epochs: 1, batch_size: 16, seed: 0}}
  data: {{max_train_samples: 256, max_eval_samples: 64}}
  scaling: {{num_workers: 1}}
experiments:
  slow:    # an unrelated sibling that outlasts fast + its child
    kind: finetune
    config: {{train: {{epochs: 20}}, data: {{max_train_samples: 1024}}}}
  fast:
    kind: finetune
  fast_ptq:
    kind: ptq
    parent: fast
  broken:  # 8 examples cannot fill a batch of 16: the worker raises, on every attempt
    kind: finetune
    retries: 1
    config: {{data: {{max_train_samples: 8}}}}
"""


@pytest.fixture(scope="module")
def graph_sweep(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("sweeps")
    path = folder / "graph.yaml"
    path.write_text(GRAPH.format(storage=folder))
    code = sweep.main([str(path), "--no-report"])
    import ray

    ray.shutdown()  # one local Ray at a time: the resume test starts its own
    return code, folder / "graph"


def test_child_starts_after_its_parent_and_before_an_unrelated_sibling_ends(graph_sweep):
    code, root = graph_sweep
    trials = by_experiment(summaries(root))
    (slow,), (fast,), (child,) = trials["slow"], trials["fast"], trials["fast_ptq"]
    for t in (slow, fast, child):
        assert t["summary"]["status"] == "done", t["summary"]
    assert child["trial"]["parents"] == [fast["trial"]["id"]]
    assert child["trial"]["config"]["model"] == fast["summary"]["outputs"]["model"]
    started = child["attempts"][0]["start"]
    assert started > fast["summary"]["ended"]  # after its own parent
    assert started < slow["summary"]["ended"]  # without waiting for the slow sibling: no stage barrier
    print(f"parent end -> child start: {started - fast['summary']['ended']:.1f} s")


def test_a_failing_trial_is_retried_then_failed_and_the_others_finish(graph_sweep):
    code, root = graph_sweep
    (broken,) = by_experiment(summaries(root))["broken"]
    assert code == 1  # the sweep says something failed, after finishing everything else
    assert broken["summary"]["status"] == "failed" and broken["summary"]["attempts"] == 2
    assert len(broken["attempts"]) == 2
    assert "no full batch" in broken["summary"]["error"]


def test_every_run_is_a_tune_trial_of_the_sweep(graph_sweep):
    from ray.tune import ExperimentAnalysis

    _, root = graph_sweep
    analysis = ExperimentAnalysis(str(root))
    ids = sorted(t.config["flatray"]["id"] for t in analysis.trials)
    assert ids == sorted(summaries(root))
    states = {t.config["flatray"]["experiment"]: t.status for t in analysis.trials}
    assert states == {"slow": "TERMINATED", "fast": "TERMINATED", "fast_ptq": "TERMINATED", "broken": "ERROR"}


def test_one_offline_wandb_run_per_trial_with_lineage(graph_sweep):
    from flatray.tracking import read_offline_runs

    _, root = graph_sweep
    trials = summaries(root)
    runs = {r["config"]["flatray"]["id"]: r for r in read_offline_runs(str(root / "wandb"))}
    assert sorted(runs) == sorted(trials)
    for tid, t in trials.items():
        run = runs[tid]
        assert run["group"] == "graph" and run["job_type"] == t["trial"]["kind"]
        assert run["config"]["task"] == "toy" and run["config"]["kind"] == t["trial"]["config"]["kind"]
        assert run["config"]["flatray"]["experiment"] == t["trial"]["experiment"]
        assert run["exit_code"] == (1 if t["summary"]["status"] == "failed" else 0)
    fast, child = (next(t for t in trials.values() if t["trial"]["experiment"] == e) for e in ("fast", "fast_ptq"))
    logged = runs[fast["trial"]["id"]]["logged_artifacts"]
    assert {a["type"] for a in logged} == {"model"}
    # The PTQ run declares the parent's model (same name and digest) as its input: W&B's lineage graph.
    assert runs[child["trial"]["id"]]["used_artifacts"] == logged
    assert {a["type"] for a in runs[child["trial"]["id"]]["logged_artifacts"]} == {"quantized-model"}
    assert runs[fast["trial"]["id"]]["history"][0]["score"] == fast["summary"]["history"][0]["score"]


# --------------------------------------------------------------------------------------------------- resume

RESUME = """
name: resume
storage: {storage}
wandb: {{mode: disabled}}
defaults:
  model: tiny-bert
  task: toy
  train: {{epochs: 2, batch_size: 16, seed: 0}}
  data: {{max_train_samples: 128, max_eval_samples: 64}}
  scaling: {{num_workers: 1}}
experiments:
  full:
    kind: finetune
    search: {{space: {{train.seed: {{grid: [0, 1]}}}}, algorithm: grid, scheduler: none}}
  ptq:
    kind: ptq
    parent: full
"""


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_and_runs_each_trial_to_the_end_once(tmp_path):
    path = tmp_path / "resume.yaml"
    path.write_text(RESUME.format(storage=tmp_path))
    root = tmp_path / "resume"
    cmd = [sys.executable, "-m", "flatray.sweep", str(path), "--no-report", "--max-concurrent", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any((p / "summary.json").exists() for p in root.glob("*")):
        time.sleep(1)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    proc.wait(timeout=120)
    finished_before = {p.name for p in root.glob("*") if (p / "summary.json").exists()}
    assert 1 <= len(finished_before) < 4

    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trials = summaries(root)
    assert len(trials) == 4 and all(t["summary"]["status"] == "done" for t in trials.values())
    for tid in finished_before:
        assert len(trials[tid]["attempts"]) == 1  # not run again
    assert f"{len(finished_before)} trial(s) had finished before" in out.stdout


# --------------------------------------------------------------------------------------------------- dry runs

SWEEPS = sorted(str(p) for p in Path("sweeps").rglob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS)
def test_every_sweep_file_passes_a_dry_run(path, capsys):
    assert sweep.main([path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    counts = sweep.plan(sweepfile.load(path))
    assert f"{sum(counts.values())} trials planned" in out
    for name, n in counts.items():
        assert f"{name} [" in out and f"] {n} trial(s)" in out
    assert "offers:" in out


def test_dry_run_counts_the_smoke_graph():
    counts = sweep.plan(sweepfile.load("sweeps/smoke.yaml"))
    # 2 dense runs; 2 IMP levels each; transfers from level 2 only; ptq and sharpness of each dense run;
    # squat and cofi from the best dense run.
    assert counts == {"full": 2, "imp": 4, "transfer": 2, "ptq": 2, "squat": 1, "cofi": 1, "sharpness": 2}


def test_a_bad_sweep_fails_before_ray_starts(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""
        name: bad
        defaults: {model: tiny-bert, task: toy}
        experiments:
          full: {kind: finetune, search: {space: {optimizer.rhoo: {grid: [0.1]}}}}
    """))
    assert sweep.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "experiments.full.search.space" in err and "'optimizer.rhoo'" in err
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def test_search_draws_grid_points_times_samples_with_one_optuna_study_per_grid_point(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""
        name: s
        defaults: {model: tiny-bert, task: toy}
        experiments:
          full:
            kind: finetune
            search:
              space: {train.seed: {grid: [0, 1]}, train.lr: {loguniform: [1.0e-5, 1.0e-3]}}
              num_samples: 3
    """))
    search = sweep.Points.create(sweepfile.load(path), "full", None)
    drawn = [search.draw() for _ in range(6)]
    assert search.draw() is None
    assert sorted(p["train.seed"] for p, _ in drawn) == [0, 0, 0, 1, 1, 1]
    assert all(1e-5 <= p["train.lr"] <= 1e-3 for p, _ in drawn)
    assert len({h[1] for _, h in drawn}) == 6 and len(search.inner) == 2  # one study per seed
    for i, (_, handle) in enumerate(drawn):
        search.tell(handle, None if i == 0 else 0.5 + i / 100)
    studies = [inner._ot_study for inner in search.inner.values()]
    assert sorted(len(s.trials) for s in studies) == [3, 3]
