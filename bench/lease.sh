#!/usr/bin/env bash
# The one command for a lent GPU machine (issue 32, part 2), with the kit that `make lease-kit` wrote:
#
#   device run: command "bash bench/lease.sh", carry [".lease"], timeout_s 540
#
# It installs the kit into a site folder (bench/lease.py says why a kit), checks that Ray starts and
# a Ray task sees the GPU (if not, only bench/gpu.py runs: it needs no Ray), then runs the GPU
# benches one after another, each under its own time limit, so that one that hangs leaves the others
# their time. Each part's whole output is $OUT/<part>.log; $OUT/lease.log has a line per step and the
# tail of each part. The limits add up to 8 minutes with the install (most runs take less), so a
# session's 15 minutes of device time leave room for the machine's start and a rerun of the parts
# that failed:
#
#   LEASE_PARTS="classify train" bash bench/lease.sh
#
# LEASE_GPU_FLAG= (empty) and LEASE_SIZE=small run the same commands without a GPU and on small
# archives: how the kit and this script are tried on a CPU machine before a lease.
set -u
OUT=${OUT:-$(mktemp -d /tmp/melbatch-lease.XXXX)}
PY=${PY:-python3}
PARTS=${LEASE_PARTS:-smoke gpu classify train featurize}
SITE=${LEASE_SITE:-/tmp/melbatch-site}
KIT=${LEASE_KIT:-.lease}
GPU=${LEASE_GPU_FLAG---use-gpu}
CPUS=$(nproc)
SCALE=1
if [ "${LEASE_SIZE:-full}" = small ]; then  # timm's test_resnet, small archives, limits x4: a CPU machine
  SCALE=4
  GPU_ARGS="--seconds 0.5 --cpu-files 2 --models test_resnet"
  CLASSIFY_ARGS="--files 16 --unique 4 --bare-files 8 --model test_resnet --instant-files 8"
  TRAIN_ARGS="--files-per-class 6 --epochs 2 --model test_resnet --instant-files-per-class 12 --min-steps 30"
  FEATURIZE_ARGS="--files 16 --repeat 1"
else
  # classify: 8 h of 16 kHz WAV (48 recordings copied round), resnet18 at batch 256 (the one
  # GPU run measured resnet18 on 16.7 h); train: the bench's 4 labels x 48 files, resnet18, batch 32
  GPU_ARGS="--seconds 2"
  CLASSIFY_ARGS="--files 960 --unique 48 --bare-files 96 --batch-size 256 --model resnet18"
  TRAIN_ARGS="--epochs 3 --model resnet18"
  FEATURIZE_ARGS="--files 480 --repeat 1"
fi

log() { echo "[$(date +%T)] $*" | tee -a "$OUT/lease.log"; }
part() {  # part NAME LIMIT_S COMMAND...: run it if PARTS names it; its log in $OUT/NAME.log
  local name=$1 limit=$(( $2 * SCALE )) t0 rc
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  log "$name: $* (at most ${limit} s)"
  t0=$(date +%s)
  PYTHONUNBUFFERED=1 timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  log "$name: exit $rc after $(( $(date +%s) - t0 )) s$([ $rc = 124 ] && echo ' (its time limit)')"
  tail -n 40 "$OUT/$name.log" | tee -a "$OUT/lease.log"
  # a part stopped at its limit can leave Ray's processes behind, busy on the next part's CPUs
  [ $rc = 0 ] || $PY -m ray.scripts.scripts stop --force > /dev/null 2>&1
  return $rc
}

log "machine: $CPUS CPUs, $($PY -V 2>&1), GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader 2>/dev/null || echo none)"
if [ ! -e "$SITE/ray/__init__.py" ]; then
  log "installing the kit into $SITE"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/*.whl \
    && tar -xJf "$KIT"/ray.tar.xz -C "$SITE" || { log "the kit did not install: make lease-kit, carry .lease"; exit 3; }
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RAY_USAGE_STATS_ENABLED=0
version() { $PY -c "import $1; print($1.__version__)" 2>/dev/null || echo "does not import"; }
log "torch $(version torch) (CUDA: $($PY -c 'import torch; print(torch.cuda.is_available())' 2>&1)), ray $(version ray), \
timm $(version timm), torchaudio $(version torchaudio), pyarrow $(version pyarrow)"

part smoke 60 $PY -c "
import ray, torch
ray.init(num_cpus=2, num_gpus=torch.cuda.device_count(), include_dashboard=False, logging_level='ERROR')
need = {'num_gpus': 1 if torch.cuda.is_available() else 0}
where = ray.get(ray.remote(**need)(lambda: torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu').remote())
print('a Ray task ran on:', where)
" || { log "Ray did not start or run a task (see $OUT/smoke.log): only bench/gpu.py, which needs no Ray, runs"
        PARTS=gpu; }
part gpu 60 $PY bench/gpu.py $GPU_ARGS
part classify 150 $PY bench/classify.py $GPU --cpus "$CPUS" --many-files 0 --memory-files 0 $CLASSIFY_ARGS
part train 100 $PY bench/train.py $GPU --cpus "$CPUS" $TRAIN_ARGS
part featurize 90 $PY bench/featurize.py $GPU --cpus "$CPUS" $FEATURIZE_ARGS
log "done: the logs are in $OUT"
