"""Hugging Face causal LMs on ``attn_implementation="lightning_icl"`` against transformers' ``"sdpa"``.

One training step (forward, backward, no optimizer) of random-init models, timed side by side
(interleaved repetitions, same weights, same batch):

- ``sdpa``: transformers' own attention, no statistics;
- ``lightning_icl``: the package's attention, no statistics;
- ``lightning_icl + stats``: the same, recording ``lse``, ``entropy`` and ``max_prob`` of every
  head and layer (:func:`lightning_icl.hf.record_attention`).

Shapes: GPT-2-small (12 layers, d 768, 12 heads) and a Llama-style model (8 layers, d 1024,
16 query heads sharing 4 key/value heads) at T = 64 and T = 512, bf16 autocast on CUDA; tiny
versions on CPU (``--quick``, what the tests run).

    python -m benchmarks.hf [--quick] [--reps 20] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import lightning_icl.hf as hf
from benchmarks.common import write_tables

GOAL = 1.3
"""``lightning_icl + stats`` should cost at most this much of ``sdpa``'s step (statistics near free)."""


def configs(quick: bool) -> dict[str, object]:
    no_drop = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    if quick:
        gpt2 = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=64)
        llama = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)  # fmt: skip
        return {"gpt2-tiny": GPT2Config(**gpt2, **no_drop), "llama-tiny": LlamaConfig(**llama)}
    llama = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024)  # fmt: skip
    return {"gpt2-small": GPT2Config(n_positions=1024, **no_drop), "llama-8L-1024": LlamaConfig(**llama)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_fn(model, ids: torch.Tensor, device: str, stats: bool):
    if device == "cuda":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = torch.autocast("cpu", enabled=False)

    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            if stats:
                with hf.record_attention(model, stats=("lse", "entropy", "max_prob")) as record:
                    loss = model(input_ids=ids, labels=ids).loss
                assert record.stats, "no statistics were recorded"
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    return step


def measure(name: str, config, b: int, t: int, device: str, reps: int) -> list[dict]:
    torch.manual_seed(0)
    models = {}
    for impl in ("sdpa", "lightning_icl"):
        torch.manual_seed(0)
        models[impl] = AutoModelForCausalLM.from_config(config, attn_implementation=impl).to(device).train()
    ids = torch.randint(0, config.vocab_size, (b, t), generator=torch.Generator().manual_seed(1)).to(device)
    arms = {
        "sdpa": step_fn(models["sdpa"], ids, device, stats=False),
        "lightning_icl": step_fn(models["lightning_icl"], ids, device, stats=False),
        "lightning_icl + stats": step_fn(models["lightning_icl"], ids, device, stats=True),
    }
    for fn in arms.values():  # warm-up: compilation and autotuning outside the timings
        for _ in range(3):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(reps):
        for arm, fn in arms.items():  # interleaved, so drift hits every arm alike
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[arm].append(time.perf_counter() - start)
    base = sorted(times["sdpa"])[len(times["sdpa"]) // 2]
    rows = []
    for arm, values in times.items():
        median = sorted(values)[len(values) // 2]
        rows.append({"model": name, "B x T": f"{b} x {t}", "attention": arm, "step ms": round(1e3 * median, 3),
                     "vs sdpa": round(median / base, 3)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and shapes (CPU smoke run)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(2, 16)] if args.quick else [(16, 64), (4, 512)]
    rows = []
    for name, config in configs(args.quick).items():
        for b, t in shapes:
            rows += measure(name, config, b, t, device, args.reps)
            for r in rows[-3:]:
                print(f"{r['model']} {r['B x T']} {r['attention']}: {r['step ms']} ms ({r['vs sdpa']}x)")
    with_stats = [r for r in rows if r["attention"] == "lightning_icl + stats"]
    met = all(r["vs sdpa"] <= GOAL for r in with_stats)
    notes = (f"Goal: a training step with every head's statistics recorded costs at most {GOAL}x transformers' "
             f"'sdpa' step without them: {'met' if met else 'NOT met'} on this machine "
             f"(worst {max(r['vs sdpa'] for r in with_stats)}x). Medians of {args.reps} interleaved repetitions; "
             "forward + backward, no optimizer step; bf16 autocast on CUDA, fp32 on CPU.")  # fmt: skip
    stem = f"hf_attention_{device}" + ("_quick" if args.quick else "")
    for path in write_tables(rows, args.out, stem, "Hugging Face models: lightning_icl vs sdpa", notes):
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
