"""``ICLTransformer``: a small GPT-style decoder whose attention reports on itself.

Pre-LN blocks; RoPE, learned or no positions; tied embeddings for token tasks or
linear read-in/read-out for vector tasks. Attention goes through
:func:`lightning_icl.kernels.capture_attention`, so the statistics of a
:class:`~lightning_icl.capture.CaptureSpec` come out of the same pass.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_icl.capture import Capture, CaptureSpec, gather_positions
from lightning_icl.config import TransformerConfig
from lightning_icl.interventions.gating import ablation_value, gate_heads, gate_mlp, is_zero
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
        self.keep_qk, self.last_qk = False, None  # set by the model for one forward when a capture asks

    def heads(
        self,
        x: Tensor,
        stats: tuple[str, ...],
        key_class: Tensor | None,
        num_classes: int,
        labels: Tensor | None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Every head's output z ``[B, H, T, Dh]`` (before the output projection) and its statistics
        ``[B, H, P]`` at query rows ``positions`` ``[B, P]`` (``None``: every row, P = T).

        Values of ``key_class`` and ``positions`` are not checked here: the model checks them once
        per forward, so no layer waits for the host."""
        b, t = x.shape[:2]
        # [B, T, 3, H, Dh] -> three [B, H, T, Dh] strided views of one projection
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.rotary is not None:  # q and k rotated together: one set of ops
            q, k = self.rotary(qkv[:2]).unbind(0)
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
        self.last_qk = (q.detach(), k.detach()) if self.keep_qk else None
        return z, st

    def project(self, y: Tensor) -> Tensor:
        """Output projection of (possibly gated) head outputs ``[B, H, T, Dh]`` to ``[B, T, D]``."""
        b, _, t, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))

    def forward(
        self,
        x: Tensor,
        stats: tuple[str, ...],
        key_class: Tensor | None,
        num_classes: int,
        labels: Tensor | None,
        gate: Tensor | None,
        ablate_with: str | Tensor | None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        z, st = self.heads(x, stats, key_class, num_classes, labels, positions)
        y = z if gate is None else gate_heads(z, gate, ablate_with)
        return self.project(y), z, st


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

    def forward(
        self, h: Tensor, mlp_gate: Tensor | None = None, mlp_ablate_with: Tensor | None = None, **attn_kwargs
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Residual update of ``h`` ``[B, T, D]``; also returns the heads' z and attention statistics.

        ``mlp_gate`` (a scalar or ``[B]``) mixes the MLP output m with ``mlp_ablate_with`` (mu,
        ``[D]`` or ``[T, D]``; ``None``: zero) as ``g * m + (1 - g) * mu``.
        """
        a, z, stats = self.attn(self.ln1(h), **attn_kwargs)
        h = h + a
        m = self.mlp(self.ln2(h))
        if mlp_gate is not None:
            m = gate_mlp(m, mlp_gate, mlp_ablate_with)
        return h + m, z, stats


class ICLTransformer(nn.Module):
    """GPT-style decoder for ICL tasks, built from a :class:`~lightning_icl.config.TransformerConfig`.

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

        Returns:
            ``(outputs, capture)``: logits ``[B, T, vocab]`` or predictions ``[B, T, output_dim]``.
        """
        b, t = inputs.shape[:2]
        if t > self.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len={self.max_seq_len}")
        gates = self._check_gates(head_gates, b)
        self._check_mlp_gates(mlp_gates, mlp_ablate_with, b, t)
        layers = capture.resolve_layers(self.n_layers) if capture is not None else []
        result = None
        if capture is not None:
            result = Capture(positions=capture.resolve_positions(b, t, inputs.device))
            if capture.stats:
                self._check_stat_inputs(capture.stats, key_class, num_classes, labels, b, t)

        h = self._embed(inputs)
        for i, block in enumerate(self.blocks):
            keep = result is not None and i in layers
            stats = capture.stats if keep else ()
            gate = None if gates is None else gates[..., i, :]
            mu = ablate_with[i] if isinstance(ablate_with, Tensor) else ablate_with
            block.attn.keep_qk = keep and capture.qk
            h, z, st = block(
                h,
                mlp_gate=None if mlp_gates is None else mlp_gates[..., i],
                mlp_ablate_with=None if mlp_ablate_with is None else mlp_ablate_with[i],
                stats=stats,
                key_class=key_class,
                num_classes=num_classes,
                labels=labels,
                gate=gate,
                ablate_with=mu,
                positions=result.positions if keep else None,
            )
            if keep:
                pos = result.positions
                if capture.residual:
                    result.residual[i] = gather_positions(h.detach(), pos, dim=1)
                if capture.heads:
                    result.heads[i] = gather_positions(z.detach(), pos, dim=2)
                if st:  # already at the captured positions: the attention computed them there only
                    result.stats[i] = st
                if capture.qk:
                    result.q[i], result.k[i] = block.attn.last_qk
                    block.attn.keep_qk, block.attn.last_qk = False, None
        return self._read_out(h), result

    def _embed(self, inputs: Tensor) -> Tensor:
        h = self.embed(inputs) if self.is_token_model else self.read_in(inputs)  # [B, T, D]
        if self.pos_embed is not None:
            h = h + self.pos_embed.weight[: inputs.shape[1]]
        return h

    def _read_out(self, h: Tensor) -> Tensor:
        h = self.ln_f(h)
        if self.is_token_model:
            return F.linear(h, self.embed.weight) if self.unembed is None else self.unembed(h)
        return self.read_out(h)

    def forward_variants(
        self,
        inputs: Tensor,
        head_gates: Tensor,
        ablate_with: str | Tensor | None = None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The clean run and ``N`` gated variants of one batch, in one pass that computes shared work once.

        Variant ``n`` runs the batch with gates ``head_gates[n]`` ``[L, H]``. Until its first layer
        with a gate other than 1 it is the clean run, so it joins the pass there: it starts from
        the clean residual stream and the clean heads' outputs of that layer, and only the layers
        above are computed for it. Ablating every head one at a time costs the clean forward
        plus, per head, the layers above it; a forward per head costs L full layers per head.

        Args:
            inputs: ``[B, T]`` tokens or ``[B, T, input_dim]`` vectors.
            head_gates: ``[N, L, H]``.
            ablate_with: as in :meth:`forward` (``"resample"`` takes the previous example of the
                same variant).
            positions: ``[B, P]`` the positions whose outputs are needed: the final layer's
                projection, MLP and read-out run at these positions only. ``None``: all.

        Returns:
            ``(clean, variants)``: ``[B, T', ...]`` and ``[N, B, T', ...]`` outputs, with
            ``T' = P`` when ``positions`` is given, else ``T``. The variants are differentiable in
            ``head_gates`` (gradients of a gate that stays exactly 1 in every layer are not formed).
        """
        b, t = inputs.shape[:2]
        if t > self.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len={self.max_seq_len}")
        if head_gates.dim() != 3 or tuple(head_gates.shape[1:]) != (self.n_layers, self.n_heads):
            raise ValueError(
                f"head_gates must be [N, L, H] with [L, H] = {(self.n_layers, self.n_heads)}, "
                f"got {tuple(head_gates.shape)}"
            )
        if positions is not None and (positions.dim() != 2 or positions.shape[0] != b):
            raise ValueError(f"positions must be [B, P] with B = {b}, got {tuple(positions.shape)}")
        n, b_h = head_gates.shape[0], self.n_heads
        plan = head_gates.detach().cpu()  # which variant joins where: decided on the host, no device syncs
        touched = (plan != 1).any(dim=2)  # [N, L]
        first = torch.where(touched.any(dim=1), touched.float().argmax(dim=1), torch.full_like(touched[:, 0], -1))
        first = first.tolist()  # -1: never gated, identical to the clean run
        touched = touched.tolist()
        h = self._embed(inputs)
        head_gates = head_gates.to(h.device, non_blocking=True)
        members: list[int] = []  # variants in the running batch, after the clean rows
        for i, block in enumerate(self.blocks):
            z, _ = block.attn.heads(block.ln1(h), (), None, 0, None)  # [(1 + M) * B, H, T, Dh]
            mu = ablate_with[i] if isinstance(ablate_with, Tensor) else ablate_with
            regated = [k for k, v in enumerate(members) if touched[v][i]]
            if regated:  # variants already running that gate this layer again
                rows = z.unflatten(0, (-1, b))
                picked = rows[[k + 1 for k in regated]].flatten(0, 1)
                gates = head_gates[[members[k] for k in regated], i].repeat_interleave(b, dim=0)
                rows = rows.index_copy(0, torch.tensor(regated, device=z.device) + 1,
                                       gate_heads(picked, gates, mu, group=b).unflatten(0, (-1, b)))  # fmt: skip
                z = rows.flatten(0, 1)
            joining = [v for v in range(n) if first[v] == i]
            delta = None
            if joining:  # they branch off the clean rows: z - (g - 1)(z - mu) per gated head, linearly
                zc = z[:b]
                diff = zc if is_zero(mu) else zc - ablation_value(zc, mu)  # [B, H, T, Dh]
            last = i == self.n_layers - 1
            if last and positions is not None:  # nothing after the last attention mixes positions
                rows = positions.repeat(1 + len(members), 1)  # [R, P]
                z, h = gather_positions(z, rows, dim=2), gather_positions(h, rows, dim=1)
                if joining:
                    diff = gather_positions(diff, positions, dim=2)
            a = block.attn.project(z)  # [(1 + M) * B, T', D]
            if joining:
                w = block.attn.proj.weight.view(-1, b_h, self.head_dim)  # [D, H, Dh]
                per_head = torch.einsum("bhtk,dhk->hbtd", diff, w)  # each head's contribution, less mu's
                # from the device gates, not the host plan, so the pass is differentiable in them
                dg = (head_gates[joining, i] - 1).to(per_head.dtype)
                delta = torch.einsum("jh,hbtd->jbtd", dg, per_head).flatten(0, 1)
                h = torch.cat([h + a, (h[:b] + a[:b]).repeat(len(joining), 1, 1) + delta])
                members += joining
            else:
                h = h + a
            h = h + block.mlp(block.ln2(h))
        out = self._read_out(h)
        clean = out[:b]
        if members == list(range(n)):  # every variant gated something, in order
            return clean, out[b:].unflatten(0, (n, b))
        variants = clean.unsqueeze(0).repeat(n, *([1] * clean.dim()))
        if members:
            variants[members] = out[b:].unflatten(0, (len(members), b))
        return clean, variants

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

    def _check_gates(self, gates: Tensor | None, batch: int) -> Tensor | None:
        if gates is None:
            return None
        shape = tuple(gates.shape)
        if shape not in ((self.n_layers, self.n_heads), (batch, self.n_layers, self.n_heads)):
            raise ValueError(f"head_gates must be [L, H] = {(self.n_layers, self.n_heads)} or [B, L, H], got {shape}")
        return gates

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
