"""P1's published numbers beside flatray's: the "Against P1" section of the report.

P1 (Na, Mehta, Strubell 2022) gives its tables as numbers only (no code); p1.yaml holds them, transcribed from the
method specification (METHODS.md 10-11). `p1_numbers()` reads them as one long table; `against_p1(df, out)` finds
the finished trials that measured the same thing and prints P1's value next to flatray's mean ± std (n) and the
difference. A trial matches a P1 cell when:

- its base model (the model its lineage's root trial fine-tuned) is P1's, bert-base-uncased (the last part of the
  name, so google-bert/bert-base-uncased and a local folder of that name count);
- it measured the same thing (`setting`): a dense fine-tuned model (full), an IMP level with rewinding (imp), a
  level without rewinding (std), a ticket re-trained on its own task (Table 6: a transfer within the task, or a
  random mask from theta_0), a dense model before/after dynamic int8 (ptq), a CoFi student at 95% whose real
  sparsity is within 1% of it (cofi), or the sharpness of a full or IMP model;
- with the same optimizer (adam, sam; swa = Adam with weight averaging), task, sparsity (P1's pruned numbers are
  at each task's reference sparsity) and metric;
- and trained with P1's settings (METHODS.md 1): the task's default lr, epochs, batch size and max length, no
  warmup or weight decay, rho 0.05 for SAM, full data, no l1; SWA at lr 8e-5 over the last 50%. Trials that differ
  are listed, not compared.

Where P1 has both, the dev value (Table 5, what flatray measures) is used, else the GLUE test value of Table 1,
and the table and split are named. Values are in P1's units: flatray's GLUE fractions x 100; SQuAD F1 and
sharpness phi are already on P1's scale. Delta = flatray - P1.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from flatray import methods
from flatray.report.load import _get, _num
from flatray.report.tables import (
    DASH, Section, _best_of_search, _cell, _delta, _finished, _markdown, _opt_key, _task_key)

DATA = Path(__file__).with_name("p1.yaml")
P1_MODEL = "bert-base-uncased"
# A column of p1.yaml: the task and the flatray metric key it is compared with (ptq trials prefix float/, int8/).
COLUMNS = {
    "mnli": ("mnli", "validation_matched/accuracy"), "mnli-mm": ("mnli", "validation_mismatched/accuracy"),
    "qqp": ("qqp", "validation/accuracy"), "qqp-f1": ("qqp", "validation/f1"),
    "stsb": ("stsb", "validation/pearson"), "qnli": ("qnli", "validation/accuracy"),
    "mrpc": ("mrpc", "validation/accuracy"), "mrpc-f1": ("mrpc", "validation/f1"),
    "rte": ("rte", "validation/accuracy"), "sst2": ("sst2", "validation/accuracy"),
    "cola": ("cola", "validation/matthews"), "squad": ("squad", "validation/f1"),
}
SETTINGS = {"full": "Full", "imp": "IMP", "std": "Std (no rewind)", "ticket": "ticket", "cofi": "CoFi",
            "cofi-teacher": "CoFi teacher", "ptq-float": "float (before int8)", "ptq-int8": "dynamic int8",
            "qat-int8": "QAT int8"}
OPTIMIZERS = {"adam": "Adam", "sam": "SAM", "swa": "SWA", "chen": "Chen et al.", "q8bert": "Q8BERT"}
PREFERENCE = (5, 6, 3, 4, 8, 2, 7, 1)  # the dev tables first; Table 1 (GLUE test) last
KEY = ["task", "metric", "setting", "optimizer", "mask", "sparsity_pct"]
P1_SETTINGS = "METHODS.md 1 (task defaults, no warmup or weight decay, rho 0.05, full data, no l1)"
SWA_LR = 8e-5  # P1 A.2: SWA runs start at lr 8e-5


# ------------------------------------------------------------------------------------------------ P1's numbers


@functools.cache
def _numbers() -> pd.DataFrame:
    data = yaml.safe_load(DATA.read_text())
    reference = data["reference_sparsity"]
    records = []
    for block in data["blocks"]:
        split = block["split"]
        for row in block["rows"]:
            if len(row["values"]) != len(block["columns"]):
                raise ValueError(f"{DATA}: Table {block['table']}, {row['setting']} {row['optimizer']}: "
                                 f"{len(row['values'])} values for {len(block['columns'])} columns")
            for column, value in zip(block["columns"], row["values"]):
                if value is None:
                    continue
                task, metric = COLUMNS[column]
                where = split if isinstance(split, str) else split["squad" if task == "squad" else "glue"]
                sparsity = {"imp": reference[task], "std": reference[task], "ticket": reference[task],
                            "cofi": 95}.get(row["setting"], 0)
                records.append(dict(table=int(block["table"]), split=where, task=task,
                                    metric=block.get("metric", metric), setting=row["setting"],
                                    optimizer=row["optimizer"], mask=row.get("mask", ""),
                                    sparsity_pct=float(sparsity), value=float(value)))
    out = pd.DataFrame(records)
    out["source"] = [f"Table {t} ({s})" for t, s in zip(out["table"], out["split"])]
    return out


def p1_numbers() -> pd.DataFrame:
    """Every value of P1's tables, one row each: table, split (dev/test), task, metric (the flatray metric key it
    compares with), setting, optimizer, mask, sparsity_pct, value (P1's units) and source ("Table 5 (dev)")."""
    return _numbers().copy()


def _value(v: float) -> str:
    """A P1 value as P1 prints it: one decimal, two where it has two (Table 8)."""
    return f"{v:.1f}" if round(v, 1) == v else f"{v:.2f}"


def reference() -> pd.DataFrame:
    """One P1 value per cell (KEY): the dev one where P1 has both, from the most direct table (PREFERENCE); `other`
    lists the values of the same cell in other tables."""
    numbers = _numbers().copy()
    numbers["rank"] = [(s != "dev", PREFERENCE.index(t)) for s, t in zip(numbers["split"], numbers["table"])]
    numbers = numbers.sort_values("rank", kind="stable").drop(columns="rank")
    first = ~numbers.duplicated(KEY)
    others: dict[tuple, list[str]] = {}
    for rec in numbers[~first].to_dict("records"):
        others.setdefault(tuple(rec[k] for k in KEY), []).append(f"{rec['source']}: {_value(rec['value'])}")
    best = numbers[first].reset_index(drop=True)
    best["other"] = ["; ".join(others.get(tuple(rec[k] for k in KEY), [])) for rec in best.to_dict("records")]
    return best


# ------------------------------------------------------------------------------------------------ flatray's side


def _is_p1_model(name: Any) -> bool:
    return isinstance(name, str) and Path(name.rstrip("/")).name == P1_MODEL


def _optimizer(cfg: dict) -> str:
    """P1's name for how the run trained: adam, sam, or swa (Adam with weight averaging, P1's "IMP SWA")."""
    name = _get(cfg, "optimizer.name", "adam")
    return ("swa" if name == "adam" else f"{name}+swa") if _get(cfg, "swa.enabled", False) else name


def _deviations(cfg: dict) -> list[str]:
    """How a fine-tuning run's config differs from P1's settings (empty: as P1)."""
    from flatray.data import TASKS

    spec = TASKS.get(cfg.get("task"))
    if spec is None or cfg.get("task_definition"):
        return [f"task {cfg.get('task')} (not one of P1's)"]
    swa = bool(_get(cfg, "swa.enabled", False))
    want = {"train.lr": SWA_LR if swa else spec.defaults["lr"], "train.epochs": spec.defaults["epochs"],
            "train.batch_size": spec.defaults["batch_size"], "data.max_length": spec.defaults["max_length"],
            "train.warmup_ratio": 0.0, "train.weight_decay": 0.0, "train.schedule": "linear", "train.l1": 0.0,
            "data.max_train_samples": None, "data.max_eval_samples": None}
    if _get(cfg, "optimizer.name") == "sam":
        want["optimizer.rho"] = 0.05
    if swa:
        want["swa.start"] = 0.5
    out = []
    for key, expected in want.items():
        value = _get(cfg, key)
        same = value == expected if expected is None or isinstance(expected, str) else (
            value is not None and math.isclose(_num(value), expected, rel_tol=1e-9, abs_tol=1e-12))
        if not same and not (expected == 0.0 and value is None):  # an older record without the key: its default
            out.append(f"{key} {value} (P1: {expected})")
    return out


FINETUNING = ("finetune", "imp", "transfer")


def _lineage_deviations(row: pd.Series, rows: pd.DataFrame) -> list[str]:
    """_deviations of the trial and of every fine-tuning run it descends from."""
    out, node, seen = [], row, set()
    while node is not None and node["id"] not in seen:
        seen.add(node["id"])
        if methods.canonical(str(node["kind"])) in FINETUNING:
            out += [d for d in _deviations(node["config"]) if d not in out]
        parent = node["parent"]
        node = rows.loc[parent] if isinstance(parent, str) and parent in rows.index else None
    return out


def _dense(row: pd.Series) -> bool:
    """A dense fine-tuned model: a root fine-tuning run without any pruning."""
    return (methods.canonical(str(row["kind"])) == "finetune" and not isinstance(row["parent"], str)
            and not (_get(row["config"], "prune.sparsity") is not None or _get(row["config"], "prune.mask")))


def _what(row: pd.Series, rows: pd.DataFrame) -> list[dict] | str:
    """The P1 settings a finished trial measured, as [{setting, optimizer, mask, sparsity_pct, prefix, keys,
    model}] (prefix: of its metric keys; keys: "dev" or "sharpness"; model: the measured model, to count a model
    measured twice once), or why it matches no P1 cell."""
    kind = methods.canonical(str(row["kind"]))
    cfg = row["config"]
    sparsity = _num(row.get("sparsity_pct"))
    base = dict(optimizer=_optimizer(cfg), mask="", sparsity_pct=0.0, prefix="", keys="dev", model=row["id"])
    if kind == "finetune" and not isinstance(row["parent"], str):
        if _dense(row):
            return [dict(base, setting="full"), dict(base, setting="full", keys="sharpness")]
        if _get(cfg, "prune.method") == "random" and not math.isnan(sparsity):
            return [dict(base, setting="ticket", mask="random", sparsity_pct=sparsity)]
        return "a pruned run from theta_0 that P1 does not report"
    if kind == "imp":
        if _get(cfg, "prune.method") == "random":
            if _get(cfg, "prune.rewind") == "none":
                return "a random chain without rewinding (P1 reports none)"
            return [dict(base, setting="ticket", mask="random", sparsity_pct=sparsity)]
        setting = "std" if _get(cfg, "prune.rewind") == "none" else "imp"
        return [dict(base, setting=setting, sparsity_pct=sparsity), dict(base, setting=setting, keys="sharpness",
                                                                         sparsity_pct=sparsity)]
    if kind == "transfer":
        if row.get("source_task") != row["task"]:
            return "a transfer across tasks (P1 Figure 4 gives no numbers)"
        mask = "random" if row.get("mask_method") == "random" else row.get("mask_optimizer")
        return [dict(base, setting="ticket", mask=mask, sparsity_pct=sparsity)]
    parent = rows.loc[row["parent"]] if isinstance(row["parent"], str) and row["parent"] in rows.index else None
    if parent is None or parent["status"] != "done":
        return "its parent trial is not finished"
    measured = dict(base, optimizer=_optimizer(parent["config"]), model=parent["id"])
    if kind == "ptq":
        if not _dense(parent):
            return "int8 of a pruned model (P1 Table 8 quantizes the full models)"
        if _get(cfg, "ptq.embeddings", False):
            return "ptq.embeddings true (P1 quantizes the Linear layers only)"
        return [dict(measured, setting="ptq-float", prefix="float/"), dict(measured, setting="ptq-int8",
                                                                          prefix="int8/")]
    if kind == "cofi":
        target = _num(_get(cfg, "cofi.target_sparsity"))
        real = _num(row.get("sparsity"))
        if not abs(real - target) <= 0.01:
            return f"CoFi's real sparsity {real:.4f} is not within 1% of its target {target:g} (P1 accepts within 1%)"
        return [dict(measured, setting="cofi", sparsity_pct=round(100 * target, 2))]
    if kind == "sharpness":
        pkind = methods.canonical(str(parent["kind"]))
        if _dense(parent):
            return [dict(measured, setting="full", keys="sharpness")]
        if pkind == "imp" and _get(parent["config"], "prune.method", "magnitude") == "magnitude":
            setting = "std" if _get(parent["config"], "prune.rewind") == "none" else "imp"
            return [dict(measured, setting=setting, keys="sharpness", sparsity_pct=_num(parent.get("sparsity_pct")))]
        return "the sharpness of a model P1 does not report"
    return f"kind {row['kind']} (P1 reports no numbers for it)"


def _scale(task: str, metric: str) -> float:
    """flatray's value -> P1's units: GLUE fractions to percent; SQuAD F1 and sharpness phi are on P1's scale."""
    return 1.0 if metric.startswith("sharpness/") or task == "squad" else 100.0


def measurements(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per (finished trial of P1's model, P1 setting, metric it reported): experiment, id, task, setting,
    optimizer, mask, sparsity_pct, metric, value (P1's units). Also returns notes on the trials left out."""
    columns = ["experiment", "id", "model", "task", "setting", "optimizer", "mask", "sparsity_pct", "metric",
               "value", "order"]
    done = _finished(df)
    if done.empty:
        return pd.DataFrame(columns=columns), []
    rows = df.set_index("id", drop=False)
    base_model = {tid: (rows.at[root, "config"] or {}).get("model") if root in rows.index else None
                  for tid, root in zip(df["id"], df["root"])}
    done = done[[_is_p1_model(base_model[t]) for t in done["id"]]]
    cofi = done["kind"].map(lambda k: methods.canonical(str(k)) == "cofi")
    # P1 accepts a CoFi student within 1% of its target sparsity; a grid per teacher (P1 Table 7) counts by its
    # best accepted dev score, as the report's CoFi table counts a search
    accepted = [abs(_num(s) - _num(_get(c, "cofi.target_sparsity"))) <= 0.01
                for s, c in zip(done.get("sparsity", pd.Series(math.nan, index=done.index)), done["config"])]
    accepted = pd.Series(accepted, index=done.index)
    notes = []
    if (cofi & ~accepted).any():
        notes.append(f"P1: {int((cofi & ~accepted).sum())} CoFi trial(s) ended more than 1% from their target "
                     "sparsity (P1 accepts within 1%; their cofi.sparsity_tolerance was wider): not compared")
    done = pd.concat([done[~cofi], _best_of_search(done[cofi & accepted], ["task"])])
    metric_keys = {m for m in p1_numbers()["metric"]}
    out, deviating = [], {}
    for _, row in done.iterrows():
        what = _what(row, rows)
        if isinstance(what, str):
            continue  # measures nothing P1 reports
        differs = _lineage_deviations(row, rows)
        if differs:
            deviating.setdefault(row["experiment"], []).append(differs)
            continue
        for w in what:
            for metric in metric_keys:
                if metric.startswith("sharpness/") != (w["keys"] == "sharpness"):
                    continue
                value = _num(row.get(w["prefix"] + metric))
                if math.isnan(value):
                    continue
                out.append(dict(experiment=row["experiment"], id=row["id"], model=w["model"], task=row["task"],
                                setting=w["setting"], optimizer=w["optimizer"], mask=w["mask"] or "",
                                sparsity_pct=float(w["sparsity_pct"]), metric=metric,
                                value=value * _scale(row["task"], metric),
                                order=int(methods.canonical(str(row["kind"])) != "sharpness")))
    for experiment, lists in sorted(deviating.items()):
        first = "; ".join(lists[0])
        notes.append(f"P1: {len(lists)} trial(s) of experiment {experiment} not compared with P1: trained unlike P1 "
                     f"({first}{' …' if any(d != lists[0] for d in lists) else ''}); P1's settings: {P1_SETTINGS}")
    found = pd.DataFrame(out, columns=columns)
    # A model measured twice (its sharpness by a sharpness trial and at the end of its own run) counts once.
    found = found.sort_values("order", kind="stable").drop_duplicates(["model", "setting", "metric"])
    return found.drop(columns="order"), notes


# ------------------------------------------------------------------------------------------------ the section


def p1_value(task: str, setting: str, optimizer: str, metric: str, sparsity_pct: float = 0.0,
             mask: str = "") -> tuple[float, str] | None:
    """P1's value of one cell and where it is from ("Table 5 (dev)"), or None."""
    ref = reference()
    hit = ref[(ref["task"] == task) & (ref["setting"] == setting) & (ref["optimizer"] == optimizer)
              & (ref["metric"] == metric) & (ref["sparsity_pct"] == float(sparsity_pct)) & (ref["mask"] == mask)]
    return (float(hit["value"].iloc[0]), str(hit["source"].iloc[0])) if len(hit) else None


def compare(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """flatray's cells (mean, std, n per experiment and P1 cell) joined with P1's values: table, split, source,
    experiment, KEY..., p1, mean, std, n, diff (= mean - p1), other; and the notes of measurements()."""
    found, notes = measurements(df)
    cols = ["table", "split", "source", "experiment", *KEY, "p1", "mean", "std", "n", "diff", "other"]
    if found.empty:
        return pd.DataFrame(columns=cols), notes
    stats = found.groupby(["experiment", *KEY], sort=False)["value"].agg(
        mean="mean", std="std", n="count").reset_index()  # std: ddof=1, as the papers
    ref = reference().rename(columns={"value": "p1"})
    table = stats.merge(ref, on=KEY, how="inner")
    table["diff"] = table["mean"] - table["p1"]
    table = table.assign(_t=table["task"].map(_task_key), _o=table["optimizer"].map(_opt_key))
    table = table.sort_values(["table", "_t", "setting", "mask", "_o", "metric", "experiment"], kind="stable")
    return table[cols].reset_index(drop=True), notes


def _label(rec: dict) -> str:
    opt = OPTIMIZERS.get(rec["optimizer"], rec["optimizer"])
    if rec["setting"] == "ticket":
        mask = "random mask" if rec["mask"] == "random" else f"{OPTIMIZERS.get(rec['mask'], rec['mask'])} ticket"
        return f"{mask}, re-trained with {opt}"
    if rec["setting"] == "cofi":
        return f"CoFi, {opt} teacher"
    if rec["setting"].startswith("ptq-"):
        return f"{opt}, {SETTINGS[rec['setting']]}"
    return f"{SETTINGS.get(rec['setting'], rec['setting'])} {opt}"


TITLES = {1: "Table 1 (GLUE test; SQuAD dev F1): flatray's dev value against P1's test value",
          2: "Table 2 (dev): CoFi structured pruning at 95%", 3: "Table 3: sharpness φ of the full models",
          4: "Table 4: sharpness φ at the reference sparsities", 5: "Table 5 (dev): full, IMP and Std at the "
          "reference sparsities", 6: "Table 6 (dev): ticket x re-training optimizer", 7: "Table 7 (dev): CoFi "
          "reproduction", 8: "Table 8 (dev): dynamic int8 quantization"}


def against_p1(df: pd.DataFrame, out: Path) -> list[Section]:
    """The "Against P1" section: every finished flatray cell that matches a P1 cell, with P1's value and the
    difference, one table per P1 table; nothing when the sweep has no trial of P1's model."""
    done = _finished(df)
    if done.empty:
        return []
    rows = df.set_index("id", drop=False)
    if not any(_is_p1_model((rows.at[r, "config"] or {}).get("model")) for r in done["root"] if r in rows.index):
        return []  # e.g. a tiny-bert sweep: nothing to compare
    sec = Section("Against P1 (Na et al. 2022)",
                  f"P1's published values (flatray/report/p1.yaml) beside flatray's mean ± std (n) over the matching "
                  f"finished trials, in P1's units (GLUE metrics in %, SQuAD F1 0-100, sharpness φ in %); Δ = "
                  f"flatray − P1. A cell matches on the base model ({P1_MODEL}), task, what was measured, optimizer, "
                  f"sparsity (P1's pruned numbers are at each task's reference sparsity) and metric, for trials "
                  f"trained with P1's settings. flatray measures dev sets: P1's dev value is used where P1 has one "
                  f"(Table 5 before Table 1); Table 1's GLUE columns are test sets, so their Δ also holds the "
                  f"dev-test gap. `from` names P1's table.")
    table, notes = compare(df)
    sec.missing += notes
    if table.empty:
        sec.missing.append("P1: no finished trial matches a cell of P1's tables (task, setting, optimizer, sparsity, "
                           "metric)")
        return [sec]
    sec.tables["p1"] = table
    parts = []
    for number, t in table.groupby("table", sort=True):
        lines = [[r["task"], _label(r), f"{r['sparsity_pct']:g}%", r["metric"], _cell(r["mean"], r["std"], r["n"], 2),
                  _value(r["p1"]), _delta(r["diff"], 2), r["source"], r["other"] or DASH, r["experiment"]]
                 for r in t.to_dict("records")]
        md = _markdown(pd.DataFrame(lines, columns=["task", "P1 row", "sparsity", "metric", "flatray", "P1", "Δ",
                                                    "from", "also in P1", "experiment"]))
        parts.append(f"**{TITLES.get(number, f'Table {number}')}**\n\n{md}")
    matched = len(table.drop_duplicates(KEY))
    parts.append(f"{matched} of P1's {len(reference())} cells are compared here (each paper sweep covers a part of "
                 "P1; sweeps/paper/README.md maps them).")
    sec.markdown["p1"] = "\n\n".join(parts)
    return [sec]
