"""`pretrain bench quality`, recipe `open_clip_train`: the real open_clip trainer from PyPI on our shards.

open_clip's trainer pins webdataset<=0.2.86 (we use 1.x), so it runs from its own virtual environment
(`--open-clip-python`, or `make_venv` under the cache folder; `make test` makes `.venv-openclip`): an
overlay that sees this environment's packages (torch, torchvision, `open_clip_torch`, which ships the
`open_clip_train` package, transformers for the tokenizer) through a .pth file and installs only what
the trainer needs otherwise, webdataset 0.2.86 and pandas, plus LAION's `clip-benchmark` (its CLI scores
our open_clip export in tests/e2e/test_clip_benchmark.py): ~200 MB instead of a second torch.
It is driven through its CLI, `open_clip_train.main.main(argv)`, by a two-line wrapper that first
registers our architecture with `open_clip.add_model_config(folder)` (the trainer has no flag for a
config file).

Same architecture: our model (same config, seed) exported with `pretrain.export.open_clip`, whose
`model_cfg` is open_clip's `CLIP` with our shapes, EOS pooling, initial logit scale and our tokenizer
(`hf_tokenizer_name` = the export folder, read by transformers offline). Same batch, lr, warm-up and
schedule, betas, eps, weight decay, gradient clipping (0: none), precision, crop scale, normalisation and
exactly our samples seen (`epoch_plan`); `quality_openclip_args.py` maps them and lists the `--set` keys
open_clip_train cannot follow (`bench quality` refuses those), and `trained_check` flags a run whose
weights never moved.
Its final checkpoint goes back into that folder and through `pretrain convert --from open_clip`, so it is
scored by exactly our `pretrain eval` code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

from data_pipelines.tokenizer import TextTokenizer
from pretrain.bench.quality_openclip_args import open_clip_argv, trained_check
from pretrain.config import Config
from pretrain.export.common import load_weight_file
from pretrain.export.open_clip import CONFIG_FILE, WEIGHT_FILES, export_open_clip
from pretrain.models.pretrain_model import PretrainModel

WRAPPER = """import sys, open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""


OVERLAY_PACKAGES = ("webdataset==0.2.86", "pandas", "requests")
"""What open_clip_train needs beyond this environment (its webdataset pin; pandas for its CSV loader), and
`requests`, which clip_benchmark's dataset modules import."""
NO_DEPS_PACKAGES = ("clip-benchmark==1.6.2", "pycocoevalcap==1.2")
"""LAION's CLIP_benchmark, whose real `clip_benchmark eval` CLI tests/e2e/test_clip_benchmark.py runs on our
open_clip export. Installed without dependencies: its torch, torchvision, open_clip_torch, scikit-learn,
transformers and tqdm are this environment's (a resolver could pull a second torch), webdataset is the
0.2.86 above (its wds reader was written against 0.2.x); pycocoevalcap only because its captioning module
imports it at start-up (and pycocoevalcap's pycocotools is only needed by captioning, not installed)."""
PROBE = ("import open_clip_train.main, transformers, webdataset, clip_benchmark.cli, numpy; "
         "assert webdataset.__version__ <= '0.2.86'; float(numpy.zeros(1))")
"""`float(numpy.zeros(1))`: clip_benchmark 1.6.2's `accuracy()` converts 1-element arrays with float(),
which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars")."""


def _numpy_pin() -> list[str]:
    """numpy 2.3.5 for the overlay when this environment's numpy is 2.4 or newer (see PROBE); nothing
    otherwise. Same ABI (2.x) as the compiled packages it shares with this environment."""
    import numpy

    major, minor = (int(x) for x in numpy.__version__.split(".")[:2])
    return ["numpy==2.3.5"] if (major, minor) >= (2, 4) else []


def make_venv(venv: Path) -> Path:
    """An environment where `open_clip_train` and `clip_benchmark` run, made once at `venv` (reused while
    both still import): a venv whose .pth adds this interpreter's site-packages after its own, so its
    webdataset 0.2.86 shadows our 1.x while torch and open_clip come from here, at the same versions as
    our runs."""
    py = venv / "bin" / "python"
    if py.exists() and not subprocess.run([str(py), "-c", PROBE], capture_output=True).returncode:
        return py
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    parents = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_mmpt_parent_env.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in sorted(parents)))
    # pip's resolver notes that our mmpt wants webdataset>=0.2.90: true, and irrelevant in this env
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *OVERLAY_PACKAGES], check=True, stderr=subprocess.DEVNULL)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    *NO_DEPS_PACKAGES, *_numpy_pin()], check=True, stderr=subprocess.DEVNULL)
    check = subprocess.run([str(py), "-c", PROBE], capture_output=True, text=True)
    if check.returncode:
        raise RuntimeError(f"{venv}: open_clip_train does not import there: {check.stderr[-800:]}")
    return py


def ensure_venv(cache: Path, python: str | None) -> str:
    """Python of an environment where `open_clip_train` imports: `python`, or `make_venv` under `cache`."""
    return python or str(make_venv(cache / "open_clip_venv"))


def epoch_plan(samples_seen: int, batch: int, train_samples: int) -> tuple[int, int]:
    """(epochs, samples per epoch) giving open_clip_train exactly our `samples_seen // batch` steps.

    open_clip counts an epoch as `--train-num-samples` rounded up to whole batches (repeating or cutting
    the shuffled shards); epochs are the smallest divisor of our step count that keeps each epoch within
    one pass over the train shards."""
    steps = max(1, samples_seen // batch)
    least = max(1, -(-steps * batch // train_samples))
    epochs = min(d for d in range(1, steps + 1) if steps % d == 0 and d >= least)
    return epochs, steps // epochs * batch


def train_open_clip(cfg: Config, tokenizer_path: str, data: dict[str, Any], out: Path, samples_seen: int,
                    python: str, device: str) -> tuple[Path, float, int, dict[str, Any]]:
    """Train with open_clip_train; return (an open_clip folder holding its final weights, wall seconds,
    samples seen: ours exactly, see `epoch_plan`; `trained_check` of its final weights)."""
    out.mkdir(parents=True, exist_ok=True)
    folder = (out / "open_clip_model").resolve()
    folder.mkdir(exist_ok=True)
    tok = TextTokenizer.load(tokenizer_path)
    torch.manual_seed(cfg.train.seed)
    model = PretrainModel.from_config(cfg, tok)
    export_open_clip(model.state_dict(), cfg, tok.to_json(), folder)  # config + tokenizer files
    model_cfg = json.loads((folder / CONFIG_FILE).read_text())["model_cfg"]
    model_cfg["text_cfg"]["hf_tokenizer_name"] = str(folder)  # a local folder: transformers, offline
    cfg_dir = out / "model_configs"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / "mmpt_quality.json").write_text(json.dumps(model_cfg, indent=1))
    (out / "run_open_clip.py").write_text(WRAPPER)
    b = cfg.train.micro_batch * cfg.train.grad_accum
    epochs, per_epoch = epoch_plan(samples_seen, b, int(data["train_samples"]))
    logs = out / "logs"
    argv = open_clip_argv(cfg, data["train"], per_epoch, epochs, logs, device)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    t0 = time.perf_counter()
    r = subprocess.run([python, str(out / "run_open_clip.py"), str(cfg_dir), *argv], cwd=out, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "open_clip_train.log").write_text(r.stdout + r.stderr)
    ckpts = sorted((logs / "run" / "checkpoints").glob("epoch_*.pt"),
                   key=lambda p: int(p.stem.split("_")[1]))
    if r.returncode or not ckpts:
        raise RuntimeError(f"open_clip_train failed (exit {r.returncode}); log "
                           f"{out / 'open_clip_train.log'}: {(r.stdout + r.stderr)[-1500:]}")
    for name in WEIGHT_FILES:  # the exported random init must not shadow the trained weights
        (folder / name).unlink(missing_ok=True)
    os.link(ckpts[-1], folder / "open_clip_pytorch_model.bin")  # {"state_dict": ...}, "module." undone
    check = trained_check(load_weight_file(folder / "open_clip_pytorch_model.bin"),
                          float(model_cfg["init_logit_scale"]))
    return folder, wall, epochs * per_epoch, check


if __name__ == "__main__":  # `make test`: python -m pretrain.bench.quality_openclip .venv-openclip
    print(make_venv(Path(sys.argv[1]).resolve()))
