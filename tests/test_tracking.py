"""W&B tracking of a real small Ray Tune sweep, offline: runs, lineage and failures, read from the .wandb files."""

import contextlib
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


# -- what a killed sweep leaves, and W&B unreachable (issue 12) -------------------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cut(file: Path, records: int) -> None:
    """Keep the file header and the first `records` records: what a process killed right then leaves."""
    import struct

    data, pos = file.read_bytes(), 7
    for _ in range(records):
        pos += 7 + struct.unpack("<H", data[pos + 4:pos + 6])[0]
    file.write_bytes(data[:pos])


def test_sync_skips_what_holds_nothing_and_uploads_the_rest_in_order(sweep, tmp_path, monkeypatch, capsys):
    import shutil

    root, recs, _, runs = sweep
    wandb_dir = tmp_path / "wandb"
    shutil.copytree(root / "wandb", wandb_dir, symlinks=True)
    folder = {name: Path(runs[tracking.run_id(SWEEP, rec["id"])]["path"]).name for name, rec in recs.items()}
    file = lambda name: next((wandb_dir / folder[name]).glob("*.wandb"))  # noqa: E731
    _cut(file("ticket"), 1)  # the header record only: killed as W&B began the run
    _cut(file("imp"), 3)  # header, run, and a little more: killed mid-run, never finished
    file("broken").with_suffix(".wandb.synced").touch()  # what `wandb sync` leaves after an upload
    (wandb_dir / "offline-run-20991231_000000-never").mkdir()  # killed before W&B wrote any file
    (wandb_dir / "offline-run-20991231_000001-empty").mkdir()
    (wandb_dir / "offline-run-20991231_000001-empty" / "run-empty.wandb").write_bytes(b"")

    groups, skipped = tracking.sync_plan(str(wandb_dir))
    assert [[Path(r["path"]).name for r in runs] for runs in groups] == [[folder["dense"]], [folder["imp"]]]
    assert groups[1][0]["exit_code"] is None
    reasons = {Path(path).name: why for path, why in skipped}
    assert reasons[folder["ticket"]].startswith("header only") and reasons[folder["broken"]].startswith("already")
    assert reasons["offline-run-20991231_000000-never"].startswith("no .wandb file")
    assert reasons["offline-run-20991231_000001-empty"].startswith("unreadable")
    assert len(tracking.read_offline_runs(str(wandb_dir))) == 3  # what holds a run: dense, imp, broken

    assert tracking.main(["sync", str(wandb_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("skip ") == 4 and out.count("would upload ") == 2 and "(unfinished" in out
    assert out.index(folder["dense"]) < out.index(folder["imp"])

    # A real upload with W&B on a closed loopback port: said at once, nothing lost, no traceback.
    port = _closed_port()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "local-" + "0" * 40)
    assert tracking.main(["sync", str(wandb_dir)]) == 1
    err = capsys.readouterr().err
    assert f"W&B unreachable at http://127.0.0.1:{port}: nothing uploaded" in err
    assert len(tracking.read_offline_runs(str(wandb_dir))) == 3
    assert tracking.main(["sync", str(tmp_path / "nope")]) == 2

    # A server that answers the check and then never answers `wandb sync`: each upload is cut at --timeout.
    with _silent_server() as url:
        monkeypatch.setenv("WANDB_BASE_URL", url)
        assert tracking.main(["sync", str(wandb_dir), "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err.count("failed (no answer within 5 s)") == 2 and "2 of 2 W&B run(s) not uploaded" in err
    assert len(tracking.read_offline_runs(str(wandb_dir))) == 3


@contextlib.contextmanager
def _silent_server():
    """A loopback HTTP server that answers GET (the reachability check) and never answers anything else."""
    import http.server
    import threading
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def do_POST(self):
            time.sleep(60)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def test_unreachable_wandb_means_offline_said_once(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "local-" + "0" * 40)
    port = _closed_port()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    root = tmp_path / SWEEP
    for mode in ("online", "auto", "online"):  # asked for online, or auto with a key: offline, one line for all
        callback = tracking.WandbTrials(WandbSettings(mode=mode), SWEEP, str(root))
        assert callback.mode == "offline"
    wandb_dir = root / "wandb"
    assert capsys.readouterr().out.splitlines() == [
        f"[flatray] W&B unreachable at http://127.0.0.1:{port}: logging offline to {wandb_dir}; "
        f"upload later with python -m flatray.tracking sync {wandb_dir}"]
    monkeypatch.delenv("WANDB_API_KEY")
    assert tracking.WandbTrials(WandbSettings(), SWEEP, str(tmp_path / "other")).mode == "offline"
    assert capsys.readouterr().out == ""  # auto without a key: offline as asked, nothing to say


# Runs in its own process: W&B keeps its settings (the server's URL among them) per process from its first use.
FAILED_START = r'''
import http.server, json, os, sys, threading, time
from pathlib import Path

class Healthy(http.server.BaseHTTPRequestHandler):  # answers the check, then never answers W&B's API
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def do_POST(self):
        time.sleep(120)
    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
server.daemon_threads = True
threading.Thread(target=server.serve_forever, daemon=True).start()
os.environ["WANDB_BASE_URL"] = f"http://127.0.0.1:{server.server_port}"

from ray.tune.experiment import Trial
from flatray.config.sweep import WandbSettings
from flatray.tracking import callback as cb, runs

runs.INIT_TIMEOUT_S = 3
root = Path(sys.argv[1])
tracking = cb.WandbTrials(WandbSettings(project="p", mode="online"), "s", str(root))
assert tracking.mode == "online"

def trial(tid):
    rec = {"id": tid, "experiment": "e", "kind": "finetune", "parents": [], "point": {}, "level": None,
           "config": {"train": {"lr": 0.1}}}
    (root / tid).mkdir(parents=True)
    (root / tid / "summary.json").write_text(json.dumps({"status": "done", "metrics": {"score": 0.75}}))
    return Trial("fn", config={"flatray": rec}, trial_id=tid, stub=True)

def report(t, epoch):
    tracking.on_trial_result(0, [], t, {"epoch": epoch, "score": epoch / 4})

waits = {}
first = trial("first")  # its online start fails with no other run open: offline at once
started = time.time(); tracking.on_trial_start(0, [], first); waits["first"] = time.time() - started
report(first, 1); report(first, 2); tracking.on_trial_complete(0, [], first)

tracking.mode = "offline"  # as if W&B had answered when `open` started, and stopped answering after
other, late = trial("open"), trial("late")
tracking.on_trial_start(0, [], other)
tracking.mode = "online"
started = time.time(); tracking.on_trial_start(0, [], late); waits["late"] = time.time() - started
report(other, 1); report(late, 1); report(late, 2)
late_waited = "late" in tracking._waiting
tracking.on_trial_complete(0, [], late)   # ended before it had a run: that waits too
report(other, 2); tracking.on_trial_complete(0, [], other)  # the last open run ends: `late` gets its run
tracking.close()
print(json.dumps({"waits": waits, "late_waited": late_waited, "mode": tracking.mode}))
'''


@pytest.mark.slow  # about 50 s: CI's second stage
def test_a_failed_online_start_falls_back_offline_and_loses_nothing(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_API_KEY="local-" + "0" * 40, **{v: str(tmp_path / v.lower()) for v in (
        "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")})
    proc = subprocess.run([sys.executable, "-c", FAILED_START, str(tmp_path / SWEEP)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["mode"] == "offline" and result["late_waited"]
    assert all(wait < 3 + 10 for wait in result["waits"].values()), result  # INIT_TIMEOUT_S, then no more
    assert sum("W&B unreachable at http://127.0.0.1:" in line for line in proc.stdout.splitlines()) == 1
    runs = {run["name"]: run for run in tracking.read_offline_runs(str(tmp_path / SWEEP / "wandb"))}
    assert sorted(runs) == ["e-first", "e-late", "e-open"]
    for name in runs:
        assert [(row["_step"], row["score"]) for row in runs[name]["history"]] == [(1, 0.25), (2, 0.5)]
        # summary.json's metrics win over the last epoch's (W&B's summary starts from the last row logged)
        assert runs[name]["summary"] == {"epoch": 2, "score": 0.75, "status": "done"}
        assert runs[name]["exit_code"] == 0
