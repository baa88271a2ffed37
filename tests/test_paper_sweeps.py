"""Every sweep file of sweeps/paper/ (P1's tables and figures, P2) plans cleanly: `python -m flatray.sweep FILE
--dry-run` exits 0, names the sweep, lists every experiment, plans as many trials as the file's header says, and
starts no Ray and writes no folder. A file added to sweeps/paper/ is picked up on its own. The dry runs run in
this process (one import of torch and the CLI for all, ~0.1 s a file); one runs as the real command line."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flatray.sweep import cli

REPO = Path(__file__).resolve().parents[1]
PAPER = sorted((REPO / "sweeps" / "paper").glob("*.yaml"))


def test_the_paper_sweeps_are_there():
    names = {p.name for p in PAPER}
    for name in ("table1_imp.yaml", "table1_std.yaml", "table2_cofi.yaml", "table6_mask_optimizer.yaml",
                 "table7_cofi_grid.yaml", "table8_ptq.yaml", "figure4_transfer.yaml", "a12_other_models.yaml",
                 "squat_bits.yaml"):
        assert name in names, name
    readme = (REPO / "sweeps" / "paper" / "README.md").read_text()
    for path in PAPER:  # the README maps every file to its P1 table or figure
        assert f"`{path.name}`" in readme, f"sweeps/paper/README.md does not mention {path.name}"


def check_plan(path: Path, out: str) -> None:
    sweep = yaml.safe_load(path.read_text())
    planned = re.search(rf"^sweep {re.escape(sweep['name'])}: (\d+) trials planned", out, re.M)
    assert planned, out
    graph = out.split("experiment graph", 1)[1]
    for experiment in sweep["experiments"]:
        assert re.search(rf"^\s+{re.escape(experiment)} \[", graph, re.M), f"{experiment} not in the plan:\n{out}"
    assert re.search(r"^at most \d+ trial\(s\) at once", out, re.M), out
    stated = re.search(r"^#\s+total (\d+) trials", path.read_text(), re.M)  # the header's count, where it has one
    if stated:
        assert int(planned.group(1)) == int(stated.group(1)), f"{path.name}: header says {stated.group(1)}"


@pytest.mark.parametrize("path", PAPER, ids=[p.name for p in PAPER])
def test_dry_run(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the files' relative storage (results/paper) resolves here
    assert cli.main([str(path), "--dry-run"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    check_plan(path, out)
    assert not (tmp_path / "results").exists()  # a dry run creates no folder
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized()


def test_the_command_line(tmp_path):
    path = REPO / "sweeps" / "paper" / "table1_std.yaml"
    done = subprocess.run([sys.executable, "-m", "flatray.sweep", str(path), "--dry-run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    check_plan(path, done.stdout)
