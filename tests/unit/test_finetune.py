"""`pretrain finetune` / `train.task=classify` without training: argument and config errors name the
problem (missing class names, unknown task, shards without `.cls`, labels out of range, bad --wise-ft), the
zero-shot head reproduces CLIP's zero-shot logits, the loss ignores unlabelled samples, and WiSE-FT's
interpolation has exact ends."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.cli import main
from pretrain.config import ConfigError, load_config
from pretrain.evaluation.wise_ft import interpolate, wise_ft_sweep
from pretrain.models.classifier import ClassifierModel, zeroshot_head
from pretrain.tasks.classify import check_labels
from pretrain.tasks.command import _alphas

SMALL = ["model.image_size=16", "model.vision.patch_size=8", "model.vision.width=16", "model.vision.layers=1",
         "model.vision.heads=2", "model.embed_dim=8"]


def _caption_only_shard(path: Path, n: int = 4) -> str:
    """A shard of jpg + txt samples, no `.cls` (what an image-caption crawl looks like)."""
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"a red thing {i}".encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_missing_classnames_is_a_config_error_naming_the_flag(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"train.task=classify needs finetune.classnames.*--classnames"):
        load_config(None, ["train.task=classify"])
    rc = main(["finetune", "--task", "classify", "--train", str(tmp_path / "x.tar")])
    assert rc == 2
    assert "finetune.classnames" in capsys.readouterr().err


def test_unknown_task_is_named(tmp_path, capsys):
    rc = main(["finetune", "--task", "segment", "--train", str(tmp_path / "x.tar"), "--classnames", "c.txt"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--task 'segment': unknown task" in err and "classify" in err
    with pytest.raises(ConfigError, match=r"train.task: 'segment' is not one of pretrain, classify"):
        load_config(None, ["train.task=segment"])


def test_wise_ft_needs_val_and_numbers(tmp_path, capsys):
    rc = main(["finetune", "--task", "classify", "--train", "x.tar", "--classnames", "c.txt",
               "--wise-ft", "0", "1"])
    assert rc == 2 and "--wise-ft scores each mixing coefficient on held-out shards: pass --val" in \
        capsys.readouterr().err
    assert _alphas(["0", "0.5", "train.steps=3"]) == ([0.0, 0.5], ["train.steps=3"])
    with pytest.raises(ValueError, match="--wise-ft: 'half' is not a number"):
        _alphas(["half"])
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        wise_ft_sweep(tmp_path, [0.0, 1.5])
    with pytest.raises(FileNotFoundError, match="zeroshot.safetensors: no zero-shot weights"):
        wise_ft_sweep(tmp_path, [0.5])


def test_shards_without_cls_are_refused_by_name(tmp_path):
    shard = _caption_only_shard(tmp_path / "captions.tar")
    why = r"--train.*none of the first 4 samples of .*captions.tar has a \.cls"
    with pytest.raises(ValueError, match=why):
        check_labels(shard, 10, "data.train (--train)")


def test_labels_outside_the_classnames_are_refused(tmp_path):
    from data_pipelines.synth import write_synthetic_shards

    out = write_synthetic_shards(tmp_path / "s", samples=40, samples_per_shard=40, image_size=16, seed=0)
    check_labels(out["urls"], 32, "data.train")  # the synthetic set's 32 classes: fine
    with pytest.raises(ValueError, match=r"data.val: label \d+ in .* is outside the 3 classes"):
        check_labels(out["urls"], 3, "data.val")


def test_zeroshot_head_gives_clip_zero_shot_logits():
    torch.manual_seed(0)
    cfg = load_config(None, SMALL)
    model = ClassifierModel.from_config(cfg, 5).eval()
    emb = F.normalize(torch.randn(5, 8), dim=-1)
    log_scale = torch.tensor([2.5])
    model.load_state_dict({**{f"visual.{k}": v for k, v in model.visual.state_dict().items()},
                           **zeroshot_head(emb, log_scale)})
    images = torch.randn(3, 3, 16, 16)
    expected = log_scale.exp() * model.encode_image(images) @ emb.T
    torch.testing.assert_close(model.logits(images), expected, rtol=1e-5, atol=1e-5)


def test_loss_ignores_unlabelled_samples_and_refuses_out_of_range_labels():
    torch.manual_seed(0)
    model = ClassifierModel.from_config(load_config(None, SMALL), 4)
    torch.nn.init.normal_(model.head.weight)
    images = torch.randn(4, 3, 16, 16)
    out = model({"image": images, "cls": torch.tensor([1, -1, 3, -1])})
    logits = model.logits(images)
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits[[0, 2]], torch.tensor([1, 3])))
    none = model({"image": images, "cls": torch.full((4,), -1)})
    assert float(none["loss"].detach()) == 0.0
    none["loss"].backward()  # still reaches the parameters: every rank runs the same backward under ZeRO
    with pytest.raises(ValueError, match="label 7 of this batch is outside the 4 classes"):
        model({"image": images, "cls": torch.tensor([0, 7, 1, 2])})


def test_wise_ft_interpolation_ends_are_exact_and_mismatches_named():
    zs = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    ft = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    assert all(torch.equal(interpolate(zs, ft, 0.0)[k], zs[k]) for k in zs)
    assert all(torch.equal(interpolate(zs, ft, 1.0)[k], ft[k]) for k in zs)
    torch.testing.assert_close(interpolate(zs, ft, 0.25)["a"], 0.75 * zs["a"] + 0.25 * ft["a"])
    with pytest.raises(ValueError, match="different parameters"):
        interpolate(zs, {"a": ft["a"]}, 0.5)
    with pytest.raises(ValueError, match=r"b has shape \(4,\) in the zero-shot weights and \(5,\)"):
        interpolate(zs, {"a": ft["a"], "b": torch.randn(5)}, 0.5)
