"""Running a sweep on Ray Tune: one Tune experiment whose trials are every run of the graph, searched or dependent.

Each trial runs a Ray Train `TorchTrainer` (DeepSpeed workers) for its run config (flatray.sweep.trial).
`SweepSearcher` walks the graph and `SweepScheduler` early-stops inside searched groups. Trials are addressed by a
hash of what determines them (docs/SWEEPS.md); their folders `<storage>/<sweep>/<id>/` hold `trial.json`,
`summary.json` and Ray Train's checkpoints. Running a sweep again, or with --resume, skips finished trials and
continues interrupted ones from their last checkpoint (Ray Train restores a run whose name and storage hold one).
"""

from __future__ import annotations

from pathlib import Path

from flatray import storage
from flatray.config import ConfigError
from flatray.config.sweep import SweepFile
from flatray.sweep.plan import TRIAL_CPU, first_config, local_cpus, max_concurrent


def root_of(sweep: SweepFile) -> str:
    return storage.join(storage.absolute(sweep.storage), sweep.name)


def run(sweep: SweepFile, sweep_text: str, address: str | None = None, max_concurrent_trials: int | None = None,
        resume: bool = False, status_every_s: float | None = None) -> dict[str, tuple[dict, dict]]:
    """Run the sweep on Ray Tune; returns {trial id: (trial record, summary)}."""
    from ray import tune

    from flatray import train
    from flatray.sweep.trial import run_trial
    from flatray.sweep.scheduler import SweepScheduler
    from flatray.sweep.searcher import SweepSearcher
    from flatray.sweep.status import STATUS_EVERY_S, Status

    root = root_of(sweep)
    previous = storage.read_text(storage.join(root, "sweep.yaml"))
    if previous is not None and previous != sweep_text and not resume:
        raise ConfigError(f"{root} holds a sweep run from a different sweep file; pass --resume to continue it with "
                          f"this file (finished trials with unchanged ids are kept), or pick another name/--storage")
    storage.write_text(storage.join(root, "sweep.yaml"), sweep_text)

    use_gpu = any(first_config(sweep, n).scaling.use_gpu for n in sweep.experiments)
    train.init_ray(address, local_cpus(sweep), use_gpu)
    import ray

    offered = ray.cluster_resources()
    limit = max_concurrent_trials or max_concurrent(sweep, offered)
    searcher = SweepSearcher(sweep, root)
    wandb_dir = storage.join(root, "wandb") if "://" not in root else str(Path("wandb").resolve())
    callbacks = [Status(searcher, status_every_s or STATUS_EVERY_S)]
    if sweep.wandb.mode != "disabled":
        from flatray.tracking import WandbTrials, wandb_mode

        if wandb_mode(sweep.wandb) != "disabled":
            callbacks.append(WandbTrials(sweep.wandb, sweep.name, root, wandb_dir))
    print(f"[flatray] sweep {sweep.name}: up to {limit} trial(s) at once on {', '.join(f'{v:g} {k}' for k, v in offered.items() if k in ('CPU', 'GPU'))}; "
          f"outputs in {root}", flush=True)
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": TRIAL_CPU}),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=SweepScheduler(sweep, searcher.stopped), num_samples=-1,
            max_concurrent_trials=limit,
            reuse_actors=True,  # a child trial starts in the actor its parent just left: no process start-up
            trial_name_creator=lambda t: f"{t.config['flatray']['experiment']}-{t.config['flatray']['id']}",
            trial_dirname_creator=lambda t: t.config["flatray"]["id"],
        ),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=storage.absolute(sweep.storage), callbacks=callbacks, verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),  # retries happen inside the trial, from its checkpoint
        ),
    )
    tuner.fit()
    if searcher.skipped:
        print(f"[flatray] {searcher.skipped} trial(s) had finished before and were not run again", flush=True)
    return dict(searcher.outcomes)
