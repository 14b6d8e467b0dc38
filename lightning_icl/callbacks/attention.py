"""``AttentionStatistics``: per-head attention statistics read from the training step itself."""

from __future__ import annotations

from typing import Any

import torch

from lightning_icl.capture import CaptureSpec
from lightning_icl.checks import check_flag, check_positive
from lightning_icl.kernels import SUPPORTED_STATS, attention_probability
from lightning_icl.plotting import attention_figure

from .base import ICLCallback


class AttentionStatistics(ICLCallback):
    """Every ``every_n_steps`` training steps, the fused attention's statistics of that very step.

    Per head, averaged over the batch and every position: ``entropy`` (nats), ``max_prob``,
    ``lse``, ``same_label_mass`` (mass on keys with the query's token) and ``class_mass``
    per token class (e.g. x, y, z); with ``previous_token`` also the previous-token score
    ``p(t -> t-1)`` (exact, from q, k and lse). Logged as ``attention/<stat>/L<l>H<h>``.
    Needs the package's attention (``native_stats``); on other models it says so once and
    records nothing.
    """

    name = "attention"

    def __init__(
        self, every_n_steps: int = 50, stats: tuple[str, ...] | list[str] = SUPPORTED_STATS, previous_token: bool = True
    ) -> None:
        check_positive("every_n_steps", every_n_steps)  # it reads training steps: None would never record
        super().__init__(every_n_steps, on_validation=False)
        stats = (stats,) if isinstance(stats, str) else tuple(stats)
        unknown = [s for s in stats if s not in SUPPORTED_STATS]
        if unknown:
            raise ValueError(f"stats {unknown} unknown; choose from {SUPPORTED_STATS}")
        check_flag("previous_token", previous_token)
        if not stats and not previous_token:
            raise ValueError("stats must name at least one statistic when previous_token=False, got ()")
        self.stats, self.previous_token = stats, previous_token
        self._armed = False

    needs_held_out = False  # it reads the training step itself

    def check(self, trainer, pl_module, adapter, batch) -> None:
        if not adapter.native_stats:
            self.warn_once(
                f"AttentionStatistics needs the fused attention of lightning_icl models (or a Hugging Face model on "
                f"attn_implementation='lightning_icl'); {type(pl_module).__name__} does not use it, so no attention "
                "statistics are recorded"
            )
            return
        missing = adapter.missing_stats(self.stats)
        if missing:
            raise ValueError(
                f"AttentionStatistics stats {missing}: {type(pl_module).__name__}'s batches do not give the token "
                f"class of every key; pass stats={tuple(s for s in self.stats if s not in missing)}"
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        adapter = self.adapter(pl_module)
        if not adapter.native_stats:
            self.check(trainer, pl_module, adapter, None)
            return
        # the step about to run is optimizer step global_step + 1
        self._armed = (trainer.global_step + 1) % self.every_n_steps == 0
        if self._armed:
            # the previous-token score needs lse (and q, k) even when lse itself is not recorded
            stats = tuple(dict.fromkeys((*self.stats, "lse"))) if self.previous_token else self.stats
            spec = CaptureSpec(stats=stats, positions="all", qk=self.previous_token)
            adapter.set_training_capture(spec)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.check_loss(trainer, pl_module, outputs)
        if not self._armed:
            return
        self._armed = False
        adapter = self.adapter(pl_module)
        self._capture = adapter.training_capture()
        adapter.set_training_capture(None)
        if self._capture is not None:
            self._run(trainer, pl_module)
        self._capture = None

    @torch.no_grad()
    def measure(self, trainer, pl_module) -> dict[str, Any]:
        cap = self._capture
        record: dict[str, Any] = {}
        task = getattr(pl_module, "task", None)
        if "class_mass" in self.stats and hasattr(task, "class_names"):
            record["class_names"] = task.class_names()  # e.g. x, y, z: the roles of the key classes
        layers = sorted(cap.stats)
        for name in self.stats:
            per_layer = [cap.stats[layer][name].float().mean(dim=(0, 2)) for layer in layers]  # [H] or [H, C]
            record[name] = trainer.strategy.reduce(torch.stack(per_layer), reduce_op="mean").tolist()
        if self.previous_token and cap.q:
            scores = []
            for layer in layers:
                q, k = cap.q[layer], cap.k[layer]
                t = q.shape[2]
                prev = attention_probability(
                    q, k, cap.stats[layer]["lse"], torch.arange(t, device=q.device) - 1, sm_scale=cap.scale.get(layer)
                )
                scores.append(prev[:, :, 1:].mean(dim=(0, 2)))
            record["previous_token"] = trainer.strategy.reduce(torch.stack(scores), reduce_op="mean").tolist()
        return record

    def scalars(self, record):
        out = {}
        for name, values in record.items():
            if name in ("step", "class_mass", "class_names"):
                continue
            for layer, row in enumerate(values):
                out.update({f"{name}/L{layer}H{head}": v for head, v in enumerate(row)})
        names = record.get("class_names")
        for layer, row in enumerate(record.get("class_mass", [])):
            for head, masses in enumerate(row):
                out.update({f"class_mass/L{layer}H{head}/{names[c] if names else f'class{c}'}": v
                            for c, v in enumerate(masses)})  # fmt: skip
        return out

    def figure(self, record):
        return attention_figure(record)
