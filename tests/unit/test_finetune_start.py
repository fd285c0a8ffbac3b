"""`pretrain finetune` refuses, before anything trains and in one line, what would otherwise cost a run or
fail deep inside DeepSpeed: `--wise-ft` coefficients outside [0, 1] (the sweep runs after training), a
`--resume` with another class-names file than the checkpoint's head was trained on, and `--init-from` an
HF / open_clip / ONNX folder (named with the `pretrain convert --from` that imports it). The sweep is
pointed at the run's checkpoints wherever `checkpoint.dir` puts them (tests/e2e/test_finetune.py runs it)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny import TINY_INFER, write_tiny_weights

from pretrain.checkpoint.convert import convert
from pretrain.checkpoint.resume import resolve_start
from pretrain.cli import build_parser, main
from pretrain.config import ConfigError, embedded_config_path, load_config
from pretrain.tasks.classify import build_classifier, check_resumed_classnames
from pretrain.tasks.command import _alphas

FINETUNE = ["finetune", "--task", "classify", "--train", "x.tar", "--val", "v.tar", "--classnames", "c.txt"]


@pytest.fixture
def no_training(monkeypatch) -> list[dict]:
    """`pretrain.train.train` replaced: records its calls and returns an empty summary; the sweep too."""
    import pretrain.evaluation.wise_ft as wise_ft
    import pretrain.train

    calls: list[dict] = []

    def sweep(run_dir, alphas, **kw):
        calls.append({"sweep": (str(run_dir), alphas), **kw})
        return {"samples": 0, "data": "v.tar", "classes": 2, "step": 1, "results": []}

    monkeypatch.setattr(pretrain.train, "train", lambda cfg, **kw: calls.append({"train": kw}) or {})
    monkeypatch.setattr(wise_ft, "wise_ft_sweep", sweep)
    return calls


@pytest.mark.parametrize("bad", ["1.5", "-0.5", "nan", "inf"])
def test_wise_ft_coefficients_outside_0_1_stop_before_training(no_training, capsys, bad):
    rc = main([*FINETUNE, "--wise-ft", "0", bad])
    assert rc == 2
    assert f"--wise-ft: mixing coefficients must be in [0, 1], got {bad} " in capsys.readouterr().err
    assert no_training == []  # train() never ran


def test_wise_ft_with_overrides_only_is_refused_and_good_ones_pass(no_training, capsys, tmp_path):
    with pytest.raises(ValueError, match="--wise-ft: no mixing coefficient, only the overrides train.steps"):
        _alphas(["train.steps=3"])
    assert _alphas(["0", "1", "train.steps=3"]) == ([0.0, 1.0], ["train.steps=3"])
    assert no_training == []
    # good ones train, then sweep the run's checkpoints where checkpoint.dir puts them
    rc = main([*FINETUNE, f"run.dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ck'}",
               "--wise-ft", "0", "1"])
    assert rc == 0, capsys.readouterr().err
    assert no_training[1] == {"sweep": (str(tmp_path / "run"), [0.0, 1.0]), "checkpoint": tmp_path / "ck"}


def _client(names: list[str] | None, file: str = "/data/old/classnames.txt", task: str = "classify") -> dict:
    client = {"config": {"train": {"task": task}, "finetune": {"classnames": file}}, "step": 2}
    return {**client, "classnames": names} if names is not None else client


def test_resume_with_other_class_names_is_refused_naming_both_files_and_counts(tmp_path):
    names = [f"class {i}" for i in range(4)]
    cfg = load_config(None, ["train.task=classify", f"finetune.classnames={tmp_path / 'new.txt'}"])
    check_resumed_classnames(cfg, names, _client(names), "ck/global_step2")  # the same names: fine
    with pytest.raises(ConfigError) as e:
        check_resumed_classnames(cfg, [*names, "extra"], _client(names), "ck/global_step2")
    msg = str(e.value)
    assert msg.startswith(f"finetune.classnames: {tmp_path / 'new.txt'} holds 5 classes, but the "
                          "checkpoint ck/global_step2 (--resume) was trained on the 4 classes of "
                          "/data/old/classnames.txt")
    assert "--classnames /data/old/classnames.txt" in msg and "\n" not in msg
    renamed = ["class 0", "class one", "class 2", "class 3"]
    with pytest.raises(ConfigError, match=r"holds other names \(class 1: 'class one' here, 'class 1' "
                                          r"there\), but the checkpoint ck/global_step2 .* the 4 classes "):
        check_resumed_classnames(cfg, renamed, _client(names), "ck/global_step2")
    with pytest.raises(ConfigError, match="a train.task=pretrain checkpoint records no class names .*"
                                          "--init-from"):
        check_resumed_classnames(cfg, names, _client(None, task="pretrain"), "pre/global_step40")


def test_build_classifier_checks_a_resumes_class_names_first(tmp_path):
    """Before the label scan of the shards and before the head is built (DeepSpeed's load would fail on
    the head's size, or take the rows under the new names)."""
    (tmp_path / "cn.txt").write_text("".join(f"class {i}\n" for i in range(5)))
    cfg = load_config(None, ["train.task=classify", f"finetune.classnames={tmp_path / 'cn.txt'}",
                             f"data.train={tmp_path / 'missing.tar'}"])
    start = SimpleNamespace(resumed=True, client=_client([f"class {i}" for i in range(4)]),
                            describe=lambda: "ck/global_step2")
    with pytest.raises(ConfigError, match=r"finetune.classnames: .*cn.txt holds 5 classes, but .* the 4 "):
        build_classifier(cfg, None, start, tmp_path)


def test_init_from_an_hf_or_open_clip_folder_names_convert_from(tmp_path, tiny_tok):
    cfg = load_config(embedded_config_path(), TINY_INFER)
    weights = write_tiny_weights(tmp_path / "w", tiny_tok)
    kinds = (("hf", "a Hugging Face CLIP model folder"), ("open_clip", "an open_clip model folder"))
    for kind, what in kinds:
        out = tmp_path / kind
        convert(weights, out, kind)
        with pytest.raises(ValueError) as e:
            resolve_start(cfg, tmp_path / "checkpoints", None, str(out))
        assert str(e.value).startswith(f"--init-from {out}: {what}, which --init-from does not read directly")
        msg = str(e.value)
        assert f"`pretrain convert --from {kind} {out} DST`" in msg and "--init-from DST" in msg
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "manifest.json").write_text(json.dumps({"kind": "onnx"}))
    with pytest.raises(ValueError, match=r"--init-from .*onnx: an ONNX export, .* inference only"):
        resolve_start(cfg, tmp_path / "checkpoints", None, str(onnx))
    assert resolve_start(cfg, tmp_path / "checkpoints", None, str(weights)).init.path == Path(weights)


def test_finetune_help_names_the_exports_init_from_takes():
    sub = next(a for a in build_parser()._actions if a.dest == "command" or getattr(a, "choices", None))
    helps = {a.dest: a.help for a in sub.choices["finetune"]._actions}
    assert "--to safetensors|universal" in helps["init_from"]
    assert "`pretrain convert --from hf|open_clip`" in helps["init_from"]
