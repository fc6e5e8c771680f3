"""Several machines: the launch command, SLURM's settings, and two launchers on this machine
(nnodes = 2, one process each, a c10d rendezvous on 127.0.0.1) against one process."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmctl.errors import UserError
from tests.conftest import REPO, kill_tree, manifest, run_cli
from tests.test_distributed import pretrain_recipe, same_losses, sft_recipe

TWO_NODES = '\n[distributed]\nstrategy = "ddp"\nnum_processes = 1\nnnodes = 2\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(stage: str, recipe: Path, logs: Path) -> list[subprocess.Popen]:
    """One llmctl launcher per "machine"."""
    endpoint = f'"127.0.0.1:{free_port()}"'
    procs = []
    for node in (0, 1):
        log = open(logs / f"{stage}-node{node}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "llmctl", stage, str(recipe), "--debug", "--set",
             f"distributed.node_rank={node}", "--set", f"distributed.rdzv_endpoint={endpoint}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        log.close()
    return procs


def wait_nodes(procs, logs: Path, stage: str, timeout: float = 240) -> list[int]:
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                kill_tree(p.pid)
            raise AssertionError(tail(logs, stage))
    return [p.returncode for p in procs]


def tail(logs: Path, stage: str) -> str:
    return "\n".join((logs / f"{stage}-node{n}.log").read_text()[-2000:] for n in (0, 1))


@pytest.mark.slow
def test_two_nodes_pretrain_match_one_process_and_resume_after_a_node_is_killed(
        tmp_path, assets, capsys):
    """2 machines x 1 process x batch 4 against 1 process x batch 8; one machine's launcher
    (its whole process tree) is SIGKILLed after the checkpoint at step 2; the rerun of both
    resumes from it and ends with the single process's losses at every step."""
    one = pretrain_recipe(tmp_path / "one.toml", assets, tmp_path / "one", batch_size=8)
    two = pretrain_recipe(tmp_path / "two.toml", assets, tmp_path / "two", batch_size=4,
                          extra=TWO_NODES)
    two.write_text(two.read_text().replace("save_steps = 10", "save_steps = 2"))
    code, _, err = run_cli(["pretrain", one], capsys)
    assert code == 0, err

    checkpoints = tmp_path / "two" / ".partial" / "pretrain" / "checkpoints"
    procs = start_nodes("pretrain", two, tmp_path)
    deadline = time.time() + 240
    while not (checkpoints / "checkpoint-2" / "trainer_state.json").exists():
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            tail(tmp_path, "pretrain")
        time.sleep(0.02)
    kill_tree(procs[1].pid)  # machine 1 is gone: its launcher, torchrun and rank
    codes = wait_nodes(procs, tmp_path, "pretrain")
    assert codes[0] != 0 and not (tmp_path / "two" / "pretrain").exists()

    procs = start_nodes("pretrain", two, tmp_path)
    assert wait_nodes(procs, tmp_path, "pretrain") == [0, 0], tail(tmp_path, "pretrain")
    assert "resuming from" in tail(tmp_path, "pretrain")
    same_losses(tmp_path / "one" / "pretrain", tmp_path / "two" / "pretrain", 8, 2e-3,
                "two nodes pretrain")
    single, nodes = manifest(tmp_path / "one" / "pretrain"), manifest(tmp_path / "two" / "pretrain")
    assert nodes["metrics"]["eval_loss"] == pytest.approx(single["metrics"]["eval_loss"], rel=2e-3)
    assert nodes["metrics"]["world_size"] == 2 and nodes["metrics"]["effective_batch_size"] == 8
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".llmctl.lock", "pretrain"]


@pytest.mark.slow
def test_two_nodes_sft_match_one_process(tmp_path, assets, pretrained_model, capsys):
    def recipe(name: str, batch_size: int, extra: str = "") -> Path:
        return sft_recipe(tmp_path, assets, pretrained_model, name, batch_size, extra, max_steps=4)

    code, _, err = run_cli(["sft", recipe("one", 8)], capsys)
    assert code == 0, err
    procs = start_nodes("sft", recipe("two", 4, TWO_NODES), tmp_path)
    assert wait_nodes(procs, tmp_path, "sft") == [0, 0], tail(tmp_path, "sft")
    # Rows differ in length: each process averages its own tokens (as under DDP).
    same_losses(tmp_path / "one" / "sft", tmp_path / "two" / "sft", 4, 2e-2, "two nodes sft")
    assert manifest(tmp_path / "two" / "sft")["metrics"]["world_size"] == 2
    assert (tmp_path / "two" / "sft" / "adapter" / "adapter_model.safetensors").exists()


# -- settings and SLURM's environment (no processes) ------------------------------------------


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-04],gpu7", ["node01", "node02", "node03", "node04", "gpu7"]),
    ("n1", ["n1"]),
    ("a[1,3-4]-ib,b", ["a1-ib", "a3-ib", "a4-ib", "b"]),
    ("r[1-2]n[09-10]", ["r1n09", "r1n10", "r2n09", "r2n10"]),
    ("node[009-011]", ["node009", "node010", "node011"]),
])
def test_slurm_nodelist_expands(nodelist, hosts):
    from llmctl.distributed import expand_nodelist

    assert expand_nodelist(nodelist) == hosts


def test_slurm_nodelist_that_cannot_be_read_is_a_user_error():
    from llmctl.distributed import expand_nodelist

    with pytest.raises(UserError, match="SLURM_JOB_NODELIST"):
        expand_nodelist("node[a-b]")


def load(tiny_recipe, extra: str = "", overrides=()):
    from llmctl.recipe import load_recipe

    return load_recipe(tiny_recipe('\n[distributed]\nstrategy = "ddp"\n' + extra), list(overrides))


def test_slurm_environment_fills_what_the_recipe_leaves_out(tiny_recipe, monkeypatch):
    from llmctl import distributed

    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: llmctl's own parser
    env = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-10]",
           "SLURM_JOB_ID": "8812"}
    recipe = load(tiny_recipe)
    job = distributed.job_nodes(recipe, "pretrain", env)
    assert job == distributed.Nodes(4, 2, "gpu07:29400", "8812")
    monkeypatch.setattr(os, "environ", {**os.environ, **env})
    cmd = distributed.launch_command(recipe, "pretrain", ["pretrain", "r.toml"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nnodes", "4", "--rdzv-backend", "c10d",
                       "--rdzv-endpoint", "gpu07:29400", "--rdzv-id", "8812",
                       "--nproc_per_node=1", "-m", "llmctl", "pretrain", "r.toml"]
    # The recipe wins; nnodes = 1 uses one machine of a larger allocation.
    pinned = load(tiny_recipe, 'nnodes = 2\nnode_rank = 1\nrdzv_endpoint = "10.0.0.5:6000"\n'
                  'rdzv_id = "mine"\n')
    assert distributed.job_nodes(pinned, "pretrain", env) == \
        distributed.Nodes(2, 1, "10.0.0.5:6000", "mine")
    one = load(tiny_recipe, "nnodes = 1\n")
    assert distributed.job_nodes(one, "pretrain", env).nnodes == 1
    assert "--standalone" in distributed.launch_command(one, "pretrain", ["pretrain"])
    assert distributed.job_nodes(load(tiny_recipe), "pretrain", {}) == \
        distributed.Nodes(1, 0, None, "tiny-pretrain")


@pytest.mark.parametrize("extra, env, message", [
    ("nnodes = 2\n", {}, "distributed.node_rank: needed with nnodes = 2"),
    ("nnodes = 2\nnode_rank = 0\n", {}, "distributed.rdzv_endpoint: needed with nnodes = 2"),
    ("", {"SLURM_NNODES": "2", "SLURM_NODEID": "x"}, '$SLURM_NODEID: "x" is not a whole number'),
    ("", {"SLURM_NNODES": "2", "SLURM_NODEID": "3"}, "distributed.node_rank: must be 0 to 1"),
])
def test_missing_or_bad_node_settings_are_user_errors(tiny_recipe, extra, env, message):
    from llmctl import distributed

    with pytest.raises(UserError) as err:
        distributed.job_nodes(load(tiny_recipe, extra), "pretrain", env)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("extra, message", [
    ('nnodes = 2\nrdzv_endpoint = "nohost"\n', "rdzv_endpoint"),
    ("nnodes = 0\n", "nnodes"),
    ("nnodes = 2\nnode_rank = 2\n", "node_rank"),
])
def test_bad_node_settings_in_the_recipe_are_exit_2(tiny_recipe, capsys, extra, message):
    code, _, err = run_cli(["pretrain", tiny_recipe(
        '\n[distributed]\nstrategy = "ddp"\n' + extra), "--dry-run"], capsys)
    assert code == 2 and err.startswith("error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_dry_run_shows_the_multi_machine_launch(tiny_recipe, capsys):
    recipe = tiny_recipe('\n[distributed]\nstrategy = "ddp"\nnum_processes = 2\nnnodes = 2\n'
                         'node_rank = 1\nrdzv_endpoint = "node01:29400"\n')
    code, out, err = run_cli(["pretrain", recipe, "--dry-run"], capsys)
    assert code == 0, err
    plan = json.loads(out)["distributed"]
    assert (plan["nnodes"], plan["node_rank"], plan["rdzv_endpoint"], plan["rdzv_id"]) == \
        (2, 1, "node01:29400", "tiny-pretrain")
    assert "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint node01:29400" in plan["launch"]
    assert "--standalone" not in plan["launch"]
