"""Resource limits: an archive of long recordings, whose decoded audio is many times what a worker
may hold, is featurized and classified in memory that does not grow with the length of a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import FAST

from melbatch.audio.objects import SPILL_BYTES
from melbatch.stages.chunks import CHUNK_BYTES

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

# One process featurizes (featurize's task function, keeping the audio too) or decodes for classify
# (the decode stage, chunks passed on and dropped as the pipeline would) one file, and prints its
# peak memory and what it made.
RUN = """
import json, sys
from melbatch import listing, storage
from melbatch.stages import classify
from melbatch.stages import chunks, featurize
stage, uri, features_json, dst, here = sys.argv[1:6]
sys.path.insert(0, here)
import peakmem
[ref] = listing.list_objects(uri)
peakmem.start()
if stage == "featurize":
    r = featurize.featurize_batch("long", [(ref, "x")], features_json, dst, 100_000, 64, -70.0, keep_audio=True)
    made = {"clips": r.clips, "quarantine": len(r.quarantine), "audio_s": r.audio_s}
else:
    sent = clips = 0
    for t in chunks.decode_batch(chunks.work_table([("b", [ref])]), features_json, -70.0):
        sent += 1
        clips += len(t.column("clips")[0])
    made = {"clips": clips, "chunks": sent}
print(json.dumps({**made, "grew_mb": peakmem.grown_mb()}))
"""


def _recording(path: str, seconds: int, sr: int = 8000) -> None:
    """An engine recording of ``seconds``, written in blocks (never whole in this process either)."""
    from melbatch.testing.archives import engine_sound

    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        for _ in range(seconds // 60):
            f.write(engine_sound(rng, 60.0, sr, faulty=False))


def _run(stage: str, path: str, dst: str) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, stage, path, FAST.canonical_json(), dst,
                           os.path.dirname(__file__)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", ["featurize", "classify"])
def test_memory_does_not_grow_with_the_length_of_a_recording(tmp_path, stage, chaos_log):
    """A 10-minute and a 2-hour recording: the 2-hour one decodes to 460 MB at 16 kHz and makes 92 MB
    of images (and 230 MB of audio clips for featurize), yet the process grows by no more than for the
    short one plus what melbatch's bounds allow (a staged file's memory and two chunks) and 40 MB."""
    short, long = str(tmp_path / "short.wav"), str(tmp_path / "long.wav")
    _recording(short, 600)
    _recording(long, 7200)
    a = _run(stage, short, str(tmp_path / "out-short"))
    b = _run(stage, long, str(tmp_path / "out-long"))
    assert b["clips"] == 3600 and a["clips"] == 300  # 2 s clips, every one made
    if stage == "featurize":
        assert b["quarantine"] == 0 and b["audio_s"] == pytest.approx(7200)
    else:
        assert b["chunks"] >= 2  # passed on in chunks, not as one 90 MB block
    assert a["grew_mb"] > 5  # the measure sees the work (it starts after the imports)
    bound_mb = (SPILL_BYTES + 2 * CHUNK_BYTES) / 2**20 + 40
    assert b["grew_mb"] < a["grew_mb"] + bound_mb, (a, b, bound_mb)
    chaos_log(f"a 2-hour recording, 460 MB decoded ({stage})", 1, 2,
              f"process grew {b['grew_mb']:.0f} MB vs {a['grew_mb']:.0f} MB for 10 minutes")


@pytest.mark.ray
def test_a_long_recording_is_classified_in_chunks_and_its_verdict_is_the_mean_of_all_its_clips(engine_model,
                                                                                                 tmp_path):
    """30 minutes (900 clips, two chunks) beside two short files in one work batch: every clip is
    predicted once, the file's verdict is the mean over all of them, and a re-run has nothing to do."""
    from melbatch import shards
    from melbatch.config import ClassifyConfig
    from melbatch.stages import classify
    from melbatch.testing import archives

    archive = tmp_path / "archive"
    archive.mkdir()
    _recording(str(archive / "long.wav"), 1800)
    archives.make_archive(str(archive), "engine", files_per_class=1, seconds=3.0, seed=2)
    cfg = ClassifyConfig(archive=str(archive), model=f"{engine_model}/model", out=str(tmp_path / "pred"),
                         files_per_task=3, task_mb=1000, top_k=2)
    s = classify.run(cfg, progress=False)
    assert s.batches == 1 and s.classified == 3 and s.clips == 900 + 2 * 2
    m = shards.read_manifest(cfg.out)
    assert len(m["clips"]) == 2 and len(m["files"]) == 1  # one work batch, its clips in two chunk files
    clips = shards.read_tables(cfg.out, "clips").to_pylist()
    long_uri = next(v["uri"] for v in shards.read_tables(cfg.out, "files").to_pylist() if v["uri"].endswith("long.wav"))
    mine = [c for c in clips if c["uri"] == long_uri]
    assert sorted(c["clip_index"] for c in mine) == list(range(900))
    verdict = next(v for v in shards.read_tables(cfg.out, "files").to_pylist() if v["uri"] == long_uri)
    mean = np.mean([dict(zip(c["top_labels"], c["top_probabilities"], strict=True))[verdict["label"]] for c in mine])
    assert verdict["clips"] == 900 and verdict["probability"] == pytest.approx(mean, abs=1e-5)
    assert classify.run(cfg, progress=False).resumed_batches == 1
