"""Running a sweep on Ray Tune: one Tune experiment whose trials are every run of the graph, searched or dependent.

Each trial runs a Ray Train `TorchTrainer` (DeepSpeed workers) for its run config (flatray.sweep.trial).
`SweepSearcher` walks the graph and `SweepScheduler` early-stops inside searched groups. Trials are addressed by a
hash of what determines them (docs/SWEEPS.md); their folders `<storage>/<sweep>/<id>/` hold `trial.json`,
`summary.json` and Ray Train's checkpoints. Running a sweep again, or with --resume, skips finished trials and
continues interrupted ones from their last checkpoint (Ray Train restores a run whose name and storage hold one).
"""

from __future__ import annotations

from flatray import storage
from flatray.config import ConfigError
from flatray.config.sweep import SweepFile
from flatray.sweep.plan import TRIAL_CPU, autoscaler_request, capacity, concurrency, first_config, local_cpus


def root_of(sweep: SweepFile) -> str:
    return storage.join(storage.absolute(sweep.storage), sweep.name)


def run(sweep: SweepFile, sweep_text: str, address: str | None = None, max_concurrent_trials: int | None = None,
        resume: bool = False, status_every_s: float | None = None,
        rerun_other_versions: bool = False) -> dict[str, tuple[dict, dict]]:
    """Run the sweep on Ray Tune; returns {trial id: (trial record, summary)}. Finished trials are kept, those made
    by another flatray/library version too unless `rerun_other_versions` (flatray.provenance)."""
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
    offered, where, autoscaling = capacity()
    limit, why = concurrency(sweep, max_concurrent_trials, offered, where)
    searcher = SweepSearcher(sweep, root, rerun_other_versions)
    wandb_dir = str((storage.local_dir(root) / "wandb").resolve())  # W&B writes local files, even for s3:// sweeps
    callbacks = [Status(searcher, status_every_s or STATUS_EVERY_S)]
    if sweep.wandb.mode != "disabled":
        from flatray.tracking import WandbTrials, wandb_mode

        if wandb_mode(sweep.wandb) != "disabled":
            callbacks.append(WandbTrials(sweep.wandb, sweep.name, root, wandb_dir))
    print(f"[flatray] sweep {sweep.name}: up to {limit} trial(s) at once ({why}); outputs in {root}", flush=True)
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
    with autoscaler_request(sweep, limit, autoscaling):  # an autoscaling cluster grows for them at once
        try:
            tuner.fit()
        except (OSError, EOFError) as err:  # Tune reading back its own files (torn by a full disk) after the run
            print(f"[flatray] warning: Ray Tune could not read its experiment files back ({type(err).__name__}: "
                  f"{err}); the sweep's results are its trial folders", flush=True)
    if searcher.skipped:
        print(f"[flatray] {searcher.skipped} trial(s) had finished before and were not run again", flush=True)
    if searcher.other_versions:
        print(f"[flatray] {len(searcher.other_versions)} of them were made by another version; pass "
              f"--rerun-other-versions to run them again:", flush=True)
        for record, changed in searcher.other_versions:
            print(f"  {record['experiment']} {record['id']}: {'; '.join(changed)}", flush=True)
    return dict(searcher.outcomes)
