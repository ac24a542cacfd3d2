"""Pictures checked for content, not only for existing: a pure tone must light the right mel band."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import FAST, tone

from melbatch import storage
from melbatch.cli import commands
from melbatch.config import FeatureConfig, FeaturizeConfig
from melbatch.look import pictures
from melbatch.stages import featurize
from melbatch.testing import archives


def _png(uri: str) -> np.ndarray:
    import io

    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(storage.read_bytes(uri)), format="png")


def test_a_pure_tone_lights_one_band_at_its_frequency_on_the_picture(tmp_path):
    cfg = FeatureConfig()
    wav = tmp_path / "tone.wav"
    storage.write_bytes(str(wav), archives.encode(tone(1000.0, 3.0, 44100), 44100, archives.FORMATS[0]))
    panel = pictures.audio_panel(str(wav), cfg, seconds=None)
    centers = cfg.band_centers_hz()
    band = int(panel.mel.mean(axis=1).argmax())
    assert abs(band - int(np.abs(centers - 1000.0).argmin())) <= 1
    assert panel.samples is not None and len(panel.samples) == 3 * cfg.sample_rate_hz

    out = pictures.render([panel], cfg, str(tmp_path / "tone.png"))
    img = _png(out.uri)
    assert img.shape[:2] == (out.height, out.width) and out.width >= 400
    left, top, right, bottom = out.spectrogram_boxes[0]
    box = img[top + 2: bottom - 2, left + 2: right - 2, :3].mean(axis=2)  # luminance inside the axes
    brightest = int(box.mean(axis=1).argmax()) + top + 2
    expected = bottom - (band + 0.5) / cfg.n_mels * (bottom - top)
    assert abs(brightest - expected) <= 2 * (bottom - top) / cfg.n_mels + 2
    # the rest of the image is dark (magma's low end): one band, not a smear
    rows = box.mean(axis=1)
    assert (rows > rows.max() * 0.6).sum() <= 12 * (bottom - top) / cfg.n_mels  # a few of 128 bands (window leakage)


@pytest.mark.ray
def test_stored_clips_side_by_side_and_the_cli(ray_session, tmp_path, capsys):
    src, dst = tmp_path / "a", tmp_path / "f"
    files = archives.make_archive(str(src), "engine", files_per_class=2, seconds=3.0)
    featurize.run(FeaturizeConfig(src=str(src), dst=str(dst), features=FAST), progress=False)  # images only
    cfg, panels = pictures.shard_panels(str(dst), limit=4)
    assert cfg == FAST and len(panels) == 4 and {p.title.split(" ")[0] for p in panels} == {"healthy", "faulty"}
    assert all(p.samples is None and p.mel.shape == FAST.shape for p in panels)
    panels = pictures.with_waveforms(panels, cfg)  # read again from the archive, as featurize cut them
    assert all(p.samples.shape == (FAST.clip_samples,) and np.abs(p.samples).max() > 0.01 for p in panels)
    out = pictures.render(panels, cfg, str(tmp_path / "sheet.png"))
    assert len(out.spectrogram_boxes) == 4 and out.width > 4 * 300
    boxes = sorted(out.spectrogram_boxes)
    assert all(a[2] <= b[0] for a, b in itertools.pairwise(boxes))  # side by side, not overlapping

    one = files[0].uri
    assert commands.main(["show", one, "-o", str(tmp_path / "one.png"), "--seconds", "2"]) == 0
    assert commands.main(["show", "--shards", str(dst), one, "--clips", "2", "-o", str(tmp_path / "two.png")]) == 0
    assert "2 panel(s)" in capsys.readouterr().out
    assert _png(str(tmp_path / "two.png")).shape[1] > _png(str(tmp_path / "one.png")).shape[1]
    assert commands.main(["show", "-o", str(tmp_path / "x.png")]) == 2
    # stored clips with other features: images remade from their waveforms (read again from the
    # archive, or stored with --keep-audio), before and after
    assert commands.main(["show", "--shards", str(dst), one, "--band-emphasis", "2000-8000:+12", "--compare",
                     "-o", str(tmp_path / "three.png")]) == 0
    assert "2 panel(s)" in capsys.readouterr().out
    kept = tmp_path / "k"
    featurize.run(FeaturizeConfig(src=str(src), dst=str(kept), features=FAST, keep_audio=True), progress=False)
    emphasis = FeatureConfig(**{**FAST.to_dict(), "band_emphasis": ("2000-8000:+12",)})
    high = FAST.band_centers_hz() >= 2000
    for out in (dst, kept):
        [stored] = pictures.shard_panels(str(out), [one])[1]
        assert (stored.samples is not None) == (out == kept)
        emphasised = pictures.restyle([stored], emphasis)
        gain = emphasised[0].mel - stored.mel
        assert np.median(gain[high]) == pytest.approx(12.0, abs=0.1) and np.median(np.abs(gain[~high])) < 0.1, out
    storage.delete_tree(str(src))  # the archive is gone: only the stored waveforms can be restyled
    assert pictures.restyle(pictures.shard_panels(str(kept), [one])[1], emphasis)[0].mel.shape == FAST.shape
    with pytest.raises(ValueError, match="featurize with --keep-audio"):
        pictures.restyle(pictures.shard_panels(str(dst), [one])[1], emphasis)
    [left] = pictures.with_waveforms(pictures.shard_panels(str(dst), [one])[1], FAST)  # drawn without one
    assert left.samples is None
    assert commands.main(["show", "--shards", str(dst), one, "-o", str(tmp_path / "four.png")]) == 0


def test_compare_draws_each_clip_before_and_after_the_steps(tmp_path, capsys, rng):
    """--compare: plain log-mel next to the denoised image; the noise is darker in the second one."""
    sr = 16000
    t = np.arange(4 * sr) / sr
    x = 0.05 * np.sin(2 * np.pi * 1000 * t) * (t % 1.0 < 0.5) + 0.1 * rng.standard_normal(len(t))
    wav = str(tmp_path / "beeps.wav")
    storage.write_bytes(wav, archives.encode(x.astype(np.float32), sr, archives.FORMATS[0]))
    cfg = FeatureConfig(denoise="gate")
    panels = pictures.before_after([pictures.audio_panel(wav, cfg, seconds=None)], cfg)
    assert [p.title.split(" ")[0] for p in panels] == ["before", "after"] and "denoise gate" in panels[1].title
    assert np.median(panels[0].mel) - np.median(panels[1].mel) > 15  # most of the picture was noise
    out = pictures.render(panels, cfg, str(tmp_path / "compare.png"))
    img = _png(out.uri)[..., :3].mean(axis=2)
    (l0, t0, r0, b0), (l1, t1, r1, b1) = out.spectrogram_boxes
    assert img[t1 + 2:b1 - 2, l1 + 2:r1 - 2].mean() < img[t0 + 2:b0 - 2, l0 + 2:r0 - 2].mean() - 0.1
    # the CLI: flags change the features of audio inputs; PCEN gets its own colour scale
    assert commands.main(["show", wav, "--denoise", "gate", "--compare", "-o", str(tmp_path / "c.png")]) == 0
    assert "2 panel(s)" in capsys.readouterr().out
    assert commands.main(["show", wav, "--compression", "pcen", "--compare", "-o", str(tmp_path / "p.png")]) == 0
    assert "PCEN" in capsys.readouterr().out
    assert commands.main(["show", wav, "--compare", "-o", str(tmp_path / "n.png")]) == 2  # nothing to compare
    assert "no feature-engineering steps" in capsys.readouterr().err
