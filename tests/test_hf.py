"""Hugging Face causal LMs on attn_implementation="lightning_icl" (tiny random configs, CPU, fp32)."""

import copy
import os
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from test_cli import shrunk
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

import lightning_icl.hf as hf
from conftest import tiny_modular, trainer_kwargs
from lightning_icl import AttentionStatistics, CaptureSpec, HFCausalLMModule
from lightning_icl.adapters import HFCausalLMAdapter
from lightning_icl.cli import main
from lightning_icl.config import OptimizerConfig

VOCAB, T = 11, 12
SMALL = dict(vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
LLAMA = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **SMALL)
GPT2 = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0)
NO_DROP = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)

FAMILIES = {
    "gpt2": lambda: GPT2Config(**GPT2, **NO_DROP),
    "gpt2_inverse_layer_idx": lambda: GPT2Config(**GPT2, **NO_DROP, scale_attn_by_inverse_layer_idx=True),
    "gpt2_unscaled": lambda: GPT2Config(**GPT2, **NO_DROP, scale_attn_weights=False),
    "llama_gqa": lambda: LlamaConfig(**LLAMA, num_key_value_heads=2),
    "qwen2_gqa": lambda: Qwen2Config(**LLAMA, num_key_value_heads=2),
    "mistral_window_ge_T": lambda: MistralConfig(**LLAMA, num_key_value_heads=1, sliding_window=T),
    "gemma_mqa": lambda: GemmaConfig(**LLAMA, num_key_value_heads=1, head_dim=16),
}


def pair(config):
    """The same random weights on "eager" and on "lightning_icl"."""
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="lightning_icl")
    ours.load_state_dict(eager.state_dict())
    assert (eager.config._attn_implementation, ours.config._attn_implementation) == ("eager", "lightning_icl")
    return eager, ours


def logits_and_grads(model, ids, mask=None):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    targets = ids.roll(-1, dims=1)
    F.cross_entropy(logits[keep], targets[keep]).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_equal_eager(family):
    eager, ours = pair(FAMILIES[family]())
    ids = torch.randint(1, VOCAB, (3, T), generator=torch.Generator().manual_seed(1))
    (le, ge), (lo, go) = logits_and_grads(eager, ids), logits_and_grads(ours, ids)
    torch.testing.assert_close(lo, le, atol=1e-5, rtol=1e-5)
    assert ge.keys() == go.keys()
    for name in ge:
        torch.testing.assert_close(go[name], ge[name], atol=1e-5, rtol=1e-5, msg=name)


def left_padded(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (batch, T), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(batch, T, dtype=torch.long)
    for row, pad in enumerate((0, 3, 7)[:batch]):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_logits_and_gradients_equal_eager(family):
    eager, ours = pair(FAMILIES[family]())
    ids, mask = left_padded()
    (le, ge), (lo, go) = logits_and_grads(eager, ids, mask), logits_and_grads(ours, ids, mask)
    keep = mask.bool()  # padding positions attend to nothing: the kernel gives zeros, eager a uniform mix
    torch.testing.assert_close(lo[keep], le[keep], atol=1e-5, rtol=1e-5)
    for name in ge:
        torch.testing.assert_close(go[name], ge[name], atol=1e-5, rtol=1e-5, msg=name)


def test_left_padded_statistics_equal_eager_patterns():
    eager, ours = pair(FAMILIES["llama_gqa"]())
    ids, mask = left_padded()
    patterns = [a.detach() for a in eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions]
    with torch.no_grad(), hf.record_attention(ours, stats=("entropy", "max_prob")) as rec:
        ours(input_ids=ids, attention_mask=mask)
    keep = mask.bool()[:, None, :].expand(-1, ours.config.num_attention_heads, -1)
    for layer, p in enumerate(patterns):
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        torch.testing.assert_close(rec.stats[layer]["entropy"][keep], entropy[keep], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rec.stats[layer]["max_prob"][keep], p.amax(-1)[keep], atol=1e-5, rtol=1e-5)
        assert torch.all(rec.stats[layer]["max_prob"][~keep] == 0)  # no key to attend: finite zeros


def test_the_mask_function_hands_a_key_padding_mask_or_none():
    _, mask = left_padded()
    got = hf.mask_function(3, T, T, attention_mask=mask.bool())
    assert got.shape == (3, T) and got.dtype == torch.bool and torch.equal(got, mask.bool())
    assert hf.mask_function(3, T, T, attention_mask=torch.ones(3, T, dtype=torch.bool)) is None
    assert hf.mask_function(3, T, T) is None
    assert hf.mask_function(3, 1, T, q_offset=T - 1).shape == (3, 1, 1, T)  # a KV cache: the exact 4-D mask


def test_set_attn_implementation_switches_a_built_model():
    eager, _ = pair(FAMILIES["llama_gqa"]())
    ids = torch.randint(1, VOCAB, (2, T))
    want = eager(input_ids=ids).logits
    eager.set_attn_implementation("lightning_icl")
    assert hf.uses_kernel(eager)
    with hf.record_attention(eager) as rec:
        got = eager(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert sorted(rec.stats) == [0, 1]


def test_from_pretrained_on_the_kernel(tmp_path):
    eager, _ = pair(FAMILIES["gpt2"]())
    eager.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="lightning_icl")
    assert hf.uses_kernel(loaded)
    ids = torch.randint(1, VOCAB, (2, T))
    torch.testing.assert_close(loaded(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def eager_patterns(model, ids):
    return [a.detach() for a in model(input_ids=ids, output_attentions=True).attentions]  # [B, H, T, T] per layer


@pytest.mark.parametrize("family", ["gpt2_inverse_layer_idx", "llama_gqa"])
def test_recorded_statistics_equal_eager_patterns(family):
    eager, ours = pair(FAMILIES[family]())
    ids = torch.randint(1, VOCAB, (3, T), generator=torch.Generator().manual_seed(2))
    patterns = eager_patterns(eager, ids)
    names = ("lse", "entropy", "max_prob", "same_label_mass")
    with torch.no_grad(), hf.record_attention(ours, stats=names, query_label=ids) as rec:
        ours(input_ids=ids)
        ours(input_ids=ids)
    assert len(rec.passes) == 2 and rec.stats is rec.passes[-1]
    first = rec.passes[0]
    same = ids[:, None, :, None] == ids[:, None, None, :]  # [B, 1, Tq, Tk]
    for layer, p in enumerate(patterns):
        st = first[layer]
        assert all(st[n].dtype == torch.float32 and st[n].shape == p.shape[:3] for n in names)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        torch.testing.assert_close(st["entropy"], entropy, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st["max_prob"], p.amax(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st["same_label_mass"], (p * same).sum(-1), atol=1e-5, rtol=1e-5)
    # lse, q, k and the model's own scale: exp(q k * scale - lse) is eager's pattern
    module = L.LightningModule()
    module.model = ours
    adapter = HFCausalLMAdapter.from_model(module, ours)
    assert adapter.native_stats
    _, cap = adapter.forward({"input_ids": ids}, capture=CaptureSpec(stats=("lse",), positions="all", qk=True))
    for layer, p in enumerate(patterns):
        scores = cap.q[layer] @ cap.k[layer].transpose(-1, -2) * cap.scale[layer]
        probs = torch.exp(scores - cap.stats[layer]["lse"][..., None]).tril()
        torch.testing.assert_close(probs, p, atol=1e-5, rtol=1e-5)
        assert cap.q[layer].shape[1] == cap.k[layer].shape[1] == adapter.n_heads  # keys expanded to query heads


def test_recorded_positions_are_the_full_rows_gathered():
    _, ours = pair(FAMILIES["llama_gqa"]())
    ids = torch.randint(1, VOCAB, (2, T))
    with torch.no_grad(), hf.record_attention(ours) as full:
        ours(input_ids=ids)
    with torch.no_grad(), hf.record_attention(ours, positions=[3, T - 1]) as some:
        ours(input_ids=ids)
    for layer in full.stats:
        for name, x in full.stats[layer].items():
            torch.testing.assert_close(some.stats[layer][name], x[:, :, [3, T - 1]])


def test_generation_falls_back_to_exact_attention_and_refuses_statistics():
    eager, ours = pair(FAMILIES["llama_gqa"]())
    ids = torch.randint(1, VOCAB, (2, 5))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))
    with hf.record_attention(ours) as _, pytest.raises(ValueError, match="use_cache=False"):
        ours.generate(ids, **kwargs)


# ---- what the kernel cannot do --------------------------------------------------------------
def model_on_kernel(config):
    return AutoModelForCausalLM.from_config(config, attn_implementation="lightning_icl")


@pytest.mark.parametrize(
    ("make", "train", "field"),
    [
        (lambda: Gemma2Config(**LLAMA, num_key_value_heads=2, head_dim=16), False, "attn_logit_softcapping"),
        (lambda: MistralConfig(**LLAMA, num_key_value_heads=2, sliding_window=4), False, "sliding_window"),
        (
            lambda: Qwen2Config(
                **LLAMA, num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=0
            ),
            False,
            "sliding_window / use_sliding_window",
        ),
        (lambda: LlamaConfig(**LLAMA, attention_dropout=0.1), True, "attention_dropout"),
        (lambda: GPT2Config(**GPT2, attn_pdrop=0.1), True, "attn_pdrop"),
        (lambda: LlamaConfig(**LLAMA, is_causal=False), False, "is_causal"),
    ],
    ids=["softcap", "mistral_window", "qwen2_window", "llama_dropout", "gpt2_dropout", "non_causal"],
)
def test_refusals_name_the_config_field(make, train, field):
    model = model_on_kernel(make()).train(train)
    with pytest.raises(ValueError, match=re.escape(f"config.{field}")):
        model(input_ids=torch.randint(1, VOCAB, (2, T)))
    with pytest.raises(ValueError, match=re.escape(f"config.{field}")):
        hf.check_config(model.config, seq_len=T, training=True)


def test_dropout_is_fine_in_eval_and_a_long_window_is_full_attention():
    model = model_on_kernel(LlamaConfig(**LLAMA, attention_dropout=0.1)).eval()
    model(input_ids=torch.randint(1, VOCAB, (2, T)))
    hf.check_config(MistralConfig(**LLAMA, sliding_window=T), seq_len=T)


def test_record_attention_refuses_a_model_not_on_the_kernel():
    eager, _ = pair(FAMILIES["gpt2"]())
    refused = pytest.raises(ValueError, match="needs a model on attn_implementation='lightning_icl', got 'eager'")
    with refused, hf.record_attention(eager):
        pass


def test_module_refuses_what_the_kernel_cannot_train():
    info = tiny_modular().task_info
    with pytest.raises(ValueError, match=r"config\.attn_pdrop=0\.1"):
        HFCausalLMModule(task=info, config=dict(model_type="gpt2", n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match="exactly one of config"):
        HFCausalLMModule(task=info)


def test_module_loads_a_local_pretrained_directory(tmp_path):
    info = tiny_modular().task_info
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    saved = AutoModelForCausalLM.from_config(LlamaConfig(**cfg, vocab_size=info.vocab_size))
    saved.save_pretrained(tmp_path)
    module = HFCausalLMModule(task=info, pretrained=str(tmp_path))
    assert hf.uses_kernel(module.model) and module.icl_adapter().native_stats
    torch.testing.assert_close(module.model.state_dict(), saved.state_dict())


# ---- training --------------------------------------------------------------------------------
TINY_LLAMA = dict(
    model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
)  # fmt: skip


def test_attention_statistics_on_a_hf_model_while_it_trains(tmp_path):
    torch.manual_seed(0)
    data = tiny_modular()
    module = HFCausalLMModule(
        task=data.task_info, config=TINY_LLAMA, optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2)
    )
    attention = AttentionStatistics(every_n_steps=5)
    L.Trainer(**trainer_kwargs(tmp_path, max_steps=10, callbacks=[attention])).fit(module, data)
    assert [r["step"] for r in attention.history] == [5, 10]
    record = attention.history[-1]
    assert set(record) >= {"lse", "entropy", "max_prob", "class_mass", "same_label_mass", "previous_token"}
    assert torch.tensor(record["entropy"]).shape == (2, 4)  # [L, H]: one value per query head
    assert torch.tensor(record["class_mass"]).shape == (2, 4, data.task_info.num_token_classes)
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "attention.jsonl").exists() and (run / "figures" / "attention.png").exists()
    assert (run / "icl_curves.jsonl").exists() and "val/id_seen/acc_last" in module.last_eval


@pytest.mark.slow
def test_the_cli_trains_the_hf_config(tmp_path):
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "hf_llama_modular_cpu.yaml")
    main(["fit", *shrunk(tmp_path, config)])
    run = tmp_path / "run" / "version_0"
    assert (run / "icl_curves.jsonl").exists() and (run / "metrics.csv").exists()


class UserLM(L.LightningModule):
    """Someone else's module: a Hugging Face model on the kernel, its own loss, causal-LM dict batches."""

    def __init__(self):
        super().__init__()
        cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
        self.model = model_on_kernel(LlamaConfig(**cfg, vocab_size=7))

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_attention_statistics_on_a_users_hf_model(tmp_path):
    torch.manual_seed(0)
    data = tiny_modular(batch_format="causal_lm")
    kwargs = trainer_kwargs(tmp_path, max_steps=4, logger=False, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"AttentionStatistics stats \['class_mass'\]"):
        L.Trainer(**kwargs, callbacks=[AttentionStatistics(every_n_steps=2)]).fit(UserLM(), data)
    attention = AttentionStatistics(every_n_steps=2, stats=("entropy", "max_prob", "same_label_mass"))
    L.Trainer(**kwargs, callbacks=[attention]).fit(UserLM(), data)
    assert [r["step"] for r in attention.history] == [2, 4]
    assert torch.tensor(attention.history[-1]["entropy"]).shape == (2, 4)
    assert torch.tensor(attention.history[-1]["previous_token"]).shape == (2, 4)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("implementation", ["eager", "lightning_icl"])
def test_hook_point_names_of_the_package_model_work_on_hf_models(family, implementation):
    eager, ours = pair(FAMILIES[family]())
    model = eager if implementation == "eager" else ours
    adapter = HFCausalLMAdapter.from_model(L.LightningModule(), model.eval())
    names = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.hook_z", "hook_mlp_out", "hook_resid_post")]
    assert adapter.hook_points() == names
    ids = torch.randint(1, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids}
    seen = {}
    zero_head = lambda z: torch.cat([torch.zeros_like(z[:, :1]), z[:, 1:]], dim=1)
    with torch.no_grad():
        with adapter.hooks(
            {"blocks.1.hook_resid_post": lambda h: seen.setdefault("resid", h), "blocks.0.attn.hook_z": zero_head}
        ):
            hooked = model(input_ids=ids).logits
        gates = torch.ones(2, adapter.n_heads)
        gates[0, 0] = 0.0
        gated, cap = adapter.forward(
            batch, capture=CaptureSpec(residual=True, layers=[1], positions="all"), head_gates=gates
        )
    torch.testing.assert_close(hooked, gated)
    torch.testing.assert_close(seen["resid"], cap.residual[1])
    counts = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    assert sum(counts) == 0  # every handle removed
