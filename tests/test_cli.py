"""The `flatray` entry point dispatches to the same main()s as the `python -m` forms."""

import subprocess
import sys
from pathlib import Path

import pytest

from flatray import cli

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command_with_an_example(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("sweep", "train", "report", "sync"):
        assert f"  {name}  " in out and f"flatray {name} " in out


def test_no_command_or_an_unknown_one_is_exit_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["swep"]) == 2
    assert "unknown command 'swep'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sweep", "train", "report", "sync"])
def test_each_command_reaches_its_own_parser(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_flatray_sweep_dry_run_from_the_installed_script():
    script = Path(sys.executable).with_name("flatray")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "flatray.cli"]
    out = subprocess.run([*cmd, "sweep", "sweeps/smoke.yaml", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trials planned" in out.stdout
