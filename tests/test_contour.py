"""Loss contours (kind: contour): the plane by hand, the grid against an independent evaluation of the interpolated
weights, the feed: group mechanism (the searcher alone, then a real sweep), bad sweep files, and the figure."""

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from flatray.config import ConfigError
from flatray.methods import contour
from flatray.sweep import graph

# --------------------------------------------------------------------------------------------------- the plane


def test_plane_basis_and_coordinates_by_hand():
    # Two "parameters" (a 2-vector and a 1-vector): w_init = 0, d1 = (3, 4, 0), d2 = (4, 3, 2).
    w_init = [torch.zeros(2), torch.zeros(1)]
    w_adam = [torch.tensor([3.0, 4.0]), torch.tensor([0.0])]
    w_sam = [torch.tensor([4.0, 3.0]), torch.tensor([2.0])]
    p = contour.plane(w_init, w_adam, w_sam)
    # u = d1 / 5; d2.u = (12 + 12) / 5 = 4.8; d2 - 4.8 u = (1.12, -0.84, 2), of norm sqrt(1.96 + 4) = sqrt(5.96)
    assert torch.allclose(torch.cat(p.u), torch.tensor([0.6, 0.8, 0.0]))
    assert torch.allclose(torch.cat(p.v), torch.tensor([1.12, -0.84, 2.0]) / math.sqrt(5.96))
    assert p.points["init"] == (0.0, 0.0)
    assert p.points["adam"] == pytest.approx((5.0, 0.0))
    assert p.points["sam"] == pytest.approx((4.8, math.sqrt(5.96)))
    for name, w in (("adam", w_adam), ("sam", w_sam)):  # the coordinates give the models back
        x, y = p.points[name]
        back = [o + x * a + y * b for o, a, b in zip(p.origin, p.u, p.v)]
        assert all(torch.allclose(got, want, atol=1e-6) for got, want in zip(back, w))
    xs, ys = contour.axes(p.points, grid=5, margin=0.5)  # x over [0, 5] and y over [0, 2.44], each +- half
    assert xs == pytest.approx([-2.5, 0.0, 2.5, 5.0, 7.5])
    assert ys == pytest.approx(np.linspace(-0.5, 1.5, 5) * math.sqrt(5.96))


def test_no_plane_through_collinear_models():
    w_init, w_adam = [torch.zeros(3)], [torch.tensor([1.0, 2.0, 3.0])]
    with pytest.raises(ValueError, match="lie on one line"):
        contour.plane(w_init, w_adam, [torch.tensor([-2.0, -4.0, -6.0])])
    with pytest.raises(ValueError, match="w_adam equals w_init"):
        contour.plane(w_init, w_init, w_adam)


# --------------------------------------------------------------------------------------------------- the grid


def toy_batches(n: int, seed: int = 0, max_train_samples: int = 64, max_length: int = 32, size: int = 16):
    """The first n toy training examples (the data a run of this seed and size reads) in batches of `size`, as a
    run's ctx.batches gives them, and all in one batch."""
    from flatray import data, models

    spec = data.TASKS["toy"]
    tokenizer = models.load_tokenizer("tiny-bert")
    raw = data.load_raw(spec, "builtin", seed=seed)
    tokenized = data.tokenize(spec, raw, tokenizer, max_length, max_train_samples=max_train_samples)
    collate, train = data.collator(tokenizer), tokenized.train
    examples = [train[j] for j in range(min(n, len(train)))]
    return [collate(examples[i:i + size]) for i in range(0, len(examples), size)], collate(examples)


def direct_loss(base_dir: str, checkpoints: list[str], head_of: int, x: float, y: float, batch: dict) -> float:
    """The test's own evaluation: w = w_init + x u + y v built from the safetensors files (Gram-Schmidt in float64
    on one flat vector), loaded into a fresh from_pretrained copy of checkpoint `head_of` (its head), one batch."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    base = load_file(f"{base_dir}/model.safetensors")  # a BertModel: no "bert." prefix, no classifier
    tuned = [load_file(f"{c}/model.safetensors") for c in checkpoints]
    keys = sorted(base)

    def flat(state, prefix):
        return torch.cat([state[prefix + k].double().flatten() for k in keys])

    w0, w1, w2 = flat(base, ""), flat(tuned[0], "bert."), flat(tuned[1], "bert.")
    u = (w1 - w0) / (w1 - w0).norm()
    v = (w2 - w0) - ((w2 - w0) @ u) * u
    v = v / v.norm()
    w = w0 + x * u + y * v
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[head_of]).eval()
    state, offset = {}, 0
    for k in keys:
        n = base[k].numel()
        state["bert." + k] = w[offset:offset + n].view(base[k].shape).float()
        offset += n
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) == {"classifier.weight", "classifier.bias"} and not unexpected
    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two tiny-bert checkpoints with a head each, their encoders moved off w_init by seeded noise (real HF model
    folders, saved with save_pretrained, as a fine-tuning run leaves them)."""
    from flatray import data, models

    folder = tmp_path_factory.mktemp("models")
    paths = []
    for seed, scale in ((1, 0.05), (2, 0.08)):
        torch.manual_seed(seed)
        model = models.load_model("tiny-bert", data.TASKS["toy"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("bert."):
                    p.add_(scale * torch.randn_like(p))
        model.save_pretrained(folder / f"m{seed}")
        models.load_tokenizer("tiny-bert").save_pretrained(folder / f"m{seed}")
        paths.append(str(folder / f"m{seed}"))
    return paths


def test_grid_loss_equals_a_direct_evaluation_of_the_interpolated_weights(two_models):
    from flatray import data, models

    batches, one_batch = toy_batches(24, size=12)
    surface = contour.loss_surface("tiny-bert", two_models, ["adam", "sam"], data.TASKS["toy"], batches, grid=3,
                                   margin=0.25, device=torch.device("cpu"))
    assert surface["head"] == ["classifier.weight", "classifier.bias"]  # what the pretrained checkpoint lacks
    assert surface["samples"] == 24 and len(surface["x"]) == len(surface["y"]) == 3
    base = models.resolve("tiny-bert")
    for head, (i, j) in ((0, (1, 2)), (1, (2, 0)), (1, (0, 2))):
        label = surface["labels"][head]
        want = direct_loss(base, two_models, head, surface["x"][i], surface["y"][j], one_batch)
        assert surface["loss"][label][j][i] == pytest.approx(want, rel=1e-5)
    # At w_sam's own coordinates with its own head, the plane gives the SAM model back.
    x, y = surface["points"]["sam"]
    assert surface["point_loss"]["sam"]["sam"] == pytest.approx(direct_loss(base, two_models, 1, x, y, one_batch),
                                                                rel=1e-5)
    from transformers import AutoModelForSequenceClassification

    with torch.no_grad():
        own = float(AutoModelForSequenceClassification.from_pretrained(two_models[1]).eval()(**one_batch).loss)
    assert surface["point_loss"]["sam"]["sam"] == pytest.approx(own, rel=1e-5)
    acc = np.array(surface["accuracy"]["adam"])
    assert acc.shape == (3, 3) and ((acc >= 0) & (acc <= 1)).all()
    metrics = contour.summary_metrics(surface)
    assert metrics["contour/x/adam"] == surface["points"]["adam"][0]
    assert metrics["contour/loss/sam_head/sam"] == surface["point_loss"]["sam"]["sam"]


# --------------------------------------------------------------------------------------------------- feed: group

GROUPED = """
name: grouped
storage: {storage}
wandb: {{mode: disabled}}
defaults:
  model: tiny-bert
  task: toy
  train: {{epochs: 1, batch_size: 16}}
  data: {{max_train_samples: 64, max_eval_samples: 32}}
  scaling: {{num_workers: 1}}
experiments:
  full:
    kind: finetune
    search: {{space: {{optimizer.name: {{grid: [adam, sam]}}, train.seed: {{grid: {seeds}}}}}, algorithm: grid,
              scheduler: none}}
  contour:
    kind: contour
    parent: full
    feed: group
    group_by: [train.seed]
    config: {{contour: {{grid: 3, samples: 32}}}}
"""


def finish(searcher, tune_id: str, record: dict, status: str = "done") -> None:
    """What a finished trial leaves: its summary.json (with a model folder), then Tune's call."""
    model = Path(record["dir"], "train", "checkpoint_0")
    model.mkdir(parents=True)
    summary = {"id": record["id"], "experiment": record["experiment"], "kind": record["kind"], "status": status,
               "metrics": {"score": 0.5}, "outputs": {"model": str(model) if status == "done" else None}}
    Path(record["dir"], "summary.json").write_text(json.dumps(summary))
    searcher.on_trial_complete(tune_id)


def test_a_group_child_starts_when_its_own_group_has_finished_and_gets_all_of_it(tmp_path):
    from flatray.sweep.searcher import SweepSearcher

    path = tmp_path / "grouped.yaml"
    path.write_text(GROUPED.format(storage=tmp_path, seeds=[0, 1]))
    searcher = SweepSearcher(graph.load(path), str(tmp_path / "grouped"))
    started = {}
    for n in range(4):
        record = searcher.suggest(f"t{n}")["flatray"]
        started[(record["point"]["optimizer.name"], record["point"]["train.seed"])] = (f"t{n}", record)
    assert searcher.suggest("t4") is None  # nothing else until a parent finishes
    finish(searcher, *started[("sam", 0)])
    assert searcher.suggest("t4") is None  # seed 0's Adam run is still running
    finish(searcher, *started[("adam", 0)])
    child = searcher.suggest("t4")["flatray"]  # seed 0's group is complete; seed 1's runs are still running
    adam, sam = started[("adam", 0)][1], started[("sam", 0)][1]
    assert child["experiment"] == "contour" and child["parents"] == [adam["id"], sam["id"]]
    assert child["config"]["contour"]["models"] == [f"{adam['dir']}/train/checkpoint_0", f"{sam['dir']}/train/checkpoint_0"]
    assert child["config"]["contour"]["labels"] == ["adam", "sam"]
    assert child["config"]["model"] == "tiny-bert" and child["config"]["train"]["seed"] == 0
    assert child["point"] == {"train.seed": 0}  # what its parents share
    # Seed 1: the SAM run fails, so its contour cannot start; it fails with the reason, the sweep goes on.
    finish(searcher, *started[("sam", 1)], status="failed")
    finish(searcher, *started[("adam", 1)])
    assert searcher.suggest("t5") is None
    failed = [s for r, s in searcher.outcomes.values() if r.get("experiment") == "contour"]
    assert len(failed) == 1 and "group of 1 (optimizer.name adam)" in failed[0]["error"]
    finish(searcher, "t4", child)
    assert searcher.suggest("t6") == searcher.FINISHED


def test_group_trial_ids_do_not_depend_on_the_order_the_parents_finished(tmp_path):
    from flatray.sweep.searcher import SweepSearcher

    path = tmp_path / "grouped.yaml"
    path.write_text(GROUPED.format(storage=tmp_path, seeds=[0]))
    children = []
    for run, order in enumerate(((0, 1), (1, 0))):
        searcher = SweepSearcher(graph.load(path), str(tmp_path / f"run{run}"))
        items = [(f"t{n}", searcher.suggest(f"t{n}")["flatray"]) for n in range(2)]
        for k in order:
            finish(searcher, *items[k])
        children.append(searcher.suggest("t2")["flatray"])
    assert children[0]["id"] == children[1]["id"]
    assert [c["config"]["contour"]["labels"] for c in children] == [["adam", "sam"]] * 2


# --------------------------------------------------------------------------------------------------- bad files

HEAD = """
name: t
defaults: {model: tiny-bert, task: toy}
experiments:
  full:
    kind: finetune
    search: {space: {optimizer.name: {grid: [adam, sam]}, train.seed: {grid: [0, 1]}}, algorithm: grid}
"""

BAD = [
    ("contour: {kind: contour, parent: full, group_by: [train.seed]}",
     ["experiments.contour.feed", "got 'each'", "expected group", "group_by: [train.seed]"]),
    ("contour: {kind: contour, parent: full, feed: best, group_by: [train.seed]}",
     ["experiments.contour.feed", "got 'best'", "expected group"]),
    ("contour: {kind: contour, feed: group}", ["experiments.contour", "needs a parent"]),
    ("contour: {kind: contour, parent: full, feed: group}",
     ["experiments.contour.group_by", "got []", "two that differ in optimizer.name", "group of 4"]),
    ("contour: {kind: contour, parent: full, feed: group, group_by: [optimizer.name, train.seed]}",
     ["experiments.contour.group_by", "'optimizer.name'", "group of 1 (optimizer.name adam)"]),
    ("contour: {kind: contour, parent: full, feed: group, group_by: [train.sed]}",
     ["experiments.contour.group_by", "'train.sed'", "not a run-config key"]),
    ("ptq: {kind: ptq, parent: full, feed: group, group_by: [train.seed]}",
     ["experiments.ptq.feed", "got 'group'", "expected each or best"]),
    ("contour: {kind: contour, parent: full, feed: group, group_by: [train.seed], config: {contour: {grid: 1}}}",
     ["experiment 'contour'", "contour.grid", "greater than or equal to 2"]),
    ("contour: {kind: contour, parent: full, feed: group, group_by: [train.seed], config: {contour: {splt: dev}}}",
     ["contour.splt", "did you mean 'split'"]),
    ("contour: {kind: contour, parent: full, feed: group, group_by: [train.seed], config: {contour: {split: test}}}",
     ["contour.split", "'test'", "'train' or 'dev'"]),
]


@pytest.mark.parametrize("experiments,expected", BAD, ids=[b[0][:60] for b in BAD])
def test_bad_contour_sweep_files(tmp_path, experiments, expected):
    path = tmp_path / "sweep.yaml"
    path.write_text(HEAD + textwrap.indent(experiments, "  ") + "\n")
    with pytest.raises(ConfigError) as err:
        graph.load(path)
    for part in expected:
        assert part in str(err.value), f"{part!r} not in:\n{err.value}"


def test_a_parent_that_varies_something_else_than_the_optimizer_is_rejected(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent("""
        name: t
        defaults: {model: tiny-bert, task: toy}
        experiments:
          full: {kind: finetune, search: {space: {train.lr: {grid: [1.0e-4, 2.0e-4]}}, algorithm: grid}}
          contour: {kind: contour, parent: full, feed: group}
    """))
    with pytest.raises(ConfigError, match=r"group of 2 \(optimizer.name adam, adam\)"):
        graph.load(path)


def test_a_contour_run_config_needs_two_models_and_a_dev_split_with_labels():
    from flatray import config

    with pytest.raises(ConfigError, match="contour.*two fine-tuned checkpoints"):
        config.from_dict({"kind": "contour", "model": "tiny-bert", "task": "toy", "contour": {"models": ["a"]}})
    with pytest.raises(ConfigError, match="contour.split.*train for task squad"):
        config.from_dict({"kind": "contour", "model": "tiny-bert", "task": "squad",
                          "contour": {"models": ["a", "b"], "labels": ["adam", "sam"], "split": "dev"}})


def test_the_paper_sweep_plans_one_contour_per_seed():
    from flatray import sweep

    counts = sweep.plan(graph.load("sweeps/paper/figure6_contours.yaml"))
    assert counts == {"finetune": 6, "contour": 3}


# --------------------------------------------------------------------------------------------------- the figure


def synthetic_sweep(root: Path) -> dict:
    """A sweep folder as a finished contour sweep leaves it, with a bowl per head for a loss surface; the summary
    names contour.json where the sweep ran (elsewhere), so the report must find it below this folder."""
    xs, ys = np.linspace(-1, 6, 9), np.linspace(-1, 3, 7)
    points = {"init": [0.0, 0.0], "adam": [5.0, 0.0], "sam": [4.0, 2.0]}
    grid_x, grid_y = np.meshgrid(xs, ys)
    loss = {h: (0.05 + 0.2 * (grid_x - points[h][0]) ** 2 + 0.5 * (grid_y - points[h][1]) ** 2).tolist()
            for h in ("adam", "sam")}
    surface = {"labels": ["adam", "sam"], "head": ["classifier.weight", "classifier.bias"], "samples": 32,
               "x": xs.tolist(), "y": ys.tolist(), "points": points, "loss": loss, "accuracy": None,
               "point_loss": {"adam": {"init": 0.69, "adam": 0.05, "sam": 2.2},
                              "sam": {"init": 0.71, "adam": 0.3, "sam": 0.05}}, "point_accuracy": None}
    trials = {}
    for tid, kind, parents, opt in (("aaaaaaaaaaaa", "finetune", [], "adam"), ("bbbbbbbbbbbb", "finetune", [], "sam"),
                                    ("cccccccccccc", "contour", ["aaaaaaaaaaaa", "bbbbbbbbbbbb"], "adam"),
                                    ("dddddddddddd", "contour", ["aaaaaaaaaaaa", "bbbbbbbbbbbb"], "adam")):
        folder = root / tid
        (folder / "train" / "checkpoint_0").mkdir(parents=True)
        config = {"kind": kind, "model": "tiny-bert", "task": "toy", "optimizer": {"name": opt},
                  "train": {"seed": 0 if tid != "dddddddddddd" else 1}}
        (folder / "trial.json").write_text(json.dumps({"id": tid, "sweep": "s", "experiment": kind, "kind": kind,
                                                       "parents": parents, "level": None, "point": {},
                                                       "config": config}))
        outputs = {"contour": f"/gone/s/{tid}/train/checkpoint_0/contour.json"} if kind == "contour" else {}
        (folder / "summary.json").write_text(json.dumps({"id": tid, "status": "done", "metrics": {"score": 0.5},
                                                         "outputs": outputs}))
        trials[tid] = folder
    (trials["cccccccccccc"] / "train" / "checkpoint_0" / "contour.json").write_text(json.dumps(surface))
    return surface  # dddddddddddd has lost its file


def test_the_contour_figure_from_a_synthetic_sweep_folder(tmp_path):
    from flatray import report
    from flatray.report.contour import contour_figure, read_surface

    surface = synthetic_sweep(tmp_path)
    assert read_surface(tmp_path, "cccccccccccc") == surface
    assert "flatray.report.contour:contour_figure" in report.section_refs()
    out = tmp_path / "report"
    out.mkdir()
    sec = contour_figure(report.load_trials(tmp_path), out)
    assert sec.figures == ["contours.png"] and (out / "contours.png").read_bytes()[:4] == b"\x89PNG"
    table = sec.tables["contours"]
    assert list(table["head"]) == ["adam", "sam"]
    assert list(table["loss at w_sam"]) == [2.2, 0.05] and list(table["|w_sam - w_init|"]) == pytest.approx(
        [math.hypot(4, 2)] * 2)
    assert sec.missing == ["contour trial dddddddddddd (toy): its contour.json cannot be read"]
    readme = (report.report(tmp_path) / "README.md").read_text()
    assert "Loss contours (P1 Figure 6)" in readme and "contours.png" in readme


# --------------------------------------------------------------------------------------------------- a real sweep


@pytest.mark.slow
def test_a_real_sweep_starts_the_contour_after_both_parents_and_feeds_it_both(tmp_path):
    import ray

    from flatray import report, storage, sweep
    from flatray.tracking import read_offline_runs

    path = tmp_path / "grouped.yaml"
    path.write_text(GROUPED.format(storage=tmp_path, seeds=[0]).replace("mode: disabled", "mode: offline"))
    ray.shutdown()
    try:
        assert sweep.main([str(path), "--no-report"]) == 0
    finally:
        ray.shutdown()
    root = tmp_path / "grouped"
    trials = {}
    for folder in root.iterdir():
        if (folder / "trial.json").exists():
            record, summary = json.loads((folder / "trial.json").read_text()), storage.read_json(str(folder / "summary.json"))
            trials[record["experiment"], record["config"]["optimizer"]["name"]] = (record, summary, folder)
    (adam, adam_summary, _), (sam, sam_summary, _) = trials["full", "adam"], trials["full", "sam"]
    (child, child_summary, child_dir), = [v for k, v in trials.items() if k[0] == "contour"]
    assert adam_summary["status"] == sam_summary["status"] == child_summary["status"] == "done"
    assert child["parents"] == [adam["id"], sam["id"]]
    assert child["config"]["contour"]["models"] == [adam_summary["outputs"]["model"], sam_summary["outputs"]["model"]]
    assert child["config"]["contour"]["labels"] == ["adam", "sam"] and child["config"]["model"] == "tiny-bert"
    started = storage.read_lines(str(child_dir / "attempts.jsonl"))[0]["start"]
    assert started > max(adam_summary["ended"], sam_summary["ended"])

    surface = json.loads(Path(child_summary["outputs"]["contour"]).read_text())
    metrics = child_summary["metrics"]
    assert metrics["contour/x/adam"] == pytest.approx(surface["points"]["adam"][0]) and metrics["contour/x/adam"] > 0
    assert metrics["score"] is None  # a plane has no dev score
    assert metrics["contour/loss/sam_head/sam"] == pytest.approx(surface["point_loss"]["sam"]["sam"])
    from flatray import models

    cfg = child["config"]
    _, one_batch = toy_batches(cfg["contour"]["samples"], seed=cfg["train"]["seed"],
                               max_train_samples=cfg["data"]["max_train_samples"], max_length=cfg["data"]["max_length"])
    checkpoints = cfg["contour"]["models"]
    want = direct_loss(models.resolve("tiny-bert"), checkpoints, 0, surface["x"][1], surface["y"][2], one_batch)
    assert surface["loss"]["adam"][2][1] == pytest.approx(want, rel=1e-5)

    runs = {r["config"]["flatray"]["id"]: r for r in read_offline_runs(str(root / "wandb"))}
    inputs = runs[child["id"]]["used_artifacts"]  # W&B lineage: both parents' models
    assert sorted(a["digest"] for a in inputs) == sorted(
        a["digest"] for p in (adam, sam) for a in runs[p["id"]]["logged_artifacts"])
    out = report.report(root)
    assert (out / "contours.png").exists() and "Loss contours" in (out / "README.md").read_text()
