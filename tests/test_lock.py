"""One driver per sweep folder (issue 12, item 10): a second driver refuses, naming the holder; a dead driver's
lock is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatray.sweep.lock import LOCK_FILE, SweepLock, SweepLocked

ROOT = Path(__file__).resolve().parent.parent
HOLD = "import sys, time; from flatray.sweep.lock import SweepLock; lock = SweepLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(600)"


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_driver_refuses_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(SweepLocked) as err:
            SweepLock(str(tmp_path)).acquire()
        assert f"host {socket.gethostname()}, pid {proc.pid}" in str(err.value)
        assert str(tmp_path / LOCK_FILE) in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup runs: its lock file stays, naming it
        proc.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid
    with SweepLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert f"taking over the lock of a driver that is gone (host {socket.gethostname()}, pid {proc.pid})" \
            in capsys.readouterr().out
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released
    with SweepLock(str(tmp_path)):  # and free again, without a takeover
        assert "taking over" not in capsys.readouterr().out


SWEEP = """
name: twice
storage: {storage}
wandb: {{mode: disabled}}
defaults:
  model: tiny-bert
  task: toy
  data: {{max_train_samples: 32, max_eval_samples: 16}}
  train: {{epochs: 1, batch_size: 16, seed: 0}}
  scaling: {{num_workers: 1}}
experiments:
  full:
    kind: finetune
"""


@pytest.mark.slow
def test_two_identical_sweeps_started_at_once_train_each_trial_once(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(SWEEP.format(storage=tmp_path))
    cmd = [sys.executable, "-m", "flatray.sweep", str(path), "--no-report"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / "twice" / LOCK_FILE
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text()) and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    started = time.time()
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    refused_in = time.time() - started
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"the sweep is already running (host {socket.gethostname()}, pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    (attempts,) = list((tmp_path / "twice").glob("*/attempts.jsonl"))
    assert len(attempts.read_text().splitlines()) == 1  # trained once
    print(f"second driver refused in {refused_in:.1f} s")
