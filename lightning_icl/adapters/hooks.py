"""Adapters for models the package did not build, through PyTorch module hooks.

:class:`HookAdapter` works for any decoder whose attention ends in a per-head output
projection: the input of that projection is the concatenation of the heads' outputs
z ``[B, T, H * Dh]``, so a forward pre-hook on it can read z (capture) and replace it
(gating), and a forward hook on each block reads the residual stream. The hooks are
inert unless the adapter has state for the current call, so an attached adapter
leaves every other forward of the model untouched.

:class:`HFCausalLMAdapter` finds the projections and blocks of Hugging Face GPT-2 and
Llama-style decoders. A model on ``attn_implementation="lightning_icl"`` (see
:mod:`lightning_icl.hf`) also gives attention statistics and queries/keys (``native_stats``):
the attention function hands them to the adapter from the very pass that computes the output.

Batches are mappings (e.g. dicts or ``BatchEncoding``)::

    input_ids       [B, T] long
    attention_mask  [B, T] (optional)
    labels          [B, T] long (optional; unshifted, -100 = not scored; absent = every next token scored)
    concept         [B] long (needed by the callbacks that group by concept)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_icl.capture import Capture, CaptureSpec, gather_positions
from lightning_icl.interventions.gating import gate_heads

from .base import Adapter, Scored

IGNORE_INDEX = -100  # Hugging Face's "not scored" label


@dataclass
class _State:
    """What the hooks do during one forward (``forward()``) or every training forward."""

    spec: CaptureSpec | None = None
    layers: frozenset[int] = frozenset()
    gates: Tensor | None = None  # [L, H] or [B, L, H]
    ablate_with: str | Tensor | None = None
    capture: Capture | None = None

    @property
    def inert(self) -> bool:
        return self.spec is None and self.gates is None


class HookAdapter(Adapter):
    """Adapter for any model with a per-head output projection, via module hooks.

    Args:
        module: the user's LightningModule.
        model: the ``nn.Module`` to call as ``model(input_ids=..., attention_mask=...)``; it
            returns logits ``[B, T, V]`` or an object with ``.logits``.
        out_projs: ``out_projs[l]`` is layer l's attention output projection; its input is
            the concatenated head outputs z ``[B, T, H * Dh]``.
        blocks: ``blocks[l]`` is the block whose output (a tensor, or a tuple whose first
            element is the tensor) is the residual stream ``[B, T, D]`` after layer l.
        n_heads: attention heads per layer.
        head_dim: per-head width; inferred from the projection's input width when ``None``.

    Hooks are registered by :meth:`attach` (or ``with adapter:``) and removed by
    :meth:`detach`. :meth:`forward` attaches them for its own call when they are not
    attached; :meth:`set_training_capture` and :meth:`set_training_gates` attach them and
    leave them attached, since they act on forwards the adapter does not run.
    Attention statistics are not available (``native_stats = False``) unless the model runs on
    the package's attention (:class:`HFCausalLMAdapter` on ``"lightning_icl"``).
    """

    native_stats = False
    key_classes = False
    """Whether the batches give key classes (``class_mass``); query labels are the input ids."""

    def __init__(
        self,
        module: L.LightningModule,
        model: nn.Module,
        out_projs: list[nn.Module],
        blocks: list[nn.Module],
        n_heads: int,
        head_dim: int | None = None,
    ) -> None:
        super().__init__(module)
        if len(out_projs) != len(blocks):
            raise ValueError(f"got {len(out_projs)} out_projs but {len(blocks)} blocks; need one of each per layer")
        if not out_projs:
            raise ValueError("out_projs and blocks are empty; need one of each per layer")
        self.model = model
        self.out_projs, self.blocks = list(out_projs), list(blocks)
        self.n_layers, self.n_heads = len(out_projs), n_heads
        self.head_dim = head_dim if head_dim is not None else _infer_head_dim(out_projs[0], n_heads)
        self._handles: list[RemovableHandle] = []
        self._call: _State | None = None  # set by forward() for one call only
        self._train = _State()  # applies to every other forward while set
        self._copy_rows: int | None = None  # rows per copy while score_variants runs a replicated batch
        # what the statistics read besides q, k: query_label (the model's input ids), key_class, num_classes
        self._stat_inputs: dict[str, Any] = {}
        self._listening = False

    # ---- hooks --------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> HookAdapter:
        """Register the hooks (once; attaching again does nothing), and on the package's attention listen
        to its statistics."""
        if not self._handles:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            for layer, (proj, block) in enumerate(zip(self.out_projs, self.blocks, strict=True)):
                hook = partial(self._on_out_proj, layer)
                self._handles.append(proj.register_forward_pre_hook(hook, with_kwargs=True))
                self._handles.append(block.register_forward_hook(partial(self._on_block, layer)))
        if self.native_stats and not self._listening:
            from lightning_icl import hf

            hf.listen(self.model, self)
            self._listening = True
        return self

    def detach(self) -> None:
        """Remove every hook this adapter registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._listening:
            from lightning_icl import hf

            hf.unlisten(self)
            self._listening = False

    def __enter__(self) -> HookAdapter:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _active(self) -> _State:
        # A forward() call takes precedence: training gates and captures must not leak into it.
        return self._call if self._call is not None else self._train

    def _on_model_call(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        # Each training forward starts a fresh capture; its positions are resolved from the
        # first activation the hooks see (the batch shape is only known then).
        if self._call is None and self._train.spec is not None:
            self._train.capture = None
        self._model_input_ids = kwargs.get("input_ids", args[0] if args else None)

    def _capture(self, state: _State, layer: int, x: Tensor) -> Capture | None:
        """The capture to write layer ``layer`` into, created from ``x`` ``[B, T, ...]`` if needed."""
        return self._capture_for(state, layer, x.shape[0], x.shape[1], x.device)

    def _capture_for(self, state: _State, layer: int, b: int, t: int, device: torch.device) -> Capture | None:
        if state.spec is None or layer not in state.layers:
            return None
        if state.capture is None:
            state.capture = Capture(positions=state.spec.resolve_positions(b, t, device))
        return state.capture

    # ---- statistics from the attention function (models on "lightning_icl") -----------
    def request(self, layer: int, batch: int, seq_len: int, device: torch.device):
        """What layer ``layer``'s attention should compute for the current capture (``None``: nothing)."""
        from lightning_icl.hf import StatRequest

        state = self._active()
        spec = state.spec
        if spec is None or not (spec.stats or spec.qk) or layer not in state.layers:
            return None
        cap = self._capture_for(state, layer, batch, seq_len, device)
        inputs = self._stat_inputs
        query_label = inputs.get("query_label")
        if query_label is None and "same_label_mass" in spec.stats:
            query_label = getattr(self, "_model_input_ids", None)
        if "class_mass" in spec.stats and inputs.get("key_class") is None:
            raise ValueError(
                "CaptureSpec stats 'class_mass' needs the token class of every key, which these batches do not give; "
                f"ask {type(self).__name__} for the other statistics"
            )
        return StatRequest(
            stats=tuple(spec.stats),
            positions=cap.positions,
            key_class=inputs.get("key_class"),
            num_classes=inputs.get("num_classes", 0),
            query_label=query_label,
            qk=spec.qk,
        )

    def deliver(self, layer: int, stats: dict[str, Tensor], q: Tensor | None, k: Tensor | None, scale: float) -> None:
        cap = self._active().capture
        if stats:
            cap.stats[layer] = stats
        if q is not None:
            cap.q[layer], cap.k[layer] = q, k
            cap.scale[layer] = scale

    def missing_stats(self, stats: tuple[str, ...]) -> list[str]:
        """The statistics among ``stats`` this adapter cannot capture."""
        if not self.native_stats:
            return list(stats)
        return [] if self.key_classes else [s for s in stats if s == "class_mass"]

    def _on_out_proj(self, layer: int, proj: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._active()
        if state.inert:
            return None
        # The heads' concatenation is the projection's only input, positional or by keyword.
        key = None if args else next(k for k, v in kwargs.items() if isinstance(v, Tensor))
        z = args[0] if key is None else kwargs[key]
        b, t = z.shape[:2]
        zh = z.reshape(b, t, self.n_heads, self.head_dim)  # [B, T, H, Dh]
        cap = self._capture(state, layer, z)
        if cap is not None and state.spec.heads:
            cap.heads[layer] = gather_positions(zh.detach().transpose(1, 2), cap.positions, dim=2)
        if state.gates is None:
            return None
        mu = state.ablate_with[layer] if isinstance(state.ablate_with, Tensor) else state.ablate_with
        y = _gate(zh, state.gates[..., layer, :], mu, self._copy_rows if state is self._call else None).reshape(z.shape)
        if key is None:
            return (y, *args[1:]), kwargs
        return args, {**kwargs, key: y}

    def _on_block(self, layer: int, block: nn.Module, args: tuple, output: Any) -> None:
        state = self._active()
        if state.spec is None or not state.spec.residual:
            return
        h = output[0] if isinstance(output, tuple) else output
        cap = self._capture(state, layer, h)
        if cap is not None:
            cap.residual[layer] = gather_positions(h.detach(), cap.positions, dim=1)

    # ---- running the model ------------------------------------------------------------
    def forward(
        self,
        batch: Mapping[str, Any],
        capture: CaptureSpec | None = None,
        head_gates: Tensor | None = None,
        ablate_with: str | Tensor | None = None,
    ) -> tuple[Tensor, Capture | None]:
        """Logits ``[B, T, V]`` and the capture (``None`` without a spec).

        ``head_gates`` ``[L, H]`` or ``[B, L, H]``: head h of layer l feeds
        ``g * z + (1 - g) * mu`` to its output projection, with ``mu`` from ``ablate_with``:
        ``None``/``"zero"``, ``"resample"`` (the previous example's z) or a mean
        ``[L, H, Dh]`` / ``[L, H, T, Dh]``.
        """
        return self._run(batch["input_ids"], batch.get("attention_mask"), capture, head_gates, ablate_with)

    def _run(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        capture: CaptureSpec | None,
        head_gates: Tensor | None,
        ablate_with: str | Tensor | None,
    ) -> tuple[Tensor, Capture | None]:
        b, t = input_ids.shape[:2]
        self._check_spec(capture)
        gates = self._check_gates(head_gates, b)
        if gates is not None:
            self._check_ablate_with(ablate_with, t)
        state = _State(gates=gates, ablate_with=ablate_with)
        if capture is not None:
            state.spec, state.layers = capture, frozenset(capture.resolve_layers(self.n_layers))
            state.capture = Capture(positions=capture.resolve_positions(b, t, input_ids.device))
        temporary = not self.attached
        self.attach()
        self._call = state
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            self._call = None
            if temporary:
                self.detach()
        logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
        if logits is None:
            raise TypeError(f"model returned {type(out).__name__}; expected a logits tensor or an object with .logits")
        return logits, state.capture

    def _check_spec(self, spec: CaptureSpec | None) -> None:
        """Hooks see head outputs and block outputs only (and, on the package's attention, statistics and
        queries/keys): what they cannot capture is an error, not ``{}``."""
        if spec is None:
            return
        if self.native_stats:
            missing = self.missing_stats(tuple(spec.stats))
            if missing:
                raise ValueError(
                    f"CaptureSpec stats {missing} need the token class of every key, which {type(self).__name__} "
                    "does not have for these batches"
                )
            return
        if spec.stats:
            raise ValueError(
                f"CaptureSpec(stats={spec.stats}) needs the package's attention (its statistics come from the "
                f"attention pass); {type(self).__name__} hooks a model with attention of its own and can capture "
                "heads and residual only"
            )
        if spec.qk:
            raise ValueError(
                f"CaptureSpec(qk=True) needs the package's attention; {type(self).__name__} can capture heads and "
                "residual only"
            )

    def _check_gates(self, gates: Tensor | None, batch: int) -> Tensor | None:
        if gates is None:
            return None
        shape = tuple(gates.shape)
        lh = (self.n_layers, self.n_heads)
        if shape not in (lh, (batch, *lh)):
            raise ValueError(f"head_gates must be [L, H] = {lh} or [B, L, H] = {(batch, *lh)}, got {shape}")
        return gates

    def _check_ablate_with(self, ablate_with: str | Tensor | None, seq_len: int) -> None:
        if ablate_with is None or isinstance(ablate_with, str):
            if ablate_with not in (None, "zero", "resample"):
                raise ValueError(f"ablate_with must be None, 'zero', 'resample' or a tensor, got {ablate_with!r}")
            return
        lh, shape = (self.n_layers, self.n_heads), tuple(ablate_with.shape)
        ok = ablate_with.dim() in (3, 4) and shape[:2] == lh and shape[-1] == self.head_dim
        if not ok or (ablate_with.dim() == 4 and shape[2] < seq_len):
            raise ValueError(
                f"ablate_with must be [L, H, Dh] = {(*lh, self.head_dim)} or [L, H, T, Dh] with T >= {seq_len}, "
                f"got {shape}"
            )

    # ---- scoring and batches ----------------------------------------------------------
    def _scored(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Positions ``[B, P]`` whose next token is scored, and those next tokens ``[B, P]``."""
        input_ids = batch["input_ids"]
        labels = batch.get("labels")
        if labels is None:
            # Every next token, except padding when a mask says where it is.
            labels = input_ids
            mask = batch.get("attention_mask")
            if mask is not None:
                labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        nxt = labels[:, 1:]
        scored = nxt != IGNORE_INDEX  # [B, T-1]; column t scores the prediction made at t
        counts = scored.sum(dim=1)
        if counts.numel() and not bool((counts == counts[0]).all()):
            raise ValueError(
                "every row must score the same number of positions (labels != -100 after the first token), "
                f"got {counts.tolist()}"
            )
        b = nxt.shape[0]
        p = int(counts[0]) if counts.numel() else 0
        positions = scored.nonzero()[:, 1].view(b, p)  # nonzero is row-major, so rows stay in order
        return positions, torch.gather(nxt, 1, positions)

    def score(self, outputs: Tensor, batch: Mapping[str, Any]) -> Scored:
        """Next-token cross-entropy ``[B, P]`` (and argmax correctness) at the scored positions."""
        positions, targets = self._scored(batch)
        b, p = positions.shape
        logits = torch.gather(outputs, 1, positions[..., None].expand(b, p, outputs.shape[-1]))  # [B, P, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(b, p)
        correct = (logits.argmax(dim=-1) == targets).float()
        shot = torch.arange(p, device=positions.device).expand(b, p)
        return Scored(loss=loss, correct=correct, shot=shot)

    def answer_positions(self, batch: Mapping[str, Any]) -> Tensor:
        """``[B, P]`` positions t whose next token ``t + 1`` is an answer."""
        return self._scored(batch)[0]

    def concept(self, batch: Mapping[str, Any]) -> Tensor:
        concept = batch.get("concept")
        if concept is None:
            raise ValueError(
                "batch has no 'concept' entry; add a [B] long tensor of concept labels to each batch "
                "for the callbacks that group sequences by concept"
            )
        return concept

    def batch_size(self, batch: Mapping[str, Any]) -> int:
        return int(batch["input_ids"].shape[0])

    def repeat(self, batch: Mapping[str, Any], times: int) -> dict[str, Any]:
        """Every tensor of the batch tiled ``times`` times along dim 0; other entries as they are."""
        return {
            k: v.repeat(times, *([1] * (v.dim() - 1))) if isinstance(v, Tensor) and v.dim() > 0 else v
            for k, v in batch.items()
        }

    def score_variants(
        self, batch: Mapping[str, Any], head_gates: Tensor, ablate_with: str | Tensor | None = None
    ) -> tuple[Scored, Scored]:
        """The replicated forward of :meth:`Adapter.score_variants`; ``"resample"`` stays within each copy."""
        self._copy_rows = self.batch_size(batch)
        try:
            return super().score_variants(batch, head_gates, ablate_with)
        finally:
            self._copy_rows = None

    def residual_module(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def head_output_module(self, layer: int) -> nn.Module:
        return self.out_projs[layer]

    # ---- hooks into the training step -------------------------------------------------
    def set_training_capture(self, spec: CaptureSpec | None) -> None:
        """Record ``spec`` in every later forward of the model (``None`` stops and drops the last one)."""
        self._check_spec(spec)
        self._train.spec = spec
        self._train.layers = frozenset(spec.resolve_layers(self.n_layers)) if spec is not None else frozenset()
        self._train.capture = None
        if spec is not None:
            self.attach()

    def training_capture(self) -> Capture | None:
        """The capture of the last model forward since :meth:`set_training_capture`."""
        return self._train.capture

    def set_training_gates(self, gates: Tensor | None) -> None:
        """Multiply head outputs by ``gates`` ``[L, H]`` in every later forward (``None`` stops)."""
        if gates is not None and tuple(gates.shape) != (self.n_layers, self.n_heads):
            raise ValueError(
                f"training head_gates must be [L, H] = {(self.n_layers, self.n_heads)}, got {tuple(gates.shape)}"
            )
        self._train.gates = gates
        if gates is not None:
            self.attach()


class HFCausalLMAdapter(HookAdapter):
    """:class:`HookAdapter` for Hugging Face GPT-2 and Llama-style causal LMs.

    On ``attn_implementation="lightning_icl"`` (``import lightning_icl.hf``) the adapter is
    ``native_stats``: captures with ``stats`` (``class_mass`` only where the batches give key classes)
    and ``qk`` come from the attention pass itself, in :meth:`forward` and in the training step
    (:meth:`set_training_capture`); ``qk`` keys are expanded to the query heads.
    """

    @property
    def native_stats(self) -> bool:
        return getattr(getattr(self.model, "config", None), "_attn_implementation", None) == "lightning_icl"

    @classmethod
    def from_model(cls, module: L.LightningModule, model: nn.Module) -> HFCausalLMAdapter:
        """Find the output projections and blocks of ``model``.

        GPT-2: ``model.transformer.h[i].attn.c_proj`` (a ``Conv1D``), heads ``config.n_head``.
        Llama-style (Llama, Mistral, Qwen2, ...): ``model.model.layers[i].self_attn.o_proj``,
        heads ``config.num_attention_heads``.
        """
        config = getattr(model, "config", None)
        gpt2_blocks = getattr(getattr(model, "transformer", None), "h", None)
        llama_blocks = getattr(getattr(model, "model", None), "layers", None)
        if gpt2_blocks is not None and all(hasattr(getattr(b, "attn", None), "c_proj") for b in gpt2_blocks):
            blocks, projs = list(gpt2_blocks), [b.attn.c_proj for b in gpt2_blocks]
            n_heads = getattr(config, "n_head", None)
        elif llama_blocks is not None and all(hasattr(getattr(b, "self_attn", None), "o_proj") for b in llama_blocks):
            blocks, projs = list(llama_blocks), [b.self_attn.o_proj for b in llama_blocks]
            n_heads = getattr(config, "num_attention_heads", None)
        else:
            raise ValueError(
                f"HFCausalLMAdapter.from_model does not recognise {type(model).__name__}: looked for GPT-2's "
                "model.transformer.h[i].attn.c_proj and Llama-style model.model.layers[i].self_attn.o_proj; "
                "for other models build a HookAdapter with out_projs, blocks and n_heads"
            )
        if not blocks or n_heads is None:
            raise ValueError(f"{type(model).__name__}: found no layers or no head count in model.config")
        return cls(module, model, projs, blocks, int(n_heads))


def _infer_head_dim(proj: nn.Module, n_heads: int) -> int:
    """Per-head width from the projection's input width (``nn.Linear`` or GPT-2's ``Conv1D``)."""
    width = getattr(proj, "in_features", None) or getattr(proj, "nx", None)
    if width is None:
        raise ValueError(f"cannot read the input width of {type(proj).__name__}; pass head_dim explicitly")
    if width % n_heads:
        raise ValueError(f"output projection input width {width} is not divisible by n_heads={n_heads}")
    return width // n_heads


def _gate(z: Tensor, gate: Tensor, ablate_with: str | Tensor | None, group: int | None = None) -> Tensor:
    """:func:`gate_heads` in the projection's ``[B, T, H, Dh]`` layout."""
    if isinstance(ablate_with, Tensor):
        ablate_with = ablate_with.to(device=z.device)
    return gate_heads(z.transpose(1, 2), gate, ablate_with, group).transpose(1, 2)
