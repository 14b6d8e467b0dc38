#!/usr/bin/env bash
# Every GPU number the package owes, in one command on a CUDA machine: the GPU test tier, the
# capture, callback, Hugging Face and training-step benchmarks, and He et al.'s transition sweep.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]          # default: benchmarks/results
#   STAGES="tests train_step he_sweep" bash benchmarks/gpu_suite.sh OUT   # some stages only
#
# Stages and their limits: tests 210 s, capture 240 s, callbacks 75 s, hf 60 s, train_step 150 s,
# he_sweep 420 s (docs/he_transition_gpu.sh: ten runs side by side, its runs and report copied to
# OUT_DIR/he_transition_gpu). The default is every stage but he_sweep (about 13 minutes).
#
# Each stage has its own time limit, and the benchmarks stop starting new rows when their
# budget is spent (the rows left out are listed in their tables), so the suite ends on time and
# keeps what it measured. Logs and tables land in OUT_DIR (a log per stage; each benchmark's
# table as .csv and .md). Needs torch, triton and lightning
# (and pytest, pytest-xdist for the tests); installs nothing from the network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
start=$(date +%s)
stamp() { echo "[gpu_suite $(( $(date +%s) - start )) s] $*"; }
STAGES=${STAGES:-"tests capture callbacks hf train_step"}
want() { [[ " $STAGES " == *" $1 "* ]]; }

# The package importable without a network: an editable install with the build tools present,
# else a copy laid out as the distribution maps it (kernels/ -> lightning_icl/kernels).
if ! "$PY" -c "import lightning_icl.kernels" 2>/dev/null; then
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/tmp/gpu_suite_install.log 2>&1; then
        site=$(mktemp -d)
        cp -r lightning_icl "$site/lightning_icl" && cp -r kernels "$site/lightning_icl/kernels"
        export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
"$PY" - <<'EOF'  # what ran, on the suite's output (the tables carry it too)
import torch, triton
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)
EOF

# 1. The GPU test tier (tests/kernels on CUDA), first config that fits instead of a full autotune.
if want tests; then
stamp "GPU test tier"
workers=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
LIGHTNING_ICL_AUTOTUNE=0 timeout 210 "$PY" -m pytest -v $workers -p no:cacheprovider tests/kernels \
    >"$OUT/gpu_tests.log" 2>&1
echo "pytest exit code $?" >>"$OUT/gpu_tests.log"
grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 5; grep -c PASSED "$OUT/gpu_tests.log"
fi

# 2. Capture benchmark: every kernel compiled first by 12 processes side by side (Triton's cache), then
#    the rows the goals read at every shape, the training steps, and the rest as the budget allows.
if want capture; then
stamp "capture benchmark"
timeout 240 "$PY" -m benchmarks.capture --warm 12 --budget 200 --out "$OUT" >"$OUT/gpu_capture.log" 2>&1
echo "capture benchmark exit code $?" >>"$OUT/gpu_capture.log"
tail -n 12 "$OUT/gpu_capture.log"
fi

# 3. Callback benchmark on the quickstart model (one fit per arm, half the quickstart's steps).
if want callbacks; then
stamp "callback benchmark"
timeout 75 "$PY" -m benchmarks.callbacks --accelerator gpu --steps 1000 --repeats 1 --out "$OUT" \
    >"$OUT/gpu_callbacks.log" 2>&1
echo "callback benchmark exit code $?" >>"$OUT/gpu_callbacks.log"
tail -n 6 "$OUT/gpu_callbacks.log"
fi

# 4. Hugging Face models on "lightning_icl" (with statistics) vs transformers' "sdpa", fwd + bwd.
if want hf; then
stamp "hf benchmark"
timeout 60 "$PY" -m benchmarks.hf --reps 10 --out "$OUT" >"$OUT/gpu_hf.log" 2>&1
echo "hf benchmark exit code $?" >>"$OUT/gpu_hf.log"
tail -n 8 "$OUT/gpu_hf.log"
fi

# 5. Training steps/s and utilisation at the He et al. depth-2 paper size, fast path vs plain.
if want train_step; then
stamp "train_step benchmark"
timeout 150 "$PY" -m benchmarks.train_step --steps 40 --warmup 12 --out "$OUT" >"$OUT/gpu_train_step.log" 2>&1
echo "train_step benchmark exit code $?" >>"$OUT/gpu_train_step.log"
tail -n 8 "$OUT/gpu_train_step.log"
fi

# 6. He et al.'s transition: ten runs side by side, the phase diagram (docs/he_transition_gpu.sh).
if want he_sweep; then
stamp "he sweep"
PYTHON="$PY" timeout 420 bash docs/he_transition_gpu.sh >"$OUT/gpu_he_sweep.log" 2>&1
echo "he sweep exit code $?" >>"$OUT/gpu_he_sweep.log"
tail -n 14 "$OUT/gpu_he_sweep.log"
mkdir -p "$OUT/he_transition_gpu"
cp -r runs/reports/he_transition_gpu "$OUT/he_transition_gpu/report" 2>/dev/null
for run in runs/he_transition_gpu/n*/version_0; do  # the records, not the checkpoints
    name=$(basename "$(dirname "$run")"); mkdir -p "$OUT/he_transition_gpu/$name"
    cp "$run"/*.csv "$run"/*.jsonl "$run"/hparams.yaml "$OUT/he_transition_gpu/$name/" 2>/dev/null
done
cp runs/he_transition_gpu/times.txt runs/he_transition_gpu/*.log "$OUT/he_transition_gpu/" 2>/dev/null
fi
stamp "done"
