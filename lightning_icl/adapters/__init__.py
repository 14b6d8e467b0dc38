"""Adapters give the callbacks a uniform view of any model: forward with capture and gates, scores."""

from __future__ import annotations

import weakref

import lightning as L

from .base import Adapter, Scored
from .hooks import HFCausalLMAdapter, HookAdapter
from .icl import ICLModuleAdapter

_ADAPTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_for(module: L.LightningModule) -> Adapter:
    """The adapter for ``module``.

    Order: an ``icl_adapter()`` method on the module (for any model: return e.g. a
    ``HookAdapter`` naming its output projections and blocks); the package's ``ICLModule``;
    a Hugging Face GPT-2 or Llama-style model found as ``module.model``.
    """
    if module in _ADAPTERS:  # one adapter per module, shared by every callback
        return _ADAPTERS[module]
    _ADAPTERS[module] = adapter = _make_adapter(module)
    return adapter


def _make_adapter(module: L.LightningModule) -> Adapter:
    from lightning_icl.module import ICLModule

    if hasattr(module, "icl_adapter"):
        return module.icl_adapter()
    if isinstance(module, ICLModule):
        return ICLModuleAdapter(module)
    model = getattr(module, "model", None)
    if model is not None and hasattr(model, "config"):
        return HFCausalLMAdapter.from_model(module, model)
    raise ValueError(
        f"no adapter for {type(module).__name__}: give it an `icl_adapter()` method returning a "
        "lightning_icl.adapters.HookAdapter, or keep a Hugging Face GPT-2/Llama model in `self.model`"
    )


__all__ = ["Adapter", "HFCausalLMAdapter", "HookAdapter", "ICLModuleAdapter", "Scored", "adapter_for"]
