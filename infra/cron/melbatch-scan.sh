#!/usr/bin/env bash
# Nightly scan on a standing Ray cluster, from cron or a systemd timer (see the files beside this).
# Settings come from the environment (e.g. /etc/melbatch/scan.env):
#   RAY_ADDRESS      http://HEAD:8265 (Ray's token auth on: RAY_AUTH_MODE=token, token in ~/.ray/auth_token)
#   MELBATCH_DIR     the melbatch checkout to ship as the job's working dir
#   ARCHIVE MODEL OUT  the three scan URIs;  SCAN_ARGS  extra `melbatch scan` flags
# The submission id is fixed per night: a second submission the same night is refused by Ray.
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS}" "${ARCHIVE:?}" "${MODEL:?}" "${OUT:?}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
night="$(date -u +%Y%m%d)"
cd "${MELBATCH_DIR:-$(dirname "$0")/../..}"
# shellcheck disable=SC2086  # SCAN_ARGS is a list of flags
exec ray job submit --address "$RAY_ADDRESS" --submission-id "melbatch-scan-${night}" --working-dir . \
    -- python jobs/scan.py "$ARCHIVE" "$MODEL" "$OUT" --no-progress ${SCAN_ARGS:-}
