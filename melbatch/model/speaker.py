"""Resemblyzer's speaker encoder (a GE2E LSTM trained on thousands of voices; Apache-2.0) as an
embedder: 16 kHz audio → 256-d L2-normed embeddings of who is speaking.

Its weights are read from the installed ``resemblyzer`` wheel; its code is not imported (that would
import librosa and webrtcvad): the network is three LSTM layers and a linear one, rebuilt here, and its
40-band mel (25 ms windows, 10 ms hop) is torchaudio's, which matches the librosa call it was trained
with to 2e-7 of the peak (measured on an FSDD file). As ``VoiceEncoder.embed_utterance`` does, each
clip is raised to -30 dBFS RMS (never lowered), cut into 1.6 s partials 1/1.3 s apart (a clip shorter
than one is zero-padded), and its partials' embeddings averaged and normed. A clip's zero padding at its
end (a recording shorter than the clip) is dropped first, so a short word is embedded as itself.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from melbatch.model.backbones import Backbone, BackboneError

SR, HOP, PARTIAL, RATE, MIN_COVERAGE, TARGET_DBFS = 16_000, 160, 160, 1.3, 0.75, -30.0


class _Network(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = torch.nn.Linear(256, 256)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        e = torch.relu(self.linear(hidden[-1]))
        return e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)


class Speaker:
    def __init__(self, spec: Backbone, threads: int) -> None:
        import torchaudio

        path = os.path.join(importlib.util.find_spec("resemblyzer").submodule_search_locations[0], "pretrained.pt")
        if not os.path.exists(path):
            raise BackboneError(f"{path} is missing from the resemblyzer wheel: {spec.extra}")
        self.net = _Network()
        state = torch.load(path, map_location="cpu", weights_only=False)["model_state"]
        self.net.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity")})
        self.net.eval()
        self.mel = torchaudio.transforms.MelSpectrogram(SR, n_fft=400, hop_length=HOP, n_mels=40, mel_scale="slaney",
                                                        norm="slaney", power=2.0, center=True, pad_mode="constant")
        self.threads = threads

    def _partials(self, wav: np.ndarray) -> list[np.ndarray]:
        """One clip's mel partials, as ``VoiceEncoder.compute_partial_slices`` cuts them."""
        nz = np.flatnonzero(wav)
        wav = wav[: nz[-1] + 1] if len(nz) else wav[:1]
        rms = float(np.sqrt(np.mean(wav.astype(np.float64) ** 2)))
        if rms > 0:
            gain = 10 ** ((TARGET_DBFS - 20 * np.log10(rms)) / 20)
            wav = wav * max(1.0, gain)  # raised only, as Resemblyzer's increase_only
        frames = int(np.ceil((len(wav) + 1) / HOP))
        step = round(SR / RATE / HOP)
        starts = list(range(0, max(1, frames - PARTIAL + step + 1), step))
        last = starts[-1] * HOP
        if len(starts) > 1 and (len(wav) - last) / (PARTIAL * HOP) < MIN_COVERAGE:
            starts = starts[:-1]
        need = (starts[-1] + PARTIAL) * HOP
        if need > len(wav):
            wav = np.pad(wav, (0, need - len(wav)))
        mel = self.mel(torch.from_numpy(np.ascontiguousarray(wav, np.float32))).T  # (frames, 40)
        return [mel[s: s + PARTIAL] for s in starts]

    def embed(self, clips: np.ndarray) -> np.ndarray:
        parts, owner = [], []
        for i, wav in enumerate(np.asarray(clips, np.float32)):
            p = self._partials(wav)
            parts += p
            owner += [i] * len(p)
        torch.set_num_threads(max(1, self.threads))
        with torch.inference_mode():
            e = torch.cat([self.net(torch.stack(parts[s: s + 256])) for s in range(0, len(parts), 256)])
        sums = torch.zeros(len(clips), e.shape[1]).index_add_(0, torch.tensor(owner), e)
        return (sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()


def load(spec: Backbone, threads: int) -> Speaker:
    return Speaker(spec, threads)
