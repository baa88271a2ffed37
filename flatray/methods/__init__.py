"""Every method flatray runs, described once: the registry.

A method is what an experiment's `kind:` names. Its entry says how to run it and how it fits the experiment graph:
what it takes from its parent trial, what it leaves behind, whether early stopping may cut it short, and which
report sections show it. The sweep, its validation, W&B tracking and the report read these entries; none of them
names a method. The run functions live in this package, one module per method (or in a plugin module), and are
imported only inside Ray Train workers, so this file imports neither torch nor Ray.

Adding a method is one module with `run(ctx)` plus one `register(Method(...))`. Plugins outside flatray register
theirs the same way from a module named in FLATRAY_METHODS (comma-separated), imported here in every process that
reads the registry (the driver, Tune's trial actors and Ray Train's workers), on the first lookup.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

PLUGINS_ENV = "FLATRAY_METHODS"

# The W&B artifact type of each kind of output a trial can leave in its checkpoint.
ARTIFACT_TYPES = {"model": "model", "mask": "mask", "export": "quantized-model"}
MASK_FILE = "mask.safetensors"  # an unstructured pruning mask (flatray.methods.imp)
LSQ_EXPORT_FILE = "lsq_export.safetensors"  # b-bit codes + step sizes; not "model*.safetensors", which holds HF weights
INT8_FILE = "model_int8.pt"  # a dynamic-int8 state dict (flatray.methods.ptq)
CONTOUR_FILE = "contour.json"  # a loss grid on a plane of weights (flatray.methods.contour)
MODEL_FILE = "config.json"  # the checkpoint folder is a Hugging Face model folder


class ParentOutputMissing(ValueError):
    """A parent trial finished without an output its child needs (e.g. a dense parent has no mask to transfer)."""


def feed_model(raw: dict, outputs: Mapping[str, str | None], exp: Any, level: int | None) -> None:
    """The default: the child starts from the parent's model (the teacher of CoFi and SQuAT, the measured model of
    PTQ and sharpness)."""
    raw["model"] = outputs["model"]


@dataclass(frozen=True)
class Method:
    name: str
    run: str  # "module:function(ctx)", called in every Ray Train worker of a trial
    help: str
    runs_as: str | None = None  # the run-config kind its trials run as (imp and transfer runs are fine-tuning)
    needs: tuple[str, ...] = ()  # outputs it takes from its parent trial; none = a root experiment
    uses: tuple[str, ...] = ()  # outputs it also takes when the parent left them (an IMP level: the parent's mask)
    files: Mapping[str, str] = field(default_factory=dict)  # output -> the checkpoint file that shows it is there
    produces: Callable[[Any], set[str]] | None = None  # the outputs a trial of this run config leaves (default: files)
    feed: Callable[[dict, Mapping, Any, int | None], None] = feed_model  # parent outputs -> child's raw run config
    # feed: group (several parent trials per trial): [(parent record, its outputs), ...] -> child's raw run config
    feed_group: Callable[[dict, list, Any], None] | None = None
    early_stopping: bool = False  # ASHA may stop its searched trials
    chained: bool = False  # a chain of levels, each trial feeding the next (IMP)
    cpu_only: bool = False  # its trials run on CPU workers whatever the sweep's defaults say
    report: tuple[str, ...] = ()  # "module:function(df, out)" report sections that show its trials
    report_row: str | None = None  # "module:function(row, trial, ancestors)": its own columns of a trial's report row

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every parent output a trial may take (its W&B inputs)."""
        return self.needs + self.uses

    def outputs_of(self, cfg: Any) -> set[str]:
        return set(self.produces(cfg)) if self.produces else set(self.files)

    def load_run(self) -> Callable:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)


METHODS: dict[str, Method] = {}
ALIASES: dict[str, str] = {}
_plugins = {"loaded": False}


def register(method: Method, aliases: tuple[str, ...] = ()) -> Method:
    METHODS[method.name] = method
    ALIASES.update({alias: method.name for alias in aliases})
    return method


def entries() -> list[Method]:
    """Every registered method, plugins included (imported on first use: a plugin imports flatray itself)."""
    if not _plugins["loaded"]:
        _plugins["loaded"] = True
        for module in filter(None, (p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(","))):
            importlib.import_module(module)
    return list(METHODS.values())


def canonical(name: str) -> str:
    """The registry name behind `name` (an alias, or the name itself)."""
    return ALIASES.get(name, name)


def get(name: str) -> Method:
    known = {m.name: m for m in entries()}
    if canonical(name) not in known:
        raise KeyError(f"unknown method {name!r}; expected one of {', '.join(known)}")
    return known[canonical(name)]


def names() -> list[str]:
    return [m.name for m in entries()]


def by_run_kind(kind: str) -> Method:
    """The method a run config's `kind` runs (its own entry: imp and transfer run as finetune)."""
    method = get(kind)
    return get(method.runs_as) if method.runs_as else method


# ------------------------------------------------------------------------------------------------ how parents feed


def _need(outputs: Mapping, what: str) -> str:
    if not outputs.get(what):
        raise ParentOutputMissing(f"the parent trial left no {what}")
    return outputs[what]


def feed_imp_level(raw: dict, outputs: Mapping, exp: Any, level: int | None) -> None:
    """An IMP level ranks its parent's trained weights and prunes to level x sparsity_step (METHODS.md section 3)."""
    raw.setdefault("prune", {}).update(parent=_need(outputs, "model"), sparsity=round(level * exp.sparsity_step, 6))


def feed_mask(raw: dict, outputs: Mapping, exp: Any, level: int | None) -> None:
    """A ticket transfer re-trains from theta_0 under the parent's mask (METHODS.md section 4)."""
    raw.setdefault("prune", {})["mask"] = _need(outputs, "mask")


def feed_pair(raw: dict, members: list, exp: Any) -> None:
    """A loss contour takes the two fine-tuned models of its group (w_adam, w_sam: their optimizers differ) and their
    base model as w_init (METHODS.md section 11)."""
    names = [record["config"]["optimizer"]["name"] for record, _ in members]
    if len(members) != 2 or len(set(names)) != 2:
        raise ParentOutputMissing(f"expected each group of parent trials to hold two that differ in optimizer.name "
                                  f"(w_adam, w_sam), got a group of {len(members)} (optimizer.name "
                                  f"{', '.join(names) or 'none'})")
    bases = {record["config"]["model"] for record, _ in members}
    if len(bases) != 1:
        raise ParentOutputMissing(f"expected parent trials fine-tuned from one model (w_init), got {sorted(bases)}")
    raw["model"] = bases.pop()
    raw.setdefault("contour", {}).update(models=[_need(outputs, "model") for _, outputs in members], labels=names)


def _finetune_outputs(cfg: Any) -> set[str]:
    return {"model", "mask"} if cfg.prune.active else {"model"}


FINETUNE_FILES = {"model": MODEL_FILE, "mask": MASK_FILE}

register(Method(
    "finetune", "flatray.methods.finetune:run", "Adam/SAM/ASAM fine-tuning (a mask makes it a pruned run)",
    files=FINETUNE_FILES, produces=_finetune_outputs, early_stopping=True,
    report=("flatray.report.flatness:search_scatter",), report_row="flatray.report.pruning:pruned_root_row"))
register(Method(
    "imp", "flatray.methods.finetune:run", "one IMP level: prune the parent's weights, rewind, re-train",
    runs_as="finetune", needs=("model",), uses=("mask",), files=FINETUNE_FILES, produces=_finetune_outputs,
    feed=feed_imp_level, chained=True, report=("flatray.report.pruning:imp_sparsity",),
    report_row="flatray.report.pruning:imp_row"))
register(Method(
    "transfer", "flatray.methods.finetune:run", "re-train from theta_0 under the parent's mask (ticket transfer)",
    runs_as="finetune", needs=("mask",), files=FINETUNE_FILES, produces=_finetune_outputs, feed=feed_mask,
    early_stopping=True,
    report=("flatray.report.pruning:transfer_mask_optimizer", "flatray.report.pruning:transfer_heatmap"),
    report_row="flatray.report.pruning:transfer_row"))
register(Method(
    "ptq", "flatray.methods.ptq:run", "dynamic int8 quantization of the parent's model, measured on the CPU",
    needs=("model",), files={"export": INT8_FILE}, cpu_only=True,
    report=("flatray.report.quantization:ptq_table",)))
register(Method(
    "cofi", "flatray.methods.cofi:run", "CoFi structured pruning, distilled from the parent as teacher",
    needs=("model",), files={"model": MODEL_FILE},
    report=("flatray.report.pruning:cofi_table",)), aliases=("structured",))
register(Method(
    "squat", "flatray.methods.squat:run", "low-bit LSQ QAT with SAM/ASAM (SQuAT), distilled from the parent",
    needs=("model",), files={"export": LSQ_EXPORT_FILE}, early_stopping=True,
    report=("flatray.report.quantization:squat_bits",), report_row="flatray.report.quantization:squat_row"))
register(Method(
    "sharpness", "flatray.methods.sharpness:run", "dev metrics and epsilon-sharpness of the parent's model",
    needs=("model",), report=("flatray.report.flatness:sharpness_table",)))
register(Method(
    "oneshot", "flatray.methods.oneshot:run", "one-shot global magnitude pruning of the parent's model to each "
    "sparsity, evaluated without retraining", needs=("model",), report=("flatray.report.oneshot:oneshot_sparsity",)))
register(Method(
    "contour", "flatray.methods.contour:run", "the loss on the plane through w_init and two fine-tuned models (feed: "
    "group)", needs=("model",), feed_group=feed_pair, files={"contour": CONTOUR_FILE},
    report=("flatray.report.contour:contour_figure",)))
