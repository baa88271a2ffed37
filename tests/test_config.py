"""Run files: defaults, overrides, and a clear error (key, value, what is allowed) for each wrong file, before
any Ray work starts."""

import textwrap

import pytest

from flatray import config
from flatray.config import ConfigError

GOOD = """
model: tiny-bert
task: toy
"""


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_follow_the_task():
    rte = config.from_dict({"model": "bert-base-uncased", "task": "rte"})
    assert (rte.train.epochs, rte.train.batch_size, rte.train.lr, rte.data.max_length) == (10, 32, 2e-5, 128)
    assert config.from_dict({"model": "m", "task": "mnli"}).train.epochs == 3
    squad = config.from_dict({"model": "m", "task": "squad"})
    assert (squad.train.lr, squad.train.batch_size, squad.data.max_length, squad.train.epochs) == (3e-5, 16, 384, 2)
    assert rte.data.source == "hub" and config.from_dict({"model": "m", "task": "toy"}).data.source == "builtin"
    assert rte.optimizer.name == "adam" and rte.optimizer.rho == 0.0
    assert config.from_dict({"model": "m", "task": "rte", "optimizer": {"name": "sam"}}).optimizer.rho == 0.05
    assert config.from_dict({"model": "m", "task": "rte", "optimizer": {"name": "asam"}}).optimizer.rho == 0.5
    assert rte.deepspeed.gradient_clipping == 1.0  # explicit, never DeepSpeed's silent default


def test_yaml_scientific_notation_and_overrides(tmp_path):
    # PyYAML reads 2e-5 (no dot) as a string; the schema still takes it as a number.
    path = write(tmp_path, GOOD + "train: {lr: 2e-5}\n")
    cfg = config.load(path, ["optimizer.name=sam", "optimizer.rho=0.1", "scaling.num_workers=2"])
    assert cfg.train.lr == 2e-5 and cfg.optimizer.rho == 0.1 and cfg.scaling.num_workers == 2


def test_recipe_by_name_and_hash():
    cfg = config.load("smoke")
    assert cfg.optimizer.name == "sam" and cfg.model == "minilm-offline"
    other = config.load("smoke", ["optimizer.rho=0.1"])
    assert cfg.run_hash() == config.load("smoke").run_hash() != other.run_hash()
    assert config.load("smoke", ["output.storage_path=/elsewhere"]).run_hash() == cfg.run_hash()


BAD = [
    ("optimiser: {name: sam}", ["optimiser", "unknown key", "did you mean 'optimizer'"]),
    ("optimizer: {name: sam, rh0: 0.1}", ["optimizer.rh0", "unknown key", "rho"]),
    ("optimizer: {name: sgd}", ["optimizer.name", "'sgd'", "'adam', 'sam' or 'asam'"]),
    ("optimizer: {name: sam, rho: -0.1}", ["optimizer.rho", "-0.1", "greater than or equal to 0"]),
    ("optimizer: {name: sam, rho: abc}", ["optimizer.rho", "'abc'", "number"]),
    ("optimizer: {name: adam, rho: 0.05}", ["optimizer.rho", "0.05", "rho is for sam/asam"]),
    ("optimizer: {name: sam, sam_scope: both}", ["optimizer.sam_scope", "'both'", "'worker' or 'global'"]),
    ("optimizer: {betas: [0.9, 1.5]}", ["optimizer.betas", "[0.9, 1.5]", "[0, 1)"]),
    ("deepspeed: {zero_stage: 3}", ["deepspeed.zero_stage", "3", "ZeRO-3 is not supported"]),
    ("deepspeed: {zero_stage: 5}", ["deepspeed.zero_stage", "5", "0, 1 or 2"]),
    ("deepspeed: {precision: fp8}", ["deepspeed.precision", "'fp8'", "'fp32', 'bf16' or 'fp16'"]),
    ("deepspeed: {precision: fp16, zero_stage: 2}", ["deepspeed.precision", "'fp16'", "ZeRO 0 only"]),
    ("deepspeed: {gradient_clipping: -1}", ["deepspeed.gradient_clipping", "-1", "greater than or equal to 0"]),
    ("train: {epochs: 0}", ["train.epochs", "0", "greater than 0"]),
    ("train: {lr: fast}", ["train.lr", "'fast'", "number"]),
    ("train: {batch_size: 30}\nscaling: {num_workers: 4}", ["train.batch_size", "30", "multiple of scaling.num_workers"]),
    ("train: {schedule: cosine}", ["train.schedule", "'cosine'", "'linear' or 'constant'"]),
    ("train: {seed: 1.5}", ["train.seed", "1.5", "integer"]),
    ("scaling: {num_workers: 0}", ["scaling.num_workers", "0", "greater than or equal to 1"]),
    ("scaling: {use_gpu: maybe}", ["scaling.use_gpu", "'maybe'", "boolean"]),
    ("scaling: 2", ["scaling", "2", "dictionary"]),
    ("data: {source: hub}", ["data.source", "'hub'", "builtin"]),
    ("data: {source: files}", ["data.data_files", "None", "split -> file"]),
    ("data: {source: files, data_files: {train: /nope/train.csv, validation: /nope/dev.csv}}",
     ["data.data_files.", "/nope/", "an existing file"]),
    ("data: {max_length: -5}", ["data.max_length", "-5", "greater than 0"]),
]


@pytest.mark.parametrize("extra,expected", BAD, ids=[b[0][:40] for b in BAD])
def test_bad_run_file_names_key_value_and_allowed(tmp_path, extra, expected):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, GOOD + extra + "\n"))
    message = str(err.value)
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"


@pytest.mark.parametrize("text,expected", [
    ("task: toy", ["model", "missing"]),
    ("model: tiny-bert\ntask: wnli", ["task", "'wnli'", "mnli", "sst2", "squad"]),
    ("model: tiny-bert\ntask: sst2\ndata: {source: builtin}", ["data.source", "'builtin'", "hub or files"]),
    ("- model: tiny-bert", ["mapping", "list"]),
    ("model: [unclosed", ["not valid YAML"]),
])
def test_bad_top_level(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    for part in expected:
        assert part in str(err.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found.*smoke"):
        config.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        config.load(write(tmp_path, GOOD), ["optimizer.rho"])
    with pytest.raises(ConfigError, match="optimizer.nme"):
        config.load(write(tmp_path, GOOD), ["optimizer.nme=sam"])


def test_cli_fails_before_ray_starts(tmp_path, capsys):
    import sys

    from flatray.train import main

    ray_was_imported = "ray" in sys.modules
    bad = write(tmp_path, GOOD + "optimizer: {name: sgd}\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "optimizer.name" in err and "'sgd'" in err
    missing = write(tmp_path, "model: ./no/such/folder\ntask: toy\n")
    assert main([str(missing)]) == 2
    assert "no/such/folder" in capsys.readouterr().err
    offline_hub = write(tmp_path, "model: tiny-bert\ntask: sst2\n")  # tests run with HF_DATASETS_OFFLINE=1
    assert main([str(offline_hub)]) == 2
    err = capsys.readouterr().err
    assert "nyu-mll/glue" in err and "source='files'" in err
    if ray_was_imported:
        import ray

        assert not ray.is_initialized()
    else:
        assert "ray" not in sys.modules  # the driver did not even import Ray


@pytest.mark.parametrize("precision,stage", [("bf16", 0), ("bf16", 2), ("fp16", 0)])
def test_reduced_precision_runs_without_a_gpu(precision, stage):
    """bf16/fp16 are torch.autocast over fp32 weights: they run on DeepSpeed's CPU accelerator too."""
    cfg = config.from_dict({"model": "tiny-bert", "task": "toy",
                            "deepspeed": {"precision": precision, "zero_stage": stage}})
    assert cfg.deepspeed.precision == precision and not cfg.scaling.use_gpu
