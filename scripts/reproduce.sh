#!/usr/bin/env bash
# Regenerates every number, table and figure quoted in README.md and docs/, in order, into results/.
# Each step prints the git revision and the lake data version it used. Takes about an hour on a 2-core CPU.
#   bash scripts/reproduce.sh            # everything
#   bash scripts/reproduce.sh default    # one step: default | seeds | comm | activity | tabular | export | noisy |
#                                          edge | robust | lake_s3 (deterministic: any machine) | fresh | tests | train | loop | swap | lake |
#                                          lake_peers | ingest | ingest_small | serve | serve_ray | serve_peers (timings: run these on an idle machine)
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
  t0=$(date +%s.%N)
  $BIN/lepton-jax lake ingest --lake lake --source digits --table digits
  t1=$(date +%s.%N)
  rm -rf results/digits_cnn
  $BIN/lepton-jax train --config configs/digits_cnn.py --workdir results/digits_cnn --lake lake --no-progress
  t2=$(date +%s.%N)
  cat results/digits_cnn/summary.json
  $PY -c 'import json, sys; a, b, c = map(float, sys.argv[1:4]); print(json.dumps({"ingest_wall_seconds": b - a,
    "train_wall_seconds": c - b, "wall_seconds": c - a, "load_average": open("/proc/loadavg").read().split()[:3],
    "layout": "1 process x 1 CPU device", "what": "lepton-jax lake ingest + lepton-jax train (no venv install)"},
    indent=1))' "$t0" "$t1" "$t2" | tee results/default_timing.json
fi
if step seeds; then
  echo "== seed spread (README)"
  $PY scripts/seed_spread.py --config configs/digits_cnn.py --seeds 0 1 2 --lake lake | tee results/seed_spread.txt
fi
if step comm; then
  echo "== collective bytes per sharding layout, from the compiled HLO (README)"
  $PY scripts/comm_table.py | tee results/comm_table.txt
  echo "== communication_report: DP, FSDP, local SGD, DiLoCo bytes per step, 4 devices (docs/edge.md)"
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu $PY -c 'import json
from lepton_jax.config import load_config
from lepton_jax.train.edge import communication_report
config = load_config("configs/edge_diloco.py", ["sharding.min_size=0"])
rows = communication_report(config, example_shape=(8, 8, 1), num_classes=10)
print(json.dumps({"nodes": config.edge.nodes, "rows": rows}, indent=1))' | tee results/comm_report.json
fi
if step activity; then
  echo "== sensor path: synthetic accelerometer log -> windows -> TCN (README, the three commands quoted there)"
  $PY -m lepton_jax.lake.synthetic results/activity.csv
  $BIN/lepton-jax lake ingest --lake lake --table activity --source csv:results/activity.csv --window 64 \
    --series-column session
  $BIN/lepton-jax lake show --lake lake --table activity --json > results/activity_table.json
  $PY -c 'import json; r = json.load(open("results/activity_table.json")); n = {s: v["shape"][0] for s, v in
    ((s, d["arrays"]["label"]) for s, d in r["splits"].items())}
print(json.dumps({"windows": n, "windows_kept": sum(n.values()), "quarantined": r["quarantine"]["num_examples"],
  "quarantine_reasons": r["quarantine"]["reasons"]}, indent=1))' | tee results/activity_windows.json
  rm -rf results/activity_tcn
  $BIN/lepton-jax train --config configs/activity_tcn.py --workdir results/activity_tcn --lake lake --no-progress
  cat results/activity_tcn/summary.json
fi
if step export; then
  echo "== edge artifacts of the default run, float32 and int8 (README, docs/serving.md); needs: reproduce.sh default"
  rm -rf results/export_float results/export_int8
  $BIN/lepton-jax export --workdir results/digits_cnn --output results/export_float
  $BIN/lepton-jax export --workdir results/digits_cnn --output results/export_int8 --int8
  $PY -c 'import json; f, q = (json.load(open(f"results/export_{k}/manifest.json")) for k in ("float", "int8"))
print(json.dumps({"float_kb": f["size_bytes"] / 1e3, "int8_kb": q["size_bytes"] / 1e3,
  "size_ratio": f["size_bytes"] / q["size_bytes"], "float": f.get("evaluation"), "int8": q.get("evaluation")},
  indent=1))' | tee results/export.json
fi
if step noisy; then
  echo "== the noisy-gradient model against white-box, transfer and Square attacks (README, docs/robustness.md)"
  $PY -m pytest -q -s -p no:cacheprovider tests/test_robust.py -k noisy_gradients | tee results/noisy_gradients.txt
fi
if step loop; then
  echo "== the loop: drift -> append -> fine-tune from @production -> gate -> swap under live traffic (docs/loop.md; ~3 min)"
  $PY scripts/close_loop.py --out results/loop
  cp results/loop/loop.png docs/loop.png
fi
if step swap; then
  echo "== p99 while a following server swaps versions vs steady p99 (README, docs/serving.md; idle machine)"
  $PY scripts/bench_swap.py | tee results/bench_swap.txt
fi
if step fresh; then
  echo "== fresh clone + make run, wall clock (README; pip's download cache warm; idle machine)"
  tmp=$(mktemp -d)
  rev=$(git rev-parse HEAD)   # the clone holds committed files only
  git clone -q . "$tmp/lepton_jax"
  t0=$(date +%s.%N)
  (cd "$tmp/lepton_jax" && make run > make_run.log 2>&1)
  t1=$(date +%s.%N)
  cp "$tmp/lepton_jax/runs/digits_cnn/summary.json" results/fresh_clone_summary.json
  $PY -c 'import json, sys; a, b = map(float, sys.argv[1:3]); print(json.dumps({"make_run_wall_seconds": b - a,
    "revision": sys.argv[3], "load_average": open("/proc/loadavg").read().split()[:3],
    "layout": "1 process x 1 CPU device"}, indent=1))' "$t0" "$t1" "$rev" \
    | tee results/fresh_clone.json
  rm -rf "$tmp"
fi
if step tests; then
  echo "== the fast test tier (README; idle machine)"
  $PY -m pytest -q -m "not slow" -p no:cacheprovider 2>&1 | tail -1 | tee results/fast_tier.txt
fi
if step train; then
  echo "== training benchmark (README)"
  $PY scripts/bench_train.py --config configs/digits_cnn.py | tee results/bench_train.txt
  $PY scripts/bench_place.py | tee results/bench_place.txt
  XLA_FLAGS=--xla_force_host_platform_device_count=8 $PY scripts/bench_place.py | tee results/bench_place_8dev.txt
fi
if step lake_s3; then
  echo "== lake on a local S3 server: bytes and requests per random read, raw vs zstd layout (docs/lake.md; ~3 minutes)"
  $PY scripts/bench_lake_s3.py | tee results/bench_lake_s3.txt
fi
if step lake; then
  echo "== lake benchmark (docs/lake.md)"
  $PY scripts/bench_lake.py | tee results/bench_lake.txt
  $PY scripts/bench_lake.py --fragments 4 --commits 5 | tee results/bench_lake_fragments4.txt
  $PY scripts/bench_read_lock.py | tee results/bench_read_lock.txt
fi
if step lake_peers; then
  echo "== the lake against Lance and a numpy memmap: 100k rows, then 1M rows in 20 npz files with --workers 2 (README, docs/lake.md, issue 25; ~10 minutes, ~3 GB temp disk)"
  if $PY -c 'import lance' 2>/dev/null; then
    $PY scripts/bench_lake_peers.py --examples 100000 --repeats 3 | tee results/bench_lake_peers_100k.txt
    $PY scripts/bench_lake_peers.py --examples 1000000 --shards 20 --repeats 3 --workers 2 | tee results/bench_lake_peers_1m.txt
  else
    echo "skipped: needs the bench-lake extra (.venv/bin/pip install -e '.[bench-lake]')"
    [ -z "$ONLY" ] || exit 1
  fi
fi
if step ingest; then
  echo "== ingest benchmark at full size, ~1.5 GB + 50,000 images, ~5 minutes and ~4 GB of temp disk (docs/lake.md)"
  $PY scripts/bench_ingest.py --scale 1 --repeats 3 | tee results/bench_ingest.txt
  echo "== where an npz ingest's CPU goes per chunk, and the ratio to np.save it allows (docs/lake.md; ~20 s)"
  $PY scripts/ingest_cost.py | tee results/ingest_cost.txt
fi
if step ingest_small; then
  echo "== ingest benchmark at a tenth of the size (docs/lake.md's smaller run)"
  $PY scripts/bench_ingest.py --scale 0.1 --repeats 2 | tee results/bench_ingest_small.txt
fi
if step serve; then
  echo "== serving benchmark (docs/serving.md)"
  $PY scripts/bench_serve.py | tee results/bench_serve.txt
  $PY scripts/serve_cost.py --workdir results/digits_cnn | tee results/serve_cost.txt
fi
if step serve_peers; then
  echo "== peer benchmark against LitServe and the gzip head-of-line check (README, docs/serving.md, issue 26)"
  if $PY -c 'import litserve' 2>/dev/null; then
    $PY scripts/bench_serve_peers.py --out results/bench_serve_peers.json | tee results/bench_serve_peers.txt
  else
    echo "skipped: needs the bench-serve extra (.venv/bin/pip install -e '.[bench-serve]')"
    [ -z "$ONLY" ] || exit 1
  fi
fi
if step serve_ray; then
  echo "== serving benchmark with Ray Serve, 2 replicas (README, docs/serving.md; slow: starts Ray)"
  $PY scripts/bench_serve.py --ray-replicas 2 | tee results/bench_serve_ray.txt
fi
if step robust && [ -f scripts/robust_table.py ]; then
  echo "== robustness table and figure (docs/robustness.md)"
  t0=$(date +%s.%N)
  $PY scripts/robust_table.py --out results/robust
  $PY -c 'import json, sys; print(json.dumps({"wall_seconds": float(sys.argv[2]) - float(sys.argv[1]),
    "load_average": open("/proc/loadavg").read().split()[:3]}))' "$t0" "$(date +%s.%N)" | tee results/robust/timing.json
fi
if step edge && [ -f scripts/edge_study.py ]; then
  echo "== edge training study (docs/edge.md)"
  $PY scripts/edge_study.py --out results/edge
  $PY scripts/edge_study.py --out results/edge_10ep --epochs 10   # the shorter study docs/edge.md quotes
fi
if step tabular; then
  echo "== tabular tables against a standardised logistic regression (README)"
  $PY scripts/tabular_baselines.py --tables iris wine breast_cancer --out results/tabular_baselines.json
  for seed in 1 2; do   # README: other seeds give the same wine and breast_cancer accuracies
    $PY scripts/tabular_baselines.py --tables wine breast_cancer --seed $seed --out results/tabular_seed$seed.json
  done
fi
if [ -z "$ONLY" ]; then
  echo "== every quoted number against its artifact (docs/numbers.toml)"
  $PY scripts/check_numbers.py
fi
