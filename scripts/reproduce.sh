#!/usr/bin/env bash
# Regenerates every number, table and figure quoted in README.md and docs/, in order, into results/.
# Each step prints the git revision and the lake data version it used. Takes about an hour on a 2-core CPU.
#   bash scripts/reproduce.sh            # everything
#   bash scripts/reproduce.sh default    # one step: default | seeds | train | lake | ingest | serve | robust | edge |
#                                          tabular (comm_table runs with train)
set -euo pipefail
cd "$(dirname "$0")/.."
make .venv/.installed >/dev/null
PY=.venv/bin/python
BIN=.venv/bin
mkdir -p results
echo "git revision: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)"
step() { [ $# -eq 0 ] || [ "$1" = "${ONLY:-$1}" ]; }
ONLY=${1:-}

if step default; then
  echo "== default job (README: test accuracy, runtime)"
  $BIN/lepton-jax lake ingest --lake lake --source digits --table digits
  rm -rf results/digits_cnn
  $BIN/lepton-jax train --config configs/digits_cnn.py --workdir results/digits_cnn --lake lake --no-progress
  cat results/digits_cnn/summary.json
fi
if step seeds; then
  echo "== seed spread (README)"
  $PY scripts/seed_spread.py --config configs/digits_cnn.py --seeds 0 1 2 --lake lake | tee results/seed_spread.txt
fi
if step train; then
  echo "== training benchmark (README)"
  $PY scripts/bench_train.py --config configs/digits_cnn.py | tee results/bench_train.txt
  echo "== collective bytes per sharding layout (README)"
  $PY scripts/comm_table.py | tee results/comm_table.txt
fi
if step lake; then
  echo "== lake benchmark (docs/lake.md)"
  $PY scripts/bench_lake.py | tee results/bench_lake.txt
fi
if step ingest; then
  echo "== ingest benchmark at full size, ~1.5 GB + 50,000 images, ~5 minutes and ~4 GB of temp disk (docs/lake.md)"
  $PY scripts/bench_ingest.py --scale 1 --repeats 3 | tee results/bench_ingest.txt
fi
if step serve; then
  echo "== serving benchmark (docs/serving.md)"
  $PY scripts/bench_serve.py | tee results/bench_serve.txt
fi
if step robust && [ -f scripts/robust_table.py ]; then
  echo "== robustness table and figure (docs/robustness.md)"
  $PY scripts/robust_table.py --out results/robust
fi
if step edge && [ -f scripts/edge_study.py ]; then
  echo "== edge training study (docs/edge.md)"
  $PY scripts/edge_study.py --out results/edge
fi
if step tabular; then
  echo "== tabular tables against a standardised logistic regression (README)"
  $PY scripts/tabular_baselines.py --tables iris wine breast_cancer --out results/tabular_baselines.json
fi
if [ -z "$ONLY" ]; then
  echo "== every quoted number against its artifact (docs/numbers.toml)"
  $PY scripts/check_numbers.py
fi
