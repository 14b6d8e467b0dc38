"""A tour of lightning_icl in under a minute on a small CPU: ``python docs/tour.py``.

A small transformer learns modular arithmetic in context (He et al. 2024): each sequence shows
16 examples ``x y z`` of one hidden task z = a*x + b*y mod 7, and the model must infer (a, b)
from the examples before each answer. After a short training run the tour opens the model up
with the package's tools: attention statistics, head ablation, concept decodability and concept
patching, each printing what it measured.
"""

import logging
import warnings

import lightning as L
import torch

from lightning_icl import CaptureSpec, ICLModule, ICLModuleAdapter, ModularArithmeticDataModule, ablation_effects
from lightning_icl.config import OptimizerConfig, TransformerConfig
from lightning_icl.interventions.patching import concept_means, concept_patching
from lightning_icl.metrics.functional import decodability_baselines

STEPS = 250  # enough for in-context learning to show on the training tasks, short enough for a CPU


def head_name(flat: int, n_heads: int) -> str:
    return f"L{flat // n_heads}H{flat % n_heads}"


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # only the tour's own lines
    for notice in (DeprecationWarning, FutureWarning):  # version notices between the installed libraries
        warnings.filterwarnings("ignore", category=notice)
    L.seed_everything(0, verbose=False)

    # The task: every batch is a pure function of the seed; answers (z) are the only scored tokens.
    print("[1/7] Task: modular arithmetic in context")
    data = ModularArithmeticDataModule(
        p=7, num_tasks=4, num_ood_tasks=16, alpha=0.7, num_shots=16, batch_size=64, num_eval_batches=4, seed=0
    )
    info = data.task_info
    example = data.train_sampler()(torch.Generator().manual_seed(0), 0)
    answers = example.scored_positions()[0].tolist()  # the token before each answer predicts it
    print(
        f"  {info.seq_len} input tokens = {info.num_shots} examples '{' '.join(info.token_class_names)}' "
        f"(a sequence starts {example.inputs[0, :9].tolist()}); {len(answers)} answers, predicted at the "
        f"y's in positions {answers[:3]} ... {answers[-1]}"
    )
    tasks = [tuple(t) for t in data.id_tasks.tolist()]
    print(
        f"  training tasks (a, b) {tasks} on {len(data.train_pairs)} of {info.vocab_size**2} (x, y) pairs; "
        f"evaluation splits {info.eval_splits} ({len(data.ood_tasks)} OOD tasks)"
    )

    print("[2/7] Model: an ICLTransformer trained by an ICLModule")
    module = ICLModule(
        info,
        TransformerConfig(d_model=64, n_layers=2, n_heads=4),
        OptimizerConfig(lr=3e-3, weight_decay=0.1, warmup_steps=50, schedule="constant"),
    )
    model = module.model
    print(
        f"  {model.n_layers} layers x {model.n_heads} heads, d_model {model.d_model}: "
        f"{sum(p.numel() for p in module.parameters()):,} parameters"
    )

    # Training on the answers only; every split is evaluated once, at the end, per shot.
    print(f"[3/7] Training: {STEPS} steps on the CPU")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        val_check_interval=STEPS,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    # In-context learning shows as accuracy rising along the sequence: at the first shot the model can
    # only guess among its tasks, at the last it has seen 15 examples. With 4 training tasks it does not
    # generalise to unseen tasks (ood_*), as He et al. predict.
    for split in ("id_seen", "ood_unseen"):
        first, last = module.last_eval[f"val/{split}/acc_shot0"], module.last_eval[f"val/{split}/acc_last"]
        print(f"  {split:<10} accuracy: first shot {first:.3f} -> last shot {last:.3f}")

    # Attention statistics come from the attention pass itself, only at the positions asked for.
    print("[4/7] Attention at the answer positions (held-out id_seen batch)")
    module.eval()
    batches = [data.val_dataloader()[0].dataset[i] for i in range(4)]  # id_seen evaluation batches
    batch = batches[0]
    spec = CaptureSpec(stats=("entropy", "class_mass"), positions=batch.scored_positions())
    with torch.no_grad():
        _, cap = module(batch, capture=spec)
    for layer, stats in cap.stats.items():
        entropy = stats["entropy"].mean(dim=(0, 2))  # [H], nats
        mass = stats["class_mass"].mean(dim=(0, 2))  # [H, 3]: share of attention on x, y and z tokens
        head = int(mass[:, 2].argmax())
        x, y, z = mass[head].tolist()
        print(
            f"  layer {layer}: entropy per head {[round(e, 2) for e in entropy.tolist()]} nats; "
            f"head {head} puts the most mass on earlier answers (z): x {x:.2f} y {y:.2f} z {z:.2f}"
        )

    # Which heads the task needs: each head replaced by its mean output, all heads in one batched pass.
    print("[5/7] Head ablation (mean): loss increase when each head is removed")
    adapter = ICLModuleAdapter(module)
    result = ablation_effects(adapter, batch, "mean")
    effect = result.loss_effect.flatten()  # [L * H]
    top, low = int(effect.argmax()), int(effect.argmin())
    print(
        f"  clean loss {float(result.clean_loss):.3f}; most important head {head_name(top, model.n_heads)} "
        f"{float(effect[top]):+.3f}, least important {head_name(low, model.n_heads)} {float(effect[low]):+.3f}"
    )

    # Is the task written in the residual stream? Leave-one-out kNN decodability of the concept (the task)
    # from each layer's output at the token before the last answer, against chance and against what the
    # same points reach with their labels shuffled (the 95% quantile).
    print("[6/7] Concept decodability at the final query")
    features, labels = [], []
    with torch.no_grad():
        for b in batches:
            _, cap = module(b, capture=CaptureSpec(residual=True, positions=b.scored_positions()[:, -1:]))
            features.append(torch.stack([cap.residual[layer][:, 0] for layer in sorted(cap.residual)]))  # [L, B, D]
            labels.append(b.concept)
    base = decodability_baselines(torch.cat(features, dim=1), torch.cat(labels), permutations=100)
    cds = ", ".join(f"layer {i} {float(cd):.3f}" for i, cd in enumerate(base["cd"]))
    print(
        f"  decodability {cds}; chance {float(base['chance']):.3f}, "
        f"shuffled labels reach {float(base['permutation_high'].max()):.3f}"
    )

    # Is that representation causal? Add a concept's direction to the final query's residual and watch the
    # last answer's loss; on a 2-layer model expect small effects (deeper models show clearer ones).
    print("[7/7] Concept patching at the final query (last layer)")
    means = concept_means(adapter, batches[:2])
    patch = concept_patching(adapter, batches[2], means, method="shift")
    loss = {name: value / patch.count for name, value in patch.loss.items()}
    print(
        f"  last-answer loss: clean {float(loss['clean']):.3f}, own concept {float(loss['own'][-1]):.3f}, "
        f"another concept {float(loss['other'][-1]):.3f}; zero-shot prompt {float(loss['zero_shot']):.3f}, "
        f"with its concept added {float(loss['zero_shot_patched'][-1]):.3f}"
    )

    acc = module.last_eval
    print(
        f"Summary: in {STEPS} steps, id_seen accuracy went from {acc['val/id_seen/acc_shot0']:.2f} at the first "
        f"shot to {acc['val/id_seen/acc_last']:.2f} at the last; head {head_name(top, model.n_heads)} matters "
        f"most, and layer {int(base['cd'].argmax())} encodes the task best."
    )


if __name__ == "__main__":
    main()
