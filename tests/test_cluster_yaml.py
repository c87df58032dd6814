"""cluster.yaml (the `ray up` config of the RTX 4090 cluster) checked offline.

* Ray's own preprocessing: the same steps `ray up` runs before it contacts any
  machine (`ray.autoscaler._private.commands.create_or_update_cluster`: the
  provider lookup, then `_bootstrap_config`, i.e. `prepare_config` (local
  provider preparation, `fillout_defaults`, ...), `validate_config` against
  ray-schema.json, and the local provider's `bootstrap_config`). No cache file
  is written, no SSH, no Ray started.
* The start commands are run for real through bash, wrapped exactly as Ray's
  SSH command runner wraps them on a node, with fake `ray` / `nvidia-smi`
  executables: the `ray start` arguments are parsed by Ray's own click command
  to check what each node advertises.
* Broken copies must be rejected, so these checks can fail.
"""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

from ray.autoscaler._private.cli_logger import cf, cli_logger
from ray.autoscaler._private.command_runner import _with_interactive
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.providers import _NODE_PROVIDERS
from ray.autoscaler._private.util import validate_config, with_head_node_ip
from ray._private.utils import parse_resources_json
from ray.scripts.scripts import start as ray_start_command

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
RESOURCE = "rtx4090"

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def load():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_offline(config):
    """What `ray up` does with the loaded YAML before contacting any host."""
    config = copy.deepcopy(config)
    provider_type = config["provider"]["type"]
    if _NODE_PROVIDERS.get(provider_type) is None:
        raise click.ClickException(f"Unknown provider type {provider_type}")
    return _bootstrap_config(config, no_config_cache=True)


@pytest.fixture(scope="module")
def config():
    return load()


@pytest.fixture(scope="module")
def prepared(config):
    return ray_up_offline(config)


# --- Ray's validation ---------------------------------------------------------


def test_ray_up_preprocessing_accepts_cluster_yaml(config, prepared):
    assert config["provider"]["type"] == "local"
    validate_config(prepared)  # already run inside _bootstrap_config; explicit
    # The local provider turns the ip lists into a single node type that keeps
    # every listed worker in the cluster.
    (node_type,) = prepared["available_node_types"].values()
    n_workers = len(config["provider"]["worker_ips"])
    assert node_type["min_workers"] == node_type["max_workers"] == n_workers
    assert prepared["max_workers"] == n_workers


def test_ip_lists(config):
    provider = config["provider"]
    workers = provider["worker_ips"]
    assert workers and all(isinstance(ip, str) and ip for ip in workers)
    assert len(set(workers)) == len(workers)
    assert provider["head_ip"] not in workers


def test_synced_repo_is_what_gets_installed(config, prepared):
    for remote, local in config["file_mounts"].items():
        # `ray up` is run from the repo root; Ray's updater asserts existence.
        assert (REPO / Path(local).expanduser()).exists(), local
    installs = " ".join(prepared["worker_setup_commands"])
    assert any(f"pip install -e {remote}" in installs for remote in config["file_mounts"])
    for package in ("ray[default]==", "torch==", "triton=="):
        assert package in installs
    # setup_commands reach the head too (merged by prepare_config).
    assert prepared["head_setup_commands"] == prepared["worker_setup_commands"]


def _break_unknown_top_level_key(c):
    c["worker_ip"] = ["192.0.2.99"]  # typo of provider.worker_ips, top level


def _break_commands_type(c):
    c["worker_start_ray_commands"] = "ray start --address=$RAY_HEAD_IP:6379"


def _break_auth_key(c):
    c["auth"]["ssh_key"] = c["auth"].pop("ssh_private_key")


def _break_rsync_exclude_type(c):
    c["rsync_exclude"] = "**/.git"  # must be a list


def _break_node_types_on_local(c):
    c["available_node_types"] = {
        "gpu": {"node_config": {}, "resources": {"GPU": 1, RESOURCE: 1}}
    }


def _break_missing_head_ip(c):
    del c["provider"]["head_ip"]


@pytest.mark.parametrize(
    "breaker, error",
    [
        (_break_unknown_top_level_key, jsonschema.ValidationError),
        (_break_commands_type, jsonschema.ValidationError),
        (_break_auth_key, jsonschema.ValidationError),
        (_break_rsync_exclude_type, jsonschema.ValidationError),
        # the local provider rejects node types: resources go in `ray start`
        (_break_node_types_on_local, click.ClickException),
        (_break_missing_head_ip, click.ClickException),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_broken_copies_are_rejected(config, breaker, error):
    broken = copy.deepcopy(config)
    breaker(broken)
    with pytest.raises(error):
        ray_up_offline(broken)


# --- What the nodes advertise ----------------------------------------------------

HEAD_IP = "192.0.2.10"


def run_on_fake_node(tmp_path, commands, gpu_names=None, smi_rc=0):
    """Run start commands as Ray's SSH runner would on a node.

    The node has fake `ray` (logs its argv) and `nvidia-smi` (prints
    gpu_names). Returns (exit codes, list of logged ray argv lists).
    """
    home = tmp_path / "home"
    fakebin = tmp_path / "bin"
    home.mkdir()
    fakebin.mkdir()
    log = tmp_path / "ray-argv.jsonl"
    ray = fakebin / "ray"
    ray.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    smi = fakebin / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        + "".join(f"echo '{name}'\n" for name in gpu_names or [])
        + f"exit {smi_rc}\n"
    )
    ray.chmod(0o755)
    smi.chmod(0o755)
    # Ray sources ~/.bashrc before each command (that is where cluster.yaml
    # activates its venv); here it puts the fakes first on PATH.
    (home / ".bashrc").write_text(f'export PATH="{fakebin}:$PATH"\n')
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C"}
    codes = []
    for cmd in with_head_node_ip(commands, HEAD_IP):
        # Ray sends this over `ssh host <args joined by spaces>`; the remote
        # login shell parses it, as `bash -c` does here.
        remote = " ".join(_with_interactive(cmd))
        proc = subprocess.run(
            ["bash", "-c", remote],
            env=env,
            cwd=home,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=20,
        )
        codes.append(proc.returncode)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return codes, calls


def ray_start_params(argv):
    assert argv[0] == "start", argv
    params = ray_start_command.make_context("start", list(argv[1:])).params
    params["resources"] = parse_resources_json(params["resources"], cli_logger, cf)
    return params


@needs_bash
@pytest.mark.parametrize("n_gpus", [1, 2, 4])
def test_workers_advertise_one_gpu_and_one_rtx4090_per_card(tmp_path, config, n_gpus):
    codes, calls = run_on_fake_node(
        tmp_path,
        config["worker_start_ray_commands"],
        gpu_names=["NVIDIA GeForce RTX 4090"] * n_gpus,
    )
    assert codes == [0] * len(codes)
    assert [c[0] for c in calls] == ["stop", "start"]
    params = ray_start_params(calls[-1])
    assert params["address"] == f"{HEAD_IP}:6379"
    assert not params["head"]
    assert params["num_gpus"] == n_gpus
    assert params["resources"] == {RESOURCE: n_gpus}


@needs_bash
@pytest.mark.parametrize(
    "gpu_names, smi_rc",
    [
        (["NVIDIA GeForce RTX 3090"], 0),
        (["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090"], 0),
        ([], 0),
        ([], 9),  # no driver / nvidia-smi failure
    ],
    ids=["3090", "mixed", "no-gpu", "smi-fails"],
)
def test_worker_without_only_rtx4090s_does_not_join(tmp_path, config, gpu_names, smi_rc):
    codes, calls = run_on_fake_node(
        tmp_path, config["worker_start_ray_commands"], gpu_names, smi_rc
    )
    assert codes[-1] != 0
    assert not [c for c in calls if c[0] == "start"]


@needs_bash
def test_head_runs_no_measurements(tmp_path, config):
    codes, calls = run_on_fake_node(tmp_path, config["head_start_ray_commands"])
    assert codes[-1] == 0
    params = ray_start_params(calls[-1])
    assert params["head"]
    assert params["num_gpus"] == 0
    assert params["resources"].get(RESOURCE, 0) == 0
