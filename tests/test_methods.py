"""The layout's promises: a method is one module plus one registry entry, config imports no heavy library, no
import cycles, no oversized module, and trial ids that do not move when the code is reorganised."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flatray import methods
from flatray.config import ConfigError
from flatray.sweep import graph

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"


def test_config_imports_without_torch_datasets_or_ray():
    code = ("import sys, flatray.config, flatray.config.sweep, flatray.methods, flatray.sweep.graph; "
            "print(sorted({'torch', 'datasets', 'ray', 'transformers', 'deepspeed', 'pandas'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The flatray modules a module imports when it is imported (imports inside functions run later)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flatray"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs or {node.module}
    return found


def test_no_import_cycles_and_no_module_over_400_lines():
    files = sorted((ROOT / "flatray").rglob("*.py"))
    names = {_module_name(f): f for f in files}
    edges = {name: _top_level_imports(path, set(names)) for name, path in names.items()}

    def cycle_from(start, node, seen):
        for nxt in edges[node]:
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                rest = cycle_from(start, nxt, seen)
                if rest:
                    return [node, *rest]
        return None

    cycles = [c for n in names if (c := cycle_from(n, n, set()))]
    assert not cycles, f"import cycles: {cycles[:3]}"
    long = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > 420}
    assert not long, f"modules over about 400 lines: {long}"


# Trial ids of sweeps/smoke.yaml as the code before the redesign gave them (a finished sweep keeps its trials);
# the cofi ones changed with the smoke file (issue 13: 6 pruning epochs, so that CoFi reaches its target).
SMOKE_IDS = {
    "full[adam]": "2423e7350fce", "imp[adam]/1": "53022e6d5a83", "imp[adam]/2": "6cf60db96092",
    "transfer[adam]": "3c2534721391", "ptq[adam]": "08d2c66733b4", "squat[adam]": "8b1b6ee34d39",
    "cofi[adam]": "078d3eaec5cf", "sharpness[adam]": "80e2d72e9b70",
    "full[sam]": "13c63dc7543a", "imp[sam]/1": "919045402fa3", "imp[sam]/2": "2b9d911b4e4e",
    "transfer[sam]": "44043afd0d0a", "ptq[sam]": "fb124673063a", "squat[sam]": "ea8861573f93",
    "cofi[sam]": "67e1f1ff6bd3", "sharpness[sam]": "bf1d61226f6f",
}


def test_trial_ids_of_the_smoke_sweep_are_unchanged(tmp_path):
    (tmp_path / "model.safetensors").touch()
    (tmp_path / "mask.safetensors").touch()
    outputs = {"outputs": {"model": str(tmp_path), "mask": str(tmp_path / "mask.safetensors")}}
    sweep = graph.load(ROOT / "sweeps" / "smoke.yaml")
    ids = {}
    for opt in ("adam", "sam"):
        full = graph.make_record(sweep, "/r", "full", {"optimizer.name": opt})
        ids[f"full[{opt}]"] = full["id"]
        level = full
        for n in (1, 2):
            level = graph.make_record(sweep, "/r", "imp", {}, level, outputs, n)
            ids[f"imp[{opt}]/{n}"] = level["id"]
        ids[f"transfer[{opt}]"] = graph.make_record(sweep, "/r", "transfer", {}, level, outputs)["id"]
        for name in ("ptq", "squat", "cofi", "sharpness"):
            ids[f"{name}[{opt}]"] = graph.make_record(sweep, "/r", name, {}, full, outputs)["id"]
    assert ids == SMOKE_IDS


def test_a_child_whose_parent_cannot_produce_what_it_needs_is_rejected(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndefaults: {model: tiny-bert, task: toy}\nexperiments:\n"
                    "  full: {kind: finetune}\n  tickets: {kind: transfer, parent: full}\n")
    with pytest.raises(ConfigError, match="experiments.tickets.parent.*produces model.*needs mask"):
        graph.load(path)
    path.write_text("name: s\ndefaults: {model: tiny-bert, task: toy}\nexperiments:\n"
                    "  full: {kind: finetune, config: {prune: {sparsity: 0.5, method: random}}}\n"
                    "  tickets: {kind: transfer, parent: full}\n")
    graph.load(path)  # a pruned fine-tuning run leaves a mask


def test_a_dense_parent_trial_without_a_mask_fails_its_transfer_instead_of_training_dense(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndefaults: {model: tiny-bert, task: toy}\nexperiments:\n"
                    "  full: {kind: finetune, config: {prune: {sparsity: 0.5, method: random}}}\n"
                    "  tickets: {kind: transfer, parent: full}\n")
    sweep = graph.load(path)
    parent = graph.make_record(sweep, str(tmp_path), "full", {})
    with pytest.raises(ConfigError, match="left no mask"):
        graph.make_record(sweep, str(tmp_path), "tickets", {}, parent, {"outputs": {"model": str(tmp_path)}})


NOOP_SWEEP = """
name: plugin
storage: {storage}
defaults:
  model: tiny-bert
  task: toy
  data: {{max_train_samples: 64, max_eval_samples: 64}}
  train: {{epochs: 1, batch_size: 32, seed: 0}}
  scaling: {{num_workers: 1}}
experiments:
  full: {{kind: finetune}}
  echo: {{kind: noop, parent: full}}
"""


@pytest.fixture(scope="module")
def noop_sweep(tmp_path_factory):
    """A sweep with a method registered from outside flatray: no sweep, tracking or report code knows it."""
    import ray

    from flatray import sweep
    from flatray.tracking import read_offline_runs

    ray.shutdown()
    tmp = tmp_path_factory.mktemp("plugin")
    env = {"FLATRAY_METHODS": "noop_method", "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    sys.path.insert(0, str(PLUGINS))
    try:
        import noop_method  # noqa: F401  (registers "noop" in this process; Ray's processes import it from the env)

        path = tmp / "plugin.yaml"
        path.write_text(NOOP_SWEEP.format(storage=tmp))
        loaded = graph.load(path)
        outcomes = sweep.run(loaded, path.read_text(), status_every_s=3600)
        runs = read_offline_runs(str(tmp / "plugin" / "wandb"))
        yield tmp / "plugin", outcomes, runs
    finally:
        ray.shutdown()
        sys.path.remove(str(PLUGINS))
        methods.METHODS.pop("noop", None)
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_a_plugin_method_runs_as_a_child_in_a_sweep(noop_sweep):
    root, outcomes, runs = noop_sweep
    by_experiment = {record["experiment"]: (record, summary) for record, summary in outcomes.values()}
    (full, full_summary), (echo, echo_summary) = by_experiment["full"], by_experiment["echo"]
    assert full_summary["status"] == echo_summary["status"] == "done"
    assert echo["parents"] == [full["id"]] and echo["config"]["model"] == full_summary["outputs"]["model"]
    # the same model evaluated on the same dev set: the parent's best score
    assert echo_summary["metrics"]["score"] == full_summary["metrics"]["score"]
    assert echo_summary["metrics"]["noop"] == 1.0
    echo_run = next(r for r in runs if r["config"].get("kind") == "noop")
    assert echo_run["job_type"] == "noop" and [a["type"] for a in echo_run["used_artifacts"]] == ["model"]


def test_the_report_of_a_sweep_with_a_plugin_method(noop_sweep):
    from flatray import report

    root, _, _ = noop_sweep
    text = (report.report(root) / "README.md").read_text()
    assert "echo" in text and "noop" in text
