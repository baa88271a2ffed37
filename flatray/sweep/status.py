"""What a sweep prints: a status line per experiment while it runs, and the results table at the end."""

from __future__ import annotations

import collections
import os
import time
from typing import TYPE_CHECKING

from ray.tune import Callback

if TYPE_CHECKING:
    from flatray.sweep.searcher import SweepSearcher

STATUS_EVERY_S = 30


class Status(Callback):
    """A line per experiment every STATUS_EVERY_S seconds and when a trial ends: running / pending (released or
    still to be drawn) / done / stopped / failed."""

    def __init__(self, searcher: SweepSearcher, every_s: float = STATUS_EVERY_S):
        self.searcher, self.every_s, self.last = searcher, every_s, 0.0

    def _print(self) -> None:
        counts = collections.defaultdict(collections.Counter)
        for record, _, _ in self.searcher.running.values():
            counts[record["experiment"]]["running"] += 1
        for record, _, _ in self.searcher.ready:
            counts[record["experiment"]]["pending"] += 1
        for search in self.searcher.searches:
            counts[search.experiment]["pending"] += len(search.todo)
        for record, summary in self.searcher.outcomes.values():
            counts[record["experiment"]][summary["status"]] += 1
        parts = []
        for name in self.searcher.order:
            c = counts[name]
            shown = " ".join(f"{k} {c[k]}" for k in ("running", "pending", "done", "stopped", "failed") if c[k])
            parts.append(f"{name}: {shown or '-'}")
        print(f"[flatray] {time.strftime('%H:%M:%S')}  " + " | ".join(parts), flush=True)
        self.last = time.time()

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.last > self.every_s:
            self._print()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._print()

    def on_trial_error(self, iteration, trials, trial, **info):
        if trial.error_file and os.path.exists(trial.error_file):  # Tune's text of the error (its own local file)
            with open(trial.error_file) as f:
                self.searcher.explain_failure(trial.trial_id, f.read().rsplit("Failure # ", 1)[-1].split("\n", 1)[-1])
        self._print()


def results_table(outcomes: dict[str, tuple[dict, dict]], order: list[str] = ()) -> str:
    """One line per trial, in the graph's order: experiment, id, searched values, status, score and what the kind
    measures."""
    rank = {name: i for i, name in enumerate(order)}
    rows = [("experiment", "trial", "point", "status", "score", "details")]
    for record, summary in sorted(outcomes.values(), key=lambda o: (rank.get(o[0].get("experiment"), len(rank)),
                                                                    o[0].get("experiment", ""), o[0].get("level") or 0)):
        m = summary.get("metrics", {})
        details = []
        if record.get("level"):
            details.append(f"level {record['level']}")
        for key, fmt in (("sparsity", "sparsity {:.2f}"), ("size_ratio", "size x{:.2f}"), ("speedup", "speedup x{:.2f}"),
                         ("float/score", "float {:.4f}"), ("params", "params {:,.0f}"), ("export_bytes", "{:,.0f} bytes")):
            if isinstance(m.get(key), (int, float)) and (key != "sparsity" or m[key]):
                details.append(fmt.format(m[key]))
        details += [f"{k.split('/')[1]} {v:.4g}" for k, v in m.items() if k.startswith("sharpness/")]
        if summary.get("status") == "failed" and summary.get("error"):
            details.append(str(summary["error"]).splitlines()[0][:120])
        point = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in record.get("point", {}).items())
        score = f"{m['score']:.4f}" if isinstance(m.get("score"), (int, float)) else "-"
        rows.append((record.get("experiment", "?"), record.get("id") or "-", point or "-", summary.get("status", "?"),
                     score, "; ".join(details)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = [(r, s) for r, s in outcomes.values() if s.get("status") == "failed"]
    if failed:  # the whole first line of each error, and where its worker's log is
        lines += ["", "failures:"]
        for record, summary in failed:
            lines.append(f"  {record.get('experiment', '?')} {record.get('id') or '-'}: "
                         f"{str(summary.get('error') or '?').splitlines()[0]}")
            if summary.get("log"):
                lines.append(f"    worker log: {summary['log']}")
    return "\n".join(lines)
