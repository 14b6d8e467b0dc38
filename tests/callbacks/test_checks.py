"""Callbacks say what cannot work when the run starts, not at the first measurement hours in."""

import lightning as L
import pytest
import torch

from conftest import tiny_modular, tiny_module, trainer_kwargs
from lightning_icl.callbacks import CircuitOverlap, ConceptDecodability, ConceptPatching, HeadAblation


class Steps(L.Callback):
    """Counts the training steps that ran."""

    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args):
        self.steps += 1


class NoAdapter(L.LightningModule):
    """A module the package cannot find heads in."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(torch.ones(1, 2)).sum()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "module, callback, message",
    [
        (NoAdapter, lambda: HeadAblation(), "no adapter for NoAdapter"),
        (
            None,
            lambda: ConceptPatching(layers=[7], num_batches=2),
            r"layers \[7\] out of range for a model with 2 layers",
        ),
        (None, lambda: ConceptDecodability(k=10000, num_batches=2), "k=10000 neighbours but the 2 held-out batch"),
        (None, lambda: HeadAblation(dataloader_idx=9), "dataloader_idx=9 but there are 4 validation loaders"),
        (None, lambda: CircuitOverlap(), "needs at least two task families"),
    ],
    ids=["no-adapter", "patching-layers", "decodability-k", "loader-index", "one-family"],
)
def test_a_callback_that_cannot_run_fails_before_the_first_step(tmp_path, module, callback, message):
    data = tiny_modular()
    steps = Steps()
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=5, logger=False, callbacks=[callback(), steps]))
    with pytest.raises(ValueError, match=message):
        trainer.fit(module() if module else tiny_module(data), data)
    assert steps.steps == 0


def test_the_checks_run_for_a_stand_alone_validate_too(tmp_path):
    data = tiny_modular()
    trainer = L.Trainer(
        **trainer_kwargs(tmp_path, logger=False, callbacks=[ConceptPatching(layers=[-3], num_batches=2)])
    )
    with pytest.raises(ValueError, match=r"layers \[-3\] out of range"):
        trainer.validate(tiny_module(data), data)


def test_concept_patching_on_a_hugging_face_model_with_causal_lm_batches(tmp_path):
    """Zero-shot and shuffled prompts built from Hugging Face dict batches, not only from ICLBatch."""
    from test_hf_models import UserLM, gpt2

    torch.manual_seed(0)
    patching = ConceptPatching(num_batches=2)
    data = tiny_modular(batch_format="causal_lm")
    L.Trainer(**trainer_kwargs(tmp_path, max_steps=10, logger=False, callbacks=[patching])).fit(UserLM(gpt2), data)
    record = patching.history[-1]
    assert record["step"] == 10 and len(record["loss/own"]) == 2 and len(record["loss/zero_shot_patched"]) == 2
    assert record["loss/zero_shot"] > 0 and record["count"] > 0
    effects = torch.tensor(record["fv_effect"])
    assert effects.shape == (2, 2) and torch.isfinite(effects).all()


def test_causal_lm_prompts_match_the_icl_batch_prompts():
    from lightning_icl.interventions.patching import shuffle_answers, zero_shot

    batch = tiny_modular().val_dataloader()[0].dataset[0]
    lm = zero_shot(batch.as_causal_lm())
    icl = zero_shot(batch)
    assert torch.equal(lm["input_ids"][:, :-1], icl.inputs) and torch.equal(lm["input_ids"][:, -1], icl.targets[:, -1])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    shuffled_lm, shuffled = shuffle_answers(batch.as_causal_lm(), g1), shuffle_answers(batch, g2)
    assert torch.equal(shuffled_lm["input_ids"], shuffled.as_causal_lm()["input_ids"])
    assert torch.equal(shuffled_lm["labels"], shuffled.as_causal_lm()["labels"])
    with pytest.raises(ValueError, match="prompts are built from an ICLBatch or a causal-LM dict"):
        zero_shot({"inputs": batch.inputs})
