"""The report's figures and tables logged to one W&B run (group = sweep name, job_type report, id `<sweep>-report`);
a W&B failure is a warning."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from flatray.report.load import _warn


def _settings(settings: Any):
    """The sweep file's wandb section as flatray.config.sweep.WandbSettings (from a dict, or as it is)."""
    from flatray.config.sweep import WandbSettings  # imported here: flatray.config pulls in torch

    if isinstance(settings, WandbSettings):
        return settings
    data = settings if isinstance(settings, dict) else (
        settings.model_dump() if hasattr(settings, "model_dump") else dict(vars(settings)))
    # None stands for "the default" in a hand-written dict; keys WandbSettings does not know were always ignored here.
    return WandbSettings(**{k: v for k, v in data.items() if k in WandbSettings.model_fields and v is not None})


def wandb_mode(settings: Any) -> str | None:
    """online/offline, or None when W&B is off: no settings, WANDB_DISABLED set, or disabled by the sweep's own rule
    (flatray.tracking.wandb_mode: WANDB_MODE wins, then the settings' mode; auto = online with a WANDB_API_KEY and
    W&B reachable, else offline)."""
    if settings is None or os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return None
    from flatray.tracking import wandb_mode as sweep_mode  # imported here: flatray.tracking pulls in Ray

    mode = sweep_mode(_settings(settings))
    return None if mode == "disabled" else mode


def log_to_wandb(root: Path, sweep: str, out: Path, figures: list[str], tables: dict[str, pd.DataFrame],
                 settings: Any) -> None:
    """The figures (wandb.Image) and tables (wandb.Table) in one run: group <sweep>, job_type report, id
    <sweep>-report (resumed on a re-run: `flatray.tracking sync` uploads a report's offline runs as one resumed run).
    Run files under <root>/wandb/ (offline: <root>/wandb/offline-run-*); offline when W&B does not answer."""
    try:  # inside: settings W&B cannot use (a bad mode) cost a warning, not the report
        if wandb_mode(settings) is None:
            return
        from flatray.tracking import runs
        from flatray.tracking.runs import base_url, offline_notice, run_mode

        s = _settings(settings)
        import wandb

        (root / "wandb").mkdir(parents=True, exist_ok=True)
        mode = run_mode(s, str(root / "wandb"))  # offline, said once, when W&B does not answer
        init = dict(project=s.project or "flatray", entity=s.entity, group=sweep, job_type="report",
                    id=f"{sweep}-report", name=f"{sweep}-report", resume="allow", dir=str(root), reinit="create_new",
                    config={"root": str(root.resolve())},
                    # bounded waits; stats off: nothing to measure, and no probe of cloud metadata addresses
                    settings=wandb.Settings(init_timeout=runs.INIT_TIMEOUT_S, finish_timeout=runs.FINISH_TIMEOUT_S,
                                            silent=True, x_disable_stats=True))
        try:
            run = wandb.init(mode=mode, **init)
        except Exception as err:
            if mode != "online":
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            offline_notice(base_url(), str(root / "wandb"), f"{type(err).__name__}: {first}")
            wandb.teardown()  # the failed run keeps its id taken until W&B's service restarts
            run = wandb.init(mode="offline", **init)
        try:
            data: dict[str, Any] = {f"report/{Path(f).stem}": wandb.Image(str(out / f)) for f in figures}
            for name, table in tables.items():
                data[f"tables/{name}"] = wandb.Table(dataframe=_wandb_frame(table))
            run.log(data)
        finally:
            run.finish()
    except Exception as err:
        _warn(f"W&B logging of the report failed ({type(err).__name__}: {err}); the files in {out} are complete")


def _wandb_frame(table: pd.DataFrame) -> pd.DataFrame:
    """W&B tables want plain column names and cells: stringify anything that is not a number or text."""
    frame = table.copy()
    frame.columns = [str(c) for c in frame.columns]
    for col in frame.columns:
        if frame[col].dtype == object:
            frame[col] = frame[col].map(lambda v: v if isinstance(v, (str, int, float)) or v is None else str(v))
    return frame
