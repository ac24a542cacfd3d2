"""Ray job entry point for train: the same run() as `melbatch train`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py s3://ml/engines-features s3://ml/engines-model --model efficientnet_b0 \
        --workers 4 --use-gpu --epochs 20

Every option of `melbatch train --help` is accepted.
"""

import sys

from melbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
