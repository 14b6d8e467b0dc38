"""``ICLTransformer``: a small GPT-style decoder whose attention reports on itself.

Pre-LN blocks; RoPE, learned or no positions; tied embeddings for token tasks or
linear read-in/read-out for vector tasks. Attention goes through
:func:`lightning_icl.kernels.capture_attention`, so the statistics of a
:class:`~lightning_icl.capture.CaptureSpec` come out of the same pass.

Every activation a capture, a gate or a patch reaches has a named hook point
(:mod:`lightning_icl.hooks`), per layer ``l``:

- ``blocks.{l}.attn.hook_q``, ``blocks.{l}.attn.hook_k``: queries and keys after rotary ``[B, H, T, Dh]``;
- ``blocks.{l}.attn.hook_z``: the heads' outputs ``[B, H, T, Dh]``, the output projection's input;
- ``blocks.{l}.hook_mlp_out``: the MLP's output ``[B, T, D]``, added to the residual stream;
- ``blocks.{l}.hook_resid_post``: the residual stream after the block ``[B, T, D]``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_icl.capture import Capture, CaptureSpec, capture_hooks
from lightning_icl.config import TransformerConfig
from lightning_icl.hooks import HookedModule, HookPoint, merge_hooks
from lightning_icl.interventions.gating import check_ablate_with, check_head_gates, gating_hooks
from lightning_icl.kernels import capture_attention

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}  # the layer of each of config.ACTIVATIONS


class Rotary(nn.Module):
    """Rotary position embedding on the first ``dim`` channels of q and k (half-split layout)."""

    def __init__(self, dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [T, dim/2]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., T, Dh]
        t = x.shape[-2]
        cos, sin = self.cos[:t], self.sin[:t]
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, bias: bool, rotary: Rotary | None, backend: str) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.rotary, self.backend = rotary, backend
        self.hook_q, self.hook_k, self.hook_z = HookPoint(), HookPoint(), HookPoint()

    def heads(
        self,
        x: Tensor,
        stats: tuple[str, ...],
        key_class: Tensor | None,
        num_classes: int,
        labels: Tensor | None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Every head's output z ``[B, H, T, Dh]`` (before the output projection, after ``hook_z``) and its
        statistics ``[B, H, P]`` at query rows ``positions`` ``[B, P]`` (``None``: every row, P = T).

        Values of ``key_class`` and ``positions`` are not checked here: the model checks them once
        per forward, so no layer waits for the host."""
        b, t = x.shape[:2]
        # [B, T, 3, H, Dh] -> three [B, H, T, Dh] strided views of one projection
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.rotary is not None:  # q and k rotated together: one set of ops
            q, k = self.rotary(qkv[:2]).unbind(0)
        q, k = self.hook_q(q), self.hook_k(k)
        z, st = capture_attention(
            q,
            k,
            v,
            causal=True,
            stats=stats,
            key_class=key_class,
            num_classes=num_classes,
            query_label=labels,
            positions=positions if stats else None,
            backend=self.backend,
            validate=False,
        )
        return self.hook_z(z), st

    def project(self, y: Tensor) -> Tensor:
        """Output projection of (possibly gated) head outputs ``[B, H, T, Dh]`` to ``[B, T, D]``."""
        b, _, t, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: Tensor, **heads_kwargs) -> tuple[Tensor, dict[str, Tensor]]:
        """The attention's output ``[B, T, D]`` and statistics; ``heads_kwargs`` as in :meth:`heads`."""
        z, st = self.heads(x, **heads_kwargs)
        return self.project(z), st


class Block(nn.Module):
    def __init__(
        self, d_model: int, n_heads: int, d_mlp: int, bias: bool, activation: str, rotary: Rotary | None, backend: str
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = Attention(d_model, n_heads, bias, rotary, backend)
        self.ln2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_mlp, bias=bias), ACTIVATIONS[activation](), nn.Linear(d_mlp, d_model, bias=bias)
        )
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, h: Tensor, **attn_kwargs) -> tuple[Tensor, dict[str, Tensor]]:
        """Residual update of ``h`` ``[B, T, D]``; also returns the attention statistics."""
        a, stats = self.attn(self.ln1(h), **attn_kwargs)
        h = h + a
        h = h + self.hook_mlp_out(self.mlp(self.ln2(h)))
        return self.hook_resid_post(h), stats


class ICLTransformer(HookedModule):
    """GPT-style decoder for ICL tasks, built from a :class:`~lightning_icl.config.TransformerConfig`,
    with the hook points listed in the module docstring (:meth:`hook_points`; ``with
    model.hooks({name: fn}):`` runs hooks for one call).

    ``ICLTransformer(TransformerConfig(vocab_size=11, d_model=64))``, or the config's fields as
    keywords: ``ICLTransformer(vocab_size=11, d_model=64)`` (with a config too, they replace its
    fields). Token tasks (``vocab_size``) get an embedding, tied to the unembedding when
    ``tie_embeddings``; vector tasks (``input_dim``) a linear read-in and a read-out to
    ``output_dim``. The config is kept as ``config``.
    """

    def __init__(self, config: TransformerConfig | None = None, **fields) -> None:
        super().__init__()
        config = TransformerConfig() if config is None else config
        if not isinstance(config, TransformerConfig):
            raise ValueError(f"config must be a TransformerConfig, got {config!r}")
        config = dataclasses.replace(config, **fields) if fields else config
        config.check_sizes()
        self.config = config
        d_model, bias = config.d_model, config.bias
        self.n_layers, self.n_heads, self.d_model = config.n_layers, config.n_heads, d_model
        self.head_dim, self.max_seq_len = config.head_dim, config.context
        self.is_token_model = config.vocab_size > 0

        if self.is_token_model:
            self.embed = nn.Embedding(config.vocab_size, d_model)
            self.unembed = None if config.tie_embeddings else nn.Linear(d_model, config.vocab_size, bias=False)
        else:
            self.read_in = nn.Linear(config.input_dim, d_model, bias=bias)
            self.read_out = nn.Linear(d_model, config.output_dim, bias=bias)
        self.pos_embed = nn.Embedding(self.max_seq_len, d_model) if config.positional == "learned" else None
        rotary = Rotary(self.head_dim, self.max_seq_len) if config.positional == "rope" else None
        self.blocks = nn.ModuleList(
            Block(d_model, config.n_heads, config.mlp_width, bias, config.activation, rotary, config.attention_backend)
            for _ in range(config.n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self._init_weights(config.init_std)

    def _init_weights(self, std: float) -> None:
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                # residual-stream writers are scaled down by depth, as in GPT-2
                scaled = name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight")
                nn.init.normal_(p, std=std / math.sqrt(2 * self.n_layers) if scaled else std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(
        self,
        inputs: Tensor,
        capture: CaptureSpec | None = None,
        head_gates: Tensor | None = None,
        ablate_with: str | Tensor | None = None,
        key_class: Tensor | None = None,
        num_classes: int = 0,
        labels: Tensor | None = None,
        mlp_gates: Tensor | None = None,
        mlp_ablate_with: Tensor | None = None,
    ) -> tuple[Tensor, Capture | None]:
        """Run the model.

        Args:
            inputs: token ids ``[B, T]`` or vectors ``[B, T, input_dim]``.
            capture: what to keep; ``None`` keeps nothing and returns ``None``.
            head_gates: ``[L, H]`` or ``[B, L, H]``; head h of layer l contributes
                ``g * z + (1 - g) * mu`` to its output projection.
            ablate_with: ``mu``: ``None``/``"zero"``, ``"resample"`` (the z of the
                previous example in the batch), or a mean tensor ``[L, H, Dh]`` or ``[L, H, T, Dh]``.
            key_class, num_classes: token classes ``[B, T]`` for the ``class_mass`` statistic.
            labels: position labels ``[B, T]`` for ``same_label_mass``.
            mlp_gates: ``[L]`` or ``[B, L]``; block l adds ``g * mlp(x) + (1 - g) * mu`` to the residual.
            mlp_ablate_with: ``mu`` for the MLPs: ``None`` (zero) or a mean MLP output ``[L, D]``
                or ``[L, T, D]``.

        Capture, gates and means are hooks on the hook points (:func:`~lightning_icl.capture.capture_hooks`,
        :func:`~lightning_icl.interventions.gating.gating_hooks`), registered for this call only;
        the statistics come from the attention pass.

        Returns:
            ``(outputs, capture)``: logits ``[B, T, vocab]`` or predictions ``[B, T, output_dim]``.
        """
        b, t = inputs.shape[:2]
        self.check_length(t)
        check_head_gates(head_gates, self.n_layers, self.n_heads, b)
        if head_gates is not None:
            check_ablate_with(ablate_with, self.n_layers, self.n_heads, self.head_dim, t)
        self._check_mlp_gates(mlp_gates, mlp_ablate_with, b, t)
        layers: list[int] = []
        result = None
        hooks = {}
        if capture is not None:
            layers = capture.resolve_layers(self.n_layers)
            result = Capture(positions=capture.resolve_positions(b, t, inputs.device))
            if capture.stats:
                self._check_stat_inputs(capture.stats, key_class, num_classes, labels, b, t)
            hooks = capture_hooks(capture, layers, lambda: result)
        if head_gates is not None or mlp_gates is not None:  # after the capture's: it keeps z ungated
            hooks = merge_hooks(hooks, gating_hooks(self.n_layers, head_gates, ablate_with, mlp_gates, mlp_ablate_with))
        stats = capture.stats if capture is not None else ()
        with self.hooks(hooks):
            h = self.embed_inputs(inputs)
            for i, block in enumerate(self.blocks):
                keep = bool(stats) and i in layers
                h, st = block(
                    h,
                    stats=stats if keep else (),
                    key_class=key_class,
                    num_classes=num_classes,
                    labels=labels,
                    positions=result.positions if keep else None,
                )
                if st:  # already at the captured positions: the attention computed them there only
                    result.stats[i] = st
        return self.read_outputs(h), result

    def check_length(self, seq_len: int) -> None:
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.max_seq_len}")

    def embed_inputs(self, inputs: Tensor) -> Tensor:
        """The residual stream ``[B, T, D]`` entering the first block."""
        h = self.embed(inputs) if self.is_token_model else self.read_in(inputs)  # [B, T, D]
        if self.pos_embed is not None:
            h = h + self.pos_embed.weight[: inputs.shape[1]]
        return h

    def read_outputs(self, h: Tensor) -> Tensor:
        """Logits or predictions ``[..., T, V]`` from the last block's residual stream ``[..., T, D]``."""
        h = self.ln_f(h)
        if self.is_token_model:
            return F.linear(h, self.embed.weight) if self.unembed is None else self.unembed(h)
        return self.read_out(h)

    def _check_stat_inputs(
        self,
        stats: tuple[str, ...],
        key_class: Tensor | None,
        num_classes: int,
        labels: Tensor | None,
        batch: int,
        seq_len: int,
    ) -> None:
        """The token classes and labels the statistics need, checked once per forward (one host sync)."""
        if "class_mass" in stats:
            if key_class is None or num_classes < 1:
                raise ValueError("CaptureSpec stats 'class_mass' needs key_class [B, T] and num_classes >= 1")
            if tuple(key_class.shape) != (batch, seq_len):
                raise ValueError(f"key_class must be [B, T] = {(batch, seq_len)}, got {tuple(key_class.shape)}")
            if key_class.numel() and not torch.compiler.is_compiling():
                low, high = torch.stack(list(torch.aminmax(key_class))).tolist()
                if low < 0 or high >= num_classes:
                    raise ValueError(f"key_class values must lie in [0, {num_classes}), got [{low}, {high}]")
        if "same_label_mass" in stats and (labels is None or tuple(labels.shape) != (batch, seq_len)):
            got = None if labels is None else tuple(labels.shape)
            raise ValueError(f"CaptureSpec stats 'same_label_mass' needs labels [B, T] = {(batch, seq_len)}, got {got}")

    def _check_mlp_gates(self, gates: Tensor | None, ablate_with: Tensor | None, batch: int, t: int) -> None:
        if gates is not None and tuple(gates.shape) not in ((self.n_layers,), (batch, self.n_layers)):
            raise ValueError(f"mlp_gates must be [L] = ({self.n_layers},) or [B, L], got {tuple(gates.shape)}")
        if ablate_with is None:
            return
        shape = tuple(ablate_with.shape)
        per_layer = (self.n_layers, self.d_model)
        per_position = len(shape) == 3 and shape[0] == self.n_layers and shape[2] == self.d_model and shape[1] >= t
        if shape != per_layer and not per_position:
            raise ValueError(f"mlp_ablate_with must be [L, D] = {per_layer} or [L, T, D] with T >= {t}, got {shape}")
