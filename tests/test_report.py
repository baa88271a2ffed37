"""flatray.report on a synthetic sweep folder written in the documented layout (docs/SWEEPS.md): every figure and
table is written, and the numbers in the CSV tables equal means and sample standard deviations (ddof=1, as the
papers report) computed here independently with numpy from what the test wrote."""

import hashlib
import json
import math
import warnings
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from flatray import report as rep
from flatray.config import RunConfig
from flatray import methods

RUN_KIND = {name: m.runs_as or m.name for name, m in methods.METHODS.items()}  # experiment kind -> run-config kind
RUN_KIND.update({alias: RUN_KIND[name] for alias, name in methods.ALIASES.items()})

SWEEP = "synth"
TASKS = ("rte", "mrpc", "cola")
SEEDS = (0, 1, 2)
EPS = (5e-3, 1e-3, 5e-4)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


class FakeSweep:
    """Writes trial.json (+ summary.json) folders as flatray.sweep does, and remembers what it wrote."""

    def __init__(self, root):
        self.root = root
        self.records: dict[str, dict] = {}
        self.rng = np.random.default_rng(0)

    def add(self, experiment, kind, *, task, optimizer="adam", seed=0, parents=(), level=None, point=None,
            config=None, metrics=None, status="done", corrupt=False, paths=None):
        raw = _merge({"kind": RUN_KIND[kind], "model": "tiny-bert", "task": task, "train": {"seed": seed},
                      "optimizer": {"name": optimizer}}, config or {})
        cfg = RunConfig.model_validate(raw).model_dump(mode="json")
        cfg = _merge(cfg, paths or {})  # the parent's paths, filled in after validation (they do not exist here)
        tid = hashlib.sha256(f"{experiment}-{len(self.records)}".encode()).hexdigest()[:12]
        folder = self.root / tid
        folder.mkdir(parents=True)
        trial = {"id": tid, "sweep": SWEEP, "experiment": experiment, "kind": kind, "parents": list(parents),
                 "level": level, "point": point or {"optimizer.name": optimizer, "train.seed": seed}, "config": cfg,
                 "dir": str(folder)}
        (folder / "trial.json").write_text(json.dumps(trial, indent=2))
        metrics = dict(metrics or {})
        if status is not None:
            summary = {"id": tid, "experiment": experiment, "kind": kind, "status": status, "metrics": metrics,
                       "history": [metrics], "checkpoint": f"{folder}/train/checkpoint_x",
                       "outputs": {"model": f"{folder}/train/checkpoint_x", "mask": None, "export": None},
                       "attempts": 1, "wall_s": 1.0, "error": None if status == "done" else "boom"}
            text = json.dumps(summary)
            (folder / "summary.json").write_text(text[: len(text) // 2] if corrupt else text)
        self.records[tid] = dict(id=tid, experiment=experiment, kind=kind, task=task, optimizer=optimizer, seed=seed,
                                 level=level, parents=list(parents), cfg=cfg, metrics=metrics,
                                 status="corrupt" if corrupt else (status or "running"))
        return tid

    def score(self, base):
        return float(np.clip(base + self.rng.normal(0, 0.02), 0, 1))

    def done(self, kind=None):
        return [r for r in self.records.values() if r["status"] == "done" and (kind is None or r["kind"] == kind)]


def build(root) -> FakeSweep:
    s = FakeSweep(root)
    base = {"rte": 0.65, "mrpc": 0.82, "cola": 0.50}
    roots = {}  # (task, optimizer, seed) -> id of the dense fine-tuned model
    for task in TASKS:
        for opt in ("adam", "sam"):
            for seed in SEEDS:
                lr = float(np.exp(s.rng.uniform(np.log(1e-5), np.log(1e-4))))
                metrics = {"score": s.score(base[task] + (0.01 if opt == "sam" else 0)), "sparsity": 0.0,
                           "epoch": 3}
                metrics[f"validation/{'matthews' if task == 'cola' else 'accuracy'}"] = metrics["score"]
                if task == "mrpc":  # a fine-tuning run that measured its own sharpness
                    metrics.update({f"sharpness/eps={e:g}": s.rng.uniform(5, 20) for e in EPS})
                status = "failed" if (task, opt, seed) == ("cola", "adam", 2) else "done"
                tid = s.add("full", "finetune", task=task, optimizer=opt, seed=seed, status=status,
                            point={"optimizer.name": opt, "train.seed": seed, "train.lr": lr},
                            config={"train": {"lr": lr}, "sharpness": {"enabled": task == "mrpc"}}, metrics=metrics)
                if status == "done":
                    roots[(task, opt, seed)] = tid

    # P1's random control as sweeps/paper/table1_imp.yaml runs it: a root fine-tuning run with a random mask
    for opt in ("adam", "sam"):
        for seed in SEEDS:
            for sparsity in (0.2, 0.4):
                if (opt, sparsity) == ("sam", 0.4):
                    continue  # a gap: mrpc / sam random at 40%
                s.add("random", "finetune", task="mrpc", optimizer=opt, seed=seed,
                      point={"optimizer.name": opt, "train.seed": seed, "prune.sparsity": sparsity},
                      config={"prune": {"method": "random", "sparsity": sparsity}},
                      metrics={"score": s.score(base["mrpc"] - 0.2 * sparsity), "sparsity": sparsity})

    level2 = {}  # (task, optimizer, seed) -> the 40% magnitude ticket
    for (task, opt, seed), root_id in roots.items():
        chains = [("imp", "magnitude")] + ([("imp_random", "random")] if task == "rte" and seed < 2 else [])
        for experiment, method in chains:
            parent = root_id
            for level in (1, 2, 3):
                status, corrupt = "done", False
                if (task, opt, level) == ("mrpc", "sam", 3):
                    status = None  # still running: the 60% cell of mrpc / sam magnitude is missing
                if (task, opt, seed, level, method) == ("rte", "adam", 2, 2, "magnitude"):
                    corrupt = True
                drop = 0.03 * level if method == "magnitude" else 0.08 * level
                parent = s.add(experiment, "imp", task=task, optimizer=opt, seed=seed, parents=[parent], level=level,
                               config={"prune": {"sparsity": round(0.2 * level, 2), "method": method}},
                               paths={"prune": {"parent": "ckpt"}}, status=status, corrupt=corrupt,
                               metrics={"score": s.score(base[task] - drop), "sparsity": 0.2 * level})
                if level == 2 and method == "magnitude":
                    level2[(task, opt, seed)] = parent

    for (task, opt, seed), ticket in level2.items():
        targets = {"rte": [("rte", ("adam", "sam")), ("mrpc", (opt, "sam") if opt == "adam" else (opt,)),
                           ("cola", (opt,))],
                   "mrpc": [("mrpc", ("adam", "sam")), ("rte", (opt,))], "cola": []}[task]
        for target, retrain in targets:
            if target == "cola" and opt == "adam":
                continue  # no Adam ticket for rte -> cola: that heatmap cell is n/a
            for ropt in retrain:
                if (task, target, opt, ropt) == ("mrpc", "mrpc", "sam", "adam"):
                    continue  # missing cell of the mask x optimizer table
                s.add("transfer", "transfer", task=target, optimizer=ropt, seed=seed, parents=[ticket],
                      point={"optimizer.name": ropt, "train.seed": seed}, paths={"prune": {"mask": "mask.st"}},
                      metrics={"score": s.score(base[target] - 0.02)})

    for (task, opt, seed), root_id in roots.items():
        if task in ("rte", "mrpc"):
            fl = s.records[root_id]["metrics"]["score"]
            i8 = fl - (0.01 if opt == "sam" else 0.05) + s.rng.normal(0, 0.005)
            s.add("ptq", "ptq", task=task, optimizer=opt, seed=seed, parents=[root_id], metrics={
                "score": i8, "float/score": fl, "int8/score": i8, "float/size_mb": 417.7 + s.rng.normal(),
                "int8/size_mb": 173.1 + s.rng.normal(), "size_ratio": 2.41 + s.rng.normal(0, 0.01),
                "float/latency_ms": 50 + s.rng.normal(), "int8/latency_ms": 30 + s.rng.normal(),
                "speedup": 1.66 + s.rng.normal(0, 0.01)})
        if task == "rte":
            s.add("cofi", "structured", task=task, optimizer="adam", seed=seed, parents=[root_id],
                  metrics={"score": s.score(0.6), "sparsity": 0.95 + s.rng.normal(0, 0.002),
                           "params": int(5e6 + s.rng.integers(1000)), "teacher_params": int(1.1e8)})
            s.add("sharpness", "sharpness", task=task, optimizer=opt, seed=seed, parents=[root_id],
                  metrics={"score": s.records[root_id]["metrics"]["score"],
                           **{f"sharpness/eps={e:g}": s.rng.uniform(5, 20) for e in EPS}})

    squat = {"SQuAT": ("sam", {"alternate": True}), "SAM+LSQ joint": ("sam", {"alternate": False}),
             "LSQ-QAT + KD": ("adam", {}), "LSQ-QAT": ("adam", {"kd_logits": 0.0, "task_loss": 1.0})}
    for seed in SEEDS:
        teacher = roots[("rte", "adam", seed)]
        for method, (opt, extra) in squat.items():
            for bits in (2, 4):
                if (method, bits) == ("LSQ-QAT", 2):
                    continue
                # seed 0's SQuAT at 4 bits searched rho: three trials, the best one counts
                for rho in ((0.01, 0.05, 0.2) if (method, bits, seed) == ("SQuAT", 4, 0) else (None,)):
                    s.add("squat", "squat", task="rte", optimizer=opt, seed=seed, parents=[teacher],
                          point={"optimizer.name": "adam", "train.seed": seed, **({"optimizer.rho": rho} if rho else {})},
                          config={"squat": {"weight_bits": bits, **extra}, "optimizer": {"rho": rho}},
                          metrics={"score": s.score(0.55 + 0.02 * bits), "export_bytes": 1000 * bits})
    # sharpness of a pruned model: not part of P1 Table 3, listed as left out
    s.add("sharp_imp", "sharpness", task="rte", optimizer="sam", seed=0, parents=[level2[("rte", "sam", 0)]],
          metrics={"score": 0.6, **{f"sharpness/eps={e:g}": 1.0 for e in EPS}})
    return s


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps") / SWEEP
    s = build(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = rep.report(root, wandb_settings=None)
    return s, root, out, [str(w.message) for w in caught if issubclass(w.category, rep.ReportWarning)]


def stats(values):
    """What the report must show: mean, sample std (ddof=1; undefined for one value), n."""
    v = np.asarray(values, dtype=float)
    return v.mean(), (v.std(ddof=1) if len(v) > 1 else math.nan), len(v)


def check(csv, keys, expected, value="", n_col="n"):
    """Every CSV row equals the expected (mean, std, n) of its key, and every expected key has a row."""
    seen = set()
    for row in csv.to_dict("records"):
        key = tuple(row[k] for k in keys)
        assert key in expected, key
        mean, std, n = stats(expected[key])
        assert row[f"{value}mean"] == pytest.approx(mean, rel=1e-9), key
        if math.isnan(std):
            assert math.isnan(row[f"{value}std"]), key
        else:
            assert row[f"{value}std"] == pytest.approx(std, rel=1e-9), key
        assert row[n_col] == n, key
        seen.add(key)
    assert seen == set(expected)


def test_writes_every_figure_and_table(sweep):
    s, root, out, caught = sweep
    for name in ("imp_sparsity.png", "transfer_heatmap.png", "squat_bits.png", "sharpness.png", "search_full.png",
                 "search_random.png", "README.md", "trials.csv"):
        assert (out / name).stat().st_size > 0, name
    for table in ("imp_sparsity", "transfer_mask_optimizer", "transfer_heatmap", "ptq", "cofi", "squat_bits",
                  "sharpness", "search_full", "search_random"):
        assert (out / f"{table}.csv").stat().st_size > 0, table
        assert (out / f"{table}.md").stat().st_size > 0, table
    readme = (out / "README.md").read_text()
    for figure in out.glob("*.png"):
        assert f"]({figure.name})" in readme
    corrupt = next(r["id"] for r in s.records.values() if r["status"] == "corrupt")
    assert f"trial {corrupt} (imp, imp, task rte): corrupt" in readme
    assert "mrpc / sam magnitude at 60% sparsity: no finished trial" in readme
    assert "mrpc / sam random at 40% sparsity: no finished trial" in readme
    assert "mrpc / sam random at 60% sparsity" not in readme  # no random control was planned at 60%
    assert "transfer heatmap (matched, 40%): rte -> cola: only SAM tickets, no pair" in readme
    assert "squat: rte / LSQ-QAT at 2 bits: no finished trial" in readme
    assert "1 measured trial(s) of pruned/quantized models left out" in readme
    assert ": failed" in readme and ": running" in readme
    # the only warning: the corrupt summary.json (no builder failed)
    assert len(caught) == 1 and "corrupt summary.json" in caught[0], caught


def test_imp_table_numbers(sweep):
    s, root, out, _ = sweep
    expected, lines, roots = defaultdict(list), set(), defaultdict(set)
    for r in s.done("imp") + [r for r in s.done("finetune") if r["cfg"]["prune"]["sparsity"] is not None]:
        method = f"{r['optimizer']} {r['cfg']['prune']['method']}"
        expected[(r["task"], method, round(100 * r["cfg"]["prune"]["sparsity"], 2))].append(r["metrics"]["score"])
        lines.add((r["task"], r["optimizer"], method))
        top = r
        while top["parents"]:
            top = s.records[top["parents"][0]]
        if r["kind"] == "imp":
            roots[(r["task"], r["optimizer"])].add(top["id"])
    for task, opt, method in lines:  # 0%: the dense roots of the task's chains with that optimizer, once each
        expected[(task, method, 0.0)] += [s.records[i]["metrics"]["score"] for i in roots[(task, opt)]]
    csv = pd.read_csv(out / "imp_sparsity.csv")
    check(csv, ["task", "method", "sparsity_pct"], expected)
    assert ("mrpc", "sam magnitude", 60.0) not in expected  # the running level
    assert stats(expected[("rte", "adam magnitude", 40.0)])[2] == 2  # 3 seeds, one corrupt summary
    md = (out / "imp_sparsity.md").read_text()
    assert " ± " in md and rep.DASH in md


def test_transfer_tables(sweep):
    s, root, out, _ = sweep
    same, cross = defaultdict(list), defaultdict(list)
    for r in s.done("transfer"):
        ticket = s.records[r["parents"][0]]
        sparsity = round(100 * ticket["cfg"]["prune"]["sparsity"], 2)
        if ticket["task"] == r["task"]:
            same[(r["task"], sparsity, ticket["optimizer"], r["optimizer"])].append(r["metrics"]["score"])
        # the heatmap: across tasks, and within a task on its diagonal
        cross[(sparsity, r["optimizer"], ticket["task"], r["task"], ticket["optimizer"])].append(r["metrics"]["score"])
    csv = pd.read_csv(out / "transfer_mask_optimizer.csv")
    check(csv, ["task", "sparsity_pct", "mask_optimizer", "optimizer"], same)
    assert ("mrpc", 40.0, "sam", "adam") not in same
    assert rep.DASH in (out / "transfer_mask_optimizer.md").read_text()

    # Arms: "matched" (each ticket re-trained with the optimizer that found it) and one per re-training optimizer;
    # an arm without any SAM/Adam pair is left out (none here: same-task transfers re-train both tickets with adam).
    arms = defaultdict(lambda: defaultdict(list))
    for (sparsity, ropt, src, tgt, mopt), scores in cross.items():
        if ropt == mopt:
            arms["matched"][(sparsity, src, tgt, mopt)] += scores
        arms[ropt][(sparsity, src, tgt, mopt)] += scores
    expected = {}
    for arm, cells in arms.items():
        pairs = {}
        for (sparsity, src, tgt, mopt), scores in cells.items():
            pairs.setdefault((arm, sparsity, src, tgt), {})[mopt] = scores
        if any(len(v) == 2 for v in pairs.values()):
            expected.update(pairs)
    heat = pd.read_csv(out / "transfer_heatmap.csv")
    keys = [tuple(k) for k in heat[["retrain", "sparsity_pct", "source_task", "target_task"]].to_numpy()]
    assert sorted(keys) == sorted(expected) and {k[0] for k in keys} == {"matched", "adam", "sam"}
    for key, row in zip(keys, heat.to_dict("records")):
        sam, adam = expected[key].get("sam", []), expected[key].get("adam", [])
        assert (row["sam_n"], row["adam_n"]) == (len(sam), len(adam))
        if sam and adam:
            assert row["diff"] == pytest.approx(np.mean(sam) - np.mean(adam), rel=1e-9)
            assert row["sam_std"] == pytest.approx(np.std(sam, ddof=1), rel=1e-9)
        else:
            assert math.isnan(row["diff"])  # rte -> cola: SAM tickets only
    assert "n/a" in (out / "transfer_heatmap.md").read_text()


def test_ptq_and_cofi_tables(sweep):
    s, root, out, _ = sweep
    ptq = defaultdict(lambda: defaultdict(list))
    for r in s.done("ptq"):
        m = r["metrics"]
        key = (r["task"], s.records[r["parents"][0]]["optimizer"])
        for name, value in (("float_metric", m["float/score"]), ("int8_metric", m["int8/score"]),
                            ("drop", m["float/score"] - m["int8/score"]), ("int8_size_mb", m["int8/size_mb"]),
                            ("speedup", m["speedup"])):
            ptq[name][key].append(value)
    csv = pd.read_csv(out / "ptq.csv")
    for name, expected in ptq.items():
        check(csv, ["task", "optimizer"], expected, value=f"{name}_")

    cofi = defaultdict(lambda: defaultdict(list))
    for r in s.done("structured"):
        teacher = s.records[r["parents"][0]]
        key = (r["task"], teacher["optimizer"])
        cofi["teacher_metric"][key].append(teacher["metrics"]["score"])
        cofi["pruned_metric"][key].append(r["metrics"]["score"])
        cofi["sparsity"][key].append(r["metrics"]["sparsity"])
        cofi["params"][key].append(r["metrics"]["params"])
    csv = pd.read_csv(out / "cofi.csv")
    for name, expected in cofi.items():
        check(csv, ["task", "teacher_optimizer"], expected, value=f"{name}_")


def test_squat_and_sharpness_tables(sweep):
    s, root, out, _ = sweep
    names = {("sam", True): "SQuAT", ("sam", False): "SAM+LSQ joint"}
    best, teachers = {}, {}  # a search (same parent, method, bits) counts by its best trial
    for r in s.done("squat"):
        sq = r["cfg"]["squat"]
        method = names.get((r["optimizer"], sq["alternate"])) or ("LSQ-QAT + KD" if sq["kd_logits"] else "LSQ-QAT")
        key = (r["task"], method, sq["weight_bits"], r["parents"][0])
        best[key] = max(best.get(key, -1.0), r["metrics"]["score"])
        teachers[r["parents"][0]] = s.records[r["parents"][0]]["metrics"]["score"]
    expected = defaultdict(list)
    for (task, method, bits, _), score in best.items():
        expected[(task, method, bits)].append(score)
    assert len(s.done("squat")) == len(best) + 2
    expected[("rte", rep.SQUAT_TEACHER, 32)] = list(teachers.values())
    csv = pd.read_csv(out / "squat_bits.csv")
    check(csv, ["task", "method", "bits"], expected)
    assert len({k[1] for k in expected}) == 5

    sharp = defaultdict(list)
    for r in s.done():
        keys = [k for k in r["metrics"] if k.startswith("sharpness/eps=")]
        parent = s.records[r["parents"][0]] if r["parents"] else None
        if not keys or (r["kind"] == "sharpness" and parent["kind"] != "finetune"):
            continue
        opt = parent["optimizer"] if r["kind"] == "sharpness" else r["optimizer"]
        for k in keys:
            sharp[(r["task"], opt, float(k.split("=")[1]))].append(r["metrics"][k])
    csv = pd.read_csv(out / "sharpness.csv")
    check(csv, ["task", "optimizer", "eps"], sharp)


def test_search_table(sweep):
    s, root, out, _ = sweep
    csv = pd.read_csv(out / "search_full.csv")
    full = [r for r in s.done("finetune") if r["experiment"] == "full"]
    assert len(csv) == len(full)
    assert "train.lr" in csv.columns and "optimizer.rho" not in csv.columns  # rho differs only between optimizers
    lr = {r["id"]: r["cfg"]["train"]["lr"] for r in full}
    assert all(row["train.lr"] == pytest.approx(lr[row["id"]]) for row in csv.to_dict("records"))
    random = pd.read_csv(out / "search_random.csv")  # the random-mask control's grid over prune.sparsity
    assert list(random.columns) == ["id", "task", "optimizer", "seed", "prune.sparsity", "score"] and len(random) == 9


def tiny(root) -> FakeSweep:
    """Two dense runs and their first IMP level: one figure, quick to draw."""
    s = FakeSweep(root)
    for opt in ("adam", "sam"):
        root_id = s.add("full", "finetune", task="rte", optimizer=opt, metrics={"score": 0.6})
        s.add("imp", "imp", task="rte", optimizer=opt, parents=[root_id], level=1,
              config={"prune": {"sparsity": 0.2}}, paths={"prune": {"parent": "ckpt"}}, metrics={"score": 0.58})
    return s


def test_cli(tmp_path, capsys):
    s = tiny(tmp_path / SWEEP)
    (s.root / "sweep.yaml").write_text(f"name: {SWEEP}\nwandb: {{mode: disabled}}\n")
    assert rep.main([str(s.root)]) == 0  # W&B settings from the sweep file: disabled
    assert "README.md" in capsys.readouterr().out
    assert (s.root / "report" / "imp_sparsity.png").exists()
    assert rep.main([str(s.root), "--no-wandb"]) == 0
    assert not (s.root / "wandb").exists()
    assert rep.main([str(tmp_path / "nope"), "--no-wandb"]) == 2


def test_partial_and_empty_sweeps(tmp_path):
    assert (rep.report(tmp_path / "empty") / "README.md").read_text().count("No trials found") == 1
    s = FakeSweep(tmp_path / "only_roots")
    for seed in SEEDS:
        s.add("full", "finetune", task="rte", optimizer="sam", seed=seed, metrics={"score": 0.6 + seed / 100})
    running = s.add("imp", "imp", task="rte", optimizer="sam", seed=0, parents=[next(iter(s.records))], level=1,
                    config={"prune": {"sparsity": 0.1}}, status=None, metrics={"score": 0.5})
    (s.root / "broken").mkdir()
    (s.root / "broken" / "trial.json").write_text("{not json")
    with pytest.warns(rep.ReportWarning, match="unreadable trial.json"):
        out = rep.report(s.root)
    assert sorted(p.name for p in out.glob("*.png")) == []  # no search (nothing numeric searched), no IMP
    readme = (out / "README.md").read_text()
    assert "no finished imp trials" in readme and "no numeric searched key" in readme
    assert f"trial {running} (imp, imp, task rte): running" in readme
    assert len(pd.read_csv(out / "trials.csv")) == 4


def test_wandb_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert rep.wandb_mode(None) is None
    assert rep.wandb_mode({"mode": "disabled"}) is None
    assert rep.wandb_mode({"mode": "auto"}) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a closed loopback port: no traffic leaves
    assert rep.wandb_mode({"mode": "auto"}) in ("online", "offline")  # online only when W&B is reachable
    assert rep.wandb_mode({"mode": "online"}) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert rep.wandb_mode({"mode": "auto"}) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert rep.wandb_mode({"mode": "online"}) is None


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    s = tiny(tmp_path / SWEEP)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep.report(s.root, wandb_settings={"project": "flatray-test", "mode": "auto"})
    assert not [w for w in caught if issubclass(w.category, rep.ReportWarning)], [str(w.message) for w in caught]
    runs = list((s.root / "wandb").glob(f"offline-run-*-{SWEEP}-report"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    media = runs[0] / "files" / "media"
    assert list(media.glob("images/report/imp_sparsity*.png")) and list(media.glob("table/tables/imp_sparsity*.json"))
