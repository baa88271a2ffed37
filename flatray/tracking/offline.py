"""Offline runs after the sweep: read them back from their .wandb files, and upload them parents first.

`wandb sync` of a whole folder syncs several runs at once in no set order; a child synced before its parent would
create the parent's artifact version itself, without the parent as its producer (see flatray.tracking.runs), so
`sync` uploads one run at a time in start order. A sweep killed mid-run leaves offline runs that W&B never
finished: `sync` uploads those with a run record as they are (with the resumed run of the same id right after), and
skips, naming each, those it holds nothing of (only the file header).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path


def _records(path: Path):
    """The records of a .wandb transaction log: a 7-byte header (":W&B", 0xBEE1, version 0), then LevelDB-log
    chunks in 32 KiB blocks (crc32 over type + data, length, type full/first/middle/last)."""
    # Parsed here: wandb has no public reader (only wandb-core, in Go, reads these; wandb.Api reads the server).
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if len(data) < 7 or data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, chunk_type = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if chunk_type == 0 or zlib.crc32(chunk, zlib.crc32(bytes([chunk_type]))) != crc:
            return  # zero padding or a torn write at the end: what came before is complete
        pos += 7 + length
        pending += chunk
        if chunk_type in (1, 4):  # full or last chunk of a record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _set(tree: dict, item) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = json.loads(item.value_json)


def _read_run(file: Path) -> dict:
    """One offline run from its .wandb file; without a run record (a process killed as W&B began it), no "id"."""
    run = {"path": str(file.parent), "config": {}, "summary": {}, "history": [], "logged_artifacts": [],
           "used_artifacts": [], "exit_code": None}
    for record in _records(file):
        entry = record.WhichOneof("record_type")
        if entry == "run":
            r = record.run
            run.update(id=r.run_id, name=r.display_name, group=r.run_group, job_type=r.job_type,
                       entity=r.entity, project=r.project, start_time=r.start_time.ToDatetime())
            for item in r.config.update:
                _set(run["config"], item)
        elif entry in ("config", "summary"):
            for item in getattr(record, entry).update:
                _set(run[entry], item)
        elif entry == "history":
            row = {}
            for item in record.history.item:
                _set(row, item)
            run["history"].append(row)
        elif entry == "artifact":
            a = record.artifact
            used = a.user_created and a.use_after_commit  # an input (flatray.tracking.runs.declare_input)
            run["used_artifacts" if used else "logged_artifacts"].append(
                {"name": a.name, "type": a.type, "digest": a.digest})
        elif entry == "use_artifact":
            run["used_artifacts"].append({"name": record.use_artifact.name, "type": record.use_artifact.type,
                                          "digest": None})
        elif entry == "exit":
            run["exit_code"] = record.exit.exit_code
    run["config"].pop("_wandb", None)
    run["summary"] = {k: v for k, v in run["summary"].items() if not k.startswith("_")}
    return run


def _run_folders(wandb_dir: str) -> list[Path]:
    base = Path(wandb_dir)
    return sorted(base.glob("offline-run-*")) + sorted(base.glob("wandb/offline-run-*"))


def read_offline_runs(wandb_dir: str) -> list[dict]:
    """Every offline run under wandb_dir (the folder holding offline-run-*, or its parent), from its .wandb file:
    id, name, group, job_type, config, logged_artifacts and used_artifacts ({name, type, digest}), history (rows
    with _step), summary (without W&B's own _keys), exit_code (None if never finished), start_time, path.
    Runs whose process was killed before W&B wrote the run itself are left out (see sync_plan)."""
    runs = []
    for folder in _run_folders(wandb_dir):
        for file in sorted(folder.glob("*.wandb")):
            try:
                run = _read_run(file)
            except ValueError:
                continue
            if "id" in run:
                runs.append(run)
    return runs


def sync_plan(wandb_dir: str, include_synced: bool = False) -> tuple[list[list[dict]], list[tuple[str, str]]]:
    """What `sync` uploads and what it skips. Uploads: one list per W&B run id, the lists in start order (parents
    first), each holding the offline runs of that id in start order (a trial stopped with its sweep and resumed
    when the sweep ran again has two: W&B uploads them as one resumed run). Skipped: (folder, why)."""
    by_id: dict[str, list[dict]] = {}
    skipped = []
    for folder in _run_folders(wandb_dir):
        files = sorted(folder.glob("*.wandb"))
        if not files:
            skipped.append((str(folder), "no .wandb file: its process was killed before W&B wrote one"))
            continue
        try:
            run = _read_run(files[0])
        except ValueError as err:
            skipped.append((str(folder), f"unreadable ({err})"))
            continue
        if "id" not in run:
            skipped.append((str(folder), "header only: its process was killed before W&B wrote the run; "
                                         "nothing to upload"))
        elif files[0].with_suffix(".wandb.synced").exists() and not include_synced:
            skipped.append((str(folder), f"already synced (run {run['id']})"))
        else:
            by_id.setdefault(run["id"], []).append(run)
    groups = [sorted(runs, key=lambda run: run["start_time"]) for runs in by_id.values()]
    return sorted(groups, key=lambda runs: runs[0]["start_time"]), skipped


def sync_order(wandb_dir: str) -> list[str]:
    """The offline run folders to upload in start order: a child starts after its parent ended, so parents first."""
    return [run["path"] for runs in sync_plan(wandb_dir)[0] for run in runs]


def sync(wandb_dir: str, *args: str, dry_run: bool = False, timeout_s: float = 1800) -> int:
    """`wandb sync` the offline runs one W&B run at a time, parents first (extra args go to `wandb sync`, e.g.
    -e ENTITY); says what it skips and why. Returns 0 when everything was uploaded (or, dry_run, listed), else 1:
    W&B unreachable (checked first: `wandb sync` would retry for ever) or an upload that failed or took over
    timeout_s. The offline files stay where they are either way, so running it again picks up what is left.
    Note: -e/-p move the runs only; their artifacts stay where they were logged (entity/project of the sweep file)."""
    from flatray.tracking.runs import base_url, reachable

    groups, skipped = sync_plan(wandb_dir, include_synced="--include-synced" in args)
    for folder, why in skipped:
        print(f"skip {folder}: {why}")
    if dry_run:
        for runs in groups:
            for run in runs:
                unfinished = "  (unfinished: its process was killed; uploaded as far as it got)" \
                    if run["exit_code"] is None else ""
                print(f"would upload {run['id']} ({run['name']}): {run['path']}{unfinished}")
        print(f"{sum(map(len, groups))} offline run(s) of {len(groups)} W&B run(s) to upload, {len(skipped)} skipped")
        return 0
    if not groups:
        print(f"nothing to upload in {wandb_dir}")
        return 0
    url = base_url()
    if not reachable(url):
        print(f"error: W&B unreachable at {url}: nothing uploaded; the offline runs stay in {wandb_dir}; run this "
              f"again once it answers", file=sys.stderr)
        return 1
    failed = []
    for runs in groups:
        paths = [run["path"] for run in runs]
        # Its own session: on a timeout, wandb sync and the wandb-core it started go together.
        proc = subprocess.Popen([sys.executable, "-m", "wandb", "sync", *args, *paths], start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = f"no answer within {timeout_s:g} s"
        if code != 0:
            failed.append(runs[0]["id"])
            print(f"error: upload of {runs[0]['id']} failed ({code if isinstance(code, str) else f'exit code {code}'})",
                  file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {len(groups)} W&B run(s) not uploaded: {', '.join(failed)}; their offline "
              f"runs stay in {wandb_dir}; run this again", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flatray.tracking",
                                     description="Upload a sweep's offline W&B runs, parents before children "
                                                 "(so W&B's lineage graph links them).",
                                     epilog="other options (after WANDB_DIR) go to `wandb sync`, e.g. -e ENTITY")
    parser.add_argument("command", choices=["sync"])
    parser.add_argument("wandb_dir", help="<storage>/<sweep>/wandb")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be uploaded, in order, and what is skipped and why; upload nothing")
    parser.add_argument("--timeout", type=float, default=1800, metavar="S",
                        help="give up on a W&B run's upload after S seconds (default 1800)")
    args, wandb_args = parser.parse_known_args(argv)
    if not Path(args.wandb_dir).is_dir():
        print(f"error: {args.wandb_dir}: no such folder (expected <storage>/<sweep>/wandb)", file=sys.stderr)
        return 2
    return sync(args.wandb_dir, *wandb_args, dry_run=args.dry_run, timeout_s=args.timeout)
