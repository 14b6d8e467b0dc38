"""Figures are drawn in one module, on Figure objects, without touching the user's matplotlib backend."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lightning_icl as icl
from lightning_icl import plotting

PACKAGE = Path(icl.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names (conditional and local imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_plotting_module_imports_matplotlib():
    importers = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(name.split(".")[0] == "matplotlib" for name in imported_modules(path))
    )
    assert importers == ["plotting.py"]


@pytest.mark.parametrize("backend", ["svg", "pdf"])
def test_importing_and_drawing_keep_the_users_backend(tmp_path, backend):
    # a fresh interpreter: this one's matplotlib state is shared by every test. (torchmetrics imports
    # pyplot, which is harmless: importing it selects no backend.)
    script = textwrap.dedent(f"""
        import matplotlib
        matplotlib.use({backend!r})
        import lightning_icl, lightning_icl.cli, lightning_icl.report
        from lightning_icl import plotting, records
        records.write_metrics_csv({str(tmp_path / "metrics.csv")!r}, {{"train/loss": [(1, 2.0), (2, 1.5)],
                                  "val/id_seen/acc": [(2, 0.4)]}})
        written = lightning_icl.report.write_fit_report({str(tmp_path)!r})
        assert written, "nothing drawn"
        plotting.save(plotting.heatmap([[0.1, -0.2]], "effect", "nats", symmetric=True), {str(tmp_path / "h.png")!r})
        assert matplotlib.get_backend() == {backend!r}, matplotlib.get_backend()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "training_curves.png").stat().st_size > 0 and (tmp_path / "h.png").stat().st_size > 0


def test_figures_read_on_fixed_scales_with_their_baselines():
    """Bounded quantities on [0, 1], chance drawn, key classes named: figures compare across runs."""
    cd = {"step": 5, "cd": [0.3, 0.6], "num_points": 32, "k": 5, "concepts": [0, 1, 2, 3], "peak_layer": 1,
          "chance": 0.25, "cd_interval": [[0.2, 0.4], [0.5, 0.7]], "cd_permutation": [0.25, 0.24],
          "cd_permutation_high": [0.33, 0.32]}  # fmt: skip
    fig = plotting.decodability_figure([cd, {**cd, "step": 10}])
    layers, over = fig.axes[0], fig.axes[1]
    assert layers.get_ylim() == (0, 1.02) and any(tuple(line.get_ydata()) == (0.25, 0.25) for line in layers.lines)
    assert over.images[0].get_clim() == (0.0, 1.0)
    attention = {"step": 5, "max_prob": [[0.5, 0.2]], "class_mass": [[[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]],
                 "class_names": ["x", "y", "z"]}  # fmt: skip
    fig = plotting.attention_figure(attention)
    titles = [ax.get_title() for ax in fig.axes]
    assert {"mass on x keys", "mass on y keys", "mass on z keys", "max prob"} <= set(titles)
    assert all(ax.images[0].get_clim() == (0.0, 1.0) for ax in fig.axes if ax.images)
    assert [t.get_text() for t in fig.axes[0].texts] == ["0.5", "0.2"]  # small grids print their values
    # a loss effect is read against zero: a diverging scale centred there, even when all are positive
    effects = {"step": 5, "loss_effect": [[0.2, 1.3]], "loss_effect_estimate": [[0.25, 1.1]], "method": "integrated",
               "steps": 2, "mode": "mean"}  # fmt: skip
    assert icl.HeadAblation(mode="mean").figure(effects).axes[0].images[0].get_clim() == pytest.approx((-1.3, 1.3))
    assert icl.HeadAttribution().figure(effects).axes[0].images[0].get_clim() == pytest.approx((-1.1, 1.1))


def test_save_writes_a_figure_and_skips_a_missing_one(tmp_path):
    fig = plotting.keep_frequency_figure({"frequency": [[1.0, 0.5]], "core": [[0, 0]], "runs": [{}, {}]})
    assert plotting.save(fig, str(tmp_path / "core.png")) == str(tmp_path / "core.png")
    assert plotting.save(None, str(tmp_path / "none.png")) is None and not (tmp_path / "none.png").exists()


def test_patching_heatmap_is_centred_on_zero_as_every_loss_effect():
    record = {"step": 3, "layers": [0, 1], "loss/clean": 1.0, "loss/own": [1.2, 1.1], "loss/other": [1.5, 1.4],
              "fv_effect": [[0.2, 0.5], [0.1, 0.05]]}  # fmt: skip
    fig = plotting.patching_figure(record)
    image = fig.axes[1].images[0]
    assert image.get_clim() == pytest.approx((-0.5, 0.5)) and image.get_cmap().name == "RdBu_r"
