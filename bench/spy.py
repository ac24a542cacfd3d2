"""Where a Ray Train worker's training thread spends its time, from a py-spy profile.

    python bench/train.py --model test_resnet &                       # or any training run
    py-spy record --pid $(pgrep -f RayTrainWorker | head -1) --format raw -o train.raw -r 50 -d 240 --nonblocking
    python bench/spy.py train.raw

py-spy is not one of melbatch's requirements: ``pip install py-spy`` where you profile.

Each sample of the training thread (the stacks through ``melbatch/train/loop.py:train_loop``) is put in
the category of its innermost frame that names one: forward, backward, optimizer step, waveform
augmentation + log-mel, waiting for Ray Data's next batch, checkpoint and package writes, melbatch's
own loop. Samples of other threads (Ray Data's prefetch, the worker's main loop) are counted apart.
"""

from __future__ import annotations

import sys
from collections import Counter

CATS = [  # (category, substrings of a frame); the innermost frame that matches any decides
    ("waveform augmentation + log-mel", ("melbatch/train/augment", "melbatch/audio/logmel")),
    ("optimizer step", ("torch/optim",)),
    ("backward", ("torch/autograd", "Tensor.backward")),
    ("forward", ("torch/nn/modules", "timm/")),
    ("Ray Data ingest (next batch)", ("ray/data",)),
    ("checkpoint / package write", ("melbatch/train/finish", "save_checkpoint", "melbatch/shards",
                                    "torch/serialization")),
    ("validation", ("evaluate",)),
    ("Ray Train report", ("ray/train/v2/_internal/execution/train_fn_utils", "ray/train/report", "report (ray")),
    ("melbatch loop itself (conversions, metrics)", ("melbatch/",)),
]
train, other = Counter(), Counter()
for line in open(sys.argv[1]):  # noqa: SIM115  (a script: the file lives as long as it runs)
    stack, _, n = line.rstrip().rpartition(" ")
    frames = stack.split(";")
    if not any("train_loop (melbatch/train/loop.py" in f for f in frames):
        other[frames[-1].split(" (")[0] if frames else "?"] += int(n)
        continue
    for f in reversed(frames):
        cat = next((c for c, keys in CATS if any(k in f for k in keys)), None)
        if cat:
            break
    train[cat or "other"] += int(n)
total = sum(train.values())
print(f"training thread: {total} samples")
for name, n in train.most_common():
    print(f"  {name:<46}{n / total:6.1%}")
print(f"other threads: {sum(other.values())} samples")
for name, n in other.most_common(5):
    print(f"  {name:<46}{n:>6}")
