"""The examples in the package's docstrings run and print what they say (``torch`` is in scope)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import lightning_icl


def _modules() -> list[str]:
    names = [lightning_icl.__name__]
    for info in pkgutil.walk_packages(lightning_icl.__path__, prefix="lightning_icl."):
        names.append(info.name)
    return sorted(names)


MODULES = _modules()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, verbose=False
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} fail"


def test_examples_exist_where_users_start():
    """The modules a newcomer reads first carry examples, so the doctest run covers something."""
    finder = doctest.DocTestFinder()
    counted = {}
    for name in ("lightning_icl.metrics.functional", "lightning_icl.pruning.core", "lightning_icl.tasks.modular"):
        module = importlib.import_module(name)
        counted[name] = sum(len(t.examples) for t in finder.find(module))
    assert all(n > 0 for n in counted.values()), counted
