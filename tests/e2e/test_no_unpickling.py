"""Checkpoints are never unpickled, on any load path.

A pickle whose `__reduce__` would create a file is planted in a real 2-rank ZeRO-3 checkpoint, once in
rank 0's optimizer states and once in rank 1's model states, and the completion marker's sizes and sha256
are rewritten to match (whoever can plant a file can rewrite the marker). `train --resume` (2 ranks, the
healthy rank must not wait forever), `train --init-from`, `eval`, `convert` and `embed` must each refuse it
with an error naming the file, and the payload must never run. Marked slow.

`--resume` meets both plants: each rank pre-checks only the files DeepSpeed reads on it, so rank 0 finds the
first and rank 1 the second. The single-process readers (`--init-from`, eval, convert, embed) all open the
checkpoint through `sources.DeepSpeedSource`, which pre-checks every `*.pt` of the tag before reading any;
they meet rank 1's model states only, the file none of them would otherwise read (ZeRO-3 weights come from
the optimizer files), so only that pre-check can refuse it. Rank 0's optimizer file adds nothing there: it
is refused by the same pre-check, and by the weights-only reader after it."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from tiny import ROOT, STRAIGHT_STEPS, TINY, pretrain_cli, run_pretrain, straight_2ranks

from pretrain.checkpoint import atomic as ckpt
from pretrain.checkpoint import weights_only
from pretrain.checkpoint.tensor_files import file_sha256

pytestmark = pytest.mark.slow
REFUSED = "refused: contains code or objects that are not tensors"
PLANTS = {  # which file gets the payload; only that one rank's DeepSpeed load would read it
    "optim_rank0": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "model_rank1": "zero_pp_rank_1_mp_rank_00_model_states.pt",
}


class Payload:
    """Unpickling this runs `touch PATH`: what a planted checkpoint does to a loader that unpickles."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.path)}",))


def plant(tag_dir: Path, name: str, marker: Path) -> Path:
    """Add the payload to `name` (keeping all its real content, so an unpickling loader would carry on as
    if nothing happened) and rewrite the checkpoint's marker to match the new file."""
    path = tag_dir / name
    state = weights_only.safe_load(path)
    state["payload"] = Payload(marker)
    torch.save(state, path)
    manifest = json.loads((tag_dir / ckpt.MARKER).read_text())
    manifest["files"][name] = path.stat().st_size
    manifest["sha256"][name] = file_sha256(path)
    (tag_dir / ckpt.MARKER).write_text(json.dumps(manifest, indent=1))
    ckpt.verify_marker(tag_dir)  # the integrity check passes: only weights-only loading stands in the way
    return path


@pytest.fixture(scope="module")
def trained(shards, trained_once) -> Path:
    """A real 2-rank ZeRO-3 checkpoint root: the session's shared run under the deepspeed launcher
    (tiny.straight_2ranks, checkpoints at steps 8 and 16); the payload goes into a copy's latest."""
    return straight_2ranks(trained_once, shards) / "checkpoints"


@pytest.fixture(scope="module", params=sorted(PLANTS))
def planted(request, trained, tmp_path_factory):
    """(checkpoint root, planted file, marker the payload would create) for one plant."""
    root = tmp_path_factory.mktemp(request.param) / "checkpoints"
    shutil.copytree(trained, root)
    marker = Path(f"/tmp/mmpt-pwned-{uuid.uuid4().hex}")
    bad = plant(root / ckpt.latest_tag(root), PLANTS[request.param], marker)
    yield root, bad, marker
    present = marker.exists()
    marker.unlink(missing_ok=True)
    assert not present, f"the payload in {bad} ran"


def refused(r: subprocess.CompletedProcess, bad: Path, marker: Path) -> None:
    out = r.stdout[-3000:] + r.stderr[-5000:]
    assert r.returncode != 0, out
    assert f"{bad}: {REFUSED}" in r.stderr, out
    assert "posix.system" in r.stderr, out  # refused for the payload, not for anything else
    assert not marker.exists(), f"the payload in {bad} ran"


def test_payload_runs_when_unpickled(tmp_path):
    """Control: the payload is live (a plain `torch.load(weights_only=False)` creates the file; in this
    process: the payload only touches a file under tmp_path, so no fresh interpreter is needed)."""
    marker = tmp_path / "control-pwned"
    torch.save({"x": Payload(marker)}, tmp_path / "control.pt")
    assert not marker.exists()
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert marker.exists()


def test_train_resume_refuses_on_every_rank_without_hanging(planted, shards, tmp_path):
    root, bad, marker = planted
    t0 = time.monotonic()
    r = run_pretrain(["train", f"run.dir={tmp_path / 'run'}", f"data.train={shards['train']}", *TINY,
                      "data.workers=1", f"train.steps={STRAIGHT_STEPS + 2}", "--resume", str(root)], procs=2,
                     timeout=300)
    refused(r, bad, marker)
    assert time.monotonic() - t0 < 240  # the healthy rank stopped too, not at a collective's timeout
    assert "resumed from" not in r.stderr


SINGLE = pytest.mark.parametrize("planted", ["model_rank1"], indirect=True)  # see the module docstring


@SINGLE
def test_train_init_from_refuses(planted, shards, tmp_path):
    root, bad, marker = planted
    r = run_pretrain(["train", f"run.dir={tmp_path / 'run'}", f"data.train={shards['train']}", *TINY,
                      "train.steps=1", "--init-from", str(root)], timeout=300)
    refused(r, bad, marker)


@SINGLE
def test_eval_convert_and_embed_refuse(planted, shards, tmp_path):
    root, bad, marker = planted
    r = pretrain_cli("eval", "--checkpoint", str(root), "--data", shards["val"], "--classnames",
                     shards["classnames"], "--json")
    refused(r, bad, marker)
    # one target: convert opens its source (sources.open_source) before it looks at --to
    r = pretrain_cli("convert", str(root), str(tmp_path / "universal"), "--to", "universal")
    refused(r, bad, marker)
    assert not (tmp_path / "universal").exists()
    (tmp_path / "texts.txt").write_text("a red square\na blue circle\n")
    r = pretrain_cli("embed", "--checkpoint", str(root), "--texts", str(tmp_path / "texts.txt"), "--out",
                     str(tmp_path / "emb.npz"))
    refused(r, bad, marker)
    assert not (tmp_path / "emb.npz").exists()


_RANK = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from pretrain.checkpoint import atomic as ckpt
    dist.init_process_group("gloo")
    try:
        ckpt.verify_for_load(sys.argv[1])
        print(json.dumps({"error": None}))
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
""")


def test_pre_check_agreement_every_rank_names_the_file(tmp_path):
    """The per-rank pre-check on its own (2 gloo ranks): rank 1's file holds code, rank 0's is clean;
    both ranks raise, promptly, and both name rank 1's file."""
    from launch.rendezvous import free_port

    tag = tmp_path / "global_step1"
    tag.mkdir()
    for r in (0, 1):
        torch.save({"module": {"w": torch.zeros(2)}}, tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {}}, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    marker = tmp_path / "pwned"
    bad = tag / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    torch.save({"module": {}, "payload": Payload(marker)}, bad)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(tag)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, env={**env, "RANK": str(r)}) for r in (0, 1)]
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert [res["error"] for res in results] == ["UnsafeCheckpointError"] * 2, results
    for res in results:
        assert f"{bad}: {REFUSED}" in res["message"], res
    assert "found by rank 1" in results[0]["message"]
    assert not marker.exists()
