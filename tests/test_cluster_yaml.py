"""cluster.yaml against Ray's own autoscaler schema, plus the project's rules for it."""

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).parent.parent / "cluster.yaml"


def test_cluster_yaml_passes_rays_schema():
    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_g5"]["node_confg"] = {}  # the check can fail
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_cluster_yaml_rules():
    text = CLUSTER.read_text()
    config = yaml.safe_load(text)
    assert config["provider"]["type"] == "aws"
    gpu_types = [n["node_config"]["InstanceType"] for n in config["available_node_types"].values()]
    assert any(t.startswith(("g5", "p4d")) for t in gpu_types)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # never open to the internet
    setup = " ".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and "constraints.txt" in setup
    assert not re.search(r"(WANDB_API_KEY|AWS_SECRET_ACCESS_KEY)\s*[:=]\s*[\w-]{8,}", text)  # no secrets in the file
