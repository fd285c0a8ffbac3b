"""Checkpoint retention, resume and output-path safety:

- retention (`keep_last`) and the `latest` fallback follow save order, so a rollback (`--resume` of an
  earlier save in the run's own folder) keeps the checkpoint resumed from and lets the abandoned branch
  age out, instead of deleting the former and keeping the latter; it is noted only once the checkpoint
  has loaded (a load that fails changes nothing);
- the newest universal copy outlives its DeepSpeed checkpoint until the next copy exists, and
  `--resume <root>/universal` takes the newest complete copy when `latest` names a missing one, never a
  staging folder a kill left complete but for its name;
- a resume re-hashes exactly the files DeepSpeed reads on the rank, the shared ZeRO 1-2 model states too;
- `--resume` of a weights-only folder names `--init-from`; `convert` refuses an output that is or holds SRC.

Checkpoints are written by the real `save_atomic` through DeepSpeed's own checkpoint engine (files and
client state real, no model). The same flows in real training runs: tests/e2e/test_checkpoint_retention.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from tiny import write_tiny_weights

from pretrain.checkpoint import atomic as ckpt
from pretrain.checkpoint.convert import TARGETS, convert, import_checkpoint
from pretrain.checkpoint.resume import open_universal, resolve_start
from pretrain.checkpoint.tags import RESUMED
from pretrain.checkpoint.tensor_files import IntegrityError, file_sha256, staged_output, write_manifest
from pretrain.config import embedded_config_path, load_config, to_dict

CFG = load_config(embedded_config_path(), [])
ZERO3 = ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
ZERO12 = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
          "zero_pp_rank_1_mp_rank_00_optim_states.pt")  # ZeRO 1-2 at dp=2, as one process sees the folder


class _Engine:
    """The part of a DeepSpeed engine `save_atomic` and `StartPoint.load` drive: `save_checkpoint` writing a
    layout's files through DeepSpeed's own TorchCheckpointEngine (the model states hold the client state, as
    DeepSpeed's); `load_checkpoint` recording what it was asked to load (after mmpt's checks)."""

    def __init__(self, files: tuple[str, ...] = ZERO3) -> None:
        self.checkpoint_engine, self.files, self.loaded = TorchCheckpointEngine(), files, []

    def load_checkpoint(self, load_dir, tag):
        self.loaded.append(tag)
        return str(Path(load_dir) / tag), {}

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(Path(save_dir) / tag, exist_ok=True)
        for name in self.files:
            state = ({"module": {"w": torch.ones(100_000)}, **client_state} if "model_states" in name else
                     {"optimizer_state_dict": {"zero_stage": 1, "w": torch.full((1000,), float(len(name)))}})
            self.checkpoint_engine.save(state, str(Path(save_dir) / tag / name))


def save(root: Path, step: int, keep_last: int = 2, files: tuple[str, ...] = ZERO3) -> str:
    client = {"mmpt": {"step": step, "config": to_dict(CFG), "tokenizer": "{}", "rng": torch.get_rng_state(),
                       "data_positions": None}}
    return ckpt.save_atomic(_Engine(files), root, step, client, keep_last=keep_last)


def test_a_rollback_keeps_the_checkpoint_resumed_from_and_ages_out_the_abandoned_branch(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40, 50):
        save(root, step)
    assert ckpt.complete_tags(root) == ["global_step40", "global_step50"]
    # loss spike after 40: the user goes back to it in the same run
    start = resolve_start(CFG, root, str(root / "global_step40"), None)
    assert start.target == (root, "global_step40")
    assert (root / "latest").read_text() == "global_step50"  # nothing noted before the checkpoint loads
    with caplog.at_level(logging.WARNING, "mmpt.checkpoint"):
        assert start.load(_Engine())[0] == 40
    assert "global_step50: those checkpoints belong to an abandoned branch" in caplog.text
    assert (root / "latest").read_text() == "global_step40"  # a crash before the next save resumes 40, not 50
    assert ckpt.complete_tags(root) == ["global_step40", "global_step50"]  # nothing deleted at the resume
    (root / "latest").unlink()
    assert ckpt.latest_tag(root) == "global_step40"  # `latest` lost too: the fallback still takes 40

    save(root, 42)  # keep_last=2: the two most recent saves are 40 (resumed from) and 42
    assert ckpt.complete_tags(root) == ["global_step40", "global_step42"]
    (root / "latest").unlink()
    assert ckpt.latest_tag(root) == "global_step42"  # the fallback takes the newest save, not step 50
    save(root, 44)
    assert ckpt.complete_tags(root) == ["global_step42", "global_step44"]

    # an ordinary resume from the newest save, and a resume from another run's folder, write nothing
    resolve_start(CFG, root, "latest", None).load(_Engine())
    other_run = tmp_path / "other_run" / "checkpoints"
    resolve_start(CFG, other_run, str(root / "global_step42"), None).load(_Engine())
    assert not list(root.glob(f"*/{RESUMED}")) and (root / "latest").read_text() == "global_step44"


def test_resume_latest_after_a_save_killed_before_it_moved_latest_keeps_that_save(tmp_path):
    """`latest` still names 20 when 30 is the newest complete save (killed between publishing 30 and
    rewriting `latest`): `--resume latest` is not a rollback, and 30 must outlive the next save."""
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save(root, step, keep_last=3)
    (root / "latest").write_text("global_step20")
    resolve_start(CFG, root, "latest", None).load(_Engine())
    resolve_start(CFG, tmp_path, str(root), None).load(_Engine())  # the folder itself: the same
    assert not list(root.glob(f"*/{RESUMED}"))
    save(root, 40, keep_last=2)
    assert ckpt.complete_tags(root) == ["global_step30", "global_step40"]


def _copy_files(folder: Path, step: int) -> None:
    """What a universal copy holds once written, manifest last (tensors left out: retention and the choice
    of copy look at the folders only)."""
    (folder / "universal.json").write_text(json.dumps({"format": "mmpt-universal", "step": step}))
    (folder / "tokenizer.json").write_text("{}")
    write_manifest(folder, {}, kind="universal")


def _universal_copy(root: Path, tag: str) -> None:
    """A complete universal copy and `universal/latest` as `save_universal` leaves them (staged)."""
    with staged_output(root / "universal" / tag, overwrite=True) as tmp:
        _copy_files(tmp, ckpt.step_of(tag))
    (root / "universal" / "latest").write_text(tag)


def _without_seq(tag_dir: Path) -> None:
    """The marker as runs before save orders were recorded wrote it (no `seq`)."""
    marker = json.loads((tag_dir / ckpt.MARKER).read_text())
    del marker["seq"]
    (tag_dir / ckpt.MARKER).write_text(json.dumps(marker))


def test_no_listing_of_saves_takes_a_staging_folder_a_kill_left_complete(tmp_path):
    """A copy killed just before `staged_output` renamed it: `.global_step50.tmp-<pid>` holds universal.json
    and the manifest. With markers without `seq` (older runs) the save order is the step, read from a name's
    trailing digits: the PID would make the staging folder the newest copy."""
    root = tmp_path / "checkpoints"
    save(root, 40, keep_last=0)
    _without_seq(root / "global_step40")
    _universal_copy(root, "global_step40")
    staged = root / "universal" / ".global_step50.tmp-4321"
    staged.mkdir()
    _copy_files(staged, 50)
    (root / "universal" / "latest").unlink()  # `latest` lost: the fallback chooses
    assert open_universal(str(root / "universal")).path == root / "universal" / "global_step40"
    (root / "universal" / "latest").write_text("global_step50")  # or naming a copy that never landed
    assert open_universal(str(root / "universal")).path == root / "universal" / "global_step40"
    # the DeepSpeed checkpoints' listing (`latest` fallback, save order, retention) skips them too
    shutil.copytree(root / "global_step40", root / ".global_step50.old-4321")
    (root / "latest").unlink()
    assert ckpt.complete_tags(root) == ["global_step40"] and ckpt.latest_tag(root) == "global_step40"


def test_the_newest_universal_copy_outlives_its_checkpoint_until_the_next_copy_exists(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 10, keep_last=1)
    _universal_copy(root, "global_step10")
    save(root, 20, keep_last=1)  # retention removes step 10; its universal copy is still the newest one
    assert ckpt.complete_tags(root) == ["global_step20"]
    # killed here, before save_universal wrote step 20's copy: `checkpoints/universal` still resumes
    assert open_universal(str(root / "universal")).path == root / "universal" / "global_step10"


def test_resume_from_the_universal_folder_takes_the_newest_complete_copy(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save(root, step, keep_last=0)
        _universal_copy(root, f"global_step{step}")
    (root / "universal" / ".global_step40.tmp-123").mkdir()  # a copy killed while it was written
    (root / "universal" / "latest").write_text("global_step40")
    with caplog.at_level(logging.WARNING, "mmpt.checkpoint"):
        assert open_universal(str(root / "universal")).path.name == "global_step30"
    assert "latest names 'global_step40', which is not a complete universal checkpoint" in caplog.text
    # after a rollback to 20, the newest is 20 (resumed from most recently), not the higher step 30
    ckpt.note_resume(root, "global_step20")
    assert (root / "universal" / "latest").read_text() == "global_step20"
    (root / "universal" / "latest").unlink()
    assert open_universal(str(root / "universal")).path.name == "global_step20"


def _flip_middle_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the tensor data: same size, still parses
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("failure", ["corrupt file", "deepspeed load"])
def test_a_rollback_whose_load_fails_leaves_latest_and_the_save_order(tmp_path, failure):
    """The start-point checks pass, then the load fails (a file fails its hash check, or DeepSpeed's own
    load raises): `latest` and the save order stay as they were, so a later `--resume latest` takes the
    newest save (50), not the branch of a rollback that never happened."""
    root = tmp_path / "checkpoints"
    for step in (30, 40, 50):
        save(root, step, keep_last=0)
    start = resolve_start(CFG, root, str(root / "global_step40"), None)
    engine = _Engine()
    if failure == "corrupt file":
        _flip_middle_byte(root / "global_step40" / ZERO3[1])  # the optimizer states DeepSpeed would read
        expected: tuple[type[Exception], str] = (IntegrityError, "optim_states.pt: sha256 does not match")
    else:
        def refuse(load_dir, tag):
            raise RuntimeError("DeepSpeed: size mismatch")
        engine.load_checkpoint = refuse
        expected = (RuntimeError, "size mismatch")
    with pytest.raises(expected[0], match=expected[1]):
        start.load(engine)
    assert (root / "latest").read_text() == "global_step50"
    assert not list(root.glob(f"*/{RESUMED}"))
    assert ckpt.saved_order(root) == ["global_step30", "global_step40", "global_step50"]
    assert ckpt.resolve("latest", root) == (root, "global_step50")


def test_a_resume_rehashes_exactly_the_files_deepspeed_reads_shared_zero12_model_states_included(tmp_path):
    tag = tmp_path / save(tmp_path, 4, files=ZERO12)
    reads = [p.name for p in ckpt.deepspeed_reads(tag)]
    assert reads == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert len(ckpt.deepspeed_reads(tag, elastic=True)) == 3  # elastic: every DP rank's optimizer states
    ckpt.verify_for_load(tag)

    _flip_middle_byte(tag / ZERO12[2])  # rank 1's optimizer states: rank 0 reads them only when elastic
    ckpt.verify_for_load(tag)
    with pytest.raises(IntegrityError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt: sha256 does not"):
        ckpt.verify_for_load(tag, elastic=True)
    _flip_middle_byte(tag / ZERO12[2])

    _flip_middle_byte(tag / ZERO12[0])  # module, client state (step, data positions, RNG), frozen params
    with pytest.raises(IntegrityError, match="mp_rank_00_model_states.pt: sha256 does not match"):
        ckpt.verify_for_load(tag)


def test_resume_of_a_weights_only_folder_names_init_from(tmp_path, tiny_tok):
    weights = write_tiny_weights(tmp_path / "w", tiny_tok)
    with pytest.raises(ValueError, match=r"a weights export holds a model's weights only, .* with "
                                         rf"`--init-from {weights}`"):
        resolve_start(CFG, tmp_path / "checkpoints", str(weights), None)
    convert(weights, tmp_path / "hf", "hf")
    with pytest.raises(ValueError, match=r"a Hugging Face CLIP model folder .* `pretrain convert --from hf "):
        resolve_start(CFG, tmp_path / "checkpoints", str(tmp_path / "hf"), None)


def test_convert_refuses_an_output_that_is_or_holds_its_source(tmp_path, tiny_tok):
    run = tmp_path / "run"
    weights = write_tiny_weights(run / "checkpoints" / "w10", tiny_tok)
    (run / "metrics.jsonl").write_text("{}\n")
    before = file_sha256(weights / "model.safetensors")
    for dst, relation in ((weights, "is"), (run, "contains"), (run / "checkpoints", "contains")):
        for to in TARGETS:
            with pytest.raises(ValueError, match=rf"output {dst} {relation} the source {weights}"):
                convert(weights, dst, to, overwrite=True)
    with pytest.raises(ValueError, match=rf"output {run} contains the source {weights}"):
        import_checkpoint("hf", weights, run, overwrite=True)
    assert file_sha256(weights / "model.safetensors") == before and (run / "metrics.jsonl").is_file()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # nothing staged either

    # a run directory as SRC: its checkpoint folder is what is read, so DST must not hold that either
    save(run / "checkpoints", 12)
    tag = run / "checkpoints" / "global_step12"
    with pytest.raises(ValueError, match=rf"output {run / 'checkpoints'} contains the source {tag} "
                                         rf"\(what SRC {run} resolves to\)"):
        convert(run, run / "checkpoints", "universal", overwrite=True)
    out = convert(weights, run / "w10_bf16", "safetensors", "bf16")  # an output beside the source is fine
    assert Path(out["out"]).is_dir()
