"""The callbacks on Hugging Face models the package did not build (random init, no download)."""

import lightning as L
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import tiny_modular, trainer_kwargs
from lightning_icl.callbacks import AttentionStatistics, ConceptDecodability, HeadAblation, HeadAttribution, ICLCurves


def gpt2():
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=7, n_positions=32, bos_token_id=0, eos_token_id=0)
    )


def llama():
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=7, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


class UserLM(L.LightningModule):
    """Someone else's module: a Hugging Face model, its own loss, its own validation."""

    def __init__(self, make):
        super().__init__()
        self.model = make()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_loss", self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_callbacks_on_a_users_hf_model(tmp_path, make):
    torch.manual_seed(0)
    callbacks = [
        ConceptDecodability(k=5, num_batches=2),
        HeadAblation(mode="resample"),
        HeadAttribution(every_n_steps=5),
        AttentionStatistics(every_n_steps=5),
        ICLCurves(num_batches=1),
    ]
    data = tiny_modular(batch_format="causal_lm")
    with pytest.warns(UserWarning, match="AttentionStatistics needs the fused attention"):
        L.Trainer(**trainer_kwargs(tmp_path, max_steps=10, logger=False, callbacks=list(callbacks))).fit(
            UserLM(make), data
        )
    cd, ablation, attribution, attention, curves = callbacks
    assert [r["step"] for r in cd.history] == [10] and len(cd.history[0]["cd"]) == 2
    assert cd.history[0]["num_points"] == 32
    assert torch.tensor(ablation.history[0]["loss_effect"]).shape == (2, 2)
    assert [r["step"] for r in attribution.history] == [5, 10]
    assert attention.history == []  # said so, recorded nothing
    assert set(curves.history[0]["splits"]) == {"id_seen", "id_unseen", "ood_seen", "ood_unseen"}
    assert len(curves.history[0]["splits"]["id_seen"]["acc"]) == 8  # one value per shot


def test_causal_lm_batches_score_the_same_answers(modular_data):
    batch = modular_data.train_sampler()(torch.Generator().manual_seed(0), 0)
    hf = batch.as_causal_lm()
    scored = hf["labels"] != -100
    # labels[t + 1] is scored exactly where the ICL batch scores position t
    assert torch.equal(scored[:, 1:], batch.mask) and not scored[:, 0].any()
    assert torch.equal(hf["input_ids"][:, 1:][batch.mask], batch.targets[batch.mask])
