import pytest
import torch

from lightning_icl import CaptureSpec, ICLTransformer
from lightning_icl.interventions import shared_ablation_pass


def token_model(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=11, d_model=32, n_layers=3, n_heads=2, max_seq_len=40)
    args.update(kw)
    return ICLTransformer(**args).eval()


def tokens(b=4, t=23):
    return torch.randint(11, (b, t), generator=torch.Generator().manual_seed(0))


def test_capture_shapes_and_positions():
    model = token_model()
    x = tokens()
    kc = (torch.arange(23) % 3).expand(4, 23)
    spec = CaptureSpec(
        layers=[0, -1],
        residual=True,
        heads=True,
        stats=("lse", "entropy", "class_mass"),
        positions=torch.tensor([1, 4, 22]),
    )
    out, cap = model(x, capture=spec, key_class=kc, num_classes=3)
    assert out.shape == (4, 23, 11)
    assert set(cap.residual) == set(cap.heads) == set(cap.stats) == {0, 2}
    assert cap.residual[2].shape == (4, 3, 32)
    assert cap.heads[0].shape == (4, 2, 3, 16)
    assert cap.stats[0]["lse"].shape == (4, 2, 3) and cap.stats[0]["class_mass"].shape == (4, 2, 3, 3)
    assert all(not t.requires_grad for t in cap.residual.values())
    # the captured positions are the same entries as a capture of every position
    _, full = model(x, capture=CaptureSpec(residual=True, heads=True, stats=("entropy",), positions="all"))
    torch.testing.assert_close(cap.residual[2], full.residual[2][:, [1, 4, 22]])
    torch.testing.assert_close(cap.heads[0], full.heads[0][:, :, [1, 4, 22]])
    torch.testing.assert_close(cap.stats[2]["entropy"], full.stats[2]["entropy"][:, :, [1, 4, 22]])
    # last position by default; per-example positions [B, P]
    _, last = model(x, capture=CaptureSpec(residual=True))
    torch.testing.assert_close(last.residual[1], full.residual[1][:, -1:])
    per_example = torch.tensor([[0], [5], [7], [22]])
    _, pe = model(x, capture=CaptureSpec(residual=True, positions=per_example))
    torch.testing.assert_close(pe.residual[1][:, 0], full.residual[1][torch.arange(4), per_example[:, 0]])


def test_capture_does_not_change_outputs_and_keeps_only_what_is_asked():
    model = token_model()
    x = tokens()
    plain, nothing = model(x)
    assert nothing is None
    out, cap = model(x, capture=CaptureSpec(heads=True, layers=[1]))
    torch.testing.assert_close(plain, out)
    assert cap.residual == {} and cap.stats == {} and list(cap.heads) == [1]


def test_zero_gate_equals_removing_the_heads_contribution():
    model = token_model()
    x = tokens()
    gates = torch.ones(3, 2)
    gates[1, 0] = 0.0
    gated, _ = model(x, head_gates=gates)
    # remove head 0 of layer 1 by hand: zero its columns of the output projection
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[:, :16] = 0.0
    removed, _ = model(x)
    torch.testing.assert_close(gated, removed)
    ungated, _ = token_model()(x, head_gates=torch.ones(3, 2))
    torch.testing.assert_close(ungated, token_model()(x)[0])


def test_per_example_gates_equal_separate_runs():
    model = token_model()
    x = tokens(b=3)
    per_example = torch.ones(3, 3, 2)
    per_example[0, 0, 1] = 0.0
    per_example[2, 2, 0] = 0.0
    batched, _ = model(x, head_gates=per_example)
    for i in range(3):
        alone, _ = model(x[i : i + 1], head_gates=per_example[i])
        torch.testing.assert_close(batched[i : i + 1], alone)


def run_with_head_replaced(model, x, layer, head, replacement):
    """Reference: overwrite one head's slice of the output-projection input by hand."""
    dh = model.head_dim

    def hook(module, args):
        (y,) = args  # [B, T, H*Dh]
        y = y.clone()
        y[..., head * dh : (head + 1) * dh] = replacement
        return (y,)

    handle = model.blocks[layer].attn.proj.register_forward_pre_hook(hook)
    try:
        return model(x)[0]
    finally:
        handle.remove()


def test_mean_and_resample_ablation_match_replacing_by_hand():
    model = token_model()
    x = tokens()
    gates = torch.ones(3, 2)
    gates[1, 1] = 0.0
    _, cap = model(x, capture=CaptureSpec(heads=True, positions="all"))
    mean = torch.stack([cap.heads[i].mean(dim=(0, 2)) for i in range(3)])  # [L, H, Dh]
    out_mean, _ = model(x, head_gates=gates, ablate_with=mean)
    torch.testing.assert_close(out_mean, run_with_head_replaced(model, x, 1, 1, mean[1, 1]))
    # a per-position mean [L, H, T, Dh]
    mean_t = torch.stack([cap.heads[i].mean(dim=0) for i in range(3)])
    out_mean_t, _ = model(x, head_gates=gates, ablate_with=mean_t)
    torch.testing.assert_close(out_mean_t, run_with_head_replaced(model, x, 1, 1, mean_t[1, 1]))
    # resample: example i takes example i-1's z of that head (z of a clean run, as layer 0 is upstream)
    out_res, _ = model(x, head_gates=gates, ablate_with="resample")
    torch.testing.assert_close(
        out_res, run_with_head_replaced(model, x, 1, 1, torch.roll(cap.heads[1][:, 1], 1, dims=0))
    )
    # half a gate mixes the two
    half = gates.clone()
    half[1, 1] = 0.5
    out_half, _ = model(x, head_gates=half, ablate_with=mean)
    mixed = 0.5 * cap.heads[1][:, 1] + 0.5 * mean[1, 1]
    torch.testing.assert_close(out_half, run_with_head_replaced(model, x, 1, 1, mixed))


def variant_gates(n_layers=3, n_heads=2):
    """Variants that gate nothing, one head, several layers, and a partial gate."""
    gates = torch.ones(5, n_layers, n_heads)
    gates[1, 2, 1] = 0.0  # the last layer only
    gates[2, 0, 0] = 0.0  # the first layer ...
    gates[2, 2, 1] = 0.3  # ... and again higher up
    gates[3, 1, :] = 0.0  # a whole layer
    gates[4, 0, 1] = 0.5
    return gates


@pytest.mark.parametrize("ablate_with", ["zero", "mean", "mean_t", "resample"])
def test_variants_pass_equals_a_forward_per_variant(ablate_with):
    model = token_model()
    x = tokens(b=4)
    _, cap = model(x, capture=CaptureSpec(heads=True, positions="all"))
    mu = {
        "zero": None,
        "resample": "resample",
        "mean": torch.stack([cap.heads[i].mean(dim=(0, 2)) for i in range(3)]),
        "mean_t": torch.stack([cap.heads[i].mean(dim=0) for i in range(3)]),
    }[ablate_with]
    gates = variant_gates()
    clean, variants = shared_ablation_pass(model, x, gates, mu)
    torch.testing.assert_close(clean, model(x)[0])
    assert variants.shape == (5, *clean.shape)
    for n in range(5):
        torch.testing.assert_close(variants[n], model(x, head_gates=gates[n], ablate_with=mu)[0])
    assert not torch.allclose(variants[1], clean)  # the gates act


def test_variants_pass_reads_out_only_the_positions_asked_for():
    model = token_model()
    x = tokens(b=3)
    positions = torch.tensor([[2, 5, 22], [0, 1, 9], [4, 4, 7]])
    gates = variant_gates()
    clean, variants = shared_ablation_pass(model, x, gates, positions=positions)
    assert clean.shape == (3, 3, 11) and variants.shape == (5, 3, 3, 11)
    for n in range(5):
        full = model(x, head_gates=gates[n])[0]
        torch.testing.assert_close(variants[n], torch.gather(full, 1, positions[..., None].expand(3, 3, 11)))
    vector = ICLTransformer(input_dim=5, output_dim=2, d_model=32, n_layers=2, n_heads=2, max_seq_len=9).eval()
    v = torch.randn(3, 9, 5)
    _, out = shared_ablation_pass(vector, v, torch.zeros(1, 2, 2), "resample", positions[:, :2] % 9)
    full = vector(v, head_gates=torch.zeros(2, 2), ablate_with="resample")[0]
    torch.testing.assert_close(out[0], torch.gather(full, 1, (positions[:, :2] % 9)[..., None].expand(3, 2, 2)))


def test_variants_pass_rejects_bad_shapes_by_name():
    model = token_model()
    with pytest.raises(ValueError, match=r"head_gates must be \[N, L, H\]"):
        shared_ablation_pass(model, tokens(), torch.ones(3, 2))
    with pytest.raises(ValueError, match="positions must be"):
        shared_ablation_pass(model, tokens(b=4), torch.ones(1, 3, 2), positions=torch.zeros(2, 3, dtype=torch.long))


def test_gate_gradient_is_first_order_ablation_effect():
    model = token_model()
    x = tokens()
    gates = torch.ones(3, 2, requires_grad=True)
    out, _ = model(x, head_gates=gates)
    loss = out.float().logsumexp(-1).mean()
    loss.backward()
    eps = 1e-3
    g = torch.ones(3, 2)
    g[2, 1] -= eps
    lo = model(x, head_gates=g)[0].logsumexp(-1).mean()
    fd = (loss.detach() - lo) / eps
    torch.testing.assert_close(gates.grad[2, 1], fd, atol=1e-3, rtol=5e-2)


def test_vector_model_and_positions():
    torch.manual_seed(0)
    for positional in ("rope", "learned", "none"):
        model = ICLTransformer(
            input_dim=5,
            d_model=32,
            n_heads=2,
            n_layers=1,
            max_seq_len=10,
            positional=positional,
            bias=True,
            activation="gelu",
        )
        out, _ = model(torch.randn(2, 10, 5))
        assert out.shape == (2, 10, 1)


def test_model_is_causal():
    model = token_model()
    x = tokens()
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 11
    torch.testing.assert_close(model(x)[0][:, :10], model(y)[0][:, :10])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=48, n_heads=2), "head dimension of 24"),
        (dict(d_model=30, n_heads=4), "not divisible"),
        (dict(positional="alibi"), "positional"),
        (dict(activation="swish"), "activation"),
        (dict(input_dim=3), "exactly one of vocab_size"),
        (dict(attention_backend="flash"), "attention_backend"),
    ],
)
def test_bad_configuration_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        token_model(**kwargs)


def test_bad_forward_input_is_named():
    model = token_model()
    with pytest.raises(ValueError, match="exceeds max_seq_len=40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="head_gates must be"):
        model(tokens(), head_gates=torch.ones(2, 2))
    with pytest.raises(ValueError, match="layers: 5 out of range"):
        model(tokens(), capture=CaptureSpec(layers=[5]))
    with pytest.raises(ValueError, match="positions must lie"):
        model(tokens(), capture=CaptureSpec(positions=torch.tensor([30])))
    with pytest.raises(ValueError, match="stats"):
        CaptureSpec(stats=("pattern",))


def run_with_mlp_replaced(model, x, layer, replacement):
    """Reference: overwrite one block's MLP output by hand."""
    handle = model.blocks[layer].mlp.register_forward_hook(lambda module, args, out: replacement.expand_as(out))
    try:
        return model(x)[0]
    finally:
        handle.remove()


def test_mlp_gates_mean_ablate_and_one_is_identity():
    model = token_model()
    x = tokens()
    plain, _ = model(x)
    ones, _ = model(x, mlp_gates=torch.ones(3), mlp_ablate_with=torch.randn(3, 32))
    torch.testing.assert_close(ones, plain)
    mean = torch.randn(3, 32)
    gates = torch.tensor([1.0, 0.0, 1.0])
    out, _ = model(x, mlp_gates=gates, mlp_ablate_with=mean)
    torch.testing.assert_close(out, run_with_mlp_replaced(model, x, 1, mean[1]))
    # zero ablation, a per-position mean [L, T, D], and per-example gates [B, L]
    zero, _ = model(x, mlp_gates=gates)
    torch.testing.assert_close(zero, run_with_mlp_replaced(model, x, 1, torch.zeros(32)))
    mean_t = torch.randn(3, 40, 32)
    out_t, _ = model(x, mlp_gates=gates, mlp_ablate_with=mean_t)
    torch.testing.assert_close(out_t, run_with_mlp_replaced(model, x, 1, mean_t[1, :23]))
    per_example = torch.ones(4, 3)
    per_example[2, 1] = 0.0
    batched, _ = model(x, mlp_gates=per_example, mlp_ablate_with=mean)
    torch.testing.assert_close(batched[2], out[2])
    torch.testing.assert_close(batched[[0, 1, 3]], plain[[0, 1, 3]])


def test_mlp_gate_gradient_flows_with_head_gates():
    model = token_model()
    heads = torch.ones(4, 3, 2, requires_grad=True)
    mlps = torch.ones(4, 3, requires_grad=True)
    out, _ = model(tokens(), head_gates=heads, mlp_gates=mlps, mlp_ablate_with=torch.zeros(3, 32))
    out.logsumexp(-1).mean().backward()
    assert heads.grad.abs().sum() > 0 and mlps.grad.abs().sum() > 0


def test_bad_mlp_gates_are_named():
    model = token_model()
    with pytest.raises(ValueError, match="mlp_gates must be"):
        model(tokens(), mlp_gates=torch.ones(2))
    with pytest.raises(ValueError, match="mlp_ablate_with must be"):
        model(tokens(), mlp_gates=torch.ones(3), mlp_ablate_with=torch.zeros(3, 16))
    with pytest.raises(ValueError, match="mlp_ablate_with must be"):
        model(tokens(t=23), mlp_gates=torch.ones(3), mlp_ablate_with=torch.zeros(3, 10, 32))
