"""A sweep on S3 (issue 12, item 3): a real S3 API (moto's server on 127.0.0.1) behind `--storage s3://...`.

Trial folders and checkpoints land in the bucket, children read their parents' checkpoints from it, a re-run skips
the finished trials, the report is built from the bucket and uploaded to it, and the console says where the offline
W&B runs went (a local folder: W&B writes local files).
"""

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SWEEP = """
name: s3sweep
wandb: {mode: offline}
defaults:
  model: tiny-bert
  task: toy
  data: {max_train_samples: 64, max_eval_samples: 32}
  train: {epochs: 1, batch_size: 16, seed: 0}
  scaling: {num_workers: 1}
experiments:
  full:
    kind: finetune
  imp:
    kind: imp
    parent: full
    levels: 1
    sparsity_step: 0.5
  ptq:
    kind: ptq
    parent: full
"""
BUCKET, PREFIX = "flatray-test", "sweeps"
ROOT = f"s3://{BUCKET}/{PREFIX}/s3sweep"


def _cli(argv):
    from flatray.sweep.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port; AWS_ENDPOINT_URL sends pyarrow (flatray, Ray) and boto3 there."""
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    tmp = tmp_path_factory.mktemp("s3")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "FLATRAY_CACHE": str(tmp / "cache")}  # parents' checkpoints are copied here
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cwd = os.getcwd()
    os.chdir(tmp)  # a cloud sweep's local side goes to ./results/cloud/...
    ray.shutdown()  # Ray's processes must start with these variables
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        (tmp / "sweep.yaml").write_text(SWEEP)
        first = _cli([str(tmp / "sweep.yaml"), "--storage", f"s3://{BUCKET}/{PREFIX}"])
        second = _cli([str(tmp / "sweep.yaml"), "--storage", f"s3://{BUCKET}/{PREFIX}"])
        yield {"client": client, "tmp": tmp, "first": first, "second": second}
    finally:
        ray.shutdown()
        os.chdir(cwd)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()


def _keys(client) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _summaries(client) -> dict[str, dict]:
    found = {}
    for key in _keys(client):
        if key.endswith("/summary.json"):
            summary = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            found[summary["experiment"]] = summary
    return found


def test_trial_folders_and_checkpoints_land_in_the_bucket(s3):
    code, out = s3["first"]
    assert code == 0, out
    summaries = _summaries(s3["client"])
    assert set(summaries) == {"full", "imp", "ptq"} and all(s["status"] == "done" for s in summaries.values())
    keys = _keys(s3["client"])
    for summary in summaries.values():
        folder = f"{PREFIX}/s3sweep/{summary['id']}"
        assert f"{folder}/trial.json" in keys
        assert summary["checkpoint"].startswith(f"s3://{BUCKET}/{folder}/train/checkpoint_")
        files = {k.rsplit("/", 1)[1] for k in keys if k.startswith(summary["checkpoint"][len(f's3://{BUCKET}/'):])}
        assert "metrics.json" in files and "flatray_run.yaml" in files
    assert "model.safetensors" in {k.rsplit("/", 1)[1] for k in keys if summaries["full"]["id"] in k}
    assert f"{PREFIX}/s3sweep/sweep.lock" not in keys  # released at the end
    assert not Path(s3["tmp"], "s3:").exists()  # the old bug: a local folder named after the URI


def test_children_read_their_parents_checkpoints_from_s3(s3):
    summaries = _summaries(s3["client"])
    client = s3["client"]
    trial = {name: json.loads(client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/s3sweep/{s['id']}/trial.json")["Body"]
                              .read()) for name, s in summaries.items()}
    assert trial["imp"]["config"]["prune"]["parent"] == summaries["full"]["checkpoint"]
    assert trial["ptq"]["config"]["model"] == summaries["full"]["checkpoint"]
    assert summaries["imp"]["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    # The parent's copy on the worker's node: the files of its S3 checkpoint.
    assert list((s3["tmp"] / "cache" / "remote" / "s3" / BUCKET).rglob("model.safetensors"))


def test_a_rerun_skips_the_finished_trials(s3):
    code, out = s3["second"]
    assert code == 0, out
    assert "3 trial(s) had finished before and were not run again" in out
    client = s3["client"]
    for summary in _summaries(client).values():
        attempts = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/s3sweep/{summary['id']}/attempts.jsonl")
        assert len(attempts["Body"].read().decode().splitlines()) == 1  # trained once, in the first run


def test_the_console_says_where_the_report_and_the_wandb_runs_went(s3):
    _, out = s3["first"]
    local = Path("results", "cloud", "s3", BUCKET, PREFIX, "s3sweep")
    assert f"W&B runs: {local / 'wandb'}" in out and "python -m flatray.tracking sync" in out
    assert (s3["tmp"] / local / "wandb").is_dir()
    assert f"(and {ROOT}/report)" in out
    assert f"{PREFIX}/s3sweep/report/README.md" in _keys(s3["client"])


def test_the_report_cli_reads_an_s3_sweep(s3):
    from flatray.report import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([ROOT, "--no-wandb"]) == 0
    assert f"(and to {ROOT}/report)" in out.getvalue()
    readme = s3["client"].get_object(Bucket=BUCKET, Key=f"{PREFIX}/s3sweep/report/README.md")["Body"].read().decode()
    assert ROOT in readme and "3 trials, 3 finished" in readme


def test_the_lock_on_s3_refuses_a_second_driver_and_takes_over_a_silent_one(s3):
    from flatray import storage
    from flatray.sweep.lock import LOCK_FILE, SweepLock, SweepLocked

    root = f"s3://{BUCKET}/{PREFIX}/locked"
    with SweepLock(root):
        with pytest.raises(SweepLocked, match="the sweep is already running"):
            SweepLock(root).acquire()
    assert storage.read_bytes(storage.join(root, LOCK_FILE)) is None  # released
    silent = {"host": "elsewhere", "pid": 1, "token": "old", "started": 0, "refreshed": 0}  # never refreshed since
    storage.write_json(storage.join(root, LOCK_FILE), silent)
    with SweepLock(root) as lock:
        assert storage.read_json(storage.join(root, LOCK_FILE))["token"] == lock.me["token"]
