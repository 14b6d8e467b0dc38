"""Named hook points: the one way to read or replace an activation.

A :class:`HookPoint` is an identity module placed where an activation is read or written,
so its dotted name in the model (``blocks.0.attn.hook_z``) names the activation. A hook is a
function of the activation that returns ``None`` (read only) or a tensor of the same shape that
replaces it downstream. Hooks are registered for one call with ``with model.hooks({...}):``
(removed on exit, also when the forward raises) or kept with :func:`add_hooks`, whose
:class:`HookHandles` the caller removes. With nothing registered a hook point costs one
module call that returns its input.

Adapters for models the package did not build expose the same names onto those models' own
modules (:class:`~lightning_icl.adapters.HookAdapter`), so code written against hook-point names
runs on both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

HookFn = Callable[[Tensor], Tensor | None]
"""Reads an activation; returns ``None`` to leave it, or a tensor that replaces it."""

Hooks = Mapping[str, HookFn | Sequence[HookFn]]
"""Hook-point name to one hook or several, run in order (each sees the previous one's result)."""


class HookPoint(nn.Module):
    """An identity module: the place a named activation can be hooked."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def add_hook(self, fn: HookFn) -> RemovableHandle:
        """Run ``fn`` on the activation in every forward until the handle is removed."""
        return self.register_forward_hook(lambda module, args, output: fn(output))


class HookHandles:
    """The registrations of one :func:`add_hooks` call; :meth:`remove` undoes them all."""

    def __init__(self, handles: Sequence[RemovableHandle] = ()) -> None:
        self.handles = list(handles)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def check_hook_names(names: Sequence[str] | Mapping[str, object], valid: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``hooks`` and listing the valid names for an unknown hook point."""
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(f"hooks: unknown hook point(s) {unknown}; the hook points are {list(valid)}")


def add_hooks(hooks: Hooks, registrars: Mapping[str, Callable[[HookFn], RemovableHandle]]) -> HookHandles:
    """Register every hook of ``hooks`` through the registrar of its hook point's name.

    The names are checked before anything is registered, so an unknown one leaves no hook behind.
    """
    check_hook_names(hooks, list(registrars))
    handles = HookHandles()
    try:
        for name, fns in hooks.items():
            for fn in (fns,) if callable(fns) else fns:
                handles.handles.append(registrars[name](fn))
    except BaseException:
        handles.remove()
        raise
    return handles


@contextmanager
def hooks_for_call(hooks: Hooks, registrars: Mapping[str, Callable[[HookFn], RemovableHandle]]) -> Iterator[None]:
    """``hooks`` registered for the body of the ``with`` only (nothing is done for none)."""
    if not hooks:
        yield
        return
    handles = add_hooks(hooks, registrars)
    try:
        yield
    finally:
        handles.remove()


def merge_hooks(*groups: Hooks) -> dict[str, list[HookFn]]:
    """One mapping from several, the hooks of a name kept in the order given."""
    merged: dict[str, list[HookFn]] = {}
    for group in groups:
        for name, fns in group.items():
            merged.setdefault(name, []).extend((fns,) if callable(fns) else fns)
    return merged


class HookedModule(nn.Module):
    """A module whose :class:`HookPoint` submodules are reachable by their dotted names."""

    def hook_points(self) -> dict[str, HookPoint]:
        """Every hook point by name, in module order (e.g. ``blocks.0.attn.hook_z``)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, HookPoint)}

    def hook_registrars(self) -> dict[str, Callable[[HookFn], RemovableHandle]]:
        """Per hook-point name, the function that registers a hook there (found once: the modules do not
        change after construction, and a capture registers its hooks every forward)."""
        registrars = self.__dict__.get("_hook_registrars")
        if registrars is None:
            registrars = {name: point.add_hook for name, point in self.hook_points().items()}
            self.__dict__["_hook_registrars"] = registrars
        return registrars

    def add_hooks(self, hooks: Hooks) -> HookHandles:
        """Register ``hooks`` until the returned handles are removed."""
        return add_hooks(hooks, self.hook_registrars())

    def hooks(self, hooks: Hooks):
        """``with model.hooks({"blocks.0.attn.hook_z": fn}): ...``: ``hooks`` for the body only."""
        return hooks_for_call(hooks, self.hook_registrars() if hooks else {})
