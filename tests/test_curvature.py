"""K-FAC and diagonal Fisher statistics against explicit float64 references built from per-example gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.curvature.kfac import (
    ConvFactor,
    CurvatureConfig,
    CurvatureError,
    DampingMode,
    FisherType,
    collect_diagonal_fisher,
    collect_kfac,
    kfac_support,
)


class ConvNet(nn.Module):
    """conv (bias, stride 2, padding 1) -> relu -> linear; the conv is called once, the head once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.head = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x)).flatten(1))


def _batches(n_batches: int = 3, n: int = 5, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(n_batches)]


def _explicit_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col by hand (padding then slicing), float64: (positions, C*kh*kw) for one example x (C, H, W)."""
    p, s, k = conv.padding[0], conv.stride[0], conv.kernel_size[0]
    xp = F.pad(x.double(), (p, p, p, p))
    rows = []
    for i in range(0, xp.shape[1] - k + 1, s):
        for j in range(0, xp.shape[2] - k + 1, s):
            rows.append(xp[:, i:i + k, j:j + k].reshape(-1))
    return torch.stack(rows)


def _per_example(model: ConvNet, batches, labels_from=None):
    """Per-example (conv input patches, conv pre-activation grads, head input, head grads, full weight grads),
    each example's loss on its own (float64 model)."""
    m = ConvNet().double()
    m.load_state_dict(model.state_dict())
    out = []
    for x, y in batches:
        for i in range(len(x)):
            acts = {}
            xi = x[i:i + 1].double()
            s1 = m.conv(xi)
            s1.retain_grad()
            h = F.relu(s1).flatten(1)
            s2 = m.head(h)
            s2.retain_grad()
            m.zero_grad()
            F.cross_entropy(s2, y[i:i + 1]).backward()
            acts["conv_a"] = _explicit_patches(m.conv, x[i])
            acts["conv_g"] = s1.grad[0].flatten(1).T.clone()  # (positions, out)
            acts["head_a"] = h[0].detach()
            acts["head_g"] = s2.grad[0].clone()
            acts["conv_grad"] = torch.cat([m.conv.weight.grad.reshape(3, -1), m.conv.bias.grad[:, None]], 1)
            acts["head_grad"] = torch.cat([m.head.weight.grad, m.head.bias.grad[:, None]], 1)
            out.append(acts)
    return out


def test_kfac_factors_match_explicit_per_example_computation():
    torch.manual_seed(0)
    model = ConvNet()
    batches = _batches()
    cfg = CurvatureConfig(fisher=FisherType.EMPIRICAL, batches=3)
    factors = collect_kfac(model, batches, cfg)
    ref = _per_example(model, batches)
    ones = lambda a: torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)  # noqa: E731
    conv_a = torch.cat([ones(r["conv_a"]) for r in ref])
    A_conv = conv_a.T @ conv_a / len(conv_a)
    G_conv = sum(r["conv_g"].T @ r["conv_g"] for r in ref) / len(ref)
    head_a = torch.stack([ones(r["head_a"]) for r in ref])
    A_head = head_a.T @ head_a / len(ref)
    G_head = sum(torch.outer(r["head_g"], r["head_g"]) for r in ref) / len(ref)
    torch.testing.assert_close(factors["conv"].A, A_conv, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(factors["conv"].G, G_conv, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(factors["head"].A, A_head, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(factors["head"].G, G_head, rtol=1e-5, atol=1e-9)
    assert factors["conv"].has_bias and factors["conv"].conv_factor is ConvFactor.PATCHES


def test_channel_form_treats_every_kernel_offset_as_a_sample():
    torch.manual_seed(0)
    model = ConvNet()
    batches = _batches()
    cfg = CurvatureConfig(fisher=FisherType.EMPIRICAL, batches=3)
    channel = collect_kfac(model, batches, cfg, layers=["conv"], conv_factor=ConvFactor.CHANNEL)["conv"]
    ref = _per_example(model, batches)
    patches = torch.cat([r["conv_a"] for r in ref]).reshape(-1, 2, 9)  # (positions, C, offsets)
    samples = patches.transpose(1, 2).reshape(-1, 2)
    torch.testing.assert_close(channel.A, samples.T @ samples / len(samples), rtol=1e-5, atol=1e-7)
    assert channel.A.shape == (2, 2) and not channel.has_bias
    w = channel.weight_matrix(model.conv)
    assert w.shape == (3, 2, 9)


class TokenNet(nn.Module):
    """A projection applied to every token of a sequence (as a transformer's q/k/v or FFN), mean-pooled, then a
    head: the projection's statistics run over the sequence dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)).mean(1))


def test_kfac_of_a_token_wise_linear_layer_runs_over_the_sequence_dimension():
    """A = mean over every token of every example of [a; 1][a; 1]^T; G = mean over examples of the sum over that
    example's tokens of g g^T (the convention of a conv's positions), against a float64 per-example reference."""
    torch.manual_seed(3)
    model = TokenNet()
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(4, 6, 4, generator=gen), torch.randint(0, 2, (4,), generator=gen)) for _ in range(2)]
    factors = collect_kfac(model, batches, CurvatureConfig(fisher=FisherType.EMPIRICAL, batches=2))["proj"]
    ref = TokenNet().double()
    ref.load_state_dict(model.state_dict())
    a_rows, g_sum, n = [], torch.zeros(3, 3, dtype=torch.float64), 0
    for x, y in batches:
        for i in range(len(x)):
            xi = x[i:i + 1].double()
            pre = ref.proj(xi)
            pre.retain_grad()
            ref.zero_grad()
            F.cross_entropy(ref.head(torch.tanh(pre).mean(1)), y[i:i + 1]).backward()
            g = pre.grad[0]  # (tokens, out), this example's own loss
            g_sum += g.T @ g
            a_rows.append(torch.cat([xi[0], torch.ones(xi.shape[1], 1, dtype=torch.float64)], 1))
            n += 1
    a = torch.cat(a_rows)
    torch.testing.assert_close(factors.A, a.T @ a / len(a), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(factors.G, g_sum / n, rtol=1e-5, atol=1e-9)


def test_kfac_is_the_exact_fisher_block_of_a_single_linear_layer_on_one_input():
    """With one input, E[vec(dW) vec(dW)^T] = (G kron A) exactly, whatever the labels (curvlinops' check)."""
    torch.manual_seed(1)
    layer = nn.Linear(5, 3)
    x = torch.randn(1, 5).repeat(6, 1)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    factors = collect_kfac(layer, [(x, y)], CurvatureConfig(fisher=FisherType.EMPIRICAL, batches=1))[""]
    grads = []
    for i in range(len(x)):
        layer.zero_grad()
        F.cross_entropy(layer(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append(torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).reshape(-1).double())
    exact = sum(torch.outer(g, g) for g in grads) / len(grads)
    torch.testing.assert_close(torch.kron(factors.G, factors.A), exact, rtol=1e-5, atol=1e-8)


def test_true_fisher_gradient_factor_approaches_softmax_covariance():
    """Sampled labels: for a single linear layer G -> diag(p) - p p^T as samples grow."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 4)
    x = torch.randn(1, 3).repeat(4000, 1)
    y = torch.zeros(4000, dtype=torch.long)
    G = collect_kfac(layer, [(x, y)], CurvatureConfig(batches=1, seed=3))[""].G
    p = torch.softmax(layer(x[:1]).double(), 1)[0].detach()
    torch.testing.assert_close(G, torch.diag(p) - torch.outer(p, p), atol=0.02, rtol=0)


def test_diagonal_fisher_matches_per_example_squared_gradients():
    torch.manual_seed(0)
    model = ConvNet()
    batches = _batches()
    diag = collect_diagonal_fisher(model, batches, CurvatureConfig(fisher=FisherType.EMPIRICAL, batches=3))
    ref = _per_example(model, batches)
    torch.testing.assert_close(diag["conv"], sum(r["conv_grad"] ** 2 for r in ref) / len(ref), rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(diag["head"], sum(r["head_grad"] ** 2 for r in ref) / len(ref), rtol=1e-5, atol=1e-10)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.fc(torch.tanh(self.fc(x))))


def test_module_called_twice_sums_its_per_example_gradients_in_the_diagonal_fisher():
    torch.manual_seed(0)
    model = Shared()
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    diag = collect_diagonal_fisher(model, [(x, y)], CurvatureConfig(fisher=FisherType.EMPIRICAL, batches=1))
    expected = torch.zeros(4, 5, dtype=torch.float64)
    for i in range(4):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected += torch.cat([model.fc.weight.grad, model.fc.bias.grad[:, None]], 1).double() ** 2
    torch.testing.assert_close(diag["fc"], expected / 4, rtol=1e-5, atol=1e-10)


def test_hooks_are_removed_and_model_mode_restored():
    model = ConvNet().train()
    model.conv.register_forward_hook(lambda *a: None)  # a user's own hook must survive
    collect_kfac(model, _batches(1), CurvatureConfig(batches=1))
    assert len(model.conv._forward_hooks) == 1 and not model.head._forward_hooks
    assert model.training and all(p.grad is None for p in model.parameters())


def test_batchnorm_is_in_eval_mode_while_collecting():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 4))
    before = model[1].running_mean.clone()
    collect_kfac(model, _batches(1), CurvatureConfig(batches=1))
    torch.testing.assert_close(model[1].running_mean, before)


def test_damping_modes_add_scaled_identities():
    factors = collect_kfac(ConvNet(), _batches(1), CurvatureConfig(batches=1))["head"]
    mean_a, mean_g = factors.A.diagonal().mean(), factors.G.diagonal().mean()
    A, G = factors.damped(0.01, DampingMode.PI)
    torch.testing.assert_close(A - factors.A, 0.1 * mean_a * torch.eye(len(A), dtype=A.dtype))
    torch.testing.assert_close(G - factors.G, 0.1 * mean_g * torch.eye(len(G), dtype=G.dtype))
    A, G = factors.damped(0.01, DampingMode.PLAIN)
    d = 0.1 * (mean_a * mean_g).sqrt()
    torch.testing.assert_close(A - factors.A, d * torch.eye(len(A), dtype=A.dtype))
    torch.testing.assert_close(G - factors.G, d * torch.eye(len(G), dtype=G.dtype))


def test_unsupported_layers_and_bad_statistics_give_clear_errors():
    assert "grouped" in kfac_support(nn.Conv2d(4, 4, 3, groups=2))
    assert kfac_support(nn.BatchNorm2d(3)).startswith("BatchNorm2d")
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(32, 4))
    with pytest.raises(ValueError, match="cannot collect curvature for 0: grouped convolution"):
        collect_kfac(model, _batches(1), layers=["0"])
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        collect_kfac(model, _batches(1), layers=["nope"])
    assert set(collect_kfac(model, _batches(1))) == {"2"}  # unsupported layers are left out by default
    bad = ConvNet()
    with torch.no_grad():
        bad.head.weight[0, 0] = float("nan")
    with pytest.raises(CurvatureError, match="NaN/inf"):
        collect_kfac(bad, _batches(1), CurvatureConfig(fisher=FisherType.EMPIRICAL))
    with pytest.raises(CurvatureError, match="at least one batch"):
        collect_kfac(ConvNet(), [])


@pytest.mark.parametrize("bad, match", [
    ({"fisher": "exact"}, "fisher must be one of"),
    ({"batches": 0}, "batches must be an int >= 1"),
    ({"damping": -1.0}, "damping must be a finite number"),
    ({"damping": float("nan")}, "damping must be a finite number"),
    ({"conv_factor": "im2col"}, "conv_factor must be one of"),
    ({"obs_update": "all"}, "obs_update must be"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        CurvatureConfig(**bad)


def test_config_round_trips_through_dict():
    cfg = CurvatureConfig(fisher="empirical", batches=3, conv_factor="channel", damping=0.1, damping_mode="plain",
                          obs_update="joint", seed=4)
    assert CurvatureConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.slow
def test_factors_are_all_reduced_under_torchrun(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    import kfac_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "factors.safetensors"
    worker = Path(kfac_worker.__file__)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", str(worker), str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = load_file(out)
    one = kfac_worker.collect()
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-5, atol=1e-7)  # float32 products
