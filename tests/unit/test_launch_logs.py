"""launch/logs.py: which third-party messages are dropped, the rank > 0 rule and `logging.all_ranks`.
The whole demo output is checked against an allowlist in tests/e2e/test_quiet_log.py."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from launch.logs import (
    LOG_NOISE,
    WARNING_NOISE,
    OnlyWarnings,
    drop_printed,
    install_filters,
    quiet_other_ranks,
)
from pretrain.config import ConfigError, load_config


def _passes(logger_name: str, message: str) -> bool:
    logger = logging.getLogger(logger_name)
    record = logger.makeRecord(logger_name, logging.WARNING, __file__, 1, message, (), None)
    return bool(logger.filter(record))


def test_noise_records_are_dropped_by_logger_and_message():
    install_filters()
    install_filters()  # idempotent: one filter per logger
    assert sum(type(f).__name__ == "DropNoise" for f in logging.getLogger("DeepSpeed").filters) == 1
    assert not _passes("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we "
                                    "were unable to detect it.")
    assert not _passes("torch.utils.cpp_extension", "No CUDA runtime is found, using CUDA_HOME='/usr/local'")
    # anything else from the same loggers, and the same words from another logger, still print
    assert _passes("DeepSpeed", "Setting accelerator to CUDA")
    assert _passes("DeepSpeed", "the checkpoint is corrupt")
    assert _passes("mmpt.train", "Setting accelerator to CPU.")
    assert {n.where for n in LOG_NOISE} == {"DeepSpeed", "torch.utils.cpp_extension"}


def test_noise_warnings_are_ignored_by_module_and_message():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        install_filters()
        msg = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
        warnings.warn_explicit(msg, UserWarning, "x.py", 1, module="megatron.core.optimizer")
        warnings.warn_explicit(msg, UserWarning, "x.py", 1, module="pretrain.models")  # not megatron's
        warnings.warn_explicit("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning,
                               "x.py", 1, module="deepspeed.runtime.zero")
        warnings.warn_explicit("something else", UserWarning, "x.py", 1, module="megatron.core.optimizer")
    assert [str(w.message) for w in seen] == [msg, "something else"]
    assert len(WARNING_NOISE) == 2


@pytest.mark.parametrize(("rank", "all_ranks", "info_shown"),
                         [(0, False, True), (1, False, False), (3, False, False), (1, True, True)])
def test_ranks_above_zero_log_only_warnings_unless_all_ranks(monkeypatch, rank, all_ranks, info_shown):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    deepspeed_logger = logging.getLogger("DeepSpeed")
    monkeypatch.setattr(deepspeed_logger, "filters", list(deepspeed_logger.filters))
    ours = logging.getLogger("mmpt.test_launch_logs")
    monkeypatch.setattr(ours, "level", logging.INFO)

    assert quiet_other_ranks(rank, all_ranks) is (not info_shown)
    ours.info("an info line")
    ours.warning("a warning")
    assert ("an info line" in stream.getvalue()) is info_shown
    assert "a warning" in stream.getvalue()
    ds_info = deepspeed_logger.makeRecord("DeepSpeed", logging.INFO, __file__, 1, "ds info", (), None)
    assert bool(deepspeed_logger.filter(ds_info)) is info_shown  # DeepSpeed's logger does not propagate
    assert sum(isinstance(f, OnlyWarnings) for f in handler.filters) == (0 if info_shown else 1)


def test_drop_printed_passes_on_everything_else_even_when_the_block_raises(capsys):
    with drop_printed():
        print("before")
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("DeepSpeed built successfully, or not")
    with pytest.raises(RuntimeError), drop_printed():
        print("said before failing")
        raise RuntimeError("boom")
    assert capsys.readouterr().out == "before\nDeepSpeed built successfully, or not\nsaid before failing\n"


def test_all_ranks_config_key():
    assert load_config(None).logging.all_ranks is False
    assert load_config(None, ["logging.all_ranks=true"]).logging.all_ranks is True
    with pytest.raises(ConfigError, match="logging.all_ranks: expected true or false"):
        load_config(None, ["logging.all_ranks=maybe"])
