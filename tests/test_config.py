"""Config: validation messages that say what to change, a stable hash, YAML < flags precedence."""

from __future__ import annotations

import dataclasses
import json

import pytest

from melbatch import config
from melbatch.cli import commands, options
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
    ({"denoise": "wiener"}, "subtract"),
    ({"denoise_quantile": 0.0}, "quietest frames"),
    ({"band_emphasis": ("8000-2000:+6",)}, "f_lo_hz < f_hi_hz"),
    ({"band_emphasis": ("loud highs",)}, "2000-8000:"),
    ({"compression": "log"}, "pcen"),
    ({"pcen_gain": 1.5}, "pcen_gain"),
    ({"clip_norm": "max"}, "standardize"),
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
    assert set(changed) == set(base.to_dict()) - set(config.features._STEP_DEFAULTS)  # every field (steps: below)
    assert FeatureConfig(n_mels=64).diff(base) == {"n_mels": (64, 128)}


# the hash of the default features before feature-engineering steps existed: old shards and models stay valid
HASH_BEFORE_STEPS = "a668fe6f84971c5c"


def test_feature_engineering_steps_change_the_hash_only_when_they_act():
    base = FeatureConfig()
    assert base.hash() == HASH_BEFORE_STEPS and base.steps == {}
    on = {"denoise": "gate", "band_emphasis": ((2000.0, 8000.0, 6.0),), "compression": "pcen", "clip_norm": "peak"}
    params = {"denoise_quantile": 0.1, "denoise_threshold_db": 3.0, "denoise_reduction_db": 12.0,
              "pcen_time_constant_s": 0.06, "pcen_gain": 0.8, "pcen_bias": 10.0, "pcen_power": 0.25,
              "pcen_eps": 1e-4}
    assert set(on) | set(params) == set(config.features._STEP_DEFAULTS)  # the test covers every step setting
    hashes = {FeatureConfig(**{k: v}).hash() for k, v in on.items()}
    steps_on = FeatureConfig(**on)
    hashes |= {FeatureConfig(**on, **{k: v}).hash() for k, v in params.items()}
    assert len(hashes) == len(on) + len(params) and base.hash() not in hashes and steps_on.hash() not in hashes
    # the parameters of a step that is off change nothing
    assert {FeatureConfig(**{k: v}).hash() for k, v in params.items()} == {base.hash()}
    assert steps_on.steps["denoise"] == "gate" and "pcen_gain" in steps_on.steps
    # a band given as text equals the same band given as numbers; a manifest round trip keeps the identity
    assert FeatureConfig(band_emphasis=("2000-8000:+6",)) == FeatureConfig(band_emphasis=((2000, 8000, 6),))
    again = FeatureConfig.from_dict(json.loads(steps_on.canonical_json()))
    assert again.hash() == steps_on.hash()
    plain = steps_on.without_steps()
    assert plain.steps == {} and plain.top_db == 80.0 and plain.n_mels == steps_on.n_mels


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="n_mel"):
        FeatureConfig.from_dict({"n_mel": 64})


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    yml = tmp_path / "cfg.yaml"
    yml.write_text("features:\n  n_mels: 64\n  clip_s: 2.0\n  clip_hop_s: 2.0\nfeaturize:\n  files_per_task: 5\n"
                   "  include: ['*/keep_*']\n")
    args = commands.parser().parse_args(["featurize", "src", "dst", "--config", str(yml), "--n-mels", "32",
                                    "--exclude", "*.tmp", "--ext", "wav,flac"])
    cfg = options.featurize_config(args)
    assert cfg.features.n_mels == 32  # flag beats YAML
    assert cfg.features.clip_s == 2.0  # YAML beats default
    assert cfg.features.n_fft == 512  # default
    assert cfg.files_per_task == 5 and cfg.include == ("*/keep_*",) and cfg.exclude == ("*.tmp",)
    assert cfg.extensions == ("wav", "flac")


def test_train_has_an_augment_section_and_old_flat_keys_still_load(tmp_path, capsys):
    """Augmentation is train's 'augment:' section (one AugmentConfig, what the augmentation code reads); the
    flags keep their names and beat the YAML; a key written flat, as before the section, loads with one line
    saying where it lives now; a wrong value fails with its fix."""
    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yaml"
    nested.write_text("train:\n  epochs: 4\n  augment:\n    noise_prob: 0.2\n    reverb_prob: 0.1\n")
    flat.write_text("train:\n  epochs: 4\n  noise_prob: 0.2\n  reverb_prob: 0.1\n")
    for yml in (nested, flat):
        args = commands.parser().parse_args(["train", "s", "o", "--config", str(yml), "--reverb-prob", "0.7",
                                             "--time-masks", "2"])
        cfg = options.train_config(args)
        assert cfg.epochs == 4 and cfg.augment.noise_prob == 0.2  # from the YAML
        assert cfg.augment.reverb_prob == 0.7 and cfg.augment.time_masks == 2  # flags beat the YAML
        assert cfg.augment.telephone_prob == config.AugmentConfig().telephone_prob  # the default
        err = capsys.readouterr().err
        if yml is flat:
            assert "train: noise_prob, reverb_prob: these settings live in its 'augment:' section now" in err
        else:
            assert "augment:" not in err
    assert not hasattr(config.TrainConfig(shards="s", out="o"), "noise_prob")  # one place for each setting
    args = commands.parser().parse_args(["train", "s", "o", "--noise-prob", "1.5"])
    with pytest.raises(ConfigError, match=r"noise_prob=1.5: a probability, in \[0, 1\]"):
        options.train_config(args)
    # a saved config (train_config.json, the workers' copy) comes back whole
    cfg = options.train_config(commands.parser().parse_args(["train", "s", "o", "--speed-prob", "0.9"]))
    assert config.TrainConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_classify_has_a_detect_section_and_old_flat_keys_still_load(tmp_path, capsys):
    """Detections are classify's (and scan's) 'detect:' section; flags keep their names and beat the YAML;
    flat keys load with one line; a saved config (the manifest's settings) comes back whole."""
    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yaml"
    nested.write_text("classify:\n  top_k: 2\n  detect:\n    threshold: ['0.7']\n    gap_s: 1.5\n")
    flat.write_text("classify:\n  top_k: 2\n  threshold: ['0.7']\n  gap_s: 1.5\n")
    for job in ("classify", "scan"):
        for yml in (nested, flat):
            args = commands.parser().parse_args([job, "a", "m", "o", "--config", str(yml), "--min-event-s", "3"])
            cfg = options.classify_config(args) if job == "classify" else options.scan_config(args).classify
            assert cfg.top_k == 2 and cfg.detect == config.DetectConfig(threshold=("0.7",), gap_s=1.5, min_event_s=3.0)
            err = capsys.readouterr().err
            assert ("threshold, gap_s: these settings live in its 'detect:' section now" in err) == (yml is flat)
    args = commands.parser().parse_args(["classify", "a", "m", "o", "--threshold", "x=high"])
    with pytest.raises(ConfigError, match="not a probability"):
        options.classify_config(args)
    assert not hasattr(cfg, "threshold")
    assert config.build(config.ClassifyConfig, json.loads(json.dumps(dataclasses.asdict(cfg))), "classify") == cfg


def test_yaml_with_an_unknown_section_is_refused(tmp_path):
    yml = tmp_path / "cfg.yaml"
    yml.write_text("feature:\n  n_mels: 64\n")
    args = commands.parser().parse_args(["featurize", "src", "dst", "--config", str(yml)])
    with pytest.raises(ConfigError, match="unknown section"):
        options.featurize_config(args)


@pytest.mark.parametrize("command,text,needle", [
    ("featurize", "features: [1, 2]\n", "'features:' section must hold settings"),
    ("featurize", "featurize: 5\n", "'featurize:' section must hold settings"),
    ("train", "train: [1]\n", "'train:' section must hold settings"),
    ("classify", "classify: 3\n", "'classify:' section must hold settings"),
    ("train", "train:\n  augment: [x]\n", "'train.augment' must be a section of settings"),
    ("featurize", "features:\n  n_mels: true\n", "features.n_mels is true/false"),
    ("train", "train:\n  epochs: 2.5\n", "train.epochs is a number (2.5): give a whole number"),
    ("classify", "classify:\n  unknown_below: yes\n", "classify.unknown_below is true/false"),
])
def test_a_config_section_or_setting_of_the_wrong_type_names_it_and_what_it_should_be(tmp_path, command, text,
                                                                                     needle):
    """Issue 44, case 2: these were AttributeError/TypeError tracebacks (exit 1), or silently accepted."""
    yml = tmp_path / "cfg.yaml"
    yml.write_text(text)
    argv = {"featurize": ["src", "dst"], "train": ["shards", "out"], "classify": ["archive", "model", "out"]}
    code = commands.main([command, *argv[command], "--config", str(yml)])
    assert code == 2
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        getattr(options, f"{command}_config")(commands.parser().parse_args([command, *argv[command], "--config",
                                                                            str(yml)]))


def test_a_config_path_that_is_missing_or_a_folder_is_a_configuration_error(tmp_path, capsys):
    for path in (tmp_path / "nope.yaml", tmp_path):
        assert commands.main(["featurize", "src", "dst", "--config", str(path)]) == 2
        assert "give the path of a YAML file" in capsys.readouterr().err


def test_train_given_an_output_that_is_not_shards_says_what_it_is_and_what_to_give(tmp_path, capsys):
    """Issue 44, case 3: a classify OUT as SHARDS was `KeyError: 'shards'`, exit 1."""
    from melbatch.shards import MANIFEST

    out = tmp_path / "predictions"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"kind": "predictions", "clips": [], "files": []}))
    assert commands.main(["train", str(out), str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert "is a predictions output, not featurize shards" in err and "melbatch featurize" in err
    assert commands.main(["report", str(out), "--thumbnails", "-1"]) == 2
    assert "--thumbnails -1: give 0 or more" in capsys.readouterr().err


def test_an_output_path_that_is_an_existing_recording_is_never_written_over(tmp_path, capsys):
    """Issue 44, case 6: `show x.wav -o other.wav` and `export MODEL some.wav` replaced a recording."""
    recording = tmp_path / "keep.wav"
    recording.write_bytes(b"RIFF....WAVEfmt the user's recording")
    before = recording.read_bytes()
    assert commands.main(["show", str(recording), "-o", str(recording)]) == 2
    assert commands.main(["export", str(tmp_path / "model"), str(recording)]) == 2
    assert commands.main(["report", str(tmp_path), "-o", str(recording)]) == 2
    assert capsys.readouterr().err.count("will not write over it") == 3
    assert recording.read_bytes() == before
