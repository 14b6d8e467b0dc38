#!/usr/bin/env bash
# The CPU-size reproductions of docs/reproductions.md, run one after the other from the
# repository root in an environment with the package installed. Runs go to runs/, reports to
# runs/reports/, and the wall time of every command to runs/reproduce_times.txt.
set -euo pipefail
mkdir -p runs
timed() {
    local start=$SECONDS
    "$@"
    echo "$((SECONDS - start)) s: $*" | tee -a runs/reproduce_times.txt
}

# 1. He et al. 2024: OOD generalisation as the number of pre-training tasks grows
for n in 4 8 16 32; do
    for a in 0.5 0.8; do
        timed lightning-icl fit --config configs/trainer/cpu.yaml --config configs/he2024_sweep_cpu.yaml --data.init_args.num_tasks "$n" \
            --data.init_args.alpha "$a" --trainer.logger.init_args.name "he_sweep/n${n}_a${a}"
    done
done
timed lightning-icl report runs/he_sweep/*/version_0 --out runs/reports/he_sweep --phase num_tasks,alpha

# 2. Han et al. 2024: concept decodability over training and layers, sparse linear regression
timed lightning-icl fit --config configs/trainer/cpu.yaml --config configs/han2024_sparse_regression_cpu.yaml
timed lightning-icl report runs/han_cpu/version_0 --out runs/reports/han
# ... and on modular arithmetic (8 tasks), where the concept is the task
timed lightning-icl fit --config configs/trainer/cpu.yaml --config configs/he2024_sweep_cpu.yaml --config configs/add/decodability.yaml \
    --data.init_args.num_tasks 8 --data.init_args.alpha 0.8 --trainer.logger.init_args.name han_modular
timed lightning-icl report runs/han_modular/version_0 --out runs/reports/han_modular

# 3. Circuit overlap between two task families on one model, and a heuristic core over seeds
timed lightning-icl fit --config configs/trainer/cpu.yaml --config configs/multi_family.yaml --config configs/add/circuits.yaml
timed lightning-icl report runs/circuits/version_0 --out runs/reports/circuits
timed lightning-icl core --ckpt runs/he_sweep/n4_a0.8/version_0/checkpoints/last.ckpt \
    --sparsities 0.2,0.4,0.6 --seeds 0,1,2 --weighting units --out runs/core
timed lightning-icl report runs/core --out runs/reports/core

# 4. Concept patching and function-vector heads on two checkpoints of the sweep
timed python docs/reproduce_patching.py runs/he_sweep/n4_a0.8/version_0/checkpoints/last.ckpt
timed python docs/reproduce_patching.py runs/he_sweep/n32_a0.5/version_0/checkpoints/last.ckpt
