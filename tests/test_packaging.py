"""The distribution ships every subpackage (an editable install would hide a missing one)."""

import os
import tomllib

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_every_subpackage_is_listed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {"lightning_icl.kernels"}
    for folder, _, files in os.walk(os.path.join(ROOT, "lightning_icl")):
        if "__init__.py" in files:
            found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
    assert found == listed
