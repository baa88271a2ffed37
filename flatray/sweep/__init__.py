"""A sweep: `python -m flatray.sweep SWEEP.yaml` runs a sweep file's graph of experiments as Ray Tune trials.

  graph      the experiment graph without Ray: loading and checking a sweep file, trial records, ids, parent feeding
  points     the points of one experiment for one parent trial (grid x Optuna / random draws)
  searcher   the Tune Searcher that releases a child trial the moment its own parent finishes
  scheduler  ASHA inside each searched group only
  trial      the Tune trainable: one Ray Train run, retried from its checkpoint; the trial's summary.json
  plan       trials, resources and concurrency known before running (--dry-run)
  status     progress lines and the results table
  tune       the Tuner that runs it all;  cli: the command line

Importing this package imports no Ray; the modules that need Ray import it themselves.
"""

from flatray.sweep.cli import main
from flatray.sweep.graph import make_record
from flatray.sweep.plan import max_concurrent, plan
from flatray.sweep.points import Points
from flatray.sweep.trial import summarize
from flatray.sweep.tune import run

__all__ = ["Points", "main", "make_record", "max_concurrent", "plan", "run", "summarize"]
