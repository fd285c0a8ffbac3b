"""`pretrain launch` input mistakes end in one line naming the flag, variable or file (exit 2), never in a
traceback or a launcher that fails later; cross-site addresses reach the config as the strings they are."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from launchargs import parse, plan

from launch import cli as launch_cli
from launch.commands import LaunchPlanError
from launch.env import LaunchEnvError
from pretrain.config import load_config

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
TRAIN = ["--", "train", "--config", "c.yaml"]



@pytest.fixture
def hosts(tmp_path: Path):
    def write(text: str) -> str:
        path = tmp_path / "hosts"
        path.write_text(text)
        return str(path)
    return write


def test_empty_hostfile_is_named(hosts):
    path = hosts("# nothing here\n\n")
    with pytest.raises(LaunchPlanError, match=f"hostfile {path} lists no hosts"):
        plan(["--launcher", "deepspeed", "--nodes", "2", "--hostfile", path, *TRAIN])


def test_bad_slot_count_names_file_and_line(hosts):
    path = hosts("n1 slots=4\nn2 slots=x\n")
    with pytest.raises(LaunchPlanError, match=f"hostfile {path}, line 2: 'slots=x'"):
        plan(["--launcher", "mpirun", "--nodes", "2", "--hostfile", path, *TRAIN])


def test_missing_hostfile_is_named_even_with_a_master_address(tmp_path):
    with pytest.raises(LaunchPlanError, match="hostfile .*nope: cannot read it"):
        plan(["--launcher", "deepspeed", "--nodes", "2", "--hostfile", str(tmp_path / "nope"),
              "--master-addr", "h0", *TRAIN])


def test_more_nodes_than_the_hostfile_lists_is_refused(hosts):
    with pytest.raises(LaunchPlanError, match="--nodes 3 but hostfile .* lists 2 host"):
        plan(["--launcher", "deepspeed", "--nodes", "3", "--hostfile", hosts("n1\nn2 slots=2\n"), *TRAIN])


@pytest.mark.parametrize("env, words", [
    ({"MASTER_PORT": "abc"}, "MASTER_PORT='abc' is not an integer"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT 70000 is not a TCP port"),
    ({"SLURM_JOB_NUM_NODES": "x"}, "SLURM_JOB_NUM_NODES='x' is not an integer"),
])
def test_bad_environment_values_are_named(env, words):
    with pytest.raises((LaunchEnvError, LaunchPlanError), match=words):
        plan(["--launcher", "torchrun", *TRAIN], env)


@pytest.mark.parametrize("port", ["0", "99999"])
def test_master_port_out_of_range_is_refused(port):
    with pytest.raises(LaunchPlanError, match=f"--master-port {port} is not a TCP port"):
        plan(["--launcher", "torchrun", "--master-port", port, *TRAIN])


def test_rendezvous_port_out_of_range_is_refused():
    with pytest.raises(LaunchPlanError, match="--serve-rendezvous must be HOST:PORT: port 99999"):
        launch_cli.cmd_launch(parse(["--serve-rendezvous", "127.0.0.1:99999"]))


def test_a_launcher_that_is_not_installed_is_named(tmp_path):
    missing = str(tmp_path / "bin" / "python")
    with pytest.raises(LaunchPlanError, match=f"{missing}: no such program"):
        launch_cli.cmd_launch(parse(["--launcher", "torchrun", "--python", missing, *TRAIN]))


def test_bracketed_ipv6_rendezvous_and_numeric_site_reach_the_config_as_strings():
    p = plan(["--launcher", "deepspeed", "--procs-per-node", "1", "--site", "0", "--rendezvous",
              "[::1]:29400", *TRAIN])
    overrides = list(p.train_args[3:])
    assert overrides == ['cross_site.site="0"', 'cross_site.rendezvous="[::1]:29400"']
    cfg = load_config(None, ["cross_site.sites=2", "parallel.zero_stage=3", *overrides])
    assert (cfg.cross_site.site, cfg.cross_site.rendezvous) == ("0", "[::1]:29400")


def test_cross_site_sbatch_quotes_site_and_rendezvous(tmp_path):
    """slurm/cross_site.sbatch hands its keys to slurm/pretrain.sbatch (here a stand-in printing its
    arguments, found through SLURM_SUBMIT_DIR as on a cluster); the config reads them back as strings."""
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "pretrain.sbatch").write_text('printf "%s\\n" "$@"\n')
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(tmp_path), "MMPT_SITE": "0",
           "MMPT_RENDEZVOUS": "[fd00::5]:29400"}
    r = subprocess.run(["bash", str(ROOT / "slurm" / "cross_site.sbatch"), "--config", "c.yaml"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    args = r.stdout.splitlines()
    assert args[-1] == 'cross_site.rendezvous="[fd00::5]:29400"'
    cfg = load_config(None, ["cross_site.sites=2", "parallel.zero_stage=3", *args[-2:]])
    assert (cfg.cross_site.site, cfg.cross_site.rendezvous) == ("0", "[fd00::5]:29400")


def test_launch_input_error_is_one_line_through_the_cli(hosts):
    r = subprocess.run([PY, "-m", "pretrain.cli", "launch", "--launcher", "deepspeed", "--nodes", "2",
                        "--hostfile", hosts(""), "--dry-run", *TRAIN], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "pretrain: error: hostfile" in r.stderr and "lists no hosts" in r.stderr
