"""Figures and tables of a sweep: `python -m flatray.report STORAGE/SWEEP [--no-wandb]`.

Reads every trial of a sweep folder (`<root>/<id>/trial.json` + `summary.json`, docs/SWEEPS.md) into one pandas
DataFrame (`load_trials`), then builds the figures and tables of the papers from it, each with a groupby. Which
sections there are is the method registry's word: each method in flatray.methods names the sections that show its
trials (`Method.report`), and they are built in registry order:

- the search of each searched root experiment: score against each searched numeric key
- IMP: metric vs sparsity per task, one line per optimizer x mask method (P1 Figure 2 / Table 1)
- ticket transfer within a task: mask source x re-training optimizer (P1 Table 6)
- ticket transfer across tasks: SAM ticket - Adam ticket, source x target heatmap (P1 Figure 4)
- post-training int8 quantization (P1 Table 8)
- CoFi structured pruning per teacher optimizer (P1 Table 2)
- SQuAT and its baselines by weight bits (P2)
- epsilon-sharpness by eps and optimizer (P1 Table 3)
- against P1: P1's published values (p1.yaml) beside every matching flatray cell and the difference (last)

Everything goes to `<root>/report/`: PNG figures, a CSV (numbers: mean, std, n) and a Markdown table (for people:
"mean ± std (n)", "—" where a cell has no finished trial) per table, and README.md, which embeds them all and lists
what is missing. Statistics are over the trials of a cell (normally the seeds): the mean and the sample standard
deviation (ddof=1, as the papers report; undefined for one trial). Values are in the units the runs report (the
task's main dev metric as a fraction, e.g. 0.84 accuracy). Only trials with status `done` are used; the others
(stopped, failed, unfinished, unreadable) are listed as missing. A partial sweep gives a partial report. A
hyperparameter search inside a dependent experiment (several trials of one experiment from one parent, differing
only in searched values) counts once, by its best dev score, before the statistics over seeds.

With W&B settings (the sweep file's `wandb` section), the same figures and tables are logged to one W&B run
(group = sweep name, job_type report, id `<sweep>-report`); a W&B failure is a warning.

Modules: load (trial folders -> DataFrame), tables (statistics, Markdown), figures (matplotlib), the sections
(pruning, quantization, flatness), p1 (P1's numbers) and wandb_log; this one writes the report and is the CLI.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from flatray import methods, storage
from flatray.report.load import SUMMARY_COLUMNS, ReportWarning, _warn, load_trials, resolve
from flatray.report.quantization import SQUAT_TEACHER  # the label of squat_bits' teacher rows
from flatray.report.tables import DASH, Section, _markdown
from flatray.report.wandb_log import log_to_wandb, wandb_mode

__all__ = ["DASH", "SQUAT_TEACHER", "ReportWarning", "Section", "load_trials", "log_to_wandb", "main", "report",
           "section_refs", "wandb_mode"]


# After the methods' sections: P1's published numbers beside every matching cell (any method's), when the sweep
# fine-tuned P1's model.
P1_SECTION = "flatray.report.p1:against_p1"


def section_refs() -> list[str]:
    """The "module:function(df, out)" report sections of every registered method, in registry order, each once."""
    return list(dict.fromkeys(ref for method in methods.entries() for ref in method.report))


def _status_table(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return pd.DataFrame(columns=["experiment", "kind", "done", "missing"])
    counts = df.groupby(["experiment", "kind", "status"]).size().unstack("status", fill_value=0)
    statuses = ["done", "stopped", "failed", "running", "corrupt"]
    statuses += sorted(set(counts.columns) - set(statuses))
    return counts.reindex(columns=statuses, fill_value=0).reset_index()


def _sweep_file(root: Path) -> dict:
    """<root>/sweep.yaml, the sweep file as run (raises when it is missing or unreadable)."""
    return yaml.safe_load((root / "sweep.yaml").read_text()) or {}


def _sweep_name(root: Path, df: pd.DataFrame) -> str:
    names = list(df["sweep"].dropna().unique()) if "sweep" in df else []
    if not names:
        try:
            names = [_sweep_file(root)["name"]]
        except Exception:
            names = [root.resolve().name]
    return str(names[0])


def _write_readme(out: Path, root: str, sweep: str, df: pd.DataFrame, sections: list[Section]) -> None:
    status = _status_table(df)
    n_done = int((df["status"] == "done").sum()) if not df.empty else 0
    lines = [f"# Report: sweep `{sweep}`", "",
             f"{root} — {len(df)} trials, {n_done} finished, {len(df) - n_done} missing "
             f"(generated {datetime.now():%Y-%m-%d %H:%M}).", "",
             "Cells: mean ± sample std (ddof=1) over the trials of the cell (the seeds), and their number (n); "
             f"{DASH} = no finished trial. Metrics as the runs report them (the task's main dev metric). "
             "CSV files hold the same numbers at full precision.", "", "## Trials", "",
             _markdown(status) if not status.empty else "No trials found.", "",
             "running = no summary.json yet (unfinished or interrupted); corrupt = an unreadable summary.json.", ""]
    for number, sec in enumerate(sections, 1):  # numbered in the registry's order of methods
        lines += [f"## {number}. {sec.title}", "", sec.about, ""]
        lines += [f"![{name}]({name})\n" for name in sec.figures]
        for name, md in sec.markdown.items():
            lines += [md, "", f"Numbers: [{name}.csv]({name}.csv)", ""]
        if not sec.figures and not sec.markdown:
            lines += ["Nothing to show yet.", ""]
    missing = [m for sec in sections for m in sec.missing]
    not_done = df[df["status"] != "done"] if not df.empty else df
    lines += ["## Missing", ""]
    stopped = not_done[not_done["status"] == "stopped"] if not not_done.empty else not_done
    for experiment, n in (stopped.groupby("experiment").size().items() if not stopped.empty else []):
        lines.append(f"- {experiment}: {n} trial(s) stopped early by the scheduler (ASHA; expected in a search)")
    lines += [f"- trial {r.id} ({r.experiment}, {r.kind}, task {r.task}): {r.status}"
              for r in not_done[not_done["status"] != "stopped"].sort_values(["experiment", "id"]).itertuples()]
    lines += [f"- {m}" for m in missing]
    if not missing and not_done.empty:
        lines.append("Nothing: every trial finished and every cell has data.")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def report(root: str | Path, wandb_settings: Any = None) -> Path:
    """Write the figures and tables of the sweep folder `root` to `<root>/report/` and return that folder.
    `wandb_settings`: the sweep file's `wandb` section (a dict or flatray.config.sweep.WandbSettings) to log them to
    W&B too; None or mode disabled: no W&B."""
    cloud = str(root) if "://" in str(root) else None
    root = _download(cloud) if cloud else Path(root)
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.png"), *out.glob("*.csv"), *out.glob("*.md")]:
        old.unlink()  # a report is rebuilt whole: no figure of an earlier report survives its data
    df = load_trials(root)
    if "sweep" not in df:
        df["sweep"] = None
    sweep = _sweep_name(root, df)
    sections: list[Section] = []
    built = set()  # two references to one function (e.g. through a re-export) build it once
    for ref in [*section_refs(), P1_SECTION]:
        name = ref.rpartition(":")[2]
        try:
            build = resolve(ref)
            if build in built:
                continue
            built.add(build)
            result = build(df, out)
        except Exception as err:  # one broken figure (or a plugin's bad reference) must not cost the rest
            _warn(f"report: {name} failed ({type(err).__name__}: {err}); left out")
            result = Section(name, missing=[f"{name} could not be built: {err}"])
        sections += result if isinstance(result, list) else [result]
    tables = {"trials": df[[c for c in SUMMARY_COLUMNS if c in df]]}
    for sec in sections:
        tables.update(sec.tables)
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    for sec in sections:
        for name, md in sec.markdown.items():
            (out / f"{name}.md").write_text(f"# {sec.title}\n\n{md}\n")
    _write_readme(out, cloud or str(root.resolve()), sweep, df, sections)
    figures = [name for sec in sections for name in sec.figures]
    log_to_wandb(root, sweep, out, figures, tables, wandb_settings)
    if cloud:  # the report lives with the sweep: <root>/report/ in the bucket too
        for file in sorted(out.iterdir()):
            storage.write_bytes(storage.join(cloud, "report", file.name), file.read_bytes())
    return out


def _download(root: str) -> Path:
    """What the report reads of a cloud sweep folder (sweep.yaml, every trial.json and summary.json; no
    checkpoints) copied to its local side (flatray.storage.local_dir), which is returned."""
    local = storage.local_dir(root)
    names = ["sweep.yaml"] + [f"{tid}/{name}" for tid in storage.list_dirs(root)
                              for name in ("trial.json", "summary.json")]
    for name in names:
        data = storage.read_bytes(storage.join(root, name))
        if data is not None:
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_bytes(data)
    return local


# ------------------------------------------------------------------------------------------------ CLI


def _sweep_wandb(root: str) -> dict:
    """The sweep file's wandb section (<root>/sweep.yaml, as run), or the defaults."""
    try:
        text = storage.read_text(storage.join(root, "sweep.yaml"))
        if text is None:
            raise FileNotFoundError(root)
        return dict((yaml.safe_load(text) or {}).get("wandb") or {})
    except FileNotFoundError:
        return {}
    except Exception as err:
        _warn(f"{storage.join(root, 'sweep.yaml')}: unreadable ({err}); W&B with the default settings")
        return {}


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flatray.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the sweep folder, STORAGE/SWEEP (holds <id>/trial.json, <id>/summary.json)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    args = parser.parse_args(argv)
    cloud = "://" in args.root
    if cloud and storage.read_bytes(storage.join(args.root, "sweep.yaml")) is None:
        print(f"error: {args.root}: no sweep.yaml there (expected STORAGE/SWEEP, e.g. s3://bucket/sweeps/smoke)",
              file=sys.stderr)
        return 2
    if not cloud and not Path(args.root).is_dir():
        print(f"error: {args.root}: no such folder (expected STORAGE/SWEEP, e.g. results/sweeps/smoke)",
              file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        out = report(args.root, None if args.no_wandb else _sweep_wandb(args.root))
    print(f"report written to {out / 'README.md'}"
          + (f" (and to {storage.join(args.root, 'report')})" if cloud else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
