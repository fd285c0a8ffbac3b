"""`key=value` overrides are accepted anywhere on the command line, in every subcommand that takes them, in
the order typed; anything else unknown is still refused."""

from __future__ import annotations

import pytest
from tiny import pretrain_cli

from pretrain.cli import build_parser, parse_args


@pytest.mark.parametrize("argv,overrides,extra", [
    (["train", "train.steps=1", "--resume", "latest", "run.dir=/tmp/x"], ["train.steps=1", "run.dir=/tmp/x"],
     {"resume": "latest"}),
    (["train", "--resume", "latest", "a.b=1", "--init-from", "w", "c.d=2"], ["a.b=1", "c.d=2"],
     {"resume": "latest", "init_from": "w"}),
    (["bench", "step", "m.x=1", "--vs-patch-dropout", "0.5", "m.y=2", "--json"], ["m.x=1", "m.y=2"],
     {"vs_patch_dropout": 0.5, "json": True}),
    (["plan", "a=1", "--world", "4", "b=2"], ["a=1", "b=2"], {"world": 4}),
    (["config", "--keys", "a=1"], ["a=1"], {"keys": True}),
])
def test_overrides_anywhere_in_order(argv, overrides, extra):
    args = parse_args(build_parser(), argv)
    assert args.overrides == overrides
    for k, v in extra.items():
        assert getattr(args, k) == v


@pytest.mark.parametrize("argv", [
    ["train", "a=1", "--resume", "latest", "--bogus"],
    ["train", "a=1", "--resume", "latest", "stray"],
    ["eval", "--checkpoint", "c", "--data", "d", "--classnames", "n", "a=1"],  # eval takes no overrides
])
def test_other_unknown_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(build_parser(), argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_config_prints_overrides_given_after_an_option():
    r = pretrain_cli("config", "train.steps=7", "--config", "configs/demo.yaml", "run.dir=/tmp/mixed-order")
    assert r.returncode == 0, r.stderr
    assert "steps: 7" in r.stdout and "dir: /tmp/mixed-order" in r.stdout
