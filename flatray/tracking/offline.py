"""Offline runs after the sweep: read them back from their .wandb files, and upload them parents first.

`wandb sync` of a whole folder syncs several runs at once in no set order; a child synced before its parent would
create the parent's artifact version itself, without the parent as its producer (see flatray.tracking.runs), so
`sync` uploads one run at a time in start order.
"""

from __future__ import annotations

import json
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
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
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


def read_offline_runs(wandb_dir: str) -> list[dict]:
    """Every offline run under wandb_dir (the folder holding offline-run-*, or its parent), from its .wandb file:
    id, name, group, job_type, config, logged_artifacts and used_artifacts ({name, type, digest}), history (rows
    with _step), summary (without W&B's own _keys), exit_code (None if never finished), start_time, path."""
    base = Path(wandb_dir)
    files = sorted(base.glob("offline-run-*/*.wandb")) + sorted(base.glob("wandb/offline-run-*/*.wandb"))
    runs = []
    for file in files:
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
        runs.append(run)
    return runs


def sync_order(wandb_dir: str) -> list[str]:
    """The offline run folders in start order: a child starts after its parent ended, so parents come first."""
    return [run["path"] for run in sorted(read_offline_runs(wandb_dir), key=lambda run: run["start_time"])]


def sync(wandb_dir: str, *args: str) -> None:
    """`wandb sync` the offline runs one at a time, parents first (extra args go to `wandb sync`, e.g. -e ENTITY).
    Note: -e/-p move the runs only; their artifacts stay where they were logged (entity/project of the sweep file)."""
    for path in sync_order(wandb_dir):
        subprocess.run([sys.executable, "-m", "wandb", "sync", *args, path], check=False)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flatray.tracking",
                                     description="Upload a sweep's offline W&B runs, parents before children "
                                                 "(so W&B's lineage graph links them).")
    parser.add_argument("command", choices=["sync"])
    parser.add_argument("wandb_dir", help="<storage>/<sweep>/wandb")
    parser.add_argument("wandb_args", nargs=argparse.REMAINDER, help="passed on to `wandb sync`, e.g. -e ENTITY")
    args = parser.parse_args(argv)
    sync(args.wandb_dir, *args.wandb_args)
    return 0
