"""What one accelerator does with melbatch's images, and how many CPU cores keep it busy.

    python bench/gpu.py                          # on the GPU when there is one, else on this CPU
    python bench/gpu.py --models resnet18 --batch-size 32 --seconds 2

All rows are measured in this run, on this machine, at melbatch's default features (one image per
clip of ``clip_s`` seconds):
  bare forward       images/s of the timm model alone on images already on the device (bfloat16
                     autocast on a GPU): the bare loop every other row is compared with
  melbatch predict   images/s of ``model.predict`` (the one scoring path of train and classify) on
                     the same images held on the host: copy in, normalise, forward, softmax, copy out
  bare train step    images/s of forward + backward + AdamW step on the device
  log-mel on device  x realtime of ``features.logmel_tensor`` (the function every stage uses) over a
                     batch of clips already on the device
  CPU decode + mel   x realtime per core: encoded bytes in memory -> decode, resample, clips, log-mel in
                     one thread (what classify's CPU stage does per core today), for 16 kHz WAV (no
                     resampling) and 44.1 kHz FLAC (decode + resample: most field and music archives)
  CPU decode only    the same without the log-mel (the CPU stage if the mel ran on the model's device)
Cores per device = images/s x clip seconds / (x realtime per core), for each model and both splits,
at the slower (FLAC) source.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

import numpy as np
import torch

from melbatch.audio import decode, logmel
from melbatch.config import FeatureConfig
from melbatch.model import package
from melbatch.testing import archives


def rate(step: Callable[[], object], items: int, device: torch.device, seconds: float) -> float:
    """Items per second of ``step`` (which handles ``items``), after a warm-up, over about ``seconds``."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        if n % 5 == 0:
            sync()
            if time.perf_counter() - t0 >= seconds:
                return n * items / (time.perf_counter() - t0)


def cpu_rates(cfg: FeatureConfig, files: int, file_s: float, sr: int, fmt: tuple[str, str, str]) -> tuple[float, float]:
    """(decode + mel, decode only) x realtime of one thread on ``files`` encoded files in memory."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    blobs = [archives.encode(archives.engine_sound(rng, file_s, sr, i % 2 == 0), sr, fmt) for i in range(files)]
    out = []
    for with_mel in (True, False):
        t0, secs = time.perf_counter(), 0.0
        for b in blobs:
            info, clips = decode.decode_clips(io.BytesIO(b), cfg)
            if with_mel:
                for _ in logmel.logmel_clips(clips, cfg):
                    pass
            else:
                for _ in clips:
                    pass
            secs += info.decoded_frames / info.sample_rate_hz
        out.append(secs / (time.perf_counter() - t0))
    return out[0], out[1]


def model_rates(name: str, images: torch.Tensor, cfg: FeatureConfig, device: torch.device,
                seconds: float) -> tuple[float, float, float]:
    """(bare forward, melbatch predict, bare train step) images/s of timm model ``name`` on ``device``."""
    bs = len(images)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    net = package.create_model(name, 10, cfg.shape, pretrained=False).to(device).eval()
    x = ((images - images.mean()) / images.std()).unsqueeze(1)
    with torch.inference_mode(), autocast:
        fwd = rate(lambda: torch.softmax(net(x).float(), 1), bs, device, seconds)
    pkg = package.Package(net, {"labels": [str(i) for i in range(10)],
                              "normalization": {"kind": "dataset", "mean": -40.0, "std": 20.0}})
    host = images.cpu().numpy()
    pred = rate(lambda: package.predict(pkg, host, batch_size=bs), bs, device, seconds)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    y = torch.randint(0, 10, (bs,), device=device)

    def step() -> None:
        with autocast:
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return fwd, pred, rate(step, bs, device, seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="resnet18,tf_efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seconds", type=float, default=5.0, help="time each row for about this long")
    p.add_argument("--cpu-files", type=int, default=16, help="30 s WAV files for the per-core CPU rows")
    args = p.parse_args()
    device, cfg, bs = torch.device(args.device), FeatureConfig(), args.batch_size
    threads = torch.get_num_threads()
    wav = cpu_rates(cfg, args.cpu_files, 30.0, cfg.sample_rate_hz, archives.FORMATS[0])
    dec_mel, dec = cpu_rates(cfg, args.cpu_files, 30.0, 44_100, archives.FORMATS[1])
    torch.set_num_threads(threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    wave = torch.randn(bs, cfg.clip_samples, device=device) * 0.1
    with torch.inference_mode():
        mel_rt = rate(lambda: logmel.logmel_tensor(wave, cfg), bs, device, args.seconds) * cfg.clip_s
        images = logmel.logmel_tensor(wave, cfg).float()

    print(f"\n{name}; images {cfg.shape[0]}x{cfg.shape[1]} ({cfg.clip_s:g} s clips), batch {bs}")
    print(f"{'log-mel on device':<32}{mel_rt:>14,.0f} x realtime")
    for src, (a, b) in (("16 kHz WAV", wav), ("44.1 kHz FLAC", (dec_mel, dec))):
        print(f"{'CPU decode + mel, per core':<32}{a:>14,.0f} x realtime  ({src})")
        print(f"{'CPU decode only, per core':<32}{b:>14,.0f} x realtime  ({src})")
    print(f"\n{'model':<24}{'bare forward':>14}{'predict':>10}{'predict/bare':>14}{'train step':>12}"
          f"{'cores: mel on CPU':>19}{'mel on device':>15}")
    for m in args.models.split(","):
        fwd, pred, train = model_rates(m, images, cfg, device, args.seconds)
        need = fwd * cfg.clip_s
        print(f"{m:<24}{fwd:>14,.0f}{pred:>10,.0f}{pred / fwd:>14.0%}{train:>12,.0f}"
              f"{need / dec_mel:>19,.1f}{need / dec:>15,.1f}")
    print("\ncores: CPU cores whose decode (+ mel) of 44.1 kHz FLAC keeps up with the bare forward's images/s "
          "(images/s x clip seconds / per-core x realtime)")


if __name__ == "__main__":
    main()
