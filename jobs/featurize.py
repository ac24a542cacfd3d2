"""Ray job entry point for featurize: the same run() as `melbatch featurize`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/featurize.py s3://archive/calls s3://features/calls-v1 --labels folder

Inside a Ray job, RAY_ADDRESS is set, so the run joins the cluster instead of starting a local Ray.
Every option of `melbatch featurize --help` is accepted.
"""

import sys

from melbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["featurize", *sys.argv[1:]]))
