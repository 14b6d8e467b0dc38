#!/usr/bin/env bash
# He et al.'s in-distribution -> out-of-distribution transition on one GPU in about 6 minutes:
# configs/he2024_transition_gpu.yaml at n_i.d. in {8, 16, 32, 64, 128} x alpha in {0.5, 0.8}, all
# ten runs side by side on the one GPU (small models leave most of it idle; each run stops at
# 40k steps or 5 minutes, whichever comes first), then the phase diagram of the four splits'
# last-shot accuracy. Runs go to runs/he_transition_gpu/, the report to
# runs/reports/he_transition_gpu/ (index.html, phase_diagram.png, phase_lines.png), and each run's
# wall time and last step to runs/he_transition_gpu/times.txt.
#
#   bash docs/he_transition_gpu.sh                      # NUM_TASKS / ALPHAS / EXTRA override the grid
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=runs/he_transition_gpu
mkdir -p "$OUT"
NUM_TASKS=${NUM_TASKS:-"8 16 32 64 128"}
ALPHAS=${ALPHAS:-"0.5 0.8"}
EXTRA=${EXTRA:-}
if [ -z "${CLI:-}" ]; then
    if command -v lightning-icl >/dev/null; then CLI=lightning-icl; else CLI="${PYTHON:-python3} -m lightning_icl.cli"; fi
fi
start=$SECONDS
for n in $NUM_TASKS; do
    for a in $ALPHAS; do
        name="n${n}_a${a}"
        (
            t0=$SECONDS
            # shellcheck disable=SC2086
            $CLI fit --config configs/trainer/gpu.yaml --config configs/he2024_transition_gpu.yaml \
                --data.init_args.num_tasks "$n" --data.init_args.alpha "$a" \
                --trainer.logger.init_args.name "he_transition_gpu/$name" $EXTRA >"$OUT/$name.log" 2>&1
            rc=$?
            last=$(tail -n 1 "$OUT/$name/version_0/metrics.csv" 2>/dev/null | cut -d, -f2)
            echo "$name: exit $rc, $((SECONDS - t0)) s, last logged step ${last:-none}" | tee -a "$OUT/times.txt"
        ) &
    done
done
wait
echo "all runs: $((SECONDS - start)) s" | tee -a "$OUT/times.txt"
$CLI report "$OUT"/n*/version_0 --out runs/reports/he_transition_gpu --phase num_tasks,alpha
