"""data.* config keys added for sources, sampling, corrupt-data limits and the key audit: clear errors."""

import pytest

from pretrain.config import ConfigError, load_config


def test_defaults_are_valid_and_documented():
    cfg = load_config(None, [])
    assert (cfg.data.sampling, cfg.data.interleave, cfg.data.log_keys) == ("epoch", 4, False)
    assert 0 < cfg.data.max_bad_fraction <= 1 and cfg.data.max_image_pixels > 0
    assert cfg.data.max_sample_bytes == 64 << 20


@pytest.mark.parametrize("overrides,message", [
    (["data.sampling=random"], "data.sampling: 'random' is not one of epoch, resampled"),
    (["data.train=a.tar::b.tar", "data.train_weights=[1, 2]"], "needs data.sampling=resampled"),
    (["data.train=a.tar::b.tar", "data.sampling=resampled", "data.train_weights=[1]"],
     "data.train_weights has 1 entries but data.train has 2"),
    (["data.sampling=resampled", "data.train_weights=[1, 0]"], "data.train_weights must all be > 0"),
    (["data.max_bad_fraction=0"], r"data.max_bad_fraction must be in \(0, 1\]"),
    (["data.interleave=0"], "data.interleave must be >= 1"),
    (["data.max_image_pixels=-1"], "data.max_image_pixels must be >= 0"),
    (["data.max_sample_bytes=-1"], r"data.max_sample_bytes must be >= 0 \(0: no limit\)"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_weighted_resampled_mix_is_accepted():
    cfg = load_config(None, ["data.train=a.tar::b.tar", "data.sampling=resampled",
                             "data.train_weights=[3, 1]"])
    assert cfg.data.train_weights == [3.0, 1.0]
