"""Count the device-to-host reads our code makes in each training step (run as a script by
tests/e2e/test_host_sync.py, one process per rank under the deepspeed launcher or alone).

On CPU nothing syncs, so the reads are counted where they are made: `Tensor.item`, `tolist`, `numpy` and
the conversions `float()`, `int()`, `bool()`, `index()` are wrapped, and each call is attributed to the
first frame outside torch that made it. Only frames in our packages count (`launch`, `parallel`,
`pretrain`, `data_pipelines`); DeepSpeed's own reads inside `engine.step` (the overflow check, the
gradient norm) and torch's are outside our code and not counted. On a GPU each of these calls is a
host-device synchronisation (torch.cuda.set_sync_debug_mode would report it).

Steps are delimited by `set_unmasked_tail`, which the loop calls first thing in every step, so a step's
count includes its own logging, validation and checkpoint work. Writes {rank: {step: [[module:line,
method], ...]}} as JSON to the path in MMPT_SYNC_PROBE_OUT (one file per rank).
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import Any

import torch

OURS = ("launch", "parallel", "pretrain", "data_pipelines")
METHODS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
reads: dict[int, list[tuple[str, str]]] = defaultdict(list)
current = [0]  # the step being run (0: start-up)


def _caller() -> str | None:
    """module:line of the first frame outside torch, if it is ours."""
    f = sys._getframe(2)
    while f is not None and f.f_globals.get("__name__", "").split(".")[0] == "torch":
        f = f.f_back
    if f is None:
        return None
    name = f.f_globals.get("__name__", "")
    return f"{name}:{f.f_lineno}" if name.split(".")[0] in OURS else None


def _wrap(method: str) -> None:
    original = getattr(torch.Tensor, method)

    def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        where = _caller()
        if where is not None:
            reads[current[0]].append((where, method))
        return original(self, *args, **kwargs)

    setattr(torch.Tensor, method, wrapper)


def install() -> None:
    """Wrap the reads and mark step boundaries."""
    for m in METHODS:
        _wrap(m)
    from pretrain.models.pretrain_model import PretrainModel

    original = PretrainModel.set_unmasked_tail

    def boundary(self: PretrainModel, on: bool) -> None:
        current[0] += 1
        original(self, on)

    PretrainModel.set_unmasked_tail = boundary  # type: ignore[method-assign]


def dump() -> None:
    path = os.environ["MMPT_SYNC_PROBE_OUT"] + f".rank{os.environ.get('RANK', '0')}.json"
    with open(path, "w") as fh:
        json.dump({str(k): v for k, v in reads.items()}, fh)


if __name__ == "__main__":
    install()
    from pretrain.cli import main

    try:
        code = main(sys.argv[1:])
    finally:
        dump()
    sys.exit(code)
