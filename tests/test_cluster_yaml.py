"""cluster.yaml is a valid Ray cluster-launcher config (`ray up cluster.yaml`).

Checked two ways against the schema that the installed Ray ships
(ray/autoscaler/ray-schema.json): plain jsonschema on the file as written, and
Ray's own path, `prepare_config` (merge the provider's defaults) followed by
`validate_config`, which is what `ray up` runs before it touches the cloud
(ray/autoscaler/_private/commands.py, `_bootstrap_config`). No cloud access is
needed. Negative cases prove the checks can fail.
"""

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
ray = pytest.importorskip("ray")

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
SCHEMA_PATH = Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json"


@pytest.fixture(scope="module")
def config():
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def schema():
    with open(SCHEMA_PATH) as f:
        return json.load(f)


def _ray_validate(cfg):
    """What `ray up` does to a config before it starts any node."""
    # A private module: if a Ray upgrade moves it, this fails loudly rather than skipping.
    from ray.autoscaler._private import util

    util.validate_config(util.prepare_config(copy.deepcopy(cfg)))


def _worker_types(cfg):
    return {
        name: node
        for name, node in cfg["available_node_types"].items()
        if name != cfg["head_node_type"]
    }


# --- the file is valid -------------------------------------------------------


def test_shipped_schema_is_a_valid_schema(schema):
    jsonschema.validators.validator_for(schema).check_schema(schema)


def test_cluster_yaml_matches_shipped_schema(config, schema):
    jsonschema.validate(config, schema)


def test_cluster_yaml_passes_ray_validate_config(config):
    _ray_validate(config)


# --- the checks can fail -----------------------------------------------------


def _typo_top_level_key(cfg):
    cfg["setup_comands"] = cfg.pop("setup_commands")


def _typo_node_type_key(cfg):
    node = next(iter(_worker_types(cfg).values()))
    node["min_worker"] = node.pop("min_workers")


def _typo_docker_key(cfg):
    cfg["docker"]["imagee"] = cfg["docker"].pop("image")


def _max_workers_as_string(cfg):
    cfg["max_workers"] = str(cfg["max_workers"])


def _fractional_node_gpu(cfg):
    # Fractions belong to trials (--gpus-per-trial), not to node resources.
    next(iter(_worker_types(cfg).values()))["resources"]["GPU"] = 0.5


def _missing_resources(cfg):
    del next(iter(_worker_types(cfg).values()))["resources"]


BROKEN = [
    _typo_top_level_key,
    _typo_node_type_key,
    _typo_docker_key,
    _max_workers_as_string,
    _fractional_node_gpu,
    _missing_resources,
]


@pytest.mark.parametrize("breaker", BROKEN, ids=lambda f: f.__name__.lstrip("_"))
def test_broken_copy_fails_shipped_schema(config, schema, breaker):
    broken = copy.deepcopy(config)
    breaker(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("breaker", BROKEN, ids=lambda f: f.__name__.lstrip("_"))
def test_broken_copy_fails_ray_validate_config(config, breaker):
    broken = copy.deepcopy(config)
    breaker(broken)
    # prepare_config itself asserts on some mistakes (a docker section
    # without an image) before the schema is checked.
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        _ray_validate(broken)


# --- what ufw needs from the cluster -------------------------------------------


def test_every_node_type_declares_resources(config):
    assert config["available_node_types"], "no node types"
    for name, node in config["available_node_types"].items():
        assert isinstance(node.get("resources"), dict) and node["resources"], name


def test_head_node_type_is_a_node_type(config):
    assert config["head_node_type"] in config["available_node_types"]


def test_worker_types_declare_gpu_and_scale_from_zero(config):
    workers = _worker_types(config)
    assert workers, "no worker node type"
    for name, node in workers.items():
        resources = node["resources"]
        assert resources.get("GPU", 0) >= 1, f"{name} declares no GPU"
        # at least one CPU per trial when 4 trials share a GPU (0.25 each)
        assert resources.get("CPU", 0) >= 4 * resources["GPU"], name
        assert node.get("min_workers", 0) == 0, name
        assert 1 <= node["max_workers"] <= config["max_workers"], name


def test_workers_can_write_trial_checkpoints_to_s3(config):
    # ufw.sweep keeps Ray Tune's experiment (checkpoints) under --results, and
    # trials checkpoint from the workers; `ray up` gives only the head a profile.
    for name, node in _worker_types(config).items():
        assert "IamInstanceProfile" in node["node_config"], name


def test_setup_installs_this_checkout_without_torch_pin(config):
    assert config["file_mounts"].get("~/ufw") == "."
    setup = " ".join(config["setup_commands"])
    assert "pip install -e ~/ufw" in setup
    assert "torch" not in setup


def test_image_is_not_the_frozen_ray_ml_image(config):
    # rayproject/ray-ml stopped at Ray 2.49; its `latest` tags are Ray 2.30.
    image = config["docker"]["image"]
    assert image.startswith("rayproject/ray:") and image.endswith("-gpu"), image


def test_standard_start_commands(config):
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
