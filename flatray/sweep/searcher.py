"""The Tune `Searcher` that walks a sweep's experiment graph: `suggest` hands out ready trials (a finished parent's
children first), `on_trial_complete` records the outcome and releases the finished trial's children, so an IMP
chain, a transfer or a PTQ run never waits for unrelated trials; a feed: group child waits for its own group only.
Finished trials (a `summary.json` with status done or stopped) are not run again; their children are released all
the same."""

from __future__ import annotations

import collections
import json
import logging
import math
import time

from ray.tune.search import Searcher

from flatray import storage
from flatray.config import ConfigError
from flatray.config.errors import flatten
from flatray.config.sweep import SearchSettings, SweepFile
from flatray.provenance import differences, provenance
from flatray.sweep.graph import make_record, order
from flatray.sweep.points import Points

log = logging.getLogger("flatray.sweep")
DIED = "the trial's process died"


class SweepSearcher(Searcher):
    """Walks the experiment graph for Tune: `suggest` hands out ready trials (children first), `on_trial_complete`
    records the outcome and releases the finished trial's children."""

    def __init__(self, sweep: SweepFile, root: str, rerun_other_versions: bool = False):
        super().__init__(metric="score", mode="max")
        self.sweep, self.root = sweep, root
        self.rerun_other_versions = rerun_other_versions
        self.other_versions: list[tuple[dict, list[str]]] = []  # finished trials made by another version, kept
        self.order = order(sweep.experiments)
        self.children = collections.defaultdict(list)
        for name in self.order:
            if sweep.experiments[name].parent:
                self.children[sweep.experiments[name].parent].append(name)
        self.searches: list[Points] = [Points.create(sweep, n, None) for n in self.order
                                       if not sweep.experiments[n].parent]
        self.ready: collections.deque = collections.deque()  # (record, its Points, tell handle)
        self.running: dict[str, tuple] = {}  # Tune trial id -> (record, its Points, tell handle)
        self.outcomes: dict[str, tuple[dict, dict]] = {}  # trial id -> (record, summary)
        self.fed_all: set[str] = set()  # feed: best/group experiments whose parent experiment has fed them all
        self.fed_groups: set[tuple[str, tuple]] = set()  # (feed: group experiment, group) already started
        self.todo_groups: dict[tuple[str, str], tuple | None] = {}  # (search, point) -> the group its trial falls in
        self.stopped: set[str] = set()  # Tune trial ids the scheduler stopped early (SweepScheduler adds them)
        self.skipped = 0  # finished in an earlier run of the sweep
        self.tune_ids: dict[str, str] = {}  # Tune trial id -> flatray trial id

    # Tune checkpoints searchers; the sweep resumes from its trial folders instead.
    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass

    def suggest(self, trial_id: str):
        while True:
            item = self._next()
            if item is None:
                return self.FINISHED if self._complete_all() else None
            record = item[0]
            summary = self._read(record, "summary.json", "the trial runs again (it continues from its checkpoint)")
            if summary and summary.get("status") in ("done", "stopped") and self._keep(record, summary):
                self.skipped += 1  # finished before: not run again, but its children are released
                if self._read(record, "trial.json", "rewritten from the sweep file") is None:
                    self._write(storage.join(record["dir"], "trial.json"), record)
                self._finish(item, summary)
                continue
            self.running[trial_id] = item
            self.tune_ids[trial_id] = record["id"]
            return {"flatray": record, "retries": self.sweep.experiments[record["experiment"]].retries}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        item = self.running.pop(trial_id, None)
        if item is None:
            return
        record = item[0]
        path = storage.join(record["dir"], "summary.json")
        summary = storage.read_json(path)
        if summary is None:
            if not error and trial_id not in self.stopped:
                return  # interrupted (Ctrl-C): no summary, so a resumed sweep continues it from its checkpoint
            summary = {"id": record["id"], "experiment": record["experiment"], "kind": record["kind"],
                       "status": "failed" if error else "stopped",
                       "metrics": {k: v for k, v in (result or {}).items() if isinstance(v, (int, float))},
                       "history": [], "checkpoint": None, "outputs": {}, "ended": time.time(),
                       "error": DIED if error else None}
            self._write(path, summary)
        self._finish(item, summary)

    def _keep(self, record: dict, summary: dict) -> bool:
        """Whether a finished trial is kept: always, unless it was made by another version and those run again
        (its summary is kept beside, as summary.superseded-<time>.json, and its Ray Train run starts afresh)."""
        changed = differences(summary.get("provenance"), provenance())
        if not changed:
            return True
        if not self.rerun_other_versions:
            self.other_versions.append((record, changed))
            return True
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(summary.get("ended") or time.time()))
        self._write(storage.join(record["dir"], f"summary.superseded-{stamp}.json"), summary)
        storage.delete(storage.join(record["dir"], "summary.json"))
        storage.delete_dir(storage.join(record["dir"], record["config"]["output"]["name"]))
        log.warning("trial %s (%s) was made by another version (%s): running it again", record["id"],
                    record["experiment"], "; ".join(changed))
        return False

    def explain_failure(self, trial_id: str, error_text: str) -> None:
        """The error Tune caught for a failed trial whose summary says no more than DIED (its process was killed,
        or its storage was full): the root cause goes to the results table and, if it can be written, summary.json."""
        from flatray.sweep.trial import root_cause, worker_log

        outcome = self.outcomes.get(self.tune_ids.get(trial_id, ""))
        if outcome and outcome[1].get("error") == DIED and error_text.strip():
            outcome[1]["error"] = f"{root_cause(error_text)}\n{error_text}"[:4000]
            outcome[1]["log"] = worker_log(error_text)
            self._write(storage.join(outcome[0]["dir"], "summary.json"), outcome[1])

    def _read(self, record: dict, name: str, then: str) -> dict | None:
        """A trial file, or None when it is missing; a corrupt one (a torn write) is reported and counts as missing."""
        path = storage.join(record["dir"], name)
        text = storage.read_text(path)
        try:
            return None if text is None else json.loads(text)
        except json.JSONDecodeError as err:
            print(f"[flatray] warning: {path} is corrupt ({err.msg} at character {err.pos} of {len(text)}): {then}",
                  flush=True)
            return None

    def _write(self, path: str, obj: dict) -> None:
        """A file of the driver's own; a storage fault loses only that file, never the sweep."""
        try:
            storage.write_json(path, obj)
        except storage.StorageError as err:
            log.warning("%s", err)

    # ---------------------------------------------------------------------------------------------------------

    def _next(self):
        """A ready dependent trial first (a parent's children start as soon as it ends), else a new point."""
        if self.ready:
            return self.ready.popleft()
        for search in self.searches:
            while (drawn := search.draw()) is not None:
                point, handle = drawn
                level = 1 if self.sweep.experiments[search.experiment].method.chained else None
                item = self._item(search.experiment, point, search.parent, level, search, handle)
                if item is not None:
                    return item
        self.searches = [s for s in self.searches if s.todo]  # exhausted: their trials hold them until told
        return None

    def _record(self, name, point, parent, level) -> dict:
        """make_record for a point of a search; a group feeds it as one parent: {"id", "members": their records}."""
        if parent and "members" in parent:
            return make_record(self.sweep, self.root, name, point, level=level,
                               group=[self.outcomes[r["id"]] for r in parent["members"]])
        parent_summary = self.outcomes[parent["id"]][1] if parent else None
        return make_record(self.sweep, self.root, name, point, parent, parent_summary, level)

    def _item(self, name, point, parent, level, search: Points, handle):
        try:
            record = self._record(name, point, parent, level)
        except ConfigError as err:  # e.g. the parent left no mask to transfer: this trial fails, the sweep goes on
            log.warning("experiment %s: cannot start a trial: %s", name, err)
            failed = {"id": None, "experiment": name, "status": "failed", "metrics": {}, "error": str(err)}
            search.tell(handle, None)
            self.outcomes[f"invalid-{len(self.outcomes)}"] = ({"experiment": name, "point": point}, failed)
            return None
        return record, search, handle

    def _finish(self, item, summary: dict) -> None:
        record, search, handle = item
        self.outcomes[record["id"]] = (record, summary)
        done = summary.get("status") == "done"
        search.tell(handle, summary.get("metrics", {}).get("score") if done else None)
        if not done:
            return
        exp = self.sweep.experiments[record["experiment"]]
        if exp.method.chained and record["level"] < exp.levels:  # the next level of this chain
            nxt = self._item(record["experiment"], {}, record, record["level"] + 1, search, None)
            if nxt:
                self.ready.appendleft(nxt)
        # First in line, in the file's order: a dependent trial starts before any new root point is drawn.
        self.searches[0:0] = [Points.create(self.sweep, child, record) for child in self.children[record["experiment"]]
                              if self.sweep.experiments[child].feed == "each"
                              and self._feeds(self.sweep.experiments[child], record)]
        self._feed_many()

    def _feeds(self, child_exp, record) -> bool:
        return not child_exp.parent_levels or record.get("level") in child_exp.parent_levels

    @staticmethod
    def _group(exp, record: dict) -> tuple:
        flat = flatten(record["config"])
        return tuple(json.dumps(flat.get(k)) for k in exp.group_by)

    def _feed_many(self) -> None:
        """feed: best waits until the parent experiment is complete, then takes the best trial of each group; feed:
        group starts a trial per group as soon as no trial of that group is still to run, fed by all of its
        finished trials, in the order of their searched values."""
        for name in self.order:
            exp = self.sweep.experiments[name]
            if exp.feed == "group" and exp.parent and name not in self.fed_all:
                self._feed_groups(name, exp)
            if exp.feed != "best" or not exp.parent or name in self.fed_all or not self._complete(exp.parent):
                continue
            self.fed_all.add(name)
            groups: dict[tuple, tuple[dict, dict]] = {}
            for record, summary in self.outcomes.values():
                if (record.get("experiment") != exp.parent or summary.get("status") != "done"
                        or not self._feeds(exp, record)):
                    continue
                group = self._group(exp, record)
                score = summary["metrics"].get("score", -math.inf)
                sign = 1 if (self.sweep.experiments[exp.parent].search or SearchSettings()).mode == "max" else -1
                if group not in groups or sign * score > sign * groups[group][1]["metrics"].get("score", -math.inf):
                    groups[group] = (record, summary)
            self.searches[0:0] = [Points.create(self.sweep, name, record) for record, _ in groups.values()]

    def _feed_groups(self, name: str, exp) -> None:
        complete = self._complete(exp.parent)  # then every group is released now, whatever _busy_groups would say
        groups: dict[tuple, list[dict]] = {}
        for record, summary in self.outcomes.values():
            if record.get("experiment") == exp.parent and summary.get("status") == "done" and self._feeds(exp, record):
                groups.setdefault(self._group(exp, record), []).append(record)
        waiting = [g for g in groups if (name, g) not in self.fed_groups]
        busy = set() if complete or not waiting else self._busy_groups(exp.parent, exp)
        for group in waiting:
            if busy is not None and group not in busy:
                self.fed_groups.add((name, group))
                members = sorted(groups[group], key=lambda r: (json.dumps(r["point"], sort_keys=True, default=str),
                                                               r["id"]))
                fed_by = {"id": "+".join(r["id"] for r in members), "members": members}
                self.searches.insert(0, Points.create(self.sweep, name, fed_by))
        if complete:
            self.fed_all.add(name)

    def _busy_groups(self, name: str, child) -> set[tuple] | None:
        """The groups (of `child`'s group_by) that a trial of experiment `name` still to run may fall in; None when
        that cannot be known yet (more of its trials may be released, or a group key is drawn at random)."""
        exp = self.sweep.experiments[name]
        if exp.parent and (not self._complete(exp.parent) or (exp.feed != "each" and name not in self.fed_all)):
            return None
        busy = {self._group(child, item[0]) for item in [*self.ready, *self.running.values()]
                if item[0]["experiment"] == name}
        for search in self.searches:
            if search.experiment != name or not search.todo:
                continue
            if search.rest:
                return None
            for point in search.todo:
                key = (search.key, json.dumps(point, sort_keys=True, default=str))
                if key not in self.todo_groups:
                    try:
                        record = self._record(name, point, search.parent, 1 if exp.method.chained else None)
                        self.todo_groups[key] = self._group(child, record)
                    except ConfigError:
                        self.todo_groups[key] = None  # it will fail without running
                busy.add(self.todo_groups[key])
        return busy

    def _complete(self, name: str) -> bool:
        """No trial of `name` is running, ready or still to be drawn, and none can be released any more."""
        exp = self.sweep.experiments[name]
        if exp.parent and not self._complete(exp.parent):
            return False
        if exp.parent and exp.feed != "each" and name not in self.fed_all:
            return False
        return not (any(s.experiment == name and s.todo for s in self.searches)
                    or any(item[0]["experiment"] == name for item in self.ready)
                    or any(item[0]["experiment"] == name for item in self.running.values()))

    def _complete_all(self) -> bool:
        self._feed_many()
        return all(self._complete(n) for n in self.order) and not self.ready
