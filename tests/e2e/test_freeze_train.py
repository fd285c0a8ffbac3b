"""End-to-end LiT: `train.freeze=[visual.*]` and `optim.lr_mult` under 2-rank ZeRO-3 with the real deepspeed
launcher, at tp=1 and tp=2, with a same-layout resume; `--init-from` and a resume that changes the groups in
one process (see their docstrings for why one suffices).

Checked against the single-device model the run started from (same seed -> same weights at every layout,
rebuilt here from the checkpoint's config and tokenizer): frozen and multiplier-0 weights bit-identical
after training, every other parameter moved; each optimizer group's learning rate exactly optim.lr x its
multiplier x the schedule; the optimizer-state files smaller by the frozen share, as `pretrain plan` says.

A resume of frozen parameters at another layout is test_fusion_train.py's resume test (dp=2 -> tp=2 under
ZeRO-3 through the universal copy, its towers frozen: the copy lists them as weights only, the losses
continue exactly and the towers come back bit-identical). The other direction's parts: a tp=2 checkpoint's
frozen weights, which a universal copy of it reads, are read back here (test_tp2_frozen_tower_bit_identical);
frozen weights loaded into 2 DP ranks' ZeRO-3 partitions: test_fusion_train.py's fusion_run (`--init-from`,
the same loader); tp=2 -> dp=2 through the universal copy: test_resume_any_layout.py. A tp=2 -> dp=2 resume
of the LiT run here started one more 2-rank run for those paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import DEFAULT_PERSISTENCE, TINY, run_pretrain

from parallel.engine import lr_lambda
from pretrain.checkpoint.sources import build_model, open_source
from pretrain.checkpoint.weights_only import mmap_load
from pretrain.config import engine_spec
from pretrain.metrics import read_metrics

pytestmark = pytest.mark.slow

LIT = ["train.freeze=[visual.*]", "optim.lr_mult={text.transformer.*: 0.5, logit_scale: 0}"]
STILL = ("visual.", "logit_scale")
"""Frozen (visual.*) or at multiplier 0 (logit_scale): must not move."""
INIT = ["train.seed=1", "parallel.zero_stage=3", DEFAULT_PERSISTENCE]
"""`lit_init_run`'s seed and ZeRO settings, which the regroup test's resume of it keeps."""


def train(run_dir: Path, overrides: list[str], resume: str | None = None) -> str:
    args = ["train", f"run.dir={run_dir}", *TINY, *LIT, *overrides] + (["--resume", resume] if resume else [])
    r = run_pretrain(args, procs=2, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def weights(run_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of a checkpoint of any layout."""
    return open_source(run_dir, tag).state_dict()


def initial_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The single-device model every layout starts from: the run's seed, config and tokenizer."""
    src = open_source(run_dir)
    torch.manual_seed(src.config.train.seed)
    return {n: p.detach() for n, p in build_model(src.config, src.meta["tokenizer"]).named_parameters()}


def check_still_and_moving(init: dict[str, torch.Tensor], now: dict[str, torch.Tensor]) -> None:
    assert set(init) == set(now)
    still = [n for n in init if n.startswith(STILL)]
    assert len(still) > 10
    for n in init:
        if n.startswith(STILL):
            assert torch.equal(now[n], init[n]), f"{n} moved"
        else:
            assert not torch.equal(now[n], init[n]), f"{n} did not move"


def group_rates(tag_dir: Path, tp_rank: int = 0) -> list[tuple[float, float, float, list[str]]]:
    """(lr_mult, lr, initial_lr, parameter names) of each optimizer group in a ZeRO-3 checkpoint."""
    states = mmap_load(tag_dir / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt")
    optim = mmap_load(tag_dir / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_optim_states.pt")
    groups = optim["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]
    assert len(groups) == len(states["param_shapes"])
    return [(g["lr_mult"], g["lr"], g["initial_lr"], list(shapes))
            for g, shapes in zip(groups, states["param_shapes"])]


def check_rates(run_dir: Path, tag: str, step: int, tp_rank: int = 0) -> None:
    """Every group at exactly optim.lr x multiplier x schedule(step); the 0.5 group exactly half the base
    group's rate, holding exactly the text transformer; frozen parameters in no group."""
    cfg = open_source(run_dir, tag).config
    factor = lr_lambda(engine_spec(cfg))(step)
    rates = group_rates(run_dir / "checkpoints" / tag, tp_rank)
    base = [lr for mult, lr, _, _ in rates if mult == 1.0]
    assert base and all(lr == cfg.optim.lr * factor for lr in base)
    for mult, lr, initial, _ in rates:
        assert initial == cfg.optim.lr * mult
        assert lr == initial * factor
        if mult == 0.5:
            assert lr == 0.5 * base[0]
    grouped = {m: [n for mult, _, _, ns in rates if mult == m for n in ns] for m in (0.0, 0.5, 1.0)}
    assert grouped[0.0] == ["logit_scale"]
    assert grouped[0.5] and all(n.startswith("text.transformer.") for n in grouped[0.5])
    assert not any(n.startswith("text.transformer.") for n in grouped[1.0])
    assert not any(n.startswith("visual.") for ns in grouped.values() for n in ns)


@pytest.fixture(scope="module")
def lit_run(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lit") / "run"
    train(run, [f"data.train={shards['train']}", "train.steps=6", "checkpoint.every=3"])
    return run


@pytest.fixture(scope="module")
def lit_tp2_run(shards, tmp_path_factory) -> Path:
    """tp=2 x dp=1 (micro-batch 16: the same global batch as the dp=2 run)."""
    run = tmp_path_factory.mktemp("lit_tp2") / "run"
    train(run, [f"data.train={shards['train']}", "train.steps=3", "parallel.tp=2", "train.micro_batch=16"])
    return run


def test_frozen_tower_bit_identical_others_move(lit_run):
    init = initial_weights(lit_run)
    check_still_and_moving(init, weights(lit_run, "global_step3"))
    check_still_and_moving(init, weights(lit_run, "global_step6"))


def test_each_group_gets_its_multiple_of_the_rate(lit_run):
    check_rates(lit_run, "global_step3", 3)
    check_rates(lit_run, "global_step6", 6)
    cfg = open_source(lit_run).config
    schedule = lr_lambda(engine_spec(cfg))
    for row in read_metrics(lit_run):  # the logged lr (the rate the step used) is the base rate
        assert row["lr"] == cfg.optim.lr * schedule(row["step"] - 1)


def test_optimizer_state_files_shrink_by_the_frozen_share(lit_run):
    plan = json.loads((lit_run / "memory.json").read_text())["plan"]
    c = plan["params"]
    share = c["frozen"] / c["total"]
    assert 0.3 < share < 0.6  # the image tower: about half of this model
    assert plan["per_rank_bytes"]["optimizer"] == round(12 * (c["total"] - c["frozen"]) / plan["dp"])
    tag = lit_run / "checkpoints" / "global_step6"
    for d in range(plan["dp"]):
        size = (tag / f"zero_pp_rank_{d}_mp_rank_00_optim_states.pt").stat().st_size
        unfrozen = 12 * c["total"] / plan["dp"]  # fp32 master + Adam m, v of every parameter
        assert plan["per_rank_bytes"]["optimizer"] <= size <= 1.03 * plan["per_rank_bytes"]["optimizer"]
        assert size / unfrozen == pytest.approx(1 - share, abs=0.03)
        model_states = (tag / f"zero_pp_rank_{d}_mp_rank_00_model_states.pt").stat().st_size
        assert model_states >= 4 * c["frozen"] / plan["dp"]  # the frozen weights are saved there


def test_same_layout_resume_is_exact(lit_run, shards, tmp_path):
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(lit_run / "checkpoints" / "global_step3", run / "checkpoints" / "global_step3")
    (run / "checkpoints" / "latest").write_text("global_step3")
    log = train(run, [f"data.train={shards['train']}", "train.steps=6", "checkpoint.every=3"],
                resume="latest")
    assert "universal copy" not in log  # DeepSpeed loads its own files
    a = {r["step"]: r["loss"] for r in read_metrics(lit_run)}
    b = {r["step"]: r["loss"] for r in read_metrics(run)}
    assert sorted(b) == [4, 5, 6]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a[step], b[step])
    straight, resumed = weights(lit_run, "global_step6"), weights(run, "global_step6")
    for n in straight:
        assert torch.equal(resumed[n], straight[n]), n
    check_rates(run, "global_step6", 6)


def test_tp2_frozen_tower_bit_identical(lit_tp2_run):
    """Read back from both TP ranks' files, as a universal copy of this checkpoint is written: the frozen
    tower bit-identical and listed as frozen (weights only, no moments)."""
    init = initial_weights(lit_tp2_run)
    check_still_and_moving(init, weights(lit_tp2_run))
    assert open_source(lit_tp2_run).frozen == {n for n in init if n.startswith("visual.")}
    for tp_rank in (0, 1):
        check_rates(lit_tp2_run, "global_step3", 3, tp_rank)


@pytest.fixture(scope="module")
def lit_init_run(lit_run, shards, tmp_path_factory) -> Path:
    """LiT from `lit_run`'s step-3 weights (`--init-from`), another seed, the default persistence threshold:
    one process, 2 steps (its only checkpoint, global_step2, is what the regroup test resumes)."""
    source = lit_run / "checkpoints" / "global_step3"
    run = tmp_path_factory.mktemp("lit_init") / "run"
    args = ["train", f"run.dir={run}", *TINY, *LIT, f"data.train={shards['train']}", "train.steps=2",
            *INIT, "--init-from", str(source)]
    r = run_pretrain(args, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


def test_init_from_sets_the_frozen_weights(lit_run, lit_init_run):
    """LiT from given weights (`--init-from`, as from an imported CLIP): the frozen tower holds the source's
    weights, not this run's own initialisation (another seed here), through training and ZeRO-3's
    checkpoint reader (DeepSpeed's frozen fragments, which ZeRO-2 reads the same way); at the default
    persistence threshold, so ZeRO-3 also keeps small frozen parameters whole. One process: the source is
    `lit_run`'s 2-rank checkpoint, and the 2-rank ZeRO-3 load of frozen towers (each DP rank's partition)
    is test_fusion_train.py's fusion_run, checked by its
    test_init_from_a_dual_encoder_adds_a_fresh_fusion_encoder[3], at threshold 0. Not checked on 2 ranks
    any more (a 2-rank run here was): the parameters the default threshold keeps whole, which ZeRO-3
    re-gathers from the loaded partitions; here that re-gather spans one rank. ZeRO-1 (the frozen working
    copy at load, the module state dict in its checkpoint) is that test's [1], whose towers are frozen and
    checked bit-identical to its source: a ZeRO-1 case here started one more 2-rank run for the same
    paths."""
    given, after, own = weights(lit_run, "global_step3"), weights(lit_init_run), initial_weights(lit_init_run)
    for n in given:
        if n.startswith(STILL):
            assert torch.equal(after[n], given[n]), n
            assert not torch.equal(after[n], own[n]) or own[n].unique().numel() == 1, n  # not its own init
        else:
            assert not torch.equal(after[n], given[n]), f"{n} did not move"


def test_changing_the_groups_at_resume_goes_through_the_universal_copy(lit_init_run, shards, tmp_path):
    """Unfreezing the tower and changing the multipliers at a same-layout resume: DeepSpeed's flat groups no
    longer fit, so the universal copy (by name) is loaded; the tower then trains, from zero moments. One
    process (`lit_init_run`'s layout): which files a resume loads depends on the groups, not on the rank
    (as in test_resume_overrides.py); a universal copy loaded into 2 DP ranks is test_resume_any_layout.py's
    tp2 -> dp2 case."""
    run = tmp_path / "regrouped"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(lit_init_run / "checkpoints" / "global_step2", run / "checkpoints" / "global_step2")
    (run / "checkpoints" / "latest").write_text("global_step2")
    args = ["train", f"run.dir={run}", *TINY, f"data.train={shards['train']}", "train.steps=4", *INIT,
            "optim.lr_mult={text.*: 0.25}", "--resume", "latest"]
    r = run_pretrain(args, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "through its universal copy" in r.stderr
    before, after = weights(lit_init_run, "global_step2"), weights(run, "global_step4")
    assert all(not torch.equal(after[n], before[n]) for n in after if n.startswith("visual."))
    rates = group_rates(run / "checkpoints" / "global_step4")
    cfg = open_source(run).config
    factor = lr_lambda(engine_spec(cfg))(4)
    assert sorted({mult for mult, *_ in rates}) == [0.25, 1.0]
    for mult, lr, initial, names in rates:
        assert initial == cfg.optim.lr * mult and lr == initial * factor
        assert all(n.startswith("text.") == (mult == 0.25) for n in names)
