"""``docs/tour.py`` runs end to end on the package under test and prints what each step found."""

from __future__ import annotations

import logging
import re
import runpy
from pathlib import Path

import pytest

TOUR = Path(__file__).resolve().parents[1] / "docs" / "tour.py"


def numbers(pattern: str, text: str) -> tuple[float, ...]:
    match = re.search(pattern, text)
    assert match, f"no line matches {pattern!r} in:\n{text}"
    return tuple(float(g) for g in match.groups())


@pytest.mark.slow
def test_tour_runs_and_reports_each_step(capsys):
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level  # the tour quiets Lightning's messages; the rest of the suite keeps them
    try:
        runpy.run_path(str(TOUR), run_name="__main__")  # in-process: the lightning_icl under test
    finally:
        logger.setLevel(level)
    printed = capsys.readouterr().out
    lines = printed.splitlines()

    # every step prints its header, then a result line with numbers in it; a summary closes the tour
    for step in range(1, 8):
        header = next((i for i, line in enumerate(lines) if line.startswith(f"[{step}/7]")), None)
        assert header is not None, f"step {step} printed no header:\n{printed}"
        result = lines[header + 1] if header + 1 < len(lines) else ""
        assert result.startswith("  ") and re.search(r"\d", result), f"step {step} printed no result:\n{printed}"
    assert lines[-1].startswith("Summary:")

    # the trained model learns in context: on its tasks the last answer beats the first
    first, last = numbers(r"id_seen\s+accuracy: first shot ([\d.]+) -> last shot ([\d.]+)", printed)
    assert 0 <= first < last <= 1

    # the ablation names heads the model has, the most important one mattering at least as much
    n_layers, n_heads = numbers(r"(\d+) layers x (\d+) heads", printed)
    most = numbers(r"most important head L(\d+)H(\d+) ([+-][\d.]+)", printed)
    least = numbers(r"least important L(\d+)H(\d+) ([+-][\d.]+)", printed)
    for layer, head, _ in (most, least):
        assert 0 <= layer < n_layers and 0 <= head < n_heads
    assert most[2] >= least[2]

    # decodability is a rate, one per layer, and chance lies strictly between 0 and 1
    line = next(line for line in lines if line.startswith("  decodability"))
    values = [float(v) for v in re.findall(r"layer \d+ ([\d.]+)", line)]
    assert len(values) == n_layers and all(0 <= v <= 1 for v in values)
    (chance,) = numbers(r"chance ([\d.]+)", line)
    assert 0 < chance < 1
