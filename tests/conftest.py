"""Shared fixtures: a real S3-compatible server on 127.0.0.1 (moto in server mode, spoken to over
HTTP by s3fs), one local Ray for the session, and generated audio."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np
import pytest

from melbatch.config import FeatureConfig

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "melbatch-test-key",
    "AWS_SECRET_ACCESS_KEY": "melbatch-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start ``moto_server`` as its own process on a free loopback port; point the AWS env at it."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=1)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start: pip install 'moto[server]'") from None
            time.sleep(0.2)
    old = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=url)
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


def new_bucket() -> str:
    """Create a fresh, empty bucket on the local S3 server: ``s3://<name>``."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def bucket(s3_endpoint) -> str:
    return new_bucket()


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole session, started after the S3 env is set so workers inherit it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


FAST = FeatureConfig(clip_s=2.0, clip_hop_s=2.0, n_mels=64)  # small images (64 x 201) keep the Ray tests quick


def tone(freq_hz: float, seconds: float, sr: int, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq_hz * np.arange(int(seconds * sr)) / sr)).astype(np.float32)
