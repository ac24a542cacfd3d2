"""Ray job entry point for classify: the same run() as `melbatch classify`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/classify.py s3://archive/calls/ s3://ml/calls-model s3://ml/calls-predictions \
        --use-gpu --batch-size 256

Every option of `melbatch classify --help` is accepted; exit code 4 means the run finished with
more inputs quarantined than --max-quarantine-rate allows.
"""

import sys

from melbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["classify", *sys.argv[1:]]))
