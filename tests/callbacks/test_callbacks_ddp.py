"""Two processes on CPU: the callbacks log the values one process computes on the same held-out batches."""

import json

import lightning as L
import pytest
import torch

from conftest import tiny_modular, tiny_module, trainer_kwargs
from lightning_icl.callbacks import CircuitOverlap, ConceptDecodability, ConceptPatching, HeadAblation, ICLCurves


def validate(tmp_path, devices):
    torch.manual_seed(0)
    data = tiny_modular(num_eval_batches=4)
    module = tiny_module(data)
    callbacks = [
        ConceptDecodability(k=5, num_batches=4),
        HeadAblation(num_batches=4),
        ICLCurves(by_concept=True),
        CircuitOverlap(families={"id": 0, "ood": 2}, num_batches=2),
        ConceptPatching(num_batches=4),
    ]
    extra = dict(devices=2, strategy="ddp_spawn") if devices == 2 else {}
    trainer = L.Trainer(**{**trainer_kwargs(tmp_path, logger=False, limit_val_batches=4, callbacks=callbacks), **extra})
    trainer.validate(module, data, verbose=False)
    # read what rank 0 wrote: with spawn, the callbacks in this process never ran
    return {
        name: json.loads((tmp_path / f"{name}.jsonl").read_text().splitlines()[-1])
        for name in ("decodability", "ablation", "curves", "circuits", "patching")
    }


@pytest.mark.slow
def test_callbacks_under_ddp_equal_one_process(tmp_path):
    single = validate(tmp_path / "one", 1)
    double = validate(tmp_path / "two", 2)
    assert double["decodability"]["num_points"] == single["decodability"]["num_points"] == 4 * 16
    assert double["decodability"]["cd"] == pytest.approx(single["decodability"]["cd"], abs=1e-6)
    assert double["decodability"]["cd_per_concept_at_peak"] == pytest.approx(
        single["decodability"]["cd_per_concept_at_peak"]
    )
    for row_a, row_b in zip(double["ablation"]["loss_effect"], single["ablation"]["loss_effect"], strict=True):
        assert row_a == pytest.approx(row_b, abs=1e-5)
    assert double["ablation"]["clean_acc"] == pytest.approx(single["ablation"]["clean_acc"])
    for split, curves in single["curves"]["splits"].items():
        assert double["curves"]["splits"][split]["loss"] == pytest.approx(curves["loss"], abs=1e-5)
        by_concept = double["curves"]["splits"][split]["loss_by_concept"]
        assert by_concept.keys() == curves["loss_by_concept"].keys()
        for concept, curve in curves["loss_by_concept"].items():
            assert by_concept[concept] == pytest.approx(curve, abs=1e-5)
    for family, effects in single["circuits"]["effects"].items():
        for row_a, row_b in zip(double["circuits"]["effects"][family], effects, strict=True):
            assert row_a == pytest.approx(row_b, abs=1e-5)
    assert double["circuits"]["jaccard"] == single["circuits"]["jaccard"]
    assert double["patching"]["count"] == single["patching"]["count"] == 2 * 16
    for key in ("loss/clean", "loss/own", "loss/other", "loss/zero_shot_patched", "prob/own"):
        assert double["patching"][key] == pytest.approx(single["patching"][key], abs=1e-6)
    for row_a, row_b in zip(double["patching"]["fv_effect"], single["patching"]["fv_effect"], strict=True):
        assert row_a == pytest.approx(row_b, abs=1e-6)
