"""W&B faults in real sweeps (issue 12): a driver killed mid-sweep and run again, W&B unreachable, and secrets.

Every sweep here runs as `python -m flatray.sweep FILE` in its own session, with W&B pointed at a closed loopback
port (nothing ever leaves the machine), W&B's and Ray's folders (and HOME) inside the test's folder, so that a kill
cleans up exactly what it started and the secret scan sees every file written.
"""

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from flatray.tracking import read_offline_runs, run_id

REPO = Path(__file__).resolve().parents[1]
SECRETS = {"WANDB_API_KEY": "local-fr14wandbkey0000000000000000000000000000",
           "AWS_ACCESS_KEY_ID": "AKIAFR14ACCESSKEY00000",
           "AWS_SECRET_ACCESS_KEY": "fr14SecretAccessKey000000000000000000000000",
           "AWS_SESSION_TOKEN": "fr14SessionToken0000000000000000000000000000000000"}

KILL = """
name: kill
storage: {storage}
wandb: {{project: flatray-test, mode: auto}}
defaults:
  model: tiny-bert
  task: toy
  data: {{max_train_samples: 2048, max_eval_samples: 32}}
  train: {{epochs: 6, batch_size: 32, seed: 0}}
  scaling: {{num_workers: 1}}
experiments:
  full:
    kind: finetune
    search:
      space: {{train.seed: {{grid: [0, 1]}}}}
      algorithm: grid
      scheduler: none
"""

OUTAGE = """
name: outage
storage: {storage}
wandb: {{project: flatray-test, mode: online}}
defaults:
  model: tiny-bert
  task: toy
  data: {{max_train_samples: 128, max_eval_samples: 32}}
  train: {{epochs: 2, batch_size: 32, seed: 0}}
  scaling: {{num_workers: 1}}
experiments:
  full:
    kind: finetune
  imp:
    kind: imp
    parent: full
    levels: 1
    sparsity_step: 0.5
"""


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_env(tmp: Path, port: int) -> dict:
    """The environment of a sweep whose W&B is unreachable on loopback, with its files kept inside tmp."""
    env = dict(os.environ, **SECRETS, WANDB_BASE_URL=f"http://127.0.0.1:{port}", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", DS_ACCELERATOR="cpu",
               HOME=str(tmp / "home"),
               # kept where they are: the compiled DeepSpeed op and the built-in tiny BERT (none hold a secret)
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   os.path.expanduser("~/.cache/torch_extensions")),
               FLATRAY_CACHE=os.environ.get("FLATRAY_CACHE", os.path.expanduser("~/.cache/flatray")),
               # short: Ray's socket paths must stay under 108 characters
               RAY_TMPDIR=tempfile.mkdtemp(prefix="fr", dir="/tmp"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp / "wandb_home" / var.lower())
    env.pop("WANDB_MODE", None)  # the sweep file's mode (tests/conftest.py sets offline)
    # A W&B service this test process started (an in-process test before this one) sets WANDB_SERVICE, and a
    # sweep that inherited it would log into that service: a SIGKILLed driver's run would stay open there, and
    # the next driver's run of the same id would be refused ("run ID ... is in use"). A user's sweep starts its own.
    env.pop("WANDB_SERVICE", None)
    (tmp / "home").mkdir(exist_ok=True)
    return env


def sweep_cmd(path: Path) -> list[str]:
    return [sys.executable, "-m", "flatray.sweep", str(path), "--max-concurrent", "1"]


def run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run a command in its own session to the end, then SIGKILL whatever it left behind."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        linger(proc.pid, 30)  # what a user's machine gives them: time to exit on their own
    finally:
        kill_session(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def linger(sid: int, seconds: float) -> None:
    """Wait up to `seconds` for the processes left in session sid (W&B's service, Ray's) to exit."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        left = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        if not left:
            return
        time.sleep(0.5)


def kill_session(sid: int) -> None:
    """SIGKILL what is left of a session started with start_new_session=True (Ray's raylet, GCS, workers,
    wandb-core): only processes of that session, never anyone else's Ray."""
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                proc.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def notice(port: int, root: Path) -> str:
    wandb_dir = root / "wandb"
    return (f"[flatray] W&B unreachable at http://127.0.0.1:{port}: logging offline to {wandb_dir}; "
            f"upload later with python -m flatray.tracking sync {wandb_dir}")


def trials(root: Path) -> dict[str, dict]:
    out = {}
    for folder in root.iterdir():
        if (folder / "trial.json").exists():
            summary = folder / "summary.json"
            out[folder.name] = {
                "experiment": json.loads((folder / "trial.json").read_text())["experiment"],
                "summary": json.loads(summary.read_text()) if summary.exists() else None,
                "summary_mtime": summary.stat().st_mtime_ns if summary.exists() else None,
                "attempts": (folder / "attempts.jsonl").read_text().splitlines()}
    return out


def init_waits(wandb_dir: Path) -> dict[str, float]:
    """Seconds each wandb.init took, per run folder (online attempts included), from W&B's own debug.log: from
    its first line to "run started", or to its last line when it never started."""
    waits = {}
    for log in wandb_dir.glob("*run-*/logs/debug.log"):
        stamps = [(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f"), line) for line in log.read_text().splitlines()
                  if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", line)]
        end = next((t for t, line in stamps if "run started" in line), stamps[-1][0])
        waits[log.parent.parent.name] = (end - stamps[0][0]).total_seconds()
    return waits


# -- 6: a driver SIGKILLed mid-sweep, then the same command again ------------------------------------------------


@pytest.fixture(scope="module")
def killed_and_rerun(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    path = tmp / "kill.yaml"
    path.write_text(KILL.format(storage=tmp / "out"))
    root, port = tmp / "out" / "kill", closed_port()
    env = sweep_env(tmp, port)
    with open(tmp / "first.log", "w") as log:
        first = subprocess.Popen(sweep_cmd(path), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        # Kill once one trial has finished and the other is training, with a checkpoint Ray Train has listed.
        deadline = time.time() + 900
        while time.time() < deadline and first.poll() is None:
            done = [f.parent.name for f in root.glob("*/summary.json")]
            running = [f.parents[1].name for f in root.glob("*/train/checkpoint_manager_snapshot.json")
                       if not (f.parents[1] / "summary.json").exists()]
            if done and running:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"no moment with a finished and a running trial (exit {first.poll()}): "
                        f"{(tmp / 'first.log').read_text()[-3000:]}")
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_at = time.time()
    finally:
        kill_session(first.pid)
    before = trials(root)
    second = run(sweep_cmd(path), env, timeout=1200)
    (tmp / "second.log").write_text(second.stdout + second.stderr)  # for a look after a failure
    yield {"root": root, "port": port, "env": env, "before": before, "after": trials(root), "done": done[0],
           "running": running[0], "first": (tmp / "first.log").read_text(), "second": second,
           "rerun_s": time.time() - killed_at}
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


@pytest.mark.slow
def test_finished_trials_are_not_rerun_after_a_sigkill(killed_and_rerun):
    k = killed_and_rerun
    second, before, after = k["second"], k["before"], k["after"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[flatray] 1 trial(s) had finished before and were not run again" in second.stdout
    done, running = k["done"], k["running"]
    # The finished trial: not started again (one attempt, summary.json untouched).
    assert after[done]["attempts"] == before[done]["attempts"] and len(after[done]["attempts"]) == 1
    assert after[done]["summary_mtime"] == before[done]["summary_mtime"]
    # The killed one: continued from its checkpoint in a second attempt, to the end.
    assert before[running]["summary"] is None and len(after[running]["attempts"]) == 2
    assert after[running]["summary"]["status"] == "done"
    assert "resumed at epoch" in second.stdout + second.stderr


@pytest.mark.slow
def test_wandb_after_a_sigkill_holds_every_epoch_and_syncs(killed_and_rerun):
    k = killed_and_rerun
    root, port, env = k["root"], k["port"], k["env"]
    # mode auto with an API key and W&B unreachable: offline, said once by each driver.
    for out in (k["first"], k["second"].stdout):
        assert out.count(notice(port, root)) == 1, out[-3000:]
    runs = read_offline_runs(str(root / "wandb"))
    def of(tid):
        return sorted((r for r in runs if r["id"] == run_id("kill", tid)), key=lambda r: r["start_time"])

    assert [r["exit_code"] for r in of(k["done"])] == [0]  # the finished trial got no second run
    # The run the kill cut short (absent when the kill came before W&B wrote its first record), then the one of the
    # second sweep.
    *killed, resumed = of(k["running"])
    assert len(killed) <= 1 and all(r["exit_code"] is None for r in killed) and resumed["exit_code"] == 0
    # The resumed run holds every epoch (the ones before the checkpoint included) and the final summary.
    summary = k["after"][k["running"]]["summary"]
    assert sorted({row["_step"] for row in resumed["history"]}) == list(range(1, 7))
    assert resumed["summary"]["status"] == "done" and resumed["summary"]["score"] == summary["metrics"]["score"]

    sync = [sys.executable, "-m", "flatray.tracking", "sync", str(root / "wandb")]
    plan = subprocess.run([*sync, "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0 and "Traceback" not in plan.stderr, plan.stderr
    listed = re.findall(r"^would upload (\S+) .*?: (\S+)", plan.stdout, re.M)
    # Every run with something in it, parents... here: in start order, the killed run before its resumption.
    assert [path for _, path in listed] == [r["path"] for r in sorted(runs, key=lambda r: r["start_time"])]
    headers_only = [p for p in (root / "wandb").glob("offline-run-*") if not any(r["path"] == str(p) for r in runs)]
    assert sorted(re.findall(r"^skip (\S+): ", plan.stdout, re.M)) == sorted(str(p) for p in headers_only)
    # A real upload: W&B is not there, so it says so at once and fails cleanly (no traceback, nothing lost).
    started = time.time()
    upload = subprocess.run(sync, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert upload.returncode == 1 and "Traceback" not in upload.stdout + upload.stderr
    assert f"W&B unreachable at http://127.0.0.1:{port}: nothing uploaded" in upload.stderr
    assert time.time() - started < 120  # `wandb sync` itself retries a closed port for minutes
    assert len(read_offline_runs(str(root / "wandb"))) == len(runs)


# -- 9 and 14: W&B unreachable with mode online, and secrets ----------------------------------------------------


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outage")
    path = tmp / "outage.yaml"
    path.write_text(OUTAGE.format(storage=tmp / "out"))
    port = closed_port()
    env = sweep_env(tmp, port)
    started = time.time()
    proc = run(sweep_cmd(path), env, timeout=1200)
    (tmp / "console.log").write_text(proc.stdout + proc.stderr)  # for a look after a failure (scanned too)
    yield {"tmp": tmp, "root": tmp / "out" / "outage", "port": port, "env": env, "proc": proc,
           "wall_s": time.time() - started}
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


@pytest.mark.slow
def test_unreachable_wandb_logs_every_trial_offline_without_waiting(outage):
    root, proc = outage["root"], outage["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count(notice(outage["port"], root)) == 1  # one line for the trials and the report together
    assert "W&B unreachable" not in out.replace(notice(outage["port"], root), "")
    assert "W&B start failed" not in out and "W&B logging of the report failed" not in out
    # No online attempt was made (each one waited out its timeout before), and no run waited long to open.
    wandb_dir = root / "wandb"
    assert not list(wandb_dir.glob("run-*")), "an online run was attempted"
    waits = init_waits(wandb_dir)
    assert waits and max(waits.values()) < 30, waits
    # Nothing lost: each trial's offline run holds every epoch it reported and its final metrics.
    runs = {r["id"]: r for r in read_offline_runs(str(wandb_dir))}
    finished = trials(root)
    assert len(finished) == 2 and sorted(runs) == sorted([run_id("outage", t) for t in finished] + ["outage-report"])
    for tid, trial in finished.items():
        run, summary = runs[run_id("outage", tid)], trial["summary"]
        assert summary["status"] == "done" and run["exit_code"] == 0
        reported = [json.loads(line) for line in (root / tid / "result.json").read_text().splitlines()]
        assert {row["_step"] for row in run["history"]} == {int(r["epoch"]) for r in reported}
        assert all(row["score"] == r["score"] for row, r in zip(run["history"], reported))
        assert run["summary"]["status"] == "done" and run["summary"]["score"] == summary["metrics"]["score"]
    imp = next(t for t, trial in finished.items() if trial["experiment"] == "imp")
    assert runs[run_id("outage", imp)]["used_artifacts"]  # lineage offline too
    print(f"outage sweep: {outage['wall_s']:.0f} s; wandb.init waits {sorted(round(w, 1) for w in waits.values())}")


def _encodings(secret: str) -> list[bytes]:
    """The secret as is, and the middle of its base64 at each of the three alignments."""
    raw = secret.encode()
    forms = [raw]
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + raw)
        forms.append(encoded[4:-4])  # what does not depend on the bytes around it
    return forms


@pytest.mark.slow
def test_no_secret_in_any_file_or_console_line(outage):
    tmp, proc = outage["tmp"], outage["proc"]
    assert proc.returncode == 0
    ray_dir = Path(outage["env"]["RAY_TMPDIR"])
    roots = [tmp, ray_dir]  # storage, W&B's run files and its config/cache/data folders, HOME; Ray's session
    files = [f for r in roots for f in r.rglob("*") if f.is_file() and not f.is_symlink()]
    assert any(f.suffix == ".wandb" for f in files) and any("session_" in str(f) for f in files)
    found = []
    for name, secret in SECRETS.items():
        forms = _encodings(secret)
        for f in files:
            try:
                data = f.read_bytes()
            except OSError:
                continue
            if any(form in data for form in forms):
                found.append(f"{name} in {f}")
        if any(form.decode() in proc.stdout + proc.stderr for form in forms):
            found.append(f"{name} on the console")
    assert not found, found


# -- the report's run when W&B answers the check and then fails: offline, its id resumed, not a collision --------

REPORT = r'''
import http.server, sys, threading, time
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
import os
os.environ["WANDB_BASE_URL"] = f"http://127.0.0.1:{server.server_port}"

import pandas as pd
from flatray.report.wandb_log import log_to_wandb
from flatray.tracking import runs

runs.INIT_TIMEOUT_S = 3
root = Path(sys.argv[1])
(root / "report").mkdir(parents=True)
for attempt in (1, 2):  # the report made twice: the second resumes the first's run id, deliberately
    log_to_wandb(root, "s", root / "report", [], {"trials": pd.DataFrame({"score": [0.5 * attempt]})},
                 {"project": "p", "mode": "online"})
print("done")
'''


@pytest.mark.slow  # about 50 s: CI's second stage
def test_report_run_falls_back_offline_without_an_id_collision(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_API_KEY=SECRETS["WANDB_API_KEY"], **{v: str(tmp_path / v.lower()) for v in (
        "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")})
    started = time.time()
    proc = run([sys.executable, "-c", REPORT, str(tmp_path / "s")], env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "done", proc.stderr[-3000:]
    assert "ServerResponseError" not in proc.stderr and "in use" not in proc.stdout + proc.stderr
    assert "W&B logging of the report failed" not in proc.stdout + proc.stderr
    assert sum(line.startswith("[flatray] W&B unreachable at http://127.0.0.1:") for line in
               proc.stdout.splitlines()) == 1
    reports = read_offline_runs(str(tmp_path / "s" / "wandb"))
    assert [(r["id"], r["job_type"], r["exit_code"]) for r in reports] == [("s-report", "report", 0)] * 2
    assert all(r["history"] for r in reports)
    print(f"report fallback: {time.time() - started:.0f} s")
