"""HookAdapter / HFCausalLMAdapter on tiny random-init Hugging Face models (no weights downloaded)."""

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from lightning_icl.adapters.hooks import HFCausalLMAdapter, HookAdapter  # noqa: E402
from lightning_icl.capture import CaptureSpec  # noqa: E402

KINDS = ("gpt2", "llama")
VOCAB, N_LAYERS, N_HEADS, D_MODEL = 11, 2, 2, 32
HEAD_DIM = D_MODEL // N_HEADS


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=N_LAYERS,
            n_head=N_HEADS,
            n_embd=D_MODEL,
            vocab_size=VOCAB,
            n_positions=32,
            bos_token_id=VOCAB - 1,  # the defaults (50256) lie outside the tiny vocabulary
            eos_token_id=VOCAB - 1,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            hidden_size=D_MODEL,
            intermediate_size=64,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            num_key_value_heads=N_HEADS,
            vocab_size=VOCAB,
            max_position_embeddings=32,
        )
        model = transformers.LlamaForCausalLM(config)
    return model.eval()


def make(kind: str, seed: int = 0) -> tuple[nn.Module, HFCausalLMAdapter]:
    model = make_model(kind, seed)
    return model, HFCausalLMAdapter.from_model(L.LightningModule(), model)


def final_norm(kind: str, model: nn.Module) -> nn.Module:
    return model.transformer.ln_f if kind == "gpt2" else model.model.norm


def make_batch(b: int = 3, t: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (b, t), generator=g), "concept": torch.arange(b)}


def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"]).logits


def scale_head_columns(kind: str, model: nn.Module, layer: int, head: int, factor: float) -> None:
    """Scale the output projection's input columns that head ``head`` feeds."""
    cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    with torch.no_grad():
        if kind == "gpt2":  # Conv1D weight is [in, out]
            model.transformer.h[layer].attn.c_proj.weight[cols, :] *= factor
        else:  # nn.Linear weight is [out, in]
            model.model.layers[layer].self_attn.o_proj.weight[:, cols] *= factor


def replace_head_input(proj: nn.Module, head: int, new: torch.Tensor):
    """Pre-hook on ``proj`` overwriting head ``head``'s slice of its input by ``new`` (broadcast to [B, T, Dh])."""

    def hook(module, args):
        z = args[0].clone()
        z[..., head * HEAD_DIM : (head + 1) * HEAD_DIM] = new.expand_as(z[..., :HEAD_DIM])
        return (z, *args[1:])

    return proj.register_forward_pre_hook(hook)


@pytest.mark.parametrize("kind", KINDS)
def test_capture_matches_hidden_states_and_projection_input(kind):
    model, adapter = make(kind)
    batch = make_batch()
    b, t = batch["input_ids"].shape

    seen = {}
    handles = [
        p.register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__(layer, args[0].detach()))
        for layer, p in enumerate(adapter.out_projs)
    ]
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], output_hidden_states=True)
        seen.clear()  # keep only the adapter's run below
        spec = CaptureSpec(residual=True, heads=True, positions="all")
        logits, cap = adapter.forward(batch, capture=spec)
        # what hooks cannot see is an error, not an empty dict
        for unsupported in (dict(stats=("entropy",)), dict(qk=True)):
            with pytest.raises(ValueError, match="needs the package's attention"):
                adapter.forward(batch, capture=CaptureSpec(residual=True, **unsupported))
            with pytest.raises(ValueError, match="needs the package's attention"):
                adapter.set_training_capture(CaptureSpec(**unsupported))
    for h in handles:
        h.remove()

    torch.testing.assert_close(logits, ref.logits)  # capturing alone changes nothing
    assert adapter.native_stats is False and cap.stats == {}
    assert (adapter.n_layers, adapter.n_heads, adapter.head_dim) == (N_LAYERS, N_HEADS, HEAD_DIM)
    assert torch.equal(cap.positions, torch.arange(t).expand(b, t))
    assert sorted(cap.residual) == sorted(cap.heads) == list(range(N_LAYERS))
    for layer in range(N_LAYERS):
        assert cap.residual[layer].shape == (b, t, D_MODEL)
        assert cap.heads[layer].shape == (b, N_HEADS, t, HEAD_DIM)
        assert not cap.residual[layer].requires_grad
        z = seen[layer].view(b, t, N_HEADS, HEAD_DIM).transpose(1, 2)
        torch.testing.assert_close(cap.heads[layer], z, rtol=0, atol=0)
    # hidden_states[l + 1] follows block l, except the last one, which HF reports after the final norm.
    for layer in range(N_LAYERS - 1):
        torch.testing.assert_close(cap.residual[layer], ref.hidden_states[layer + 1])
    with torch.no_grad():
        last = final_norm(kind, model)(cap.residual[N_LAYERS - 1])
    torch.testing.assert_close(last, ref.hidden_states[-1])
    assert not torch.allclose(cap.residual[N_LAYERS - 1], ref.hidden_states[-1])

    # A subset of layers at chosen per-row positions.
    pos = torch.tensor([[1, 5], [0, 7], [2, 2]])
    with torch.no_grad():
        _, sub = adapter.forward(batch, capture=CaptureSpec(layers=[-1], residual=True, positions=pos))
    assert list(sub.residual) == [N_LAYERS - 1] and sub.heads == {}
    expected = torch.stack([cap.residual[N_LAYERS - 1][i, pos[i]] for i in range(b)])
    torch.testing.assert_close(sub.residual[N_LAYERS - 1], expected)


@pytest.mark.parametrize("kind", KINDS)
def test_gates_equal_scaled_projection_columns(kind):
    model, adapter = make(kind)
    batch = make_batch()
    gates = torch.ones(N_LAYERS, N_HEADS)
    gates[0, 1], gates[1, 0] = 0.0, 0.5
    with torch.no_grad():
        gated, _ = adapter.forward(batch, head_gates=gates)
        edited = copy.deepcopy(model)
        scale_head_columns(kind, edited, 0, 1, 0.0)  # gate 0 = that head's columns zeroed
        scale_head_columns(kind, edited, 1, 0, 0.5)
        ref = logits_of(edited, batch)
        clean = logits_of(model, batch)
    torch.testing.assert_close(gated, ref)
    assert not torch.allclose(gated, clean, atol=1e-4)
    with pytest.raises(ValueError, match="head_gates"):
        adapter.forward(batch, head_gates=torch.ones(N_LAYERS + 1, N_HEADS))


@pytest.mark.parametrize("kind", KINDS)
def test_per_example_gates_equal_separate_runs(kind):
    _, adapter = make(kind)
    batch = make_batch()
    b = batch["input_ids"].shape[0]
    gates = torch.rand(b, N_LAYERS, N_HEADS, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        together, _ = adapter.forward(batch, head_gates=gates)
        for i in range(b):
            row = {"input_ids": batch["input_ids"][i : i + 1]}
            alone, _ = adapter.forward(row, head_gates=gates[i])
            torch.testing.assert_close(together[i : i + 1], alone)


@pytest.mark.parametrize("kind", KINDS)
def test_mean_and_resample_ablation_equal_manual_replacement(kind):
    model, adapter = make(kind)
    batch = make_batch()
    t = batch["input_ids"].shape[1]
    layer, head = 1, 0
    gates = torch.ones(N_LAYERS, N_HEADS)
    gates[layer, head] = 0.0
    g = torch.Generator().manual_seed(4)
    proj = adapter.out_projs[layer]

    with torch.no_grad():
        # mean per head [L, H, Dh]
        mu = torch.randn(N_LAYERS, N_HEADS, HEAD_DIM, generator=g)
        ablated, _ = adapter.forward(batch, head_gates=gates, ablate_with=mu)
        handle = replace_head_input(proj, head, mu[layer, head])
        ref = logits_of(model, batch)
        handle.remove()
        torch.testing.assert_close(ablated, ref)

        # mean per position [L, H, T', Dh], T' longer than the batch: the first T positions are used
        mu_t = torch.randn(N_LAYERS, N_HEADS, t + 4, HEAD_DIM, generator=g)
        ablated, _ = adapter.forward(batch, head_gates=gates, ablate_with=mu_t)
        handle = replace_head_input(proj, head, mu_t[layer, head, :t])
        ref = logits_of(model, batch)
        handle.remove()
        torch.testing.assert_close(ablated, ref)

        # resample: each example gets the previous example's z for that head
        _, clean = adapter.forward(batch, capture=CaptureSpec(layers=[layer], heads=True, positions="all"))
        z_prev = torch.roll(clean.heads[layer][:, head], shifts=1, dims=0)  # [B, T, Dh]
        ablated, _ = adapter.forward(batch, head_gates=gates, ablate_with="resample")
        handle = replace_head_input(proj, head, z_prev)
        ref = logits_of(model, batch)
        handle.remove()
        torch.testing.assert_close(ablated, ref)

        # a partial gate mixes: g * z + (1 - g) * mu
        half = torch.ones(N_LAYERS, N_HEADS)
        half[layer, head] = 0.25
        mixed, _ = adapter.forward(batch, head_gates=half, ablate_with=mu)
        handle = replace_head_input(proj, head, 0.25 * clean.heads[layer][:, head] + 0.75 * mu[layer, head])
        ref = logits_of(model, batch)
        handle.remove()
        torch.testing.assert_close(mixed, ref)

    with pytest.raises(ValueError, match="ablate_with"):
        adapter.forward(batch, head_gates=gates, ablate_with=torch.zeros(N_LAYERS, N_HEADS, HEAD_DIM + 1))


@pytest.mark.parametrize("kind", KINDS)
def test_scored_variants_equal_a_forward_per_variant(kind):
    _, adapter = make(kind)
    batch = make_batch(b=4)
    gates = torch.ones(3, N_LAYERS, N_HEADS)
    gates[0, 1, 0] = 0.0
    gates[1, 0, 1], gates[1, 1, 1] = 0.0, 0.5  # two layers: resample must stay within the copy
    with torch.no_grad():
        clean, variants = adapter.score_variants(batch, gates, "resample")
        torch.testing.assert_close(clean.loss, adapter.score(adapter.forward(batch)[0], batch).loss)
        assert variants.loss.shape == (3, *clean.loss.shape)
        for n in range(3):
            alone = adapter.score(adapter.forward(batch, head_gates=gates[n], ablate_with="resample")[0], batch)
            torch.testing.assert_close(variants.loss[n], alone.loss)
            torch.testing.assert_close(variants.correct[n], alone.correct)


@pytest.mark.parametrize("kind", KINDS)
def test_training_gates_gradient_matches_finite_difference(kind):
    model, adapter = make(kind)
    # float64 keeps the finite difference accurate; Llama's RMSNorm still computes in float32 whatever the
    # model dtype, so the step is large and the tolerance loose enough for that rounding.
    model.double()
    ids = make_batch()["input_ids"]

    def loss_fn() -> torch.Tensor:  # what a user's training_step does: a plain model call
        logits = model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    gates = torch.ones(N_LAYERS, N_HEADS, dtype=torch.float64, requires_grad=True)
    adapter.set_training_gates(gates)
    loss_fn().backward()
    assert gates.grad is not None and gates.grad.shape == (N_LAYERS, N_HEADS)

    eps, (layer, head) = 1e-2, (0, 1)
    values = []
    for sign in (1, -1):
        bumped = torch.ones(N_LAYERS, N_HEADS, dtype=torch.float64)
        bumped[layer, head] += sign * eps
        adapter.set_training_gates(bumped)
        with torch.no_grad():
            values.append(loss_fn())
    fd = (values[0] - values[1]) / (2 * eps)
    torch.testing.assert_close(gates.grad[layer, head], fd, rtol=1e-3, atol=1e-7)
    assert gates.grad.abs().sum() > 0

    adapter.set_training_gates(None)
    with torch.no_grad():
        ungated = loss_fn()
    adapter.detach()
    with torch.no_grad():
        torch.testing.assert_close(ungated, loss_fn())
    with pytest.raises(ValueError, match="head_gates"):
        adapter.set_training_gates(torch.ones(N_HEADS, N_LAYERS + 1))


@pytest.mark.parametrize("kind", KINDS)
def test_training_capture_records_plain_calls_until_stopped(kind):
    model, adapter = make(kind)
    batch = make_batch()
    spec = CaptureSpec(residual=True, heads=True, positions="last")
    assert adapter.training_capture() is None

    adapter.set_training_capture(spec)
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    cap = adapter.training_capture()
    assert cap is not None and cap.positions.shape == (3, 1)
    with torch.no_grad():
        _, ref = adapter.forward(batch, capture=spec)
        # a forward() during training capture neither uses nor replaces the training capture
        _, none = adapter.forward(batch)
    assert none is None and adapter.training_capture() is cap
    for layer in range(N_LAYERS):
        torch.testing.assert_close(cap.residual[layer], ref.residual[layer])
        torch.testing.assert_close(cap.heads[layer], ref.heads[layer])

    # each call gets a fresh capture, positions resolved for its own shape
    smaller = make_batch(b=2, t=5, seed=7)
    with torch.no_grad():
        model(input_ids=smaller["input_ids"])
    cap2 = adapter.training_capture()
    assert cap2 is not cap
    assert torch.equal(cap2.positions, torch.full((2, 1), 4))
    assert cap2.residual[0].shape == (2, 1, D_MODEL) and cap2.heads[1].shape == (2, N_HEADS, 1, HEAD_DIM)

    adapter.set_training_capture(None)
    assert adapter.training_capture() is None
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    assert adapter.training_capture() is None


def test_score_at_labelled_positions():
    _, adapter = make("gpt2")
    ids = make_batch(b=2, t=10)["input_ids"]
    labels = torch.full_like(ids, -100)
    answers = torch.tensor([[3, 6, 9], [2, 5, 8]])  # the answer tokens; each is predicted from the token before
    labels.scatter_(1, answers, ids.gather(1, answers))
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        logits, _ = adapter.forward(batch)
    scored = adapter.score(logits, batch)

    before = answers - 1
    assert torch.equal(adapter.answer_positions(batch), before)
    rows = torch.arange(2)[:, None]
    expected = F.cross_entropy(logits[rows, before].flatten(0, 1), ids.gather(1, answers).flatten(), reduction="none")
    torch.testing.assert_close(scored.loss, expected.view(2, 3))
    correct = (logits[rows, before].argmax(-1) == ids.gather(1, answers)).float()
    assert torch.equal(scored.correct, correct)
    assert torch.equal(scored.shot, torch.arange(3).expand(2, 3))

    # without labels every next token is scored
    full = adapter.score(logits, {"input_ids": ids})
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(2, 9)
    torch.testing.assert_close(full.loss, expected)

    uneven = labels.clone()
    uneven[0, 3] = -100
    with pytest.raises(ValueError, match="same number"):
        adapter.score(logits, {"input_ids": ids, "labels": uneven})


def test_batch_helpers():
    _, adapter = make("gpt2")
    batch = make_batch(b=2, t=4)
    batch["attention_mask"] = torch.ones(2, 4, dtype=torch.long)
    assert adapter.batch_size(batch) == 2
    assert torch.equal(adapter.concept(batch), torch.arange(2))
    tiled = adapter.repeat(batch, 3)
    assert tiled["input_ids"].shape == (6, 4) and tiled["attention_mask"].shape == (6, 4)
    assert torch.equal(tiled["input_ids"][4:], batch["input_ids"]) and torch.equal(
        tiled["concept"], torch.arange(2).repeat(3)
    )
    with pytest.raises(ValueError, match="concept"):
        adapter.concept({"input_ids": batch["input_ids"]})


def test_forward_and_training_registrations_leave_no_hooks():
    fresh = make_model("llama")
    model, adapter = make("llama")
    batch = make_batch()

    def hook_counts():
        return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]

    before = hook_counts()
    assert sum(before) == 0  # building the adapter registers nothing
    with torch.no_grad():
        adapter.forward(
            batch, capture=CaptureSpec(residual=True, heads=True), head_gates=torch.zeros(N_LAYERS, N_HEADS)
        )
    assert hook_counts() == before  # forward() registers for its own call only

    with pytest.raises(RuntimeError, match="boom"):  # also when the call raises

        def boom(h):
            raise RuntimeError("boom")

        with adapter.hooks({"blocks.0.hook_resid_post": boom}):
            adapter.forward(batch)
    assert hook_counts() == before

    adapter.set_training_gates(torch.ones(N_LAYERS, N_HEADS))
    adapter.set_training_capture(CaptureSpec(residual=True))
    assert hook_counts() != before
    adapter.set_training_gates(None)
    adapter.set_training_capture(None)
    assert hook_counts() == before
    adapter.set_training_gates(torch.zeros(N_LAYERS, N_HEADS))
    adapter.detach()
    assert hook_counts() == before
    with torch.no_grad():
        assert torch.equal(logits_of(model, batch), logits_of(fresh, batch))


class ToyBlock(nn.Module):
    """Heads z = tanh(mix(h)); the projection is called by keyword and the block returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.proj = nn.Linear(D_MODEL, D_MODEL), nn.Linear(D_MODEL, D_MODEL)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.tanh(self.mix(h))
        return h + self.proj(input=z), z


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, D_MODEL), nn.Linear(D_MODEL, VOCAB)
        self.blocks = nn.ModuleList([ToyBlock() for _ in range(N_LAYERS)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h, self.seen = self.embed(input_ids), []
        for block in self.blocks:
            h, z = block(h)
            self.seen.append((h, z))
        return self.head(h)  # plain logits, no .logits


def test_generic_hook_adapter_on_a_toy_model():
    torch.manual_seed(0)
    toy = Toy()
    adapter = HookAdapter(L.LightningModule(), toy, [b.proj for b in toy.blocks], list(toy.blocks), n_heads=N_HEADS)
    batch = make_batch()
    b, t = batch["input_ids"].shape
    with torch.no_grad():
        logits, cap = adapter.forward(batch, capture=CaptureSpec(residual=True, heads=True, positions="all"))
        assert torch.equal(logits, toy(batch["input_ids"]))
        for layer, (h, z) in enumerate(toy.seen):
            assert torch.equal(cap.residual[layer], h)
            assert torch.equal(cap.heads[layer], z.view(b, t, N_HEADS, HEAD_DIM).transpose(1, 2))
        gates = torch.ones(N_LAYERS, N_HEADS)
        gates[0, 1] = 0.0
        gated, _ = adapter.forward(batch, head_gates=gates)
        toy.blocks[0].proj.weight[:, HEAD_DIM:] = 0.0
        torch.testing.assert_close(gated, toy(batch["input_ids"]))


def test_from_model_rejects_unknown_models():
    with pytest.raises(ValueError, match="looked for"):
        HFCausalLMAdapter.from_model(L.LightningModule(), nn.Sequential(nn.Linear(4, 4)))
