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


def test_the_package_root_exports_what_a_study_starts_from():
    import lightning_icl

    exported = lightning_icl.__all__
    assert exported == sorted(exported) and len(set(exported)) == len(exported)
    for name in exported:
        obj = getattr(lightning_icl, name)  # every listed name is there
        assert (obj.__doc__ or "").strip(), f"lightning_icl.{name} has no docstring"
    # what the README's examples import from the root, and the low-level pieces that stay in their modules
    for name in ("ICLModule", "ICLCallback", "adapter_for", "ICLModuleAdapter", "ablation_effects", "load_trained"):
        assert name in exported
    for name in ("HardConcrete", "keep_frequency", "heuristic_core", "effective_size"):
        assert name not in exported and hasattr(lightning_icl.pruning, name)
