"""Config: validation messages that say what to change, a stable hash, YAML < flags precedence."""

from __future__ import annotations

import json

import pytest

from melbatch import cli
from melbatch.config import ConfigError, FeatureConfig, FeaturizeConfig


@pytest.mark.parametrize("kwargs,needle", [
    ({"sample_rate_hz": 0}, "sample_rate_hz"),
    ({"win_length": 1024, "n_fft": 512}, "raise n_fft"),
    ({"f_max_hz": 12000.0}, "Nyquist"),
    ({"f_min_hz": 9000.0, "f_max_hz": 8000.0}, "f_min_hz"),
    ({"n_mels": 400}, "n_mels"),
    ({"clip_s": 0.02, "min_tail_s": 0.01}, "shorter than one FFT window"),
    ({"min_tail_s": 10.0}, "min_tail_s"),
    ({"dtype": "int8"}, "float16"),
    ({"tail": "wrap"}, "pad"),
])
def test_wrong_feature_settings_fail_with_a_message_naming_the_fix(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        FeatureConfig(**kwargs)


def test_featurize_config_validation():
    with pytest.raises(ConfigError, match="same place"):
        FeaturizeConfig(src="s3://b/x", dst="s3://b/x/")
    with pytest.raises(ConfigError, match="not audio formats"):
        FeaturizeConfig(src="a", dst="b", extensions=("wav", "txt"))
    with pytest.raises(ConfigError, match="rows_per_shard"):
        FeaturizeConfig(src="a", dst="b", rows_per_shard=10, rows_per_row_group=20)
    assert FeaturizeConfig(src="a", dst="b", extensions=(".WAV",)).extensions == ("wav",)


def test_hash_is_stable_canonical_and_sensitive_to_every_field():
    base = FeatureConfig()
    assert base.hash() == FeatureConfig().hash() == FeatureConfig(f_max_hz=8000.0).hash()
    assert json.loads(base.canonical_json())["f_max_hz"] == 8000.0
    assert FeatureConfig.from_dict(json.loads(base.canonical_json())) == FeatureConfig(f_max_hz=8000.0)
    changed = {"sample_rate_hz": 22050, "clip_s": 4.0, "clip_hop_s": 2.5, "tail": "drop", "min_tail_s": 0.5,
               "n_fft": 1024, "win_length": 512, "hop_length": 320, "n_mels": 96, "f_min_hz": 20.0,
               "f_max_hz": 7000.0, "top_db": 60.0, "mel_scale": "htk", "dtype": "float32"}
    narrow = FeatureConfig(n_mels=64)  # htk at 128 mels would leave empty bands at n_fft 512
    hashes = {FeatureConfig(**{"n_mels": 64, k: v}).hash() for k, v in changed.items()}
    assert len(hashes) == len(changed) and narrow.hash() not in hashes
    assert set(changed) == set(base.to_dict())  # the test covers every field
    assert FeatureConfig(n_mels=64).diff(base) == {"n_mels": (64, 128)}


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="n_mel"):
        FeatureConfig.from_dict({"n_mel": 64})


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    yml = tmp_path / "cfg.yaml"
    yml.write_text("features:\n  n_mels: 64\n  clip_s: 2.0\n  clip_hop_s: 2.0\nfeaturize:\n  files_per_task: 5\n"
                   "  include: ['*/keep_*']\n")
    args = cli.parser().parse_args(["featurize", "src", "dst", "--config", str(yml), "--n-mels", "32",
                                    "--exclude", "*.tmp", "--ext", "wav,flac"])
    cfg = cli.featurize_config(args)
    assert cfg.features.n_mels == 32  # flag beats YAML
    assert cfg.features.clip_s == 2.0  # YAML beats default
    assert cfg.features.n_fft == 512  # default
    assert cfg.files_per_task == 5 and cfg.include == ("*/keep_*",) and cfg.exclude == ("*.tmp",)
    assert cfg.extensions == ("wav", "flac")


def test_yaml_with_an_unknown_section_is_refused(tmp_path):
    yml = tmp_path / "cfg.yaml"
    yml.write_text("feature:\n  n_mels: 64\n")
    args = cli.parser().parse_args(["featurize", "src", "dst", "--config", str(yml)])
    with pytest.raises(ConfigError, match="unknown section"):
        cli.featurize_config(args)
