#!/usr/bin/env bash
# Which part of He et al.'s in-distribution -> out-of-distribution transition a CPU shows in
# minutes: one-factor-at-a-time around configs/he2024_sweep_cpu.yaml (p = 7, width 64, 2 blocks),
# over n_i.d., alpha, width and p, each run 8000 steps with an evaluation every 1000 (so the steps
# axis is read from each run's history). Two runs at a time, one thread each. Runs go to
# runs/he_transition_cpu/, the reports to runs/reports/he_transition_cpu*/, the wall time
# of every run to runs/he_transition_cpu/times.txt. About 70 minutes on 2 cores.
#
#   bash docs/he_transition_cpu.sh
set -euo pipefail
OUT=runs/he_transition_cpu
mkdir -p "$OUT"
STEPS=${STEPS:-8000}
# name p num_tasks alpha d_model (RUNS in the environment replaces the list)
RUNS=${RUNS:-"
p7_n4_a0.5_d64 7 4 0.5 64
p7_n8_a0.5_d64 7 8 0.5 64
p7_n16_a0.5_d64 7 16 0.5 64
p7_n32_a0.5_d64 7 32 0.5 64
p7_n32_a0.8_d64 7 32 0.8 64
p7_n32_a0.5_d128 7 32 0.5 128
p11_n64_a0.5_d64 11 64 0.5 64
"}
one() {
    local name=$1 p=$2 n=$3 a=$4 d=$5 start=$SECONDS
    OMP_NUM_THREADS=1 lightning-icl fit --config configs/trainer/cpu.yaml --config configs/he2024_sweep_cpu.yaml \
        --trainer.max_steps "$STEPS" --trainer.val_check_interval 1000 --trainer.enable_progress_bar false \
        --data.init_args.p "$p" --data.init_args.num_tasks "$n" --data.init_args.alpha "$a" \
        --model.init_args.transformer.d_model "$d" \
        --trainer.logger.init_args.save_dir runs --trainer.logger.init_args.name "he_transition_cpu/$name" \
        >"$OUT/$name.log" 2>&1
    echo "$((SECONDS - start)) s: $name" | tee -a "$OUT/times.txt"
}
export -f one
export STEPS OUT
echo "$RUNS" | grep . | xargs -P 2 -L 1 bash -c 'one "$@"' _
# the n_i.d. x alpha grid of the p = 7, width-64 runs; the width and p runs in a report of their own
lightning-icl report "$OUT"/p7_*_d64/version_0 --out runs/reports/he_transition_cpu --phase num_tasks,alpha
lightning-icl report "$OUT"/p7_n32_a0.5_d*/version_0 "$OUT"/p11_*/version_0 --out runs/reports/he_transition_cpu_size
