"""W&B tracking of a real small Ray Tune sweep, offline: runs, lineage and failures, read from the .wandb files."""

import json
import logging
import os
from pathlib import Path

import pytest

from flatray import tracking
from flatray.config.sweep import WandbSettings

SWEEP = "tsweep"


def record(root: Path, id_, experiment, kind, parents=(), level=None, **config):
    return {"id": id_, "sweep": SWEEP, "experiment": experiment, "kind": kind, "parents": list(parents),
            "level": level, "point": {"train.lr": config.get("lr", 1e-4)},
            "config": {"kind": "finetune", "model": "tiny-bert", "task": "toy", "train": config},
            "dir": str(root / id_)}


def trainable(config):
    """Stands in for flatray's trainable: reports per epoch, writes a checkpoint folder, a mask and summary.json."""
    from ray import tune

    rec = config["flatray"]
    out = Path(rec["dir"])
    ckpt = out / "train" / "checkpoint_000"
    ckpt.mkdir(parents=True, exist_ok=True)
    (out / "trial.json").write_text(json.dumps(rec))
    history = []
    for epoch in (1, 2, 3):
        row = {"epoch": epoch, "score": 0.5 + epoch / 10, "validation/accuracy": 0.5 + epoch / 10, "task": "toy"}
        tune.report(row)
        history.append(row)
        if rec["experiment"] == "broken":
            raise RuntimeError("boom: the trial fails")
    (ckpt / "model.safetensors").write_bytes(os.urandom(64))
    (ckpt / "config.json").write_text("{}")
    (ckpt / "mask.safetensors").write_bytes(rec["id"].encode())
    summary = {"id": rec["id"], "experiment": rec["experiment"], "kind": rec["kind"], "status": "done",
               "metrics": history[-1], "history": history, "checkpoint": str(ckpt),
               "outputs": {"model": str(ckpt), "mask": str(ckpt / "mask.safetensors"), "export": None},
               "attempts": 1, "wall_s": 0.1, "error": None}
    (out / "summary.json").write_text(json.dumps(summary))


def tune_run(tmp, records, callback):
    from ray import tune

    tuner = tune.Tuner(
        trainable, param_space={"flatray": tune.grid_search(records)},
        # One at a time, in order: a parent ends before its children start. One reused actor: no start-up per trial.
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=str(tmp / "tune"), callbacks=[callback], verbose=0))
    return tuner.fit()


@pytest.fixture(scope="module")
def ray_session():
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def wandb_home(tmp_path_factory):
    """W&B's caches and settings in a scratch folder; offline (conftest) whatever the machine says."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(home / var.lower()))
        mp.setenv("WANDB_MODE", "offline")
        yield


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_session, wandb_home):
    tmp = tmp_path_factory.mktemp("sweep")
    root = tmp / SWEEP
    dense = record(root, "a1a1a1a1a1a1", "dense", "finetune", lr=3e-5, seed=1)
    broken = record(root, "f0f0f0f0f0f0", "broken", "finetune", lr=1e-3, seed=2)
    ticket = record(root, "c2c2c2c2c2c2", "ticket", "transfer", [dense["id"]], seed=1)
    imp = record(root, "d3d3d3d3d3d3", "imp", "imp", [dense["id"]], level=1, seed=1)
    records = [dense, broken, ticket, imp]
    callback = tracking.WandbTrials(WandbSettings(project="flatray-test"), SWEEP, str(root), str(root / "wandb"))
    assert callback.mode == "offline"
    results = tune_run(tmp, records, callback)
    runs = {run["id"]: run for run in tracking.read_offline_runs(str(root / "wandb"))}
    return root, {r["experiment"]: r for r in records}, results, runs


def test_one_offline_run_per_trial(sweep):
    root, recs, results, runs = sweep
    assert len(results) == 4 and len(results.errors) == 1  # the broken trial failed, the sweep went on
    assert sorted(runs) == sorted(tracking.run_id(SWEEP, r["id"]) for r in recs.values())
    assert {Path(run["path"]).parent for run in runs.values()} == {root / "wandb"}  # <root>/wandb/offline-run-*
    for name, rec in recs.items():
        run = runs[tracking.run_id(SWEEP, rec["id"])]
        assert (run["group"], run["job_type"], run["name"]) == (SWEEP, rec["kind"], f"{name}-{rec['id']}")
        assert run["config"]["train"] == rec["config"]["train"] and run["config"]["model"] == "tiny-bert"
        assert run["config"]["flatray"] == {"experiment": name, "id": rec["id"], "parents": rec["parents"],
                                            "point": rec["point"], "level": rec["level"]}


def test_metrics_per_epoch_and_summary(sweep):
    root, recs, results, runs = sweep
    dense = runs[tracking.run_id(SWEEP, recs["dense"]["id"])]
    assert [(row["_step"], row["score"]) for row in dense["history"]] == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert "validation/accuracy" in dense["history"][0]
    assert not {"training_iteration", "time_this_iter_s", "timestamp", "pid", "task"} & set(dense["history"][0])
    assert dense["summary"]["status"] == "done" and dense["summary"]["score"] == 0.8 and dense["exit_code"] == 0


def test_failed_trial_gets_a_finished_failed_run(sweep):
    root, recs, results, runs = sweep
    broken = runs[tracking.run_id(SWEEP, recs["broken"]["id"])]
    assert broken["exit_code"] == 1 and broken["summary"]["status"] == "failed"
    assert "boom" in broken["summary"]["error"]
    assert broken["logged_artifacts"] == [] and len(broken["history"]) == 1


def test_outputs_and_lineage(sweep):
    root, recs, results, runs = sweep
    run = {name: runs[tracking.run_id(SWEEP, rec["id"])] for name, rec in recs.items()}
    logged = {name: {a["type"]: a for a in r["logged_artifacts"]} for name, r in run.items()}
    for name in ("dense", "ticket", "imp"):
        assert logged[name]["model"]["name"] == f"{recs[name]['kind']}-{recs[name]['id']}-model"
        assert logged[name]["mask"]["name"] == f"{recs[name]['kind']}-{recs[name]['id']}-mask"
        assert run[name]["summary"]["status"] == "done"
    # A child's inputs are its parent's outputs: same name, type and digest (the server dedupes them into one).
    assert run["ticket"]["used_artifacts"] == [logged["dense"]["mask"]]
    assert sorted(run["imp"]["used_artifacts"], key=lambda a: a["type"]) == [logged["dense"]["mask"],
                                                                            logged["dense"]["model"]]
    assert run["dense"]["used_artifacts"] == []
    order = tracking.sync_order(str(root / "wandb"))
    assert order.index(run["dense"]["path"]) < min(order.index(run["ticket"]["path"]), order.index(run["imp"]["path"]))


def test_model_is_a_reference_and_mask_a_file(sweep):
    root, recs, results, runs = sweep
    summary = json.loads((root / recs["dense"]["id"] / "summary.json").read_text())
    model, mask = tracking.output_artifact(summary, "model"), tracking.output_artifact(summary, "mask")
    assert all(e.ref and e.ref.startswith("file://") for e in model.manifest.entries.values())
    assert [e.local_path for e in mask.manifest.entries.values()] == [summary["outputs"]["mask"]]
    uri = "s3://bucket/sweeps/tsweep/a1a1a1a1a1a1/train/checkpoint_000"  # cloud storage: the URI, no S3 client
    remote = tracking.output_artifact({**summary, "outputs": {"model": uri}}, "model")
    assert [(e.path, e.ref) for e in remote.manifest.entries.values()] == [("checkpoint_000", uri)]


def test_broken_wandb_never_reaches_tune(tmp_path, ray_session, wandb_home, caplog):
    root = tmp_path / SWEEP
    dense = record(root, "b1b1b1b1b1b1", "dense", "finetune", lr=3e-5)
    ticket = record(root, "b2b2b2b2b2b2", "ticket", "transfer", [dense["id"]])
    callback = tracking.WandbTrials(WandbSettings(project="no/such:project"), SWEEP, str(root))  # wandb.init raises
    with caplog.at_level(logging.WARNING, logger="flatray.tracking"):
        results = tune_run(tmp_path, [dense, ticket], callback)
    assert len(results) == 2 and not results.errors
    assert all((root / r["id"] / "summary.json").exists() for r in (dense, ticket))
    warnings = [r.getMessage() for r in caplog.records if r.name == "flatray.tracking"]
    assert len(warnings) == 2 and all("W&B start failed" in w and "project" in w for w in warnings)
    assert tracking.read_offline_runs(str(root / "wandb")) == []


def test_mode_and_run_id(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.wandb_mode(WandbSettings(mode="online")) == "offline"  # the environment wins
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert tracking.wandb_mode(WandbSettings()) == "offline"  # auto without a key
    assert tracking.wandb_mode(WandbSettings(mode="disabled")) == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert tracking.wandb_mode(WandbSettings()) == "offline"
    assert tracking.run_id("smoke", "3f2a9c0b1d2e") == "smoke-3f2a9c0b1d2e"
    long = tracking.run_id("a/b:c" * 30, "3f2a9c0b1d2e")
    assert len(long) <= 64 and long.endswith("-3f2a9c0b1d2e") and not set("/:") & set(long)
