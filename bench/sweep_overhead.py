"""What a flatray sweep costs over plain Ray Tune running the same trials.

Two contenders run the same N tiny trials (tiny BERT, toy task, 64 train / 64 dev examples, 1 epoch, batch 16,
1 Ray Train worker per trial) on one local Ray (flatray.train.init_ray: loopback), with the same trial limit and the
same resources per trial (1 CPU for the Tune trial + its Train worker's):

- flatray: `flatray.sweep.run` on a sweep of a root `finetune` experiment with a grid over train.seed (N/2 values)
  and a `ptq` child experiment fed by each of them (N trials, half of them dependent), W&B disabled;
- plain Tune: `ray.tune.Tuner` over `tune.grid_search` of the run configs flatray ran (read from its trial.json
  files; the dependent ones load their parent's checkpoint, which exists by then), each trial a function trainable
  that runs `flatray.train.make_trainer(cfg, callbacks=[TuneReportCallback()]).fit()`, nothing else.

Plain Tune has no dependency ordering, so it is handed all N configs at once: its wall time is a lower bound for
running this graph, and flatray / plain Tune is an upper bound on flatray's overhead. It runs with Tune's default
reuse_actors=False (a new trial actor per trial); flatray.sweep.run reuses actors, and --plain-reuse-actors gives
plain Tune the same, to compare the engines alone.

Both contenders share one Ray session started before anything is timed (flatray.sweep.run then finds it running),
so neither pays Ray's start-up; an untimed warm-up trial (one root config through plain Tune) takes the first-use
costs (file cache, Tune/Train imports and set-up in the driver) out of the first timed run. Rounds alternate the
order (round 1 flatray first, round 2 plain Tune first, ...), each round in fresh folders, so that drift on a shared
machine hits both alike. Printed:

    flatray / plain Tune wall time      target <= 1.10
    parent end -> child start           median and max over the dependent trials, target <= 5 s
    all trial slots busy                the fraction of each contender's wall time with max_concurrent trials running

    python bench/sweep_overhead.py                            # N=8, 2 rounds
    python bench/sweep_overhead.py --trials 4 --rounds 1      # a quick check
    python bench/sweep_overhead.py --set defaults.train.epochs=3 --json out.json   # longer trials; flags: --help

It is a benchmark, not a test: the exit code is 0 whatever the numbers (1 only if a trial failed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from flatray import storage
from flatray.config.sweep import SweepFile
from flatray.sweep import graph as sweepfile
from flatray import sweep as sweep_lib
from flatray import train

TARGET_RATIO = 1.10
TARGET_GAP_S = 5.0

SWEEP = """\
name: {name}
storage: {storage}
wandb: {{mode: disabled}}
defaults:
  model: tiny-bert
  task: toy
  train: {{epochs: 1, batch_size: 16, seed: 0}}
  data: {{max_train_samples: 64, max_eval_samples: 64}}
  scaling: {{num_workers: 1}}
experiments:
  finetune:
    kind: finetune
    search: {{space: {{train.seed: {{grid: {seeds}}}}}, algorithm: grid, scheduler: none}}
  ptq:
    kind: ptq
    parent: finetune
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8, metavar="N",
                   help="trials per contender, even: N/2 finetune roots (a grid over train.seed) + N/2 ptq children")
    p.add_argument("--max-concurrent", type=int, metavar="K",
                   help="trials at once, for both (default: flatray.sweep.max_concurrent on the local Ray's resources)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds; odd rounds run flatray first, even rounds plain Tune first (default 2)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up trial")
    p.add_argument("--plain-reuse-actors", action="store_true",
                   help="give plain Tune reuse_actors=True, as flatray.sweep.run uses (default: Tune's default, False: "
                        "a new trial actor, with its process start and imports, per trial)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the benchmark's sweep file, e.g. --set defaults.train.epochs=3 "
                        "(repeatable; plain Tune runs whatever configs flatray ran)")
    p.add_argument("--storage", metavar="DIR", help="local folder for the trials (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder of the trials (default: deleted at the end)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    args = p.parse_args()
    if args.trials < 2 or args.trials % 2:
        p.error(f"--trials: an even number >= 2 (N/2 roots, each with one ptq child), got {args.trials}")
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        p.error("--max-concurrent: at least 1")
    return args


# --------------------------------------------------------------------------------------------------- measures


def all_busy_fraction(intervals: list[tuple[float, float]], slots: int, t0: float, t1: float) -> float:
    """The fraction of [t0, t1] during which at least `slots` of the intervals were open."""
    events = sorted([(max(s, t0), 1) for s, e in intervals] + [(min(e, t1), -1) for s, e in intervals],
                    key=lambda ev: (ev[0], ev[1]))  # an end before a start at the same instant
    busy, open_, last = 0.0, 0, t0
    for t, step in events:
        if open_ >= slots:
            busy += max(0.0, t - last)
        open_ += step
        last = t
    return busy / (t1 - t0) if t1 > t0 else 0.0


def refills(intervals: list[tuple[float, float]], slots: int) -> list[float]:
    """Seconds from a trial's end to the start of the trial that took its slot: the i-th start after the first
    `slots` waits for the (i - slots)-th end (never more than `slots` trials run at once)."""
    starts, ends = sorted(s for s, _ in intervals), sorted(e for _, e in intervals)
    return [starts[i] - ends[i - slots] for i in range(slots, len(starts))]


def describe(name: str, wall: float, t0: float, t1: float, trials: list[dict], slots: int) -> dict:
    """What one contender's run looked like: wall time, per-trial time, how busy its trial slots were."""
    spans = [(t["start"], t["end"]) for t in trials if t.get("start") and t.get("end")]
    durations = [e - s for s, e in spans]
    return {
        "contender": name, "wall_s": wall, "trials": len(trials),
        "failed": sum(t["status"] != "done" for t in trials),
        "trial_s_sum": sum(durations), "trial_s_median": statistics.median(durations) if durations else None,
        "all_slots_busy": all_busy_fraction(spans, slots, t0, t1),
        "refill_s": refills(spans, slots),
        "actors": len({t["pid"] for t in trials if t.get("pid")}) or None,  # trial actor processes (reuse: fewer)
        # trial-seconds over slot-seconds: how much of the capacity the trials used, whatever their number at once
        "slot_use": sum(durations) / (slots * wall) if wall else 0.0,
        "trial_list": trials,
    }


# --------------------------------------------------------------------------------------------------- contenders


def write_sweep(folder: Path, trials: int, sets: list[str]) -> tuple[SweepFile, str]:
    folder.mkdir(parents=True, exist_ok=True)
    text = SWEEP.format(name="flatray", storage=folder, seeds=list(range(trials // 2)))
    path = folder / "overhead.yaml"
    path.write_text(text)
    sw = sweepfile.load(path, sets)
    return sw, text + "".join(f"# --set {s}\n" for s in sets)


def run_flatray(sw: SweepFile, text: str, slots: int) -> dict:
    t0 = time.time()
    outcomes = sweep_lib.run(sw, text, max_concurrent_trials=slots, status_every_s=1e9)
    t1 = time.time()
    root = Path(sweep_lib._root(sw))
    trials = []
    for record, summary in outcomes.values():
        if not record.get("id"):
            trials.append({"id": None, "experiment": record.get("experiment"), "status": "failed"})
            continue
        folder = root / record["id"]
        started = storage.read_json(str(folder / "trial.json")) or {}
        attempts = storage.read_lines(str(folder / "attempts.jsonl")) or []
        results = storage.read_lines(str(folder / "result.json"))  # Tune's, one line per report, with its pid
        trials.append({"id": record["id"], "experiment": record["experiment"], "parents": record["parents"],
                       "status": summary.get("status"), "start": started.get("started"), "end": summary.get("ended"),
                       "first_attempt": attempts[0]["start"] if attempts else None,
                       "pid": results[0].get("pid") if results else None})
    out = describe("flatray sweep", t1 - t0, t0, t1, trials, slots)
    out["root"] = str(root)
    # A child's wait: from its parent's summary.json `ended` to its first attempt's start.
    by_id = {t["id"]: t for t in trials if t["id"]}
    out["gaps_s"] = [t["first_attempt"] - by_id[t["parents"][0]]["end"] for t in trials
                     if t.get("parents") and t["parents"][0] in by_id and t.get("first_attempt")
                     and by_id[t["parents"][0]].get("end")]
    return out


def flatray_configs(root: str) -> list[dict]:
    """The run configs flatray ran (trial.json), in the order it started them."""
    records = [json.loads(p.read_text()) for p in Path(root).glob("*/trial.json")]
    return [{"id": r["id"], "experiment": r["experiment"], "config": r["config"]}
            for r in sorted(records, key=lambda r: r["started"])]


def plain_trial(config: dict) -> None:
    """The plain Tune trainable: one Ray Train run of the config, plus its own start/end stamps."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from flatray import train as train_lib
    from flatray.config import RunConfig

    start = time.time()
    cfg = RunConfig.model_validate(config["trial"]["config"])
    train_lib.make_trainer(cfg, callbacks=[TuneReportCallback()]).fit()
    Path(config["trial"]["stamps"]).write_text(json.dumps({"start": start, "end": time.time(), "pid": os.getpid()}))


def run_plain(configs: list[dict], folder: Path, slots: int, reuse_actors: bool = False) -> dict:
    from ray import tune

    trials = []
    for c in configs:
        out = folder / "plain_trials" / c["id"]
        out.mkdir(parents=True, exist_ok=True)
        cfg = json.loads(json.dumps(c["config"]))
        cfg["output"] = {"storage_path": str(out), "name": "train"}  # not flatray's folder: Ray Train would restore it
        trials.append({"id": c["id"], "experiment": c["experiment"], "config": cfg, "stamps": str(out / "stamps.json")})
    tuner = tune.Tuner(
        tune.with_resources(plain_trial, {"cpu": 1}),
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=slots, reuse_actors=reuse_actors,
                                    trial_dirname_creator=lambda t: t.config["trial"]["id"]),
        run_config=tune.RunConfig(name="plain", storage_path=str(folder), verbose=0),
    )
    t0 = time.time()
    grid = tuner.fit()
    t1 = time.time()
    failed = {str(e)[:200] for e in grid.errors}
    rows = []
    for t in trials:
        stamps = json.loads(Path(t["stamps"]).read_text()) if Path(t["stamps"]).exists() else {}
        rows.append({"id": t["id"], "experiment": t["experiment"], "status": "done" if stamps else "failed",
                     "start": stamps.get("start"), "end": stamps.get("end"), "pid": stamps.get("pid")})
    out = describe("plain Tune", t1 - t0, t0, t1, rows, slots)
    out["errors"] = sorted(failed)
    return out


def warm_up(sw: SweepFile, folder: Path) -> float:
    """One root trial through plain Tune, untimed: the first use of Tune/Train in this driver and of the files."""
    cfg = sweep_lib.first_config(sw, "finetune").model_dump(mode="json")
    t0 = time.time()
    run_plain([{"id": "warmup", "experiment": "finetune", "config": cfg}], folder, 1)
    return time.time() - t0


# --------------------------------------------------------------------------------------------------- main


def fmt_s(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def main() -> int:
    args = parse_args()
    base = Path(args.storage).resolve() if args.storage else Path(tempfile.mkdtemp(prefix="sweep_overhead_"))
    base.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    # One Ray session for everything, started as flatray.sweep.run would start it (loopback, the same CPUs).
    sw, _ = write_sweep(base / "round1", args.trials, args.set)
    use_gpu = any(sweep_lib.first_config(sw, n).scaling.use_gpu for n in sw.experiments)
    train.init_ray(None, sweep_lib._local_cpus(sw), use_gpu)
    import ray

    offered = ray.cluster_resources()
    slots = args.max_concurrent or sweep_lib.max_concurrent(sw, offered)
    need = sweep_lib.trial_resources(sweep_lib.first_config(sw, "finetune"))
    print(f"[bench] local Ray: {offered.get('CPU', 0):g} CPU, {offered.get('GPU', 0):g} GPU on {os.cpu_count()} cores; "
          f"{args.trials} trials per contender, {slots} at once, each asking "
          + ", ".join(f"{v:g} {k}" for k, v in need.items()) + f"; folders in {base}", flush=True)

    warmup_s = None
    if not args.no_warmup:
        warmup_s = warm_up(sw, base / "warmup")
        print(f"[bench] warm-up trial: {warmup_s:.1f} s", flush=True)

    rounds, configs = [], None
    for r in range(1, args.rounds + 1):
        folder = base / f"round{r}"
        sw, text = write_sweep(folder, args.trials, args.set)
        order = ("flatray", "plain") if r % 2 or configs is None else ("plain", "flatray")
        result = {"round": r, "order": list(order)}
        for who in order:
            print(f"[bench] round {r}/{args.rounds}: {who}", flush=True)
            if who == "flatray":
                result["flatray"] = run_flatray(sw, text, slots)
                if configs is None:
                    configs = flatray_configs(result["flatray"]["root"])
            else:
                result["plain"] = run_plain(configs, folder, slots, args.plain_reuse_actors)
        f, p = result["flatray"], result["plain"]
        result["ratio"] = f["wall_s"] / p["wall_s"]
        print(f"[bench] round {r}: flatray {f['wall_s']:.1f} s, plain Tune {p['wall_s']:.1f} s, "
              f"ratio {result['ratio']:.2f}", flush=True)
        rounds.append(result)
    ray.shutdown()
    load_after = os.getloadavg()

    # ------------------------------------------------------------------------------------------------- report
    total = {who: sum(r[who]["wall_s"] for r in rounds) for who in ("flatray", "plain")}
    ratio = total["flatray"] / total["plain"]
    gaps = [g for r in rounds for g in r["flatray"]["gaps_s"]]
    failed = sum(r[who]["failed"] for r in rounds for who in ("flatray", "plain"))
    busy = {who: statistics.mean(r[who]["all_slots_busy"] for r in rounds) for who in ("flatray", "plain")}
    refill = {who: [g for r in rounds for g in r[who]["refill_s"]] for who in ("flatray", "plain")}

    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after; ray {ray.__version__}")
    print(f"trials: {args.trials // 2} finetune (tiny-bert, toy, 64/64 examples, 1 epoch, batch 16) + "
          f"{args.trials // 2} ptq children, 1 worker each; {slots} at once; {args.rounds} round(s)"
          + (f"; --set {' '.join(args.set)}" if args.set else ""))
    print(f"plain Tune: reuse_actors={args.plain_reuse_actors}"
          + (" (--plain-reuse-actors)" if args.plain_reuse_actors else " (Tune's default)")
          + "; actors = trial actor processes started (fewer than trials: reused)")
    print()
    print(f"{'round':<7}{'contender':<15}{'wall s':>8}{'trials':>8}{'actors':>8}{'failed':>8}{'trial s sum':>13}"
          f"{'median trial s':>16}{'all slots busy':>16}{'slot use':>10}")
    for r in rounds:
        for who in r["order"]:
            c = r[who]
            print(f"{r['round']:<7}{c['contender']:<15}{c['wall_s']:>8.1f}{c['trials']:>8}{c['actors'] or '-':>8}"
                  f"{c['failed']:>8}"
                  f"{c['trial_s_sum']:>13.1f}{fmt_s(c['trial_s_median']):>16}{c['all_slots_busy']:>16.0%}"
                  f"{c['slot_use']:>10.0%}")
    print()
    per_round = ", ".join(f"{r['ratio']:.2f}" for r in rounds)
    print(f"flatray / plain Tune wall time: {ratio:.2f} (target <= {TARGET_RATIO}; per round: {per_round})")
    if gaps:
        print(f"parent end -> child start: median {statistics.median(gaps):.1f} s, max {max(gaps):.1f} s over "
              f"{len(gaps)} dependent trial(s) (target <= {TARGET_GAP_S:g} s when resources are free)")
    else:
        print("parent end -> child start: n/a (no dependent trial started)")
    if refill["plain"]:
        print(f"slot refill, a trial's end -> the next trial's start: plain Tune median "
              f"{statistics.median(refill['plain']):.1f} s, max {max(refill['plain']):.1f} s; flatray median "
              + (f"{statistics.median(refill['flatray']):.1f} s, max {max(refill['flatray']):.1f} s"
                 if refill["flatray"] else "n/a")
              + " (Tune's turnover between trials; without actor reuse, a new trial actor's start and imports)")
    print(f"all {slots} trial slots busy: flatray {busy['flatray']:.0%} of its wall time, plain Tune "
          f"{busy['plain']:.0%} (mean over rounds)")
    print(textwrap.fill(
        "note: plain Tune has no dependency ordering: it was handed all N configs at once (the ptq children's parent "
        "checkpoints already existed), so its wall time is a lower bound for this graph, and the ratio an upper "
        "bound on flatray's overhead. A ptq child cannot start before its parent ends in flatray, which leaves "
        "slots idle near the end of the sweep that plain Tune fills.", width=118))
    if failed:
        print(f"warning: {failed} trial(s) failed; the ratios compare unequal work", file=sys.stderr)
        for r in rounds:
            for e in r["plain"].get("errors", []):
                print(f"  plain Tune round {r['round']}: {e}", file=sys.stderr)

    if args.json:
        report = {
            "machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "load_before": load_before, "load_after": load_after, "ray": ray.__version__,
                        "ray_resources": offered},
            "settings": {"trials": args.trials, "max_concurrent": slots, "rounds": args.rounds, "set": args.set,
                         "plain_reuse_actors": args.plain_reuse_actors,
                         "warmup_s": warmup_s},
            "rounds": rounds,
            "wall_s": total, "ratio": ratio, "ratio_per_round": [r["ratio"] for r in rounds],
            "gaps_s": gaps, "gap_median_s": statistics.median(gaps) if gaps else None,
            "gap_max_s": max(gaps) if gaps else None, "refill_s": refill, "all_slots_busy": busy, "failed": failed,
            "targets": {"ratio_max": TARGET_RATIO, "gap_max_s": TARGET_GAP_S},
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.keep:
        print(f"trial folders kept in {base}")
    elif not args.storage:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
