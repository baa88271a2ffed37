"""Bad input of every kind gets one clear error (key or file, value, what is allowed), exit 2, before Ray starts.

Fuzzing (hypothesis): random bytes, random YAML trees, mutations of sweeps/smoke.yaml and of a run file, random
--set strings. Loading gives a config or a ConfigError, never another exception; a sweep that loads passes its dry
run's checks (plan, preflight) without one either. Then the command lines, end to end, on one file per class of
mistake; then the hub checks in subprocesses (the hub's settings are read when huggingface_hub is imported): an
unreachable hub (a closed loopback port), a stand-in hub on loopback that knows one model, and the local HF cache.
"""

import contextlib
import copy
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flatray import config, models, sweep
from flatray.config import ConfigError
from flatray.config.run import RunConfig
from flatray.config.sweep import Experiment, SearchSettings, SweepFile
from flatray.sweep import graph, preflight
from flatray.sweep.plan import first_config, local_cpus, plan

SMOKE = Path(__file__).parent.parent / "sweeps" / "smoke.yaml"
PAPER = SMOKE.parent / "paper"
SMOKE_TREE = yaml.safe_load(SMOKE.read_text())
RUN_TREE = {"model": "tiny-bert", "task": "toy", "data": {"max_train_samples": 64},
            "train": {"batch_size": 8, "epochs": 1, "lr": 1.0e-3, "seed": 0}, "optimizer": {"name": "sam"},
            "deepspeed": {"zero_stage": 1}, "scaling": {"num_workers": 2}, "output": {"storage_path": "results"}}

# Derandomized: the same examples on every run (CI must not flake); no example database in the work tree.
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much])


def _keys(model, seen=None) -> set[str]:
    """Every key name of a schema (random trees that use real keys get further than the top level)."""
    seen = seen if seen is not None else set()
    for name, field in model.model_fields.items():
        seen.add(name)
        for sub in [field.annotation, *getattr(field.annotation, "__args__", ())]:
            if isinstance(sub, type) and hasattr(sub, "model_fields") and sub.__name__ not in seen:
                seen.add(sub.__name__)
                _keys(sub, seen)
    return {k for k in seen if k[0].islower()}


KEYS = sorted(_keys(SweepFile) | _keys(Experiment) | _keys(SearchSettings) | _keys(RunConfig)
              | {"grid", "choice", "uniform", "loguniform", "randint", "full", "imp", "optimizer.rho", "train.lr"})
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["finetune", "imp", "sam", "toy", "tiny-bert", "full"]))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(keys, inner, max_size=5)), max_leaves=25)
odd_values = st.one_of(trees, st.sampled_from(
    [-1, 0, 10**9, 2**64, 1e300, -1e-9, 0.5, "", [], {}, None, "~nouser/x", "a" * 300, "/", "..", "s3://B", "imp",
     "full", "transfer", "ptq", "cofi", "structured", "squat", "sharpness", "best", "grid", "files", "hub", [0, 1]]))


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutations(draw, base):
    """A valid tree with 1 to 3 edits: a key deleted, a value replaced (wrong type, out of range), a key added."""
    tree = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from([p for p in _paths(tree) if p]))
        parent = tree
        for part in path[:-1]:
            parent = parent[part]
        op = draw(st.sampled_from(["delete", "replace", "add"]))
        if op == "delete":
            del parent[path[-1]]
        elif op == "replace":
            parent[path[-1]] = draw(odd_values)
        elif isinstance(parent, dict):
            parent[draw(keys)] = draw(odd_values)
    return tree


@st.composite
def text_mutations(draw, text):
    """The text of a valid file with characters deleted, inserted or swapped (YAML syntax errors, odd tokens)."""
    chars = list(text)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(chars) - 1))
        op = draw(st.sampled_from(["delete", "insert", "swap"]))
        if op == "delete":
            del chars[i]
        elif op == "insert":
            chars.insert(i, draw(st.sampled_from(list(":-[]{}&*!|>'\"#%@`,?\t\n ") + ["\x00", "\x07", "\ufeff"])))
        else:
            j = draw(st.integers(0, len(chars) - 1))
            chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def dump(tree) -> bytes:
    return yaml.safe_dump(tree, allow_unicode=True).encode()


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


def load_sweep_or_config_error(path: Path, overrides=()):
    """graph.load and, when it loads, what a dry run does before printing (plan, configs, preflight): a result or a
    ConfigError, nothing else."""
    try:
        loaded = graph.load(path, list(overrides))
    except ConfigError as err:
        assert str(err).strip()
        return None
    plan(loaded)
    local_cpus(loaded)
    for name in loaded.experiments:
        first_config(loaded, name)
    with contextlib.suppress(ConfigError):
        quiet(preflight.check, loaded, True)
    return loaded


def load_run_or_config_error(path: Path, overrides=()):
    try:
        cfg = config.load(path, list(overrides))
    except ConfigError as err:
        assert str(err).strip()
        return None
    preflight.storage_problems(cfg.output.storage_path, "output.storage_path", create=False)
    return cfg


@pytest.fixture
def work(tmp_path, monkeypatch):
    """Relative storage paths of fuzzed files land in a temporary folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda t: t.encode("utf-8", "replace")),
                      st.binary(max_size=50).map(lambda b: SMOKE.read_bytes()[:200] + b)))
def test_random_bytes_load_or_fail_cleanly(work, data):
    path = work / "f.yaml"
    path.write_bytes(data)
    load_sweep_or_config_error(path)
    load_run_or_config_error(path)


@FUZZ
@given(tree=trees)
def test_random_yaml_trees_load_or_fail_cleanly(work, tree):
    path = work / "f.yaml"
    path.write_bytes(dump(tree))
    load_sweep_or_config_error(path)
    load_run_or_config_error(path)


@FUZZ
@given(tree=mutations(SMOKE_TREE))
def test_mutated_smoke_sweeps_load_or_fail_cleanly(work, tree):
    path = work / "f.yaml"
    path.write_bytes(dump(tree))
    load_sweep_or_config_error(path)


@FUZZ
@given(text=text_mutations(SMOKE.read_text()))
def test_mutated_smoke_sweep_texts_load_or_fail_cleanly(work, text):
    path = work / "f.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    load_sweep_or_config_error(path)


@FUZZ
@given(tree=mutations(RUN_TREE))
def test_mutated_run_files_load_or_fail_cleanly(work, tree):
    path = work / "f.yaml"
    path.write_bytes(dump(tree))
    load_run_or_config_error(path)


set_strings = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}",
              st.one_of(keys, st.sampled_from(["defaults.train.epochs", "experiments.full.kind", "optimizer.rho",
                                               "a..b", ".", "=x"])),
              st.one_of(st.text(max_size=20), st.sampled_from(["[1", "{a: 1, a: 2}", "!!binary aGk=", "&a [*a]",
                                                               "2024-01-01", "yes", "1e999", "9" * 5000]))))


@FUZZ
@given(sets=st.lists(set_strings, min_size=1, max_size=3))
def test_random_set_strings_load_or_fail_cleanly(work, sets):
    load_sweep_or_config_error(SMOKE, sets)
    run = work / "run.yaml"
    run.write_bytes(dump(RUN_TREE))
    load_run_or_config_error(run, sets)


HEAD = "name: s\ndefaults: {model: tiny-bert, task: toy}\nexperiments:\n"
CHAIN = "".join(f"  e{i}: {{kind: imp, parent: e{i - 1}, levels: 1}}\n" for i in range(1, 40))
BOMB = "".join(f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]\n" for i in range(1, 8))
# What the fuzzer hit, or came near, and what once gave a traceback (or a silent wrong config) instead of one line.
TARGETED = {
    "section not a mapping": (HEAD.replace("task: toy}", "task: toy, prune: 5}") + "  full: {kind: finetune}\n"
                              "  imp: {kind: imp, parent: full}\n", ["experiment 'full'", "prune: got 5",
                                                                     "expected a mapping of prune keys"]),
    "scaling not a mapping (ptq)": (HEAD + "  full: {kind: finetune}\n  ptq: {kind: ptq, parent: full, config: "
                                    "{scaling: gpu}}\n", ["experiment 'ptq'", "scaling: got 'gpu'"]),
    "a line of 40 parents": (HEAD + "  e0: {kind: finetune}\n" + CHAIN,
                             ["experiments.e32.parent", "a line of more than 32 experiments"]),
    "alias bomb": ("x0: &x0 [a, a, a, a, a, a, a, a, a, a]\n" + BOMB, ["more than 1,000,000 values"]),
    "nested 200 deep": ("a: " + "[" * 200 + "]" * 200 + "\n", ["nested more than 32 levels"]),
    "alias in itself": ("a: &a [*a]\n", ["nested more than 32 levels", "alias contains itself"]),
    "dotted key 40 deep": (HEAD + "  full: {kind: finetune, config: {" + "a." * 40 + "b: 1}}\n",
                           ["more than 32 dotted parts"]),
    "unknown ~user model": (HEAD.replace("tiny-bert", "~nouser/bert") + "  full: {kind: finetune}\n",
                            ["model folder '~nouser/bert' not found"]),
    "data file of an unknown ~user": (HEAD.replace("task: toy}", "task: sst2, data: {source: files, data_files: "
                                                   "{train: ~nouser/t.csv, validation: ~nouser/d.csv}}}")
                                      + "  full: {kind: finetune}\n", ["data.data_files.train", "an existing file"]),
    "integer of 5000 digits": ("name: " + "9" * 5000 + "\n", ["a value cannot be read", "digits"]),
    "key read as a boolean": (HEAD + "  full: {kind: finetune, config: {on: 1}}\n",
                              ["line 4", "the key 'on' is not a string (bool)"]),
    "binary tag": (HEAD + "  full: {kind: finetune, config: {model: !!binary aGk=}}\n", ["tag 'binary'"]),
    "date stays text": (HEAD.replace("name: s", "name: 2024-01-01") + "  full: {kind: finetune}\n", []),
}


@pytest.mark.parametrize("case", list(TARGETED), ids=list(TARGETED))
def test_targeted_bad_sweeps(case, tmp_path):
    text, expected = TARGETED[case]
    path = tmp_path / "s.yaml"
    path.write_text(text)
    if not expected:
        assert graph.load(path)  # loads: only what is wrong is an error
        return
    with pytest.raises(ConfigError) as err:
        preflight.check(graph.load(path), dry_run=True)
    for part in expected:
        assert part in str(err.value), f"{part!r} not in:\n{err.value}"


def test_bounds_that_keep_the_searcher_in_memory(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndefaults: {model: tiny-bert, task: toy}\nexperiments:\n  full:\n    kind: finetune\n"
                    "    search: {space: {train.lr: {uniform: [0.001, 0.01]}}, num_samples: 100000}\n")
    assert graph.load(path).experiments["full"].search.num_samples == 100_000  # the largest allowed
    grid = {f"train.seed": {"grid": list(range(400))}, "optimizer.rho": {"grid": [0.01 * i for i in range(1, 300)]}}
    path.write_text(yaml.safe_dump({"name": "s", "defaults": {"model": "tiny-bert", "task": "toy"},
                                    "experiments": {"full": {"kind": "finetune", "search": {"space": grid,
                                                                                            "algorithm": "grid"}}}}))
    with pytest.raises(ConfigError, match=r"400 x 299|119,600 grid point|at most 100,000"):
        graph.load(path)


# ------------------------------------------------------------------------------------- the commands, end to end

SWEEP = """\
name: bad
storage: STORAGE
defaults: {model: tiny-bert, task: toy}
experiments:
  full: {kind: finetune}
"""


def sweep_case(text=None, data=None, sets=(), storage=None):
    return {"text": text, "data": data, "sets": list(sets), "storage": storage}


SWEEP_CASES = {
    "binary": (sweep_case(data=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), ["binary file", "NUL byte", "expected YAML"]),
    "empty": (sweep_case(text=""), ["is empty", "expected a mapping"]),
    "comments only": (sweep_case(text="# nothing here\n"), ["is empty"]),
    "not utf-8": (sweep_case(data="name: caf\xe9\n".encode("latin-1")), ["not UTF-8", "0xe9", "offset 9"]),
    "a list": (sweep_case(text="- name: x\n"), ["expected a mapping", "got a list"]),
    "duplicate experiment": (sweep_case(text=SWEEP + "  full: {kind: finetune}\n"),
                             ["line 6", "duplicate key 'full'", "first at line 5"]),
    "duplicate key deep": (sweep_case(text=SWEEP.replace("task: toy", "task: toy, task: sst2")),
                           ["line 3", "duplicate key 'task'"]),
    "set without =": (sweep_case(text=SWEEP, sets=["defaults.train.epochs"]), ["--set 'defaults.train.epochs'",
                                                                             "expected key=value"]),
    "set empty key": (sweep_case(text=SWEEP, sets=["=3"]), ["--set '=3'", "expected key=value"]),
    "set bad yaml": (sweep_case(text=SWEEP, sets=["defaults.train.lr=[1e-3"]),
                     ["--set 'defaults.train.lr=[1e-3'", "not valid YAML", "expected a YAML value"]),
    "set unknown key": (sweep_case(text=SWEEP, sets=["defaults.train.epoch=2"]),
                        ["train.epoch", "unknown key", "did you mean 'epochs'"]),
    "read-only storage": (sweep_case(text=SWEEP, storage="/proc/flatray-results"),
                          ["storage: got '/proc/flatray-results'", "cannot be created", "expected a folder"]),
    "storage under a file": (sweep_case(text=SWEEP, storage="{tmp}/a-file/results"),
                             ["storage: got", "a-file", "expected a folder"]),
    "bad bucket": (sweep_case(text=SWEEP, storage="s3://My_Bucket/x"),
                   ["storage: got 's3://My_Bucket/x'", "bucket name of 3 to 63 lowercase"]),
    "absurd num_samples": (sweep_case(text=SWEEP.replace("{kind: finetune}", "{kind: finetune, search: {space: {train"
                                                         ".lr: {uniform: [0.001, 0.1]}}, num_samples: 10000000000}}")),
                           ["experiments.full.search.num_samples", "10000000000", "less than or equal to 100000"]),
    "misspelt hub model offline": (sweep_case(text=SWEEP.replace("tiny-bert", "google-bert/bert-base-uncasd")),
                                   ["model 'google-bert/bert-base-uncasd'", "cannot be verified offline",
                                    "HF_HUB_OFFLINE=1, not in the local cache", "a local folder"]),
    "missing model folder": (sweep_case(text=SWEEP.replace("tiny-bert", "./models/bert")),
                             ["experiment 'full'", "model folder './models/bert' not found"]),
    "unknown task": (sweep_case(text=SWEEP.replace("task: toy", "task: glue")), ["task", "'glue'", "mnli"]),
}


@pytest.fixture
def no_ray(tmp_path, monkeypatch):
    """Ray would create its session folder under RAY_TMPDIR: the test asserts it never appears."""
    ray_dir = tmp_path / "ray-tmp"
    monkeypatch.setenv("RAY_TMPDIR", str(ray_dir))
    yield
    assert not ray_dir.exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def assert_one_clear_error(err: str, expected: list[str]) -> None:
    assert "Traceback" not in err and "Retry" not in err, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[0]], err
    assert len(err.strip().splitlines()) <= 2, err  # the error, and for a schema error the key's line
    for part in expected:
        assert part in err, f"{part!r} not in:\n{err}"


@pytest.mark.parametrize("case", list(SWEEP_CASES), ids=list(SWEEP_CASES))
def test_bad_sweep_inputs_stop_before_ray_with_one_message(case, tmp_path, capsys, no_ray):
    spec, expected = SWEEP_CASES[case]
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "sweep.yaml"
    text = spec["text"].replace("STORAGE", str(tmp_path / "results")) if spec["text"] is not None else None
    path.write_bytes(spec["data"] if spec["data"] is not None else text.encode())
    argv = [str(path), *[a for s in spec["sets"] for a in ("--set", s)]]
    if spec["storage"]:
        argv += ["--storage", spec["storage"].format(tmp=tmp_path)]
    assert sweep.main(argv) == 2  # a real run, not --dry-run: it must stop before starting Ray
    out, err = capsys.readouterr()
    assert "Retry" not in out
    assert_one_clear_error(err, expected)


RUN_CASES = {
    "binary": ({"data": b"\x00\x01\x02"}, [], ["run.yaml", "binary file"]),
    "duplicate key": ({"text": "model: tiny-bert\ntask: toy\nmodel: minilm-offline\n"}, [],
                      ["line 3", "duplicate key 'model'", "first at line 1"]),
    "set bad yaml": ({"text": "model: tiny-bert\ntask: toy\n"}, ["optimizer={name: sam"],
                     ["--set 'optimizer={name: sam'", "not valid YAML"]),
    "set empty part": ({"text": "model: tiny-bert\ntask: toy\n"}, ["optimizer..rho=0.1"],
                       ["--set 'optimizer..rho=0.1'", "expected key=value"]),
    "seed too large": ({"text": "model: tiny-bert\ntask: toy\ntrain: {seed: 5000000000}\n"}, [],
                       ["train.seed", "5000000000", "less than or equal to 4294967295"]),
    "negative resources": ({"text": "model: tiny-bert\ntask: toy\nscaling: {resources_per_worker: {CPU: -1}}\n"}, [],
                           ["scaling.resources_per_worker", "-1", "amounts in [0, 1e15]"]),
    "read-only storage": ({"text": "model: tiny-bert\ntask: toy\noutput: {storage_path: /proc/flatray-runs}\n"}, [],
                          ["output.storage_path: got '/proc/flatray-runs'", "cannot be created"]),
    "misspelt hub model offline": ({"text": "model: bert-base-uncasd\ntask: toy\n"}, [],
                                   ["model 'bert-base-uncasd'", "cannot be verified offline"]),
}


@pytest.mark.parametrize("case", list(RUN_CASES), ids=list(RUN_CASES))
def test_bad_run_inputs_stop_before_ray_with_one_message(case, tmp_path, capsys, no_ray, monkeypatch):
    from flatray.train import main

    spec, sets, expected = RUN_CASES[case]
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_bytes(spec.get("data") or spec["text"].encode())
    assert main([str(path), *[a for s in sets for a in ("--set", s)]]) == 2
    assert_one_clear_error(capsys.readouterr().err, expected)


@settings(FUZZ, max_examples=12)
@given(data=st.one_of(mutations(SMOKE_TREE).map(dump), text_mutations(SMOKE.read_text()).map(str.encode),
                      st.binary(max_size=100)),
       sets=st.lists(set_strings, max_size=1))
def test_generated_bad_sweeps_stop_before_ray_with_one_message(work, capsys, no_ray, data, sets):
    """The command line on generated files that do not load (a file that loads would start a real sweep)."""
    path = work / "f.yaml"
    path.write_bytes(data)
    try:
        graph.load(path, sets)
    except ConfigError:
        pass
    else:
        assume(False)
    argv = [str(path), *[a for s in sets for a in ("--set", s)]]
    assert sweep.main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Retry" not in out + err, err
    assert err.startswith("error: ") and err.count("error:") == 1, err


def test_offline_dry_run_of_a_paper_sweep_prints_one_line_about_the_hub(capsys):
    # tests run with HF_HUB_OFFLINE=1: bert-base-uncased and GLUE/SQuAD are not in this machine's cache
    assert sweep.main([str(PAPER / "table6_mask_optimizer.yaml"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    hub_lines = [line for line in (out + err).splitlines()
                 if "hub" in line.lower() or "retry" in line.lower() or "offline" in line.lower()]
    assert len(hub_lines) == 1, hub_lines
    line = hub_lines[0]
    assert line.startswith("warning: model 'bert-base-uncased'; data 'rajpurkar/squad', 'nyu-mll/glue' (")
    assert "cannot be verified offline (HF_HUB_OFFLINE=1" in line and line.endswith("a real run would stop here")


# --------------------------------------------------------------------------- the hub, in processes of their own

HUB_SWEEP = """\
name: hub
storage: {storage}
defaults: {{model: {model}, task: sst2}}
experiments:
  full: {{kind: finetune}}
"""


CLI_CALLS = """
import contextlib, io, json, sys
from flatray import sweep
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sweep.main(argv)
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


def sweep_cli(calls: list[list[str]], env: dict, cwd: Path) -> list[dict]:
    """`python -m flatray.sweep` once per argv, in one fresh process (its hub settings from `env`); the process's
    own stderr (where huggingface_hub would log its retries) must stay clean."""
    proc = subprocess.run([sys.executable, "-c", CLI_CALLS, json.dumps(calls)], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Retry" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def online(endpoint: str) -> dict:
    return {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": endpoint,
            "PYTHONPATH": str(SMOKE.parent.parent)}


def test_an_unreachable_hub_is_one_line_and_stops_a_real_run(tmp_path):
    path = tmp_path / "hub.yaml"
    path.write_text(HUB_SWEEP.format(storage=tmp_path / "results", model="google-bert/bert-base-uncased"))
    env = {**online("http://127.0.0.1:9"), "RAY_TMPDIR": str(tmp_path / "ray")}  # a closed port: refused at once
    dry, real = sweep_cli([[str(path), "--dry-run"], [str(path)]], env, tmp_path)
    assert dry["code"] == 0, dry
    hub_lines = [line for line in (dry["out"] + dry["err"]).splitlines() if "127.0.0.1:9" in line or "etry" in line]
    assert len(hub_lines) == 1 and hub_lines[0].startswith("warning: ")
    assert "model 'google-bert/bert-base-uncased'; data 'nyu-mll/glue' (sst2): cannot be verified offline " \
        "(http://127.0.0.1:9 unreachable" in hub_lines[0] and "set HF_HUB_OFFLINE=1" in hub_lines[0]
    assert real["code"] == 2 and len(real["err"].strip().splitlines()) == 1
    assert real["err"].startswith("error: model 'google-bert/bert-base-uncased'; data 'nyu-mll/glue' (sst2): "
                                  "cannot be verified offline")
    assert not (tmp_path / "ray").exists()


def test_a_hub_that_never_answers_costs_the_timeout_once():
    with socket.socket() as silent:  # listens, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert preflight.hub_unreachable(timeout=1, endpoint=endpoint) == \
            f"{endpoint} did not answer within 1 s; set HF_HUB_OFFLINE=1 to use the local cache"


class FakeHub(BaseHTTPRequestHandler):
    """A stand-in for the hub's API on loopback, answering as the hub does: one model, GLUE with its configs, and
    404 RepoNotFound for anything else (what a misspelt id gets)."""

    KNOWN = {"/api/models/google-bert/bert-base-uncased": {"id": "google-bert/bert-base-uncased"},
             "/api/datasets/nyu-mll/glue": {"id": "nyu-mll/glue", "cardData": {
                 "configs": [{"config_name": c} for c in ("cola", "mnli", "qnli", "qqp", "rte", "sst2", "stsb")]}}}

    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def do_GET(self):
        body = self.KNOWN.get(self.path.split("?")[0])
        self.send_response(200 if body else 404)
        if not body:
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body or {"error": "Repository Not Found"}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_hub_is_asked_up_front_and_a_misspelt_model_id_stops_the_sweep(tmp_path, fake_hub):
    env = {**online(fake_hub), "RAY_TMPDIR": str(tmp_path / "ray")}
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(HUB_SWEEP.format(storage=tmp_path / "results", model="google-bert/bert-base-uncased"))
    bad.write_text(HUB_SWEEP.format(storage=tmp_path / "results", model="google-bert/bert-base-uncasd"))
    known, misspelt = sweep_cli([[str(good), "--dry-run"], [str(bad), "--dry-run"]], env, tmp_path)
    assert known["code"] == 0 and "warning" not in known["out"] + known["err"], known
    assert misspelt["code"] == 2 and len(misspelt["err"].strip().splitlines()) == 1, misspelt
    assert misspelt["err"].startswith("error: experiment 'full': model 'google-bert/bert-base-uncasd': no such "
                                      f"model on the Hugging Face hub ({fake_hub})")
    assert not (tmp_path / "ray").exists()


def test_offline_a_model_in_the_local_hf_cache_passes_and_loads(tmp_path):
    """HF_HUB_OFFLINE=1: a hub id passes the checks when the local HF cache holds it, and then really loads."""
    snapshot = tmp_path / "hub" / "models--flatray-test--tiny-bert" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in models.tiny_bert_dir().iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hub" / "models--flatray-test--tiny-bert" / "refs").mkdir()
    (tmp_path / "hub" / "models--flatray-test--tiny-bert" / "refs" / "main").write_text("0" * 40)
    script = textwrap.dedent("""
        from flatray import config, models
        from flatray.data import TASKS
        from flatray.sweep import preflight
        preflight.check_run(config.from_dict({"model": "flatray-test/tiny-bert", "task": "toy",
                                              "output": {"storage_path": "results"}}))
        try:
            preflight.check_run(config.from_dict({"model": "flatray-test/not-cached", "task": "toy"}))
        except config.ConfigError as err:
            print("not cached:", err)
        print("loaded:", models.load_model("flatray-test/tiny-bert", TASKS["toy"]).config.num_hidden_layers)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
                              "PYTHONPATH": str(SMOKE.parent.parent)})
    assert out.returncode == 0, out.stderr
    assert "not cached: model 'flatray-test/not-cached': cannot be verified offline (HF_HUB_OFFLINE=1, not in the " \
           "local cache)" in out.stdout
    assert "loaded: 2" in out.stdout
