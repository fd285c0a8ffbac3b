"""A write failure inside DeepSpeed's save_checkpoint is recorded, not raised, so DeepSpeed still runs the
collectives that follow its writes on the failing rank (the multi-rank behaviour is tested end to end in
tests/e2e/test_reliability.py); the save then fails as a whole, naming the rank, and nothing is published."""

from __future__ import annotations

import pytest

from pretrain.checkpoint import atomic as ckpt
from pretrain.checkpoint.write_errors import deferred_write_errors


class _Files:
    """Stands in for DeepSpeed's TorchCheckpointEngine."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail, self.written = fail, []

    def makedirs(self, path, exist_ok=False):
        pass

    def save(self, state_dict, path):
        if self.fail and self.fail in path:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        self.written.append(path.rsplit("/", 1)[-1])


class _Engine:
    """save_checkpoint as DeepSpeed's: file writes, then collectives every rank must reach."""

    def __init__(self, files: _Files) -> None:
        self.checkpoint_engine, self.after_writes = files, 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.checkpoint_engine.makedirs(f"{save_dir}/{tag}", exist_ok=True)
        self.checkpoint_engine.save(state_dict=client_state, path=f"{save_dir}/{tag}/zero_pp_rank_0_"
                                    "mp_rank_00_model_states.pt")
        self.checkpoint_engine.save({}, f"{save_dir}/{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt")
        self._copy_recovery_script(save_dir)
        self.after_writes += 1  # the persistent-parameter all_gather and the closing barrier run here

    def _copy_recovery_script(self, save_path):
        pass


def test_a_failed_write_is_deferred_and_later_writes_skipped(monkeypatch):
    engine = _Engine(_Files(fail="model_states"))
    with deferred_write_errors(engine, step=3) as errors:
        engine.save_checkpoint("/nowhere", "global_step3", {}, False)
    assert engine.after_writes == 1  # DeepSpeed went on past the failed write
    assert len(errors) == 1 and "unexpected pos" in str(errors[0])
    assert engine.checkpoint_engine.written == []  # the optimizer file was not attempted after the failure
    assert "save" not in vars(engine.checkpoint_engine)  # the class's methods are back
    assert "_copy_recovery_script" not in vars(engine)


def test_fault_hook_fails_only_the_configured_step_rank_and_file(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    for spec, failed in [("3:1:optim_states", ["zero_pp_rank_0_mp_rank_00_model_states.pt"]),
                         ("3:1", []), ("4:1", None), ("3:0", None)]:
        monkeypatch.setenv("MMPT_FAULT_WRITE", spec)
        engine = _Engine(_Files())
        with deferred_write_errors(engine, step=3) as errors:
            engine.save_checkpoint("/nowhere", "global_step3", {}, False)
        if failed is None:
            assert not errors and len(engine.checkpoint_engine.written) == 2, spec
        else:
            assert "injected write failure" in str(errors[0]), spec
            assert engine.checkpoint_engine.written == failed, spec


def test_save_atomic_fails_whole_and_publishes_nothing(tmp_path):
    engine = _Engine(_Files(fail="optim_states"))
    with pytest.raises(ckpt.CheckpointSaveError, match=r"global_step3 .* failed on rank 0: .*unexpected pos"):
        ckpt.save_atomic(engine, tmp_path, 3, {})
    assert engine.after_writes == 1
    assert ckpt.complete_tags(tmp_path) == [] and not (tmp_path / "latest").exists()
    assert not (tmp_path / ckpt.STAGING / "global_step3").exists()


def test_a_failed_universal_copy_is_a_failed_save(tmp_path):
    from pretrain.checkpoint.resume import save_universal

    with pytest.raises(ckpt.CheckpointSaveError, match=r"universal copy of .* failed on rank 0: "):
        save_universal(tmp_path, "global_step1")  # nothing there to convert
