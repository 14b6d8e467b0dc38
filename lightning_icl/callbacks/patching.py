"""``ConceptPatching``: task vectors and function-vector heads, measured during training."""

from __future__ import annotations

from typing import Any

import torch

from lightning_icl.checks import check_choice, check_flag, check_number, index_list
from lightning_icl.interventions.patching import (
    PATCH_METHODS,
    ConceptMeans,
    check_prompt_layout,
    concept_means,
    concept_patching,
    function_vector_effects,
    query_head_means,
)
from lightning_icl.plotting import patching_figure

from .base import ICLCallback, reduce_padded


class ConceptPatching(ICLCallback):
    """Is the concept representation causal? Patching at the final query
    (see :mod:`lightning_icl.interventions.patching`).

    Of the first ``num_batches`` held-out batches, the even-numbered give the means (per-concept
    mean residual at each layer; each head's mean output) and the odd-numbered are patched, so no
    prompt contributes to the mean patched into it. Per layer it records the last answer's loss
    (and probability of the right token): clean, patched with the prompt's own concept mean, with
    another concept's, the zero-shot prompt (no demonstrations) unpatched and patched with its own
    concept. With ``function_vectors``, each head's indirect effect: how much its mean output
    restores the answer in prompts whose demonstration answers are shuffled.

    Logs ``patching/own/L<l>``, ``patching/other/L<l>`` and ``patching/zero_shot/L<l>`` (loss
    change against the clean, resp. unpatched zero-shot prompt; negative = helps), and
    ``patching/fv_top1``. Means and sums are reduced over DDP ranks.

    Args:
        layers: layers to patch (default all).
        method: ``"shift"`` (add the concept's direction) or ``"replace"`` (overwrite with its mean);
            see :func:`~lightning_icl.interventions.patching.concept_patching`.
        scale: multiplies the direction in ``"shift"``.
        zero_shot: also patch zero-shot prompts.
        function_vectors: also measure every head's indirect effect.
        num_batches: held-out batches per measurement, at least 2.
        every_n_steps, on_validation, dataloader_idx, tag (``**cadence``): see :class:`ICLCallback`.
    """

    name = "patching"

    def __init__(
        self,
        layers: list[int] | None = None,
        method: str = "shift",
        scale: float = 1.0,
        zero_shot: bool = True,
        function_vectors: bool = True,
        num_batches: int = 4,
        **cadence,
    ) -> None:
        super().__init__(num_batches=num_batches, **cadence)
        if num_batches < 2:
            raise ValueError(f"num_batches must be >= 2 (half give the means, half are patched), got {num_batches}")
        check_choice("method", method, PATCH_METHODS)
        check_number("scale", scale)
        check_flag("zero_shot", zero_shot)
        check_flag("function_vectors", function_vectors)
        self.layers = None if layers is None else index_list("layers", layers)
        self.method, self.scale = method, scale
        self.zero_shot, self.function_vectors = zero_shot, function_vectors

    def _batches(self, trainer, pl_module) -> tuple[list, list]:
        """This rank's share of the mean batches (even global index) and the patched ones (odd)."""
        world = trainer.world_size
        means, patched = [], []
        indices = range(trainer.global_rank, self.num_batches, world)  # the global index of each of our batches
        for i, batch in zip(indices, self.eval_batches(trainer, pl_module), strict=False):
            (means if i % 2 == 0 else patched).append(batch)
        return means, patched

    def check(self, trainer, pl_module, adapter, batch) -> None:
        n_l = adapter.n_layers
        bad = [x for x in self.layers or [] if not -n_l <= x < n_l]
        if bad:
            raise ValueError(f"ConceptPatching: layers {bad} out of range for a model with {n_l} layers")
        if batch is not None:
            adapter.concept(batch)  # raises, naming the missing concept labels
            if self.zero_shot or self.function_vectors:
                try:
                    check_prompt_layout(batch)
                except ValueError as err:
                    raise ValueError(
                        f"ConceptPatching(zero_shot={self.zero_shot}, function_vectors={self.function_vectors}): "
                        f"{err}; or set both to False"
                    ) from err
        if batch is not None:
            loader = self.validation_loaders(trainer)[self.dataloader_idx]
            length = len(loader) if hasattr(loader, "__len__") else None
            if length is not None and length < 2:
                raise ValueError(
                    f"ConceptPatching needs at least 2 held-out batches (one for the means, one to patch); "
                    f"validation loader {self.dataloader_idx} has {length}"
                )

    @torch.no_grad()
    def measure(self, trainer, pl_module) -> dict[str, Any]:
        adapter = self.adapter(pl_module)
        mean_batches, patch_batches = self._batches(trainer, pl_module)
        device = pl_module.device
        n_l = adapter.n_layers
        layers = list(range(n_l)) if self.layers is None else sorted({x % n_l for x in self.layers})
        # the means: every rank's sums added
        if mean_batches:
            local = concept_means(adapter, mean_batches, layers)
        else:
            local = ConceptMeans(layers, torch.zeros(len(layers), 1, 1, dtype=torch.float64, device=device),
                                 torch.zeros(1, dtype=torch.float64, device=device))  # fmt: skip
        width = torch.tensor([local.sums.shape[2]], device=device)
        width = int(trainer.strategy.reduce(width, reduce_op="max")) if trainer.world_size > 1 else int(width)
        sums = torch.nn.functional.pad(local.sums, (0, width - local.sums.shape[2]))
        means = ConceptMeans(layers, reduce_padded(trainer, sums), reduce_padded(trainer, local.counts))
        record: dict[str, Any] = {"layers": layers, "concepts": means.concepts.tolist(), "method": self.method}
        totals: dict[str, torch.Tensor] = {}
        count = torch.zeros((), dtype=torch.float64, device=device)
        is_tokens = True
        for batch in patch_batches:
            r = concept_patching(adapter, batch, means, self.method, self.scale, zero_shot_prompts=self.zero_shot)
            is_tokens = is_tokens and r.prob is not None
            for name, value in r.loss.items():
                totals[f"loss/{name}"] = totals.get(f"loss/{name}", 0) + value
                if r.prob is not None:
                    totals[f"prob/{name}"] = totals.get(f"prob/{name}", 0) + r.prob[name]
            count += r.count
        keys = _expected_keys(self.zero_shot)
        flat = torch.cat([torch.as_tensor(totals.get(k, _zeros(k, len(layers), device))).flatten() for k in keys])
        flat = trainer.strategy.reduce(torch.cat([flat, count[None]]), reduce_op="sum")
        total = flat[-1]
        offset = 0
        for key in keys:
            size = 1 if _is_scalar(key) else len(layers)
            value = flat[offset : offset + size] / total
            offset += size
            if key.startswith("prob/") and not is_tokens:
                continue
            record[key] = float(value) if _is_scalar(key) else value.tolist()
        record["count"] = int(total)
        if self.function_vectors:
            record.update(self._function_vectors(trainer, pl_module, adapter, mean_batches, patch_batches))
        return record

    def _function_vectors(self, trainer, pl_module, adapter, mean_batches, patch_batches) -> dict[str, Any]:
        device = pl_module.device
        shape = (adapter.n_layers, adapter.n_heads, adapter.head_dim)
        z_sum, n = query_head_means(adapter, mean_batches) if mean_batches else (torch.zeros(shape, device=device), 0)
        z = trainer.strategy.reduce(torch.cat([z_sum.double().flatten(), torch.tensor([float(n)], device=device)]),
                                    reduce_op="sum")  # fmt: skip
        head_means = (z[:-1] / z[-1]).view(shape)
        generator = torch.Generator().manual_seed(len(self.history))
        effect_sum = torch.zeros(adapter.n_layers * adapter.n_heads + 1, dtype=torch.float64, device=device)
        for batch in patch_batches:
            r = function_vector_effects(adapter, batch, head_means, generator=generator)
            effect_sum[:-1] += (r.indirect_effect() * r.count).flatten()
            effect_sum[-1] += r.count
        effect_sum = trainer.strategy.reduce(effect_sum, reduce_op="sum")
        effect = (effect_sum[:-1] / effect_sum[-1]).view(adapter.n_layers, adapter.n_heads)
        order = effect.flatten().argsort(descending=True)[:5].tolist()
        return {
            "fv_effect": effect.tolist(),
            "fv_top_heads": [[i // adapter.n_heads, i % adapter.n_heads, float(effect.flatten()[i])] for i in order],
        }

    def scalars(self, record):
        out = {}
        clean = record["loss/clean"]
        for i, layer in enumerate(record["layers"]):
            out[f"own/L{layer}"] = record["loss/own"][i] - clean
            out[f"other/L{layer}"] = record["loss/other"][i] - clean
            if "loss/zero_shot_patched" in record:
                out[f"zero_shot/L{layer}"] = record["loss/zero_shot_patched"][i] - record["loss/zero_shot"]
        if "fv_top_heads" in record:
            out["fv_top1"] = record["fv_top_heads"][0][2]
        return out

    def figure(self, record):
        return patching_figure(record)


def _expected_keys(zero_shot: bool) -> list[str]:
    names = ["clean", "own", "other"] + (["zero_shot", "zero_shot_patched"] if zero_shot else [])
    return [f"{kind}/{name}" for kind in ("loss", "prob") for name in names]


def _is_scalar(key: str) -> bool:
    return key.endswith("/clean") or key.endswith("/zero_shot")


def _zeros(key: str, n_layers: int, device) -> torch.Tensor:
    return torch.zeros(() if _is_scalar(key) else (n_layers,), dtype=torch.float64, device=device)
