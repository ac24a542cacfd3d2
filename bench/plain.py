"""The plain PyTorch script melbatch is measured against: what a practitioner writes in ~60 lines.

Reads the files itself (soundfile), 1 s clips from the start of each recording (padded), log-mel
with torchaudio, per-dataset standardisation, a timm model (ImageNet weights from a file, or random),
AdamW, no augmentation. Used by bench/transfer.py on the same files and split as melbatch.
"""

from __future__ import annotations

import time

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


if __name__ == "__main__":
    raise SystemExit("run bench/transfer.py, which calls this on melbatch's split")
