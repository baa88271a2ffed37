"""Storage faults injected into a real local sweep (issue 12, item 5): the disk fills mid-sweep (a real tmpfs), and
trial files are truncated between runs. Each costs only the trial it hits; a re-run finishes the sweep."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SWEEP = """
name: disk
storage: {storage}
wandb: {{mode: disabled}}
defaults:
  model: tiny-bert
  task: toy
  data: {{max_train_samples: 64, max_eval_samples: 32}}
  train: {{epochs: 2, batch_size: 16}}
  scaling: {{num_workers: 1}}
experiments:
  full:
    kind: finetune
    search:
      space: {{train.seed: {{grid: [0, 1]}}}}
      algorithm: grid
      scheduler: none
"""


def _sweep(path: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flatray.sweep", str(path), "--max-concurrent", "1", "--no-report"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _summaries(root: Path) -> dict[str, dict]:
    found = {}
    for path in root.glob("*/summary.json"):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except json.JSONDecodeError:
            found[path.parent.name] = None
    return found


def _fill(folder: Path) -> Path:
    """Write until the filesystem is full."""
    ballast = folder / "ballast"
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2 ** 20)
                f.flush()
        except OSError:
            pass
    return ballast


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disk")
    mount = tmp / "storage"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield tmp, mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_only_the_trial_it_hits_and_a_rerun_finishes(disk):
    tmp, mount = disk
    path = tmp / "disk.yaml"
    path.write_text(SWEEP.format(storage=mount))
    root = mount / "disk"
    started = time.time()
    proc = _sweep(path)
    while proc.poll() is None and not any(s and s.get("status") == "done" for s in _summaries(root).values()):
        time.sleep(0.05)
    ballast = _fill(mount)  # the first trial is done: the second one meets a full disk
    out, _ = proc.communicate(timeout=900)
    first_run_s = time.time() - started
    summaries = _summaries(root)
    done = [tid for tid, s in summaries.items() if s and s["status"] == "done"]
    assert proc.returncode == 1, out  # a failed trial, not a crashed driver
    assert "TuneError" not in out and "Traceback" not in out.split("[flatray] sweep disk finished")[-1]
    assert "experiment  trial" in out  # the results table
    assert len(done) == 1, out
    failed = [line for line in out.splitlines() if line.startswith("full ") and " failed " in line]
    assert failed and "MiB free" in failed[0] and str(mount) in failed[0], out
    assert not list(mount.rglob(".tmp-*")), "a temporary file was left behind"
    finished_before = (root / done[0] / "summary.json").read_bytes()

    ballast.unlink()  # space freed: the same command again
    started = time.time()
    out, _ = _sweep(path).communicate(timeout=900)
    rerun_s = time.time() - started
    assert "1 trial(s) had finished before and were not run again" in out, out
    summaries = _summaries(root)
    assert sorted(s["status"] for s in summaries.values()) == ["done", "done"], out
    assert (root / done[0] / "summary.json").read_bytes() == finished_before  # untouched
    print(f"disk full: first run {first_run_s:.0f} s, re-run {rerun_s:.0f} s, trials re-run: 1 of 2")


def test_truncated_trial_files_are_reported_and_the_trial_finishes_the_first_time(disk):
    tmp, mount = disk
    root = mount / "disk"
    summaries = _summaries(root)
    assert len(summaries) == 2 and all(s["status"] == "done" for s in summaries.values())
    cut, kept = sorted(summaries)
    before = summaries[cut]
    text = (root / cut / "summary.json").read_text()
    (root / cut / "summary.json").write_text(text[: len(text) // 2])  # a torn write
    text = (root / kept / "trial.json").read_text()
    (root / kept / "trial.json").write_text(text[: len(text) // 3])
    attempts = len((root / cut / "attempts.jsonl").read_text().splitlines())
    out, _ = _sweep(tmp / "disk.yaml").communicate(timeout=900)
    assert f"{root / cut / 'summary.json'} is corrupt" in out, out
    assert f"{root / kept / 'trial.json'} is corrupt" in out, out
    after = _summaries(root)
    assert after[cut]["status"] == "done", out  # finished in this run, not the next
    assert after[cut]["metrics"]["score"] == before["metrics"]["score"]
    assert after[cut]["checkpoint"] == before["checkpoint"]
    assert len((root / cut / "attempts.jsonl").read_text().splitlines()) == attempts + 1
    assert json.loads((root / kept / "trial.json").read_text())["id"] == kept  # rewritten
