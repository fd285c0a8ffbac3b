"""The default recipe (contrastive + masked image + masked language modeling) must not learn worse than
contrastive alone: both train on the same shards (scikit-learn's real digit scans), from the same seed, for
the same samples, through `pretrain bench quality`, and are scored by `pretrain eval` (zero-shot top-1 and
the linear probe on frozen image features).

16,384 samples (256 steps): at 128 steps every masked-image variant measured still costs zero-shot accuracy
(docs/benchmarks.md); at 256 the default was +0.020 / +0.019 (seed 0), 0.000 / -0.006 (seed 1) and
-0.022 / -0.022 (seed 2) in zero-shot / probe: the margin below (0.03) holds for all three seeds.
`MMPT_QUALITY_SEEDS` (default "0") picks the seeds. A default that hurts, such as the
pre-#14 one (FLIP, MAE and MLM on one 50%-masked pass: 0.36 zero-shot against 0.74 at 128 steps), fails.
"""

from __future__ import annotations

import json
import os

import pytest

from pretrain.cli import main

pytestmark = pytest.mark.slow

MARGINS = {"zeroshot_top1": 0.03, "linear_probe_top1": 0.03}
"""How far (absolute) the default may fall behind contrastive-only: "a few points" of issue #14, about
eleven of the 360 held-out images (seed to seed, either recipe moves by about two points)."""
SEEDS = [int(s) for s in os.environ.get("MMPT_QUALITY_SEEDS", "0").split()]


@pytest.mark.parametrize("seed", SEEDS)
def test_default_recipe_is_not_behind_contrastive_only(seed, tmp_path):
    args = ["bench", "quality", "--out", str(tmp_path), "--datasets", "digits", "--recipes",
            "contrastive_full", "default", "--samples-seen", "16384", "--seed", str(seed), "--strict"]
    assert main(args) == 0
    rows = {r["recipe"]: r for r in json.loads((tmp_path / "quality.json").read_text())["rows"]}
    full, default = rows["contrastive_full"], rows["default"]
    for metric, margin in MARGINS.items():
        assert default[metric] >= full[metric] - margin, (
            f"seed {seed}: default recipe {metric} {default[metric]:.3f} vs contrastive-only "
            f"{full[metric]:.3f}")
