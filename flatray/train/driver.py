"""One run: `python -m flatray.train RUN.yaml [--set key=value ...]`.

The driver validates the run file (before Ray starts), then runs a Ray Train `TorchTrainer` whose workers each wrap
the model in a DeepSpeed engine and run the method its `kind` names (flatray.train.context, flatray.methods).

A fine-tuning checkpoint is a plain Hugging Face model folder (config.json, model.safetensors, tokenizer files) plus
`flatray_run.yaml` (the resolved run config), `metrics.json`, `history.json`, for pruned runs `mask.safetensors`, and
`resume/`, the state a retried or resumed run continues from exactly (flatray.train.checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys


from flatray import config as config_lib
from flatray import methods
from flatray.config import ConfigError, RunConfig
from flatray.train.context import train_worker

# RAY_TRAIN_ENABLE_PRINT_PATCH=0: Train V2 reroutes print() through its logger, and each worker line then reaches
# the console twice.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def init_ray(address: str | None, cpus_needed: int, use_gpu: bool) -> None:
    """Connect to a cluster (`address`, else RAY_ADDRESS), or start a local Ray on the loopback address (nothing
    leaves the machine)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        keep_local_ray_on_loopback()
    import ray

    if ray.is_initialized():
        return
    env = dict(WORKER_ENV) if use_gpu else {**WORKER_ENV, "DS_ACCELERATOR": "cpu"}
    if os.environ.get(methods.PLUGINS_ENV):  # plugin methods: every Ray process must register them too
        env[methods.PLUGINS_ENV] = os.environ[methods.PLUGINS_ENV]
    for key, value in env.items():  # Train V2 also propagates some variables from the driver's environment
        os.environ.setdefault(key, value)
    if address:
        ray.init(address=address, runtime_env={"env_vars": env})
        return
    # The dashboard (bound to 127.0.0.1) stays on: Ray Train V2 cleans up placement groups through its State API.
    # address "local": a new Ray even where `ray start` left this machine's default cluster address behind.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed), runtime_env={"env_vars": env})
    keep_credentials_out_of_runtime_envs()


def keep_credentials_out_of_runtime_envs() -> None:
    """Ray Tune copies the driver's AWS credentials into each trial's runtime env, and Ray's runtime env agent logs
    runtime envs in plain text (<Ray temp dir>/session_*/logs/runtime_env_agent.log). A local Ray's processes
    inherit the driver's environment, credentials included: the copy is not needed there."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = class_cache.ENV_VARS_TO_PROPAGATE - {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}


def keep_local_ray_on_loopback() -> None:
    """A local Ray otherwise takes the machine's network address for its node, and Ray Train hands that to gloo as
    MASTER_ADDR. Ray's switch for loopback is read when ray is imported (and by every Ray process it starts)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray" in sys.modules:
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def make_trainer(cfg: RunConfig, callbacks: list = ()):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from flatray.train.checkpoint import BEST

    resources = cfg.scaling.resources_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=cfg.storage_uri,
            # Every epoch ends with a checkpoint; its report says whether it holds the best model so far. Ray keeps
            # the latest that does (Result.best_checkpoints) and, always, the latest (Result.checkpoint, restored by
            # a retried or resumed run).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=BEST,
                                                         checkpoint_score_order="max"),
            callbacks=list(callbacks),
            # Ray Train's INFO lines (worker-group start-up, resource requests) add nothing to flatray's own.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def fit(cfg: RunConfig):
    """Run `cfg` on Ray Train and return Ray's `Result`: `best_checkpoints[-1]` is the best dev checkpoint (with its
    metrics), `checkpoint` and `metrics` the latest."""
    per_worker = (cfg.scaling.resources_per_worker or {}).get("CPU", 1)
    init_ray(cfg.address, int(cfg.scaling.num_workers * per_worker) + 1, cfg.scaling.use_gpu)
    return make_trainer(cfg).fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flatray.train",
        description="Fine-tune one model on one task with Adam, SAM or ASAM, in Ray Train workers running DeepSpeed.",
    )
    parser.add_argument("run_file", help="run YAML, or the name of a built-in recipe (e.g. smoke)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the run file, e.g. --set optimizer.rho=0.1 (repeatable)")
    parser.add_argument("--address", help="Ray cluster address (default: the run file's, else a local Ray)")
    args = parser.parse_args(argv)

    from flatray.sweep import preflight

    try:
        cfg = config_lib.load(args.run_file, args.set)
        if args.address:
            cfg.address = args.address
        preflight.check_run(cfg)  # an unwritable storage, a missing model, an unknown hub id: here, not in a worker
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    print(f"[flatray] run {cfg.run_name}: {cfg.model} on {cfg.task}, {cfg.optimizer.name} "
          f"(rho {cfg.optimizer.rho}), ZeRO {cfg.deepspeed.zero_stage}, {cfg.scaling.num_workers} worker(s)")
    try:
        result = fit(cfg)
    except Exception as err:  # ray.train.TrainingFailedError: a worker raised
        print(f"error: run failed: {err}", file=sys.stderr)
        return 1
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                      if "/" in k or k in ("size_ratio", "speedup") or (k == "sparsity" and v))
    print(f"[flatray] result: {shown}")
    if result.best_checkpoints:
        ckpt, metrics = result.best_checkpoints[0]
        print(f"[flatray] best checkpoint (epoch {metrics.get('epoch', '-')}): {ckpt.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
