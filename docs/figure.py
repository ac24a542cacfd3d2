"""Render the README's picture from real pipeline output: `make figure` (after `make demo`).

    python docs/figure.py demo-output/features docs/engine-logmel.png

One faulty and one healthy engine clip as melbatch stored them (waveform and log-mel), drawn by the
same code as `melbatch show --shards`.
"""

from __future__ import annotations

import sys

from melbatch.look import pictures


def main(features: str, out: str) -> None:
    cfg, panels = pictures.shard_panels(features, limit=2)
    panels = pictures.with_waveforms(panels, cfg)  # the demo's shards hold images; its archive, the clips
    rendered = pictures.render(panels, cfg, out, dpi=110)
    print(f"wrote {rendered.uri}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
