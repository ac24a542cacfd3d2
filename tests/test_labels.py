"""Labels from folders, CSV and JSON Lines manifests (relative or absolute URIs), or none."""

from __future__ import annotations

import pytest

from melbatch import storage
from melbatch.config import ConfigError, FeaturizeConfig
from melbatch.labels.sources import NO_LABEL, Labeler


def test_folder_labels_use_the_first_folder_under_src_like_imagefolder(tmp_path):
    src = storage.canonical(str(tmp_path))
    lab = Labeler("folder", str(tmp_path))
    assert lab(f"{src}/dog/a.wav") == "dog"
    assert lab(f"{src}/dog/2024-05-01/rec.wav") == "dog"  # whatever lies below the class folder
    assert lab(f"{src}/loose.wav") is NO_LABEL
    assert lab(f"{src}//abs/olute.wav") == "abs" and lab(f"{src}/dog//x.wav") == "dog"  # S3 keys may hold "//"
    assert "class folder" in lab.why_missing()


def test_label_depth_chooses_another_folder(tmp_path):
    src = storage.canonical(str(tmp_path))
    second, own = Labeler("folder", str(tmp_path), depth=2), Labeler("folder", str(tmp_path), depth=-1)
    assert second(f"{src}/site1/cat/2024/b.wav") == "cat" and own(f"{src}/site1/cat/2024/b.wav") == "2024"
    assert second(f"{src}/cat/b.wav") is NO_LABEL and "--label-depth 2" in second.why_missing()
    assert own(f"{src}/cat/b.wav") == "cat" and own(f"{src}/b.wav") is NO_LABEL
    with pytest.raises(ConfigError, match="label_depth=0"):
        FeaturizeConfig(src="a", dst="b", label_depth=0)


def test_none_labels_everything_none(tmp_path):
    assert Labeler("none", str(tmp_path))(storage.canonical(str(tmp_path)) + "/x/a.wav") is None


def test_csv_and_jsonl_manifests_with_relative_and_absolute_uris(tmp_path):
    src = storage.canonical(str(tmp_path / "arch"))
    (tmp_path / "l.csv").write_text(f"path,label,extra\nx/a.wav,dog,1\n{src}/y/b.wav,cat,2\n")
    (tmp_path / "l.jsonl").write_text(f'{{"uri": "x/a.wav", "label": "dog"}}\n\n{{"uri": "{src}/y/b.wav", '
                                      '"label": "cat"}\n')
    for name in ("l.csv", "l.jsonl"):
        lab = Labeler(str(tmp_path / name), str(tmp_path / "arch"))
        assert lab(f"{src}/x/a.wav") == "dog" and lab(f"{src}/y/b.wav") == "cat"
        assert lab(f"{src}/z/c.wav") is NO_LABEL and name in lab.why_missing()


@pytest.mark.parametrize("content,needle", [("file,label\na,b\n", "'uri'"), ("uri,label\na.wav,\n", "empty label"),
                                            ("uri,label\n", "no rows"),
                                            # issue 44's neighbours: a NaN or an infinity among a span's times
                                            ("uri,label,start_s,end_s\na.wav,x,nan,2\n", "not two finite numbers"),
                                            ("uri,label,start_s,end_s\na.wav,x,0,inf\n", "not two finite numbers")])
def test_bad_csv_manifests_are_config_errors(tmp_path, content, needle):
    (tmp_path / "l.csv").write_text(content)
    with pytest.raises(ConfigError, match=needle):
        Labeler(str(tmp_path / "l.csv"), str(tmp_path))


def test_bad_jsonl_and_missing_manifest(tmp_path):
    (tmp_path / "l.jsonl").write_text('{"uri": "a.wav"}\n')
    with pytest.raises(ConfigError, match="line 1"):
        Labeler(str(tmp_path / "l.jsonl"), str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        Labeler(str(tmp_path / "missing.csv"), str(tmp_path))
