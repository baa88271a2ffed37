"""What a run gets in each Ray Train worker, whatever its method: `RunContext`.

`train_worker` is Ray Train's train_loop_per_worker: it sets up what every method needs (the worker's place in the
group, the task's data, the tokenizer, the checkpoint a retried or resumed run restored) and calls the run function
the registry (flatray.methods) names for the run config's kind. A run function reads the context, trains with
flatray.train.loop and reports through `ctx.report`.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flatray import methods
from flatray.config import RunConfig
from flatray.train import checkpoint
from flatray.train.checkpoint import BEST, Resumed


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shard(n: int, rank: int, world: int) -> range:
    """Contiguous, non-overlapping shard of n items (evaluation must not count any example twice)."""
    bounds = np.linspace(0, n, world + 1).astype(int)
    return range(bounds[rank], bounds[rank + 1])


def predict(module, features, collate, batch_size: int, device, rank: int, world: int, pad_to: int):
    """Model outputs on `features` from all workers, in order: logits [n, C] or (start, end) [n, pad_to]."""
    import torch
    import torch.distributed as dist

    part = features.select(shard(len(features), rank, world))
    outs = []
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for i in range(0, len(part), batch_size):
            batch = {k: v.to(device) for k, v in collate([part[j] for j in range(i, min(i + batch_size, len(part)))]).items()}
            out = module(**batch)
            if hasattr(out, "start_logits"):  # QA: pad the sequence axis so all batches stack
                se = torch.stack([out.start_logits, out.end_logits]).float()
                se = torch.nn.functional.pad(se, (0, pad_to - se.shape[-1]), value=float("-inf"))
                outs.append(se.cpu().numpy())
            else:
                outs.append(out.logits.float().cpu().numpy())
    module.train(was_training)
    local = np.concatenate(outs, axis=-2) if outs else None
    gathered = [local]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    full = np.concatenate([g for g in gathered if g is not None], axis=-2)
    return (full[0], full[1]) if full.ndim == 3 else full


def quiet_libraries() -> None:
    """Keep worker logs to flatray's own lines: library progress bars and load reports add nothing there."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


@dataclass
class RunContext:
    """One worker's view of a run: its config, its place in the group, the task's data and the tokenizer."""

    cfg: RunConfig
    rank: int
    world: int
    device: Any
    spec: Any  # flatray.data.tasks.TaskSpec
    tokenizer: Any
    tokenized: Any  # flatray.data: train features and eval sets
    collate: Callable[[list[dict]], dict]
    resumed: Resumed | None = None  # the checkpoint a retried or resumed run continues from

    def evaluate(self, module) -> dict[str, float]:
        """Dev metrics of `module` under the run's compute precision, gathered from every worker."""
        from flatray.data import compute_metrics
        from flatray.train.engine import autocast

        metrics = {}
        for split, eval_set in self.tokenized.evals.items():
            with autocast(self.cfg, self.device):  # logits are read back as float32
                outputs = predict(module, eval_set.features, self.collate, self.cfg.train.eval_batch_size,
                                  self.device, self.rank, self.world, pad_to=self.cfg.data.max_length)
            for key, value in compute_metrics(self.spec, eval_set, outputs).items():
                metrics[f"{split}/{key}"] = float(value)
        # The score that picks the best checkpoint: the main metric on the first dev split (MNLI: matched).
        metrics["score"] = metrics[f"{self.spec.eval_splits[0]}/{self.spec.main_metric}"]
        return metrics

    def report(self, metrics: dict, save: Callable[[Path], None] | None = None, best: bool = True,
               state: Callable[[Path], None] | None = None) -> None:
        """ray.train.report from every worker, with a checkpoint when `save` is given: rank 0 writes the method's
        files with `save(folder)`, and every worker adds `state(folder)` (what continuing exactly needs) to its own
        copy of the folder, which Ray Train merges into one. `best`: the checkpoint holds the best model so far."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            if save is not None and self.rank == 0:
                save(Path(tmp))
            if save is not None and state is not None:
                state(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if any(Path(tmp).iterdir()) else None
            if save is not None:
                metrics = {**metrics, BEST: int(best)}  # after save, which may add to metrics (SQuAT's export size)
            ray.train.report(metrics, checkpoint=checkpoint)

    def log(self, text: str) -> None:
        if self.rank == 0:
            print(f"[flatray] {text}", flush=True)

    def train_loader(self):
        """The worker's shard of the training set, in batches of batch_size / world (full batches only)."""
        import torch
        from torch.utils.data import DataLoader, DistributedSampler

        train, batch_size = self.tokenized.train, self.cfg.train.batch_size
        if self.cfg.data.group_by_length:
            from flatray.data.sampling import LengthGroupedSampler

            sampler = LengthGroupedSampler([len(ids) for ids in train["input_ids"]], batch_size, self.world,
                                           self.rank, self.cfg.train.seed)
        else:
            sampler = DistributedSampler(train, num_replicas=self.world, rank=self.rank, shuffle=True,
                                         seed=self.cfg.train.seed)
        # Its own generator: starting an epoch's iterator then draws nothing from the global RNG, whose stream
        # (dropout) depends on the steps taken only, so a run resumed mid-epoch draws what an unbroken one draws.
        loader = DataLoader(train, batch_size=batch_size // self.world, sampler=sampler,
                            collate_fn=self.collate, drop_last=True, generator=torch.Generator())
        if len(loader) == 0:
            raise ValueError(f"train set of {len(train)} examples gives no full batch of {batch_size}")
        return loader

    def batches(self, features, n: int) -> list[dict]:
        """The first `n` examples of `features` as eval-size batches on this worker's device."""
        size, n = self.cfg.train.eval_batch_size, min(n, len(features))
        return [{k: v.to(self.device) for k, v in self.collate([features[j] for j in range(i, min(i + size, n))]).items()}
                for i in range(0, n, size)]


def local_inputs(cfg: RunConfig) -> RunConfig:
    """The run config with its cloud inputs (a parent's checkpoint or mask in s3://...) copied to this node:
    Hugging Face and safetensors read local files."""
    from flatray import storage

    prune = cfg.prune.model_copy(update={k: storage.local_copy(v) for k, v in
                                         (("parent", cfg.prune.parent), ("mask", cfg.prune.mask)) if v})
    return cfg.model_copy(update={"model": storage.local_copy(cfg.model), "prune": prune})


def train_worker(run_config: dict) -> None:
    """Ray Train's train_loop_per_worker: set up, then the run function of the run's method. An error carries the
    path of this worker's log (a note under the exception), which the sweep shows wherever it shows the error."""
    try:
        _run_worker(run_config)
    except Exception as err:
        log = worker_log()
        if log and hasattr(err, "add_note"):
            err.add_note(f"{WORKER_LOG_NOTE} {log}")
        raise


WORKER_LOG_NOTE = "worker log:"


def worker_log() -> str | None:
    """This Ray worker's stderr log, <session>/logs/worker-<id>-<job>-<pid>.err on its node, which holds the
    traceback (its stdout, with the progress lines, is the .out beside it); None if not found."""
    try:
        import ray

        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())  # Ray has no public accessor
        found = sorted(logs.glob(f"worker-*-{os.getpid()}.err"))
        return str(found[-1]) if found else None
    except Exception:
        return None


def _run_worker(run_config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch

    from flatray import data, models

    quiet_libraries()
    cfg = local_inputs(RunConfig.model_validate(run_config))
    method = methods.by_run_kind(cfg.kind)
    train_context = ray.train.get_context()
    device = torch.device("cpu") if method.cpu_only else ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")

    tokenizer = models.load_tokenizer(cfg.model)
    # a task defined in the run file gets its classes from its data
    spec, raw = data.load_task(cfg.task_spec, cfg.data.source, cfg.data.path, cfg.data.data_files, seed=cfg.train.seed)
    tokenized = data.tokenize(spec, raw, tokenizer, cfg.data.max_length, cfg.data.doc_stride,
                              cfg.data.max_train_samples, cfg.data.max_eval_samples)
    ctx = RunContext(cfg, train_context.get_world_rank(), train_context.get_world_size(), device, spec, tokenizer,
                     tokenized, data.collator(tokenizer))
    restored = ray.train.get_checkpoint()  # the latest checkpoint of a retried or resumed run
    with restored.as_directory() if restored else contextlib.nullcontext() as folder:
        ctx.resumed = checkpoint.read(Path(folder)) if folder else None
        method.load_run()(ctx)
