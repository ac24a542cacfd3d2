"""Ray job entry point for scan: the same run() as `melbatch scan` (the nightly incremental scan).

    ray job submit --address http://HEAD:8265 --submission-id melbatch-scan-$(date -u +%Y%m%d) \
        --working-dir . -- python jobs/scan.py s3://archive/calls/ s3://ml/calls-model s3://ml/calls-scan

Every option of `melbatch scan --help` is accepted. Exit codes: 0 ok, 4 too many inputs
quarantined, 5 refused (another scan holds OUT).
"""

import sys

from melbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["scan", *sys.argv[1:]]))
