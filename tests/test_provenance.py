"""Provenance (issue 12, item 13): each trial records the flatray version, the git commit and the library versions;
a re-run lists the finished trials another version made, and --rerun-other-versions runs them again."""

import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest

from flatray.provenance import LIBRARIES, differences, provenance

ROOT = Path(__file__).resolve().parent.parent


def test_provenance_names_the_commit_and_the_libraries_that_shape_results():
    made_by = provenance()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert made_by["git"].split("+")[0] == head
    import torch
    import transformers

    assert made_by["libraries"]["torch"] == torch.__version__
    assert made_by["libraries"]["transformers"] == transformers.__version__
    assert set(made_by["libraries"]) == set(LIBRARIES) and made_by["flatray"]
    assert differences(made_by, made_by) == []
    older = {**made_by, "git": "0" * 40, "libraries": {**made_by["libraries"], "torch": "2.0.0"}}
    assert differences(older, made_by) == [f"git 000000000000 -> {made_by['git'][:12]}"
                                           f"{'+dirty' if made_by['git'].endswith('+dirty') else ''}",
                                           f"torch 2.0.0 -> {torch.__version__}"]
    assert differences(None, made_by) == ["no version recorded (made before flatray recorded versions)"]


SWEEP = """
name: versions
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


def _cli(argv):
    from flatray.sweep.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.mark.slow
def test_trials_of_another_version_are_listed_and_rerun_on_request(tmp_path):
    import ray

    path = tmp_path / "versions.yaml"
    path.write_text(SWEEP.format(storage=tmp_path))
    try:
        code, out = _cli([str(path), "--no-report"])
        assert code == 0, out
        (folder,) = [p.parent for p in (tmp_path / "versions").glob("*/summary.json")]
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["provenance"] == provenance()
        assert json.loads((folder / "trial.json").read_text())["provenance"] == provenance()

        # As if an older flatray, before a fix, had made it.
        summary["provenance"] = {**summary["provenance"], "git": "0" * 40}
        (folder / "summary.json").write_text(json.dumps(summary))
        code, out = _cli([str(path), "--no-report"])
        assert code == 0, out
        assert "1 of them were made by another version; pass --rerun-other-versions to run them again" in out
        assert f"full {folder.name}: git 000000000000 -> " in out
        assert len((folder / "attempts.jsonl").read_text().splitlines()) == 1  # kept, not run again

        code, out = _cli([str(path), "--no-report", "--rerun-other-versions"])
        assert code == 0, out
        assert len((folder / "attempts.jsonl").read_text().splitlines()) == 2
        rerun = json.loads((folder / "summary.json").read_text())
        assert rerun["status"] == "done" and rerun["provenance"] == provenance()
        assert rerun["checkpoint"] != summary["checkpoint"]  # a new run, not the old one's checkpoint restored
        (superseded,) = folder.glob("summary.superseded-*.json")
        assert json.loads(superseded.read_text())["provenance"]["git"] == "0" * 40
    finally:
        ray.shutdown()
