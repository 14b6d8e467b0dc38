"""Adapters for models the package did not build, through PyTorch module hooks.

:class:`HookAdapter` works for any decoder whose attention ends in a per-head output
projection. It exposes the hook-point names of :class:`~lightning_icl.models.ICLTransformer`
(:mod:`lightning_icl.hooks`) on the model's own modules, so code written against those names
(capture, gating, patching) runs on both:

- ``blocks.{l}.attn.hook_z``: the input of layer l's output projection, the heads' outputs,
  seen by hooks as ``[B, H, T, Dh]`` (the projection gets it back as ``[B, T, H * Dh]``);
- ``blocks.{l}.hook_resid_post``: the output of block l (a tensor, or a tuple's first element);
- ``blocks.{l}.hook_mlp_out``: the output of block l's MLP, where the adapter is given the MLPs.

Nothing is registered on the model unless asked: :meth:`HookAdapter.forward` registers its
hooks for its own call, and a training-step capture or gate is a registration the adapter
holds until it is set to ``None`` (or :meth:`HookAdapter.detach`).

:class:`HFCausalLMAdapter` finds the projections, blocks and MLPs of Hugging Face GPT-2 and
Llama-style decoders. A model on ``attn_implementation="lightning_icl"`` (see
:mod:`lightning_icl.hf`) also gives attention statistics and queries/keys (``native_stats``):
the attention function hands them to a listener of the capture from the very pass that
computes the output.

Batches are mappings (e.g. dicts or ``BatchEncoding``)::

    input_ids       [B, T] long
    attention_mask  [B, T] (optional)
    labels          [B, T] long (optional; unshifted, -100 = not scored; absent = every next token scored)
    concept         [B] long (needed by the callbacks that group by concept)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_icl.capture import Capture, CaptureSpec, capture_hooks
from lightning_icl.hooks import HookFn, HookHandles, add_hooks
from lightning_icl.interventions.gating import check_ablate_with, check_head_gates, gating_hooks

from .base import Adapter, Scored

IGNORE_INDEX = -100  # Hugging Face's "not scored" label


class _Recording:
    """Where one capture goes: the ``Capture`` of the current model call and that call's input ids."""

    def __init__(self, spec: CaptureSpec, n_layers: int) -> None:
        self.spec, self.layers = spec, frozenset(spec.resolve_layers(n_layers))
        self.capture: Capture | None = None
        self.input_ids: Tensor | None = None

    def start(self, input_ids: Tensor) -> None:
        """A fresh capture for a call on ``input_ids`` ``[B, T]``."""
        b, t = input_ids.shape[:2]
        self.capture = Capture(positions=self.spec.resolve_positions(b, t, input_ids.device))
        self.input_ids = input_ids


class _StatListener:
    """Receives the statistics and queries/keys a recording asks of the package's attention (``lightning_icl.hf``)."""

    def __init__(self, adapter: HookAdapter, recording: _Recording) -> None:
        self.adapter, self.recording = adapter, recording

    def request(self, layer: int, batch: int, seq_len: int, device: torch.device):
        from lightning_icl.hf import StatRequest

        rec = self.recording
        spec = rec.spec
        if not (spec.stats or spec.qk) or layer not in rec.layers or rec.capture is None:
            return None
        inputs = self.adapter._stat_inputs
        query_label = inputs.get("query_label")
        if query_label is None and "same_label_mass" in spec.stats:
            query_label = rec.input_ids
        if "class_mass" in spec.stats and inputs.get("key_class") is None:
            raise ValueError(
                "CaptureSpec stats 'class_mass' needs the token class of every key, which these batches do not give; "
                f"ask {type(self.adapter).__name__} for the other statistics"
            )
        return StatRequest(
            stats=tuple(spec.stats),
            positions=rec.capture.positions,
            key_class=inputs.get("key_class"),
            num_classes=inputs.get("num_classes", 0),
            query_label=query_label,
            qk=spec.qk,
        )

    def deliver(self, layer: int, stats: dict[str, Tensor], q: Tensor | None, k: Tensor | None, scale: float) -> None:
        cap = self.recording.capture
        if stats:
            cap.stats[layer] = stats
        if q is not None:
            cap.q[layer], cap.k[layer] = q, k
            cap.scale[layer] = scale


class HookAdapter(Adapter):
    """Adapter for any model with a per-head output projection, via module hooks.

    Args:
        module: the user's LightningModule.
        model: the ``nn.Module`` to call as ``model(input_ids=..., attention_mask=...)``; it
            returns logits ``[B, T, V]`` or an object with ``.logits``.
        out_projs: ``out_projs[l]`` is layer l's attention output projection; its input is
            the concatenated head outputs z ``[B, T, H * Dh]`` (hook point ``blocks.{l}.attn.hook_z``).
        blocks: ``blocks[l]`` is the block whose output (a tensor, or a tuple whose first
            element is the tensor) is the residual stream ``[B, T, D]`` after layer l
            (``blocks.{l}.hook_resid_post``).
        n_heads: attention heads per layer.
        head_dim: per-head width; inferred from the projection's input width when ``None``.
        mlps: optional; ``mlps[l]``'s output ``[B, T, D]`` is layer l's MLP output (``blocks.{l}.hook_mlp_out``).

    :meth:`forward` registers its hooks for its own call only. :meth:`set_training_capture` and
    :meth:`set_training_gates` register hooks that act on every later call of the model (the
    forwards of the user's training step, which the adapter does not run) and hold their handles
    until set to ``None``; a :meth:`forward` call sets them aside for its duration, so they
    never leak into it. Attention statistics are not available (``native_stats = False``) unless
    the model runs on the package's attention (:class:`HFCausalLMAdapter` on ``"lightning_icl"``).
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
        mlps: list[nn.Module] | None = None,
    ) -> None:
        super().__init__(module)
        if len(out_projs) != len(blocks):
            raise ValueError(f"got {len(out_projs)} out_projs but {len(blocks)} blocks; need one of each per layer")
        if not out_projs:
            raise ValueError("out_projs and blocks are empty; need one of each per layer")
        if mlps is not None and len(mlps) != len(blocks):
            raise ValueError(f"got {len(mlps)} mlps for {len(blocks)} blocks; give one per layer or none")
        self.model = model
        self.out_projs, self.blocks = list(out_projs), list(blocks)
        self.mlps = None if mlps is None else list(mlps)
        self.n_layers, self.n_heads = len(out_projs), n_heads
        self.head_dim = head_dim if head_dim is not None else _infer_head_dim(out_projs[0], n_heads)
        # what the statistics read besides q, k: query_label (the model's input ids), key_class, num_classes
        self._stat_inputs: dict[str, Any] = {}
        # training-step requests, kept so a forward() call can set their hooks aside and restore them
        self._train_spec: CaptureSpec | None = None
        self._train_gates: Tensor | None = None
        self._train_recording: _Recording | None = None
        self._train_handles: list[HookHandles] = []

    # ---- hook points --------------------------------------------------------------------
    def hook_registrars(self) -> dict[str, Callable[[HookFn], RemovableHandle]]:
        registrars: dict[str, Callable[[HookFn], RemovableHandle]] = {}
        for layer in range(self.n_layers):
            registrars[f"blocks.{layer}.attn.hook_z"] = lambda fn, proj=self.out_projs[layer]: self._hook_z(proj, fn)
            if self.mlps is not None:
                registrars[f"blocks.{layer}.hook_mlp_out"] = lambda fn, m=self.mlps[layer]: _hook_output(m, fn)
            registrars[f"blocks.{layer}.hook_resid_post"] = lambda fn, b=self.blocks[layer]: _hook_output(b, fn)
        return registrars

    def _hook_z(self, proj: nn.Module, fn: HookFn) -> RemovableHandle:
        """``fn`` on the projection's input as ``[B, H, T, Dh]``; its result goes back as ``[B, T, H * Dh]``."""

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            # The heads' concatenation is the projection's only input, positional or by keyword.
            key = None if args else next(k for k, v in kwargs.items() if isinstance(v, Tensor))
            z = args[0] if key is None else kwargs[key]
            b, t = z.shape[:2]
            y = fn(z.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2))
            if y is None:
                return None
            y = y.transpose(1, 2).reshape(z.shape)
            return ((y, *args[1:]), kwargs) if key is None else (args, {**kwargs, key: y})

        return proj.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def _record(self, recording: _Recording) -> HookHandles:
        """Hooks that keep ``recording``'s capture; on the package's attention also its statistics."""
        handles = add_hooks(
            capture_hooks(recording.spec, sorted(recording.layers), lambda: recording.capture, qk=False),
            self.hook_registrars(),
        )
        if self.native_stats and (recording.spec.stats or recording.spec.qk):
            from lightning_icl import hf

            listener = _StatListener(self, recording)
            hf.listen(self.model, listener)
            handles.handles.append(_Call(lambda: hf.unlisten(listener)))
        return handles

    def missing_stats(self, stats: tuple[str, ...]) -> list[str]:
        """The statistics among ``stats`` this adapter cannot capture."""
        if not self.native_stats:
            return list(stats)
        return [] if self.key_classes else [s for s in stats if s == "class_mass"]

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
        check_head_gates(head_gates, self.n_layers, self.n_heads, b)
        if head_gates is not None:
            check_ablate_with(ablate_with, self.n_layers, self.n_heads, self.head_dim, t)
        recording = None
        with self._training_set_aside(), ExitStack() as stack:
            if capture is not None:
                recording = _Recording(capture, self.n_layers)
                recording.start(input_ids)
                stack.callback(self._record(recording).remove)
            if head_gates is not None:
                stack.enter_context(self.hooks(gating_hooks(self.n_layers, head_gates, ablate_with)))
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
        if logits is None:
            raise TypeError(f"model returned {type(out).__name__}; expected a logits tensor or an object with .logits")
        return logits, None if recording is None else recording.capture

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

    # ---- hooks into the training step -------------------------------------------------
    def set_training_capture(self, spec: CaptureSpec | None) -> None:
        """Record ``spec`` in every later call of the model (``None`` stops and drops the last one)."""
        self._check_spec(spec)
        self._remove_training()
        self._train_spec = spec
        self._train_recording = None if spec is None else _Recording(spec, self.n_layers)
        self._register_training()

    def training_capture(self) -> Capture | None:
        """The capture of the last model call since :meth:`set_training_capture`."""
        return None if self._train_recording is None else self._train_recording.capture

    def set_training_gates(self, gates: Tensor | None) -> None:
        """Gate head outputs by ``gates`` ``[L, H]`` in every later call of the model (``None`` stops)."""
        check_head_gates(gates, self.n_layers, self.n_heads, None, name="training head_gates")
        self._remove_training()
        self._train_gates = gates
        self._register_training()

    def detach(self) -> None:
        """Remove the training-step capture and gates: the model runs as if the adapter did not exist."""
        self._remove_training()
        self._train_spec = self._train_gates = self._train_recording = None

    def _register_training(self) -> None:
        rec = self._train_recording
        if rec is not None:

            def start(model: nn.Module, args: tuple, kwargs: dict) -> None:
                rec.start(kwargs["input_ids"] if "input_ids" in kwargs else args[0])

            pre = self.model.register_forward_pre_hook(start, with_kwargs=True)
            self._train_handles += [HookHandles([pre]), self._record(rec)]
        if self._train_gates is not None:
            self._train_handles.append(self.add_hooks(gating_hooks(self.n_layers, self._train_gates)))

    def _remove_training(self) -> None:
        for handles in self._train_handles:
            handles.remove()
        self._train_handles.clear()

    @contextmanager
    def _training_set_aside(self) -> Iterator[None]:
        """No training-step hook acts inside (a :meth:`forward` call gets only its own)."""
        if not self._train_handles:
            yield
            return
        self._remove_training()
        try:
            yield
        finally:
            self._register_training()


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
        heads ``config.num_attention_heads``. Each block's ``mlp`` gives ``hook_mlp_out``.
        """
        config = getattr(model, "config", None)
        gpt2_blocks = getattr(getattr(model, "transformer", None), "h", None)
        llama_blocks = getattr(getattr(model, "model", None), "layers", None)
        if gpt2_blocks is not None and all(hasattr(getattr(b, "attn", None), "c_proj") for b in gpt2_blocks):
            blocks, projs = list(gpt2_blocks), [b.attn.c_proj for b in gpt2_blocks]
            mlps = [getattr(b, "mlp", None) for b in gpt2_blocks]
            n_heads = getattr(config, "n_head", None)
        elif llama_blocks is not None and all(hasattr(getattr(b, "self_attn", None), "o_proj") for b in llama_blocks):
            blocks, projs = list(llama_blocks), [b.self_attn.o_proj for b in llama_blocks]
            mlps = [getattr(b, "mlp", None) for b in llama_blocks]
            n_heads = getattr(config, "num_attention_heads", None)
        else:
            raise ValueError(
                f"HFCausalLMAdapter.from_model does not recognise {type(model).__name__}: looked for GPT-2's "
                "model.transformer.h[i].attn.c_proj and Llama-style model.model.layers[i].self_attn.o_proj; "
                "for other models build a HookAdapter with out_projs, blocks and n_heads"
            )
        if not blocks or n_heads is None:
            raise ValueError(f"{type(model).__name__}: found no layers or no head count in model.config")
        return cls(module, model, projs, blocks, int(n_heads), mlps=mlps if all(m is not None for m in mlps) else None)


def _infer_head_dim(proj: nn.Module, n_heads: int) -> int:
    """Per-head width from the projection's input width (``nn.Linear`` or GPT-2's ``Conv1D``)."""
    width = getattr(proj, "in_features", None) or getattr(proj, "nx", None)
    if width is None:
        raise ValueError(f"cannot read the input width of {type(proj).__name__}; pass head_dim explicitly")
    if width % n_heads:
        raise ValueError(f"output projection input width {width} is not divisible by n_heads={n_heads}")
    return width // n_heads


def _hook_output(module: nn.Module, fn: HookFn) -> RemovableHandle:
    """``fn`` on ``module``'s output (a tensor, or a tuple's first element); its result replaces it."""

    def hook(m: nn.Module, args: tuple, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        y = fn(h)
        if y is None:
            return None
        return (y, *output[1:]) if isinstance(output, tuple) else y

    return module.register_forward_hook(hook)


class _Call:
    """A handle whose ``remove`` calls ``fn`` (for a registration that is not a module hook)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def remove(self) -> None:
        self.fn()
