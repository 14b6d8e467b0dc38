"""Peers for side-by-side benchmarks: the same capture done by another interpretability library.

TransformerLens 4.x (``pip install -e '.[bench]'``) is the peer here: a random-init
``TransformerBridge`` built by ``TransformerBridge.boot_native`` (no download, no Hugging Face
Hub access) with the shape of an :class:`~lightning_icl.ICLTransformer`, and its
``run_with_cache`` keeping, for every layer, what an ICL capture keeps and more: the attention
pattern, the per-head outputs z and the residual stream after the block.

Only :func:`transformerlens_model` and :func:`transformerlens_capture` import TransformerLens;
importing this module, :func:`transformerlens_available` and :func:`kept_bytes` do not, so a
benchmark can skip the peer cleanly where the extra is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

TL_DISTRIBUTION = "transformer-lens"
TL_MIN_VERSION = (4, 3)
_INSTALL_HINT = "pip install -e '.[bench]'"

# Hook names of TransformerLens 4.x on a boot_native model, per layer ("{layer}" filled in):
# the attention pattern [B, H, T, T], the per-head outputs z [B, T, H, Dh] (an alias of the
# input of the output projection) and the residual stream after the block [B, T, D] (an alias
# of the block's hook_out).
TL_HOOKS = {
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "z": "blocks.{layer}.attn.hook_z",
    "resid_post": "blocks.{layer}.hook_resid_post",
}

_POSITIONAL = {"rope": "rotary", "learned": "standard"}


def transformerlens_available() -> bool:
    """Whether TransformerLens >= 4.3 is installed.

    Reads the installed distribution's metadata and looks the package up on the import path;
    it imports nothing, so it has no side effects (TransformerLens itself takes seconds to
    import and pulls in ``transformers``).
    """
    try:
        version = importlib.metadata.version(TL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    if importlib.util.find_spec("transformer_lens") is None:
        return False
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is not None and (int(match[1]), int(match[2])) >= TL_MIN_VERSION


def _transformer_bridge() -> Any:
    """The ``TransformerBridge`` class, or an ``ImportError`` that says how to install it."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as err:
        raise ImportError(
            f"the TransformerLens peer needs transformer-lens >= {'.'.join(map(str, TL_MIN_VERSION))} "
            f"(TransformerBridge.boot_native): {_INSTALL_HINT}"
        ) from err
    if not hasattr(TransformerBridge, "boot_native"):
        raise ImportError(
            f"the installed transformer-lens has no TransformerBridge.boot_native; "
            f"version >= {'.'.join(map(str, TL_MIN_VERSION))} is needed: {_INSTALL_HINT}"
        )
    return TransformerBridge


def transformerlens_model(
    *,
    n_layers: int,
    d_model: int,
    n_heads: int,
    d_mlp: int,
    vocab_size: int,
    seq_len: int,
    positional: str = "rope",
    bias: bool = False,
    tie_embeddings: bool = True,
    init_std: float = 0.02,
    seed: int | None = 0,
) -> Any:
    """A random-init TransformerLens ``TransformerBridge`` shaped like ``ICLTransformer``.

    Built by ``TransformerBridge.boot_native`` (TransformerLens's own small decoder, no download),
    in eval mode, fp32, on the CPU. With the defaults it has exactly the parameters of
    ``ICLTransformer(vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
    d_mlp=d_mlp, max_seq_len=seq_len)``, laid out the same way, and the same init.

    What matches ICLTransformer: pre-LN blocks (LayerNorm, eps 1e-5), a ReLU MLP of width
    ``d_mlp``, a final LayerNorm, causal attention scaled by ``1/sqrt(d_head)``,
    ``d_head = d_model / n_heads``; ``positional="rope"`` gives rotary embeddings on every
    channel of each head (base 10000), ``"learned"`` a learned absolute embedding of
    ``seq_len`` rows; normal init of std ``init_std`` with the output projections of attention
    and MLP scaled by ``1/sqrt(2 n_layers)`` (TransformerLens's ``gpt2`` init mode with
    ``initializer_range=init_std``), LayerNorm weights 1.

    Biases and tying: ``boot_native`` always builds biases in q, k, v, o, both MLP layers and
    the LayerNorms, and an untied unembedding. With ``bias=False`` (the ICLTransformer default)
    those biases are removed after the build (set to ``None`` on the wrapped ``nn.Linear`` /
    ``nn.LayerNorm``; they are zero at init, so the function is unchanged, only the bias adds
    and parameters go). With ``tie_embeddings=True`` (the default, as in ICLTransformer) the
    unembedding shares the token embedding's weight. ``bias=True, tie_embeddings=False`` keeps
    TransformerLens's stock layout (ICLTransformer's ``bias=True`` has no biases in the
    unembedding either, so only the weights are then comparable).

    What differs, and cannot be changed through ``boot_native``:

    - q, k and v are three ``nn.Linear`` (three matmuls) where ICLTransformer has one fused
      ``qkv`` projection: same parameters, split differently.
    - Rotary embeddings rotate adjacent channel pairs ``(2i, 2i+1)``; ICLTransformer rotates
      halves ``(i, i + d_head/2)``. The two differ by a fixed permutation of each head's q/k
      channels, so they compute the same family of functions at the same cost.
    - Attention is eager: ``q @ k^T``, masked softmax, ``pattern @ v``, with the ``[B, H, T, T]``
      pattern materialised on every forward (it is what ``hook_pattern`` sees), never
      ``scaled_dot_product_attention``.
    - LayerNorm is computed in Python by TransformerLens's ``NormalizationBridge`` (mean,
      variance, divide, with hooks between) rather than by ``F.layer_norm``.
    - ``positional="none"`` has no TransformerLens counterpart (``boot_native`` knows only
      ``"standard"`` and ``"rotary"``) and raises ``ValueError``.

    Args:
        n_layers, d_model, n_heads, d_mlp: sizes, as in ICLTransformer.
        vocab_size: number of tokens (token models only; TransformerLens has no vector read-in).
        seq_len: longest sequence (``n_ctx``; rotary tables and learned positions are this long).
        positional: ``"rope"`` or ``"learned"``.
        bias: keep TransformerLens's biases (``False``: remove them, as ICLTransformer has none).
        tie_embeddings: share the unembedding with the token embedding.
        init_std: std of the normal init.
        seed: seed of the init (TransformerLens seeds its own generator; the global RNG is left
            alone); ``None`` draws from the global RNG.

    Raises:
        ImportError: transformer-lens >= 4.3 is not installed (``pip install -e '.[bench]'``).
        ValueError: a size that does not divide, or a positional kind TransformerLens lacks.
    """
    if positional not in _POSITIONAL:
        raise ValueError(
            f"positional must be one of {tuple(_POSITIONAL)} for the TransformerLens peer "
            f"(boot_native has no model without positions), got {positional!r}"
        )
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    bridge_cls = _transformer_bridge()
    config = {
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "d_head": d_model // n_heads,
        "d_mlp": d_mlp,
        "d_vocab": vocab_size,
        "n_ctx": seq_len,
        "act_fn": "relu",
        "normalization_type": "LN",
        "positional_embedding_type": _POSITIONAL[positional],
        "rotary_base": 10000,
        "init_mode": "gpt2",
        "initializer_range": init_std,
        "seed": seed,
        "dtype": torch.float32,
    }
    model = bridge_cls.boot_native(config, device="cpu", dtype=torch.float32)
    if not bias:
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.LayerNorm) and module.bias is not None:
                module.bias = None
    if tie_embeddings:
        embed, unembed = model.embed.original_component, model.unembed.original_component
        if unembed.weight.shape != embed.weight.shape:
            raise ValueError(
                f"cannot tie an unembedding {tuple(unembed.weight.shape)} to an embedding {tuple(embed.weight.shape)}"
            )
        unembed.weight = embed.weight
    return model.eval()


def transformerlens_hook_names(model: Any) -> list[str]:
    """The hooks :func:`transformerlens_capture` keeps, for every layer of ``model``, checked to exist.

    Raises ``KeyError`` naming the missing hooks when the installed TransformerLens does not have
    them (a rename would otherwise make ``run_with_cache`` cache nothing, silently).
    """
    names = [pattern.format(layer=layer) for layer in range(model.cfg.n_layers) for pattern in TL_HOOKS.values()]
    missing = [name for name in names if name not in model.hook_dict]
    if missing:
        raise KeyError(f"hooks missing from this TransformerLens model (renamed in this version?): {missing}")
    return names


def transformerlens_capture(model: Any, tokens: Tensor) -> dict[str, Tensor]:
    """``model.run_with_cache`` keeping the attention pattern, z and residual stream of every layer.

    Per layer ``l``, the returned dict holds

    - ``blocks.l.attn.hook_pattern`` ``[B, H, T, T]``: the attention probabilities;
    - ``blocks.l.attn.hook_z`` ``[B, T, H, Dh]``: every head's output before the output
      projection (TransformerLens orders it position-major; ICLTransformer's heads are
      ``[B, H, T, Dh]``);
    - ``blocks.l.hook_resid_post`` ``[B, T, D]``: the residual stream after the block.

    The hooks are looked up on the model first (``KeyError`` if one is missing), the forward runs
    under ``torch.no_grad()``, and the cache is checked to hold exactly those hooks before it is
    returned as a plain ``dict`` (``AssertionError`` otherwise), so a hook that is renamed or stops
    firing fails loudly rather than caching nothing.

    Args:
        model: a model from :func:`transformerlens_model`.
        tokens: token ids ``[B, T]``, ``T`` at most the model's ``seq_len``.
    """
    names = transformerlens_hook_names(model)
    wanted = frozenset(names)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=wanted.__contains__, return_cache_object=False)
    cache = dict(cache)
    assert set(cache) == wanted, (
        f"run_with_cache kept {sorted(cache)}, expected {sorted(wanted)} "
        f"(missing {sorted(wanted - set(cache))}, extra {sorted(set(cache) - wanted)})"
    )
    return cache


def _tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in ``obj``: a tensor, mapping, list/tuple/set or dataclass, nested."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, list | tuple | set | frozenset):
        for value in obj:
            yield from _tensors(value)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, field.name))


def kept_bytes(tensors: Any) -> int:
    """Bytes of memory the tensors in ``tensors`` keep alive: the memory a capture holds on to.

    ``tensors`` may be a tensor, or a dict / list / tuple / set / dataclass (such as
    :class:`~lightning_icl.Capture`) of them, nested to any depth; other values are ignored.
    Each distinct storage counts once, at its full size: two views of one buffer (TransformerLens
    keeps some activations under two names) count once, and a small view of a large buffer
    counts the whole buffer, since that is what stays allocated.
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in _tensors(tensors):
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total
