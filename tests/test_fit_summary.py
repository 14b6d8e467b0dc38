"""The lines ``lightning-icl fit`` ends with: what the run found, from hand-made records."""

import time
from types import SimpleNamespace

import torch

import lightning_icl as icl
from lightning_icl.report import callback_histories, fit_summary

LAST_EVAL = {
    "val/id_seen/acc": 0.9,
    "val/id_seen/acc_shot0": 0.31,
    "val/id_seen/acc_last": 0.99,
    "val/id_seen/loss": 0.2,
    "val/id_seen/loss_shot0": 1.3,
    "val/id_seen/loss_last": 0.03,
    "val/ood_unseen/acc": 0.15,
    "val/ood_unseen/acc_shot0": 0.14,
    "val/ood_unseen/acc_last": 0.17,
}

ABLATION = {"step": 1000, "mode": "mean", "loss_effect": [[0.1, 0.0, 0.3, 0.2], [0.05, 1.25, 0.0, 0.4]]}
ATTRIBUTION = {  # ranks L1H1 second, below L1H3
    "step": 1000,
    "loss_effect_estimate": [[0.1, 0.0, 0.3, 0.2], [0.05, 0.9, 0.0, 1.1]],
    "rank_agreement": 0.81,
}
DECODABILITY = {
    "step": 1000,
    "cd": [0.29, 0.66],
    "peak_layer": 1,
    "peak": 0.66,
    "chance": 0.25,
    "cd_permutation_high": [0.30, 0.31],
    "cd_by_shot": [[0.2, 0.25, 0.29], [0.21, 0.5, 0.66]],
}
ATTENTION = {
    "step": 1000,
    "class_names": ["x", "y", "z"],
    "class_mass": [
        [[0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.4, 0.3, 0.3], [0.7, 0.2, 0.1]],
        [[0.3, 0.3, 0.4], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]],
    ],
    "previous_token": [[0.1, 0.2, 0.9, 0.3], [0.1, 0.1, 0.2, 0.1]],
    "entropy": [[1.0, 0.5, 0.8, 0.9], [1.1, 1.2, 0.3, 1.0]],
}
HISTORIES = {
    "ablation": [{**ABLATION, "step": 800}, ABLATION],  # the last record counts
    "attribution": [ATTRIBUTION],
    "decodability": [DECODABILITY],
    "attention": [ATTENTION],
}
SECONDS = {"ConceptDecodability": 2.0, "HeadAblation": 1.0, "HeadAttribution": 3.0, "AttentionStatistics": 0.5}


def test_every_finding_has_its_line_naming_the_head_layer_and_accuracies():
    lines = fit_summary(LAST_EVAL, HISTORIES, SECONDS, fit_seconds=65.0)
    assert len(lines) == 5 and all(len(line) < 110 for line in lines), lines
    accuracy, heads, decodability, attention, cost = lines
    assert "id_seen 0.31 -> 0.99" in accuracy and "ood_unseen 0.14 -> 0.17" in accuracy
    assert "head L1H1" in heads and "mean ablation: loss +1.250" in heads
    assert "attribution ranks it 2nd of 8" in heads and "Spearman 0.81" in heads
    assert "layer 1: 0.66" in decodability and "shuffled labels 0.31" in decodability and "chance 0.25" in decodability
    assert "0.21 at the first shot" in decodability
    assert "x L0H3 (0.70)" in attention and "y L0H1 (0.60)" in attention and "z L1H1 (0.60)" in attention
    assert "previous-token head L0H2 (0.90)" in attention
    assert cost == "callbacks: 6.5 s of 65.0 s (10.0%), most in HeadAttribution (3.0 s)"


def test_a_line_is_left_out_when_its_callback_did_not_run():
    assert fit_summary(LAST_EVAL, {}) == ["accuracy, first -> last shot: id_seen 0.31 -> 0.99, ood_unseen 0.14 -> 0.17"]
    assert fit_summary({}, {}, {}, 10.0) == []
    only = fit_summary({}, {"decodability_probe": [DECODABILITY]})  # a tagged callback's records
    assert len(only) == 1 and only[0].startswith("concept decodability peaks at layer 1")
    # ablation alone: no attribution rank; attribution alone names its own top head
    (heads,) = fit_summary({}, {"ablation": [ABLATION]})
    assert "L1H1" in heads and "attribution" not in heads
    (heads,) = fit_summary({}, {"attribution": [ATTRIBUTION]})
    assert heads == "most important head by attribution: L1H3 (estimated loss effect +1.100)"
    # no Spearman when the two records are of different steps
    (heads,) = fit_summary({}, {"ablation": [ABLATION], "attribution": [{**ATTRIBUTION, "step": 900}]})
    assert "ranks it 2nd of 8" in heads and "Spearman" not in heads


def test_partial_records_give_shorter_lines():
    bare = {"step": 1, "cd": [0.4, 0.5], "peak_layer": 1, "peak": 0.5}  # no baselines, one position
    (line,) = fit_summary({}, {"decodability": [bare]})
    assert line == "concept decodability peaks at layer 1: 0.50"
    (line,) = fit_summary({}, {"attention": [{"step": 1, "entropy": ATTENTION["entropy"]}]})
    assert line == "attention: sharpest head L1H2 (entropy 0.30 nats)"
    regression = {"val/id/mse": 0.5, "val/id/mse_shot0": 1.2, "val/id/mse_last": 0.1}
    assert fit_summary(regression, {}) == ["squared error, first -> last shot: id 1.20 -> 0.10"]
    (line,) = fit_summary({}, {}, {"HeadAblation": 1.5})  # no fit time: the callbacks' own
    assert line == "callbacks: 1.5 s"
    nan_head = {**ABLATION, "loss_effect": [[None, 0.2], [0.1, 0.0]]}  # a non-finite effect is written as null
    assert "head L0H1" in fit_summary({}, {"ablation": [nan_head]})[0]


class _Sleepy(icl.ICLCallback):
    name = "sleepy"

    def measure(self, trainer, pl_module):
        time.sleep(0.01)
        return {"value": 1.0}


def test_callbacks_count_their_seconds_and_only_those_that_ran_are_listed(tmp_path):
    ran, idle = _Sleepy(), icl.HeadAblation()
    trainer = SimpleNamespace(
        global_step=5, state=SimpleNamespace(fn="fit"), log_dir=str(tmp_path), default_root_dir=str(tmp_path),
        is_global_zero=False,
    )  # fmt: skip
    ran._run(trainer, torch.nn.Linear(1, 1))
    assert ran.seconds >= 0.01 and ran.history == [{"step": 5, "value": 1.0}]
    histories, seconds = callback_histories([ran, idle, object()])
    assert histories == {"sleepy": ran.history} and list(seconds) == ["_Sleepy"]
