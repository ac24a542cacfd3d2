"""The plain PyTorch script melbatch is measured against: what a practitioner writes in ~60 lines.

Reads the files itself (soundfile), 1 s clips from the start of each recording (padded), log-mel
with torchaudio, per-dataset standardisation, a timm model (ImageNet weights from a file, or random),
AdamW, no augmentation. Used by bench/transfer.py on the same files and split as melbatch;
:func:`fit_and_score` (bench/field.py) also with the augmentation a practitioner adds for the field.
"""

from __future__ import annotations

import time

import numpy as np
import soundfile as sf
import torch
import torchaudio


def load(files: list[str], sr: int, clip_s: float) -> torch.Tensor:
    n = int(sr * clip_s)
    out = torch.zeros(len(files), n)
    for i, f in enumerate(files):
        x, rate = sf.read(f, dtype="float32", always_2d=True)
        w = torchaudio.functional.resample(torch.from_numpy(x.mean(1)), rate, sr)[:n]
        out[i, : len(w)] = w
    return out


def run(train: list[tuple[str, str]], val: list[tuple[str, str]], model_name: str, weights: str | None,
        epochs: int = 3, sr: int = 8000, clip_s: float = 1.0, n_mels: int = 64, batch: int = 64,
        lr: float = 1e-3, seed: int = 0) -> list[dict]:
    import timm

    torch.manual_seed(seed)
    labels = sorted({lab for _, lab in train})
    mel = torchaudio.transforms.MelSpectrogram(sr, n_fft=256, hop_length=80, n_mels=n_mels)
    db = torchaudio.transforms.AmplitudeToDB(top_db=80)

    def images(rows):
        x = db(mel(load([f for f, _ in rows], sr, clip_s))).unsqueeze(1)
        return x, torch.tensor([labels.index(lab) for _, lab in rows])

    (xt, yt), (xv, yv) = images(train), images(val)
    mean, std = xt.mean(), xt.std()
    xt, xv = (xt - mean) / std, (xv - mean) / std
    kw = {"pretrained_cfg_overlay": {"file": weights}} if weights else {}
    model = timm.create_model(model_name, pretrained=bool(weights), num_classes=len(labels), in_chans=1, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(yt)).split(batch):
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(xv[i: i + 256]).argmax(1) for i in range(0, len(yv), 256)])
        history.append({"epoch": epoch + 1, "val_accuracy": float((pred == yv).float().mean()),
                        "epoch_s": time.perf_counter() - t0})
    return history


def _augment(w: torch.Tensor, sr: int, gen: torch.Generator) -> torch.Tensor:
    """What a practitioner adds for the field: random gain, noise at 0-20 dB SNR, a random band limit."""
    n, samples = w.shape
    w = w * 10 ** (torch.empty(n, 1).uniform_(-12, 6, generator=gen) / 20)
    noise = torch.randn(n, samples, generator=gen)
    snr = torch.empty(n, 1).uniform_(0, 20, generator=gen)
    w = w + noise * w.square().mean(1, keepdim=True).sqrt() / 10 ** (snr / 20) * (torch.rand(n, 1, generator=gen) < 0.5)
    spec = torch.fft.rfft(w, dim=1)
    f = torch.fft.rfftfreq(samples, 1 / sr)[None, :]
    lo = torch.empty(n, 1).uniform_(0, 400, generator=gen)
    hi = torch.empty(n, 1).uniform_(2500, sr / 2, generator=gen)
    keep = ((f >= lo) & (f <= hi)) | (torch.rand(n, 1, generator=gen) < 0.5)
    return torch.fft.irfft(spec * keep, n=samples, dim=1)


def fit_and_score(train: list[tuple[str, str]], tests: dict[str, list[tuple[str, str]]], model_name: str,
                  weights: str | None, epochs: int = 10, augmented: bool = False, sr: int = 8000, clip_s: float = 1.0,
                  n_mels: int = 64, batch: int = 32, lr: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """The plain script trained on ``train`` and scored on each test set (one clip per file). ``augmented``:
    per-clip normalised log-mel, gain / noise / band-limit on the waveforms, SpecAugment (2 + 2 masks)."""
    import timm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    labels = sorted({lab for _, lab in train})
    mel = torchaudio.transforms.MelSpectrogram(sr, n_fft=256 if sr <= 8000 else 1024, hop_length=int(sr / 100),
                                               n_mels=n_mels)
    db = torchaudio.transforms.AmplitudeToDB(top_db=80)
    masks = [torchaudio.transforms.TimeMasking(10), torchaudio.transforms.FrequencyMasking(8)] * 2
    wt = load([f for f, _ in train], sr, clip_s)
    yt = torch.tensor([labels.index(lab) for _, lab in train])
    stats = db(mel(wt))
    mean, std = stats.mean(), stats.std()

    def images(w: torch.Tensor) -> torch.Tensor:
        x = db(mel(w)).unsqueeze(1)
        if augmented:
            return (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
        return (x - mean) / std

    kw = {"pretrained_cfg_overlay": {"file": weights}} if weights else {}
    model = timm.create_model(model_name, pretrained=bool(weights), num_classes=len(labels), in_chans=1, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(yt), generator=gen).split(batch):
            w = _augment(wt[idx], sr, gen) if augmented else wt[idx]
            x = images(w)
            if augmented:
                for m in masks:
                    x = m(x)
            loss = torch.nn.functional.cross_entropy(model(x), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    out = {}
    with torch.no_grad():
        for name, rows in tests.items():
            x = images(load([f for f, _ in rows], sr, clip_s))
            pred = torch.cat([model(x[i: i + 128]).argmax(1) for i in range(0, len(x), 128)])
            out[name] = float(np.mean([labels[p] == lab for p, (_, lab) in zip(pred.tolist(), rows, strict=True)]))
    return out


if __name__ == "__main__":
    raise SystemExit("run bench/transfer.py, which calls this on melbatch's split")
