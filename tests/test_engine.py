"""The channel engine: a physically shrunk model equals the same model with the removed slices zeroed (to 1e-5 on
fresh inputs) for every zoo model and every coupling pattern of ``architectures``; groups that cannot be shrunk
exactly are skipped with a reason; bad plans are refused with a message; a failed shrink rolls back."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from architectures import ARCHITECTURES, calibrate_bn_, random_plan
from prunekit.channels.graph import ChannelGraph, ChannelPlan, SliceKind, UnsupportedModelError
from prunekit.measurement.metrics import count_params
from prunekit.models import create_model, list_models
from prunekit.models.attention import PrunableMultiheadAttention

ZOO = list_models()
CASES = [("zoo", n) for n in ZOO] + [("arch", n) for n in ARCHITECTURES]
CASE_IDS = [f"{kind}-{name}" for kind, name in CASES]



def input_shape(kind: str, name: str) -> tuple[int, ...]:
    if kind == "arch":
        return ARCHITECTURES[name].input_shape
    return (1, 28, 28) if name.startswith("lenet") else (3, 32, 32)


def build(kind: str, name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """A seeded model in eval mode with calibrated BatchNorm statistics, and its input shape (no batch)."""
    shape = input_shape(kind, name)
    torch.manual_seed(seed)
    if kind == "arch":
        model = ARCHITECTURES[name].factory()
    else:
        model = create_model(name, num_classes=10, in_channels=shape[0], input_size=shape[1])
    calibrate_bn_(model, shape, seed=seed)
    return model, shape


def randn(shape: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def masked_copy(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` with every parameter multiplied by its mask (by name)."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)
    return out


def kept_slices(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``param`` without the slices (along any dimension) that ``mask`` zeroes entirely."""
    out = param.detach()
    for d in range(mask.dim()):
        keep = mask.movedim(d, 0).reshape(mask.shape[d], -1).any(1).nonzero().flatten()
        out = out.index_select(d, keep)
    return out


# ------------------------------------------------------------------------------------------------ the oracle


@pytest.mark.parametrize("kind,name", CASES, ids=CASE_IDS)
def test_shrinking_equals_masking(kind, name):
    model, shape = build(kind, name)
    graph = ChannelGraph(model, randn(shape, 2, seed=1))
    assert graph.groups, f"{name} has no prunable group; skipped: {graph.skipped}"
    plan = random_plan(graph, seed=2)
    assert plan, "the plan should remove something"

    masks = graph.masks(plan)
    masked = masked_copy(model, masks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params_before = count_params(model)
    fresh = randn(shape, 3, seed=3)  # not the example batch the engine verified on
    with torch.no_grad():
        dense_out = model(fresh)

    graph.shrink_(plan)

    with torch.no_grad():
        ref, got = masked(fresh), model(fresh)
    assert got.shape == ref.shape == dense_out.shape  # the number of classes is unchanged
    assert ref.abs().max() < 100, "outputs should be O(1) for an absolute tolerance to mean something"
    assert (got - ref).abs().max().item() <= 1e-5
    assert not torch.allclose(ref, dense_out, atol=1e-5), "the plan should change the model"

    # Every parameter is the original with exactly the masked slices removed (shapes and values). An
    # nn.MultiheadAttention that lost heads became its prunable form: its fused in_proj is now q/k/v layers.
    after = dict(model.named_parameters())
    for name, module in model.named_modules():
        if isinstance(module, PrunableMultiheadAttention):
            layers = (module.q_proj, module.k_proj, module.v_proj)
            for fused, part in (("in_proj_weight", "weight"), ("in_proj_bias", "bias")):
                key = f"{name}.{fused}"
                assert torch.equal(torch.cat([getattr(m, part).detach() for m in layers]),
                                   kept_slices(before.pop(key), masks.pop(key)))
                for proj in ("q_proj", "k_proj", "v_proj"):
                    after.pop(f"{name}.{proj}.{part}")
    assert set(after) == set(before)
    assert count_params(model) < params_before
    for pname, old in before.items():
        expected = kept_slices(old, masks[pname]) if pname in masks else old
        assert after[pname].shape == expected.shape, pname
        assert torch.equal(after[pname].detach(), expected), pname
    shrunk = [n for n in masks if after[n].numel() < before[n].numel()]
    assert shrunk == list(masks)


def test_vit_tiny_prunes_its_mlps_and_heads_and_skips_the_residual_stream():
    model, shape = build("zoo", "vit_tiny")
    graph = ChannelGraph(model, randn(shape, 2, seed=1))
    assert set(graph.by_root) == {f"blocks.{i}.{part}" for i in range(4) for part in ("fc1", "attn")}
    for i in range(4):
        heads = graph.by_root[f"blocks.{i}.attn"]
        assert heads.heads is not None and len(heads.units) == 4
    layernorm = [why for why in graph.skipped.values() if "LayerNorm" in why or "breaks the forward pass" in why]
    assert layernorm, "the residual stream is coupled to the LayerNorms and must be skipped"


EXPECTED_SKIPS = [
    ("mlp_layernorm", "fc1", "LayerNorm normalises over the channels"),
    ("attention_block", None, "MultiheadAttention"),
    ("chunk", "stem", "breaks the forward pass"),
]


@pytest.mark.parametrize("name,root,words", EXPECTED_SKIPS, ids=[f"{n}-{r}" for n, r, _ in EXPECTED_SKIPS])
def test_groups_that_cannot_be_shrunk_exactly_are_skipped_with_a_reason(name, root, words):
    model, shape = build("arch", name)
    graph = ChannelGraph(model, randn(shape, 2, seed=1))
    if root is None:
        assert any(words in why for why in graph.skipped.values()), graph.skipped
    else:
        assert root in graph.skipped and root not in graph.by_root
        assert words in graph.skipped[root]
    assert all(isinstance(why, str) and why for why in graph.skipped.values())
    for r in graph.skipped:  # a skipped group cannot be planned, and the refusal carries the reason
        with pytest.raises(ValueError, match="cannot be pruned"):
            graph.masks(ChannelPlan({r: (0,)}))


def test_graph_json_lists_groups_and_skipped():
    model, shape = build("arch", "mlp_layernorm")
    graph = ChannelGraph(model, randn(shape, 2, seed=1))
    data = json.loads(graph.to_json())
    assert data["skipped"] == graph.skipped
    assert [g.split(" ")[0] for g in data["groups"]] == [g.root for g in graph.groups]


def test_building_a_graph_leaves_the_model_untouched():
    model, shape = build("arch", "residual_add")
    model.train()
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    ChannelGraph(model, randn(shape, 2, seed=1))
    assert model.training and all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert p is params[n][0] and torch.equal(p, params[n][1])
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


# ------------------------------------------------------------------------------------------------- specific


@torch.no_grad()
def _shrink_and_compare(name: str, seed: int = 2) -> tuple[nn.Module, ChannelGraph, ChannelPlan, dict]:
    model, shape = build("arch", name)
    graph = ChannelGraph(model, randn(shape, 2, seed=1))
    plan = random_plan(graph, seed=seed)
    masks = graph.masks(plan)
    masked = masked_copy(model, masks)
    original = copy.deepcopy(model)
    graph.shrink_(plan)
    fresh = randn(shape, 4, seed=5)
    assert (model(fresh) - masked(fresh)).abs().max().item() <= 1e-5
    return original, graph, plan, dict(model.named_parameters())


def test_module_called_twice_loses_the_same_channels_in_and_out():
    original, graph, plan, after = _shrink_and_compare("shared_conv")
    group = graph.by_root["shared"]
    kinds = {(m.name, m.kind) for m in group.members}
    assert {("shared", SliceKind.OUT), ("shared", SliceKind.IN), ("stem", SliceKind.OUT)} <= kinds
    k = 8 - len(plan.removed["shared"])
    assert after["shared.weight"].shape == (k, k, 3, 3)
    assert after["stem.weight"].shape[0] == k and after["mid.weight"].shape[1] == k
    keep = [c for c in range(8) if c not in plan.removed["shared"]]
    assert torch.equal(after["shared.weight"], original.shared.weight[keep][:, keep])


@pytest.mark.parametrize("name,param,dim,size", [("channel_scale", "scale", 1, 8),
                                                 ("positional_embedding", "pos", 2, 8)])
def test_non_channel_parameter_is_shrunk_with_its_channels(name, param, dim, size):
    original, graph, plan, after = _shrink_and_compare(name)
    root = next(g.root for g in graph.groups if any(m.name == param for m in g.members))
    removed = plan.removed[root]
    keep = torch.tensor([c for c in range(size) if c not in removed])
    assert after[param].shape[dim] == size - len(removed)
    assert torch.equal(after[param], getattr(original, param).detach().index_select(dim, keep))


@torch.no_grad()
def test_masked_slices_are_zero_and_the_rest_untouched():
    model, shape = build("arch", "nested_residual")
    graph = ChannelGraph(model, randn(shape, 2, seed=1))
    plan = random_plan(graph, seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    masks = graph.masks(plan)
    graph.apply_masks_(plan)
    after = dict(model.named_parameters())
    assert set(masks) <= set(after) and masks
    for name, old in before.items():
        mask = masks.get(name, torch.ones_like(old))
        assert mask.shape == old.shape
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (after[name][mask == 0] == 0).all(), name
        assert torch.equal(after[name][mask == 1], old[mask == 1]), name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name])
    # the zeroed slices are exactly those of the plan: conv out-channel c of a root loses its whole filter
    for root, idxs in plan.removed.items():
        w = after[f"{root}.weight"]
        for c in range(w.shape[0]):
            assert bool((w[c] == 0).all()) == (c in idxs)


@pytest.mark.parametrize("name", ["lenet300", "resnet20", "mobilenetv2", "vit_tiny"])
def test_output_layer_is_never_pruned(name):
    model, shape = build("zoo", name)
    graph = ChannelGraph(model, randn(shape, 2, seed=1))
    classifier = {"lenet300": "fc3", "resnet20": "fc", "mobilenetv2": "classifier", "vit_tiny": "head"}[name]
    assert classifier in graph.ignore
    assert all(not (m.name == classifier and m.kind is SliceKind.OUT) for g in graph.groups for m in g.members)
    graph.shrink_(random_plan(graph, seed=0, fraction=0.5))
    assert dict(model.named_modules())[classifier].out_features == 10
    with torch.no_grad():
        assert model(randn(shape, 2, seed=3)).shape == (2, 10)


def test_output_layer_is_found_through_an_elementwise_op():
    class LogSoftmaxNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(self.fc2(torch.relu(self.fc1(x))), dim=1)

    torch.manual_seed(0)
    graph = ChannelGraph(LogSoftmaxNet().eval(), torch.randn(2, 8), probe=False)
    assert "fc2" in graph.ignore and "fc2" not in graph.by_root


def test_ignore_keeps_the_layers_out_channels():
    model, shape = build("zoo", "resnet20")
    # layer1.0.conv1 roots its own group; layer1.1.conv2 sits inside the stem's residual-stream group.
    graph = ChannelGraph(model, randn(shape, 2, seed=1), ignore=["layer1.0.conv1", "layer1.1.conv2"])
    assert {"layer1.0.conv1", "layer1.1.conv2", "fc"} <= set(graph.ignore)
    for g in graph.groups:
        for m in g.members:
            assert not (m.kind is SliceKind.OUT and m.name in ("layer1.0.conv1", "layer1.1.conv2")), g.describe()
    assert "layer1.0.conv1" not in graph.by_root and "conv1" not in graph.by_root
    assert graph.groups
    graph.shrink_(random_plan(graph, seed=0, fraction=0.5))
    assert model.layer1[0].conv1.out_channels == 16
    assert model.layer1[1].conv2.out_channels == 16 and model.conv1.out_channels == 16
    assert model.layer1[1].conv1.out_channels == 8  # the others were pruned


# ------------------------------------------------------------------------------------------------ bad input


def _graph(name: str = "pool_linear") -> tuple[nn.Module, ChannelGraph]:
    model, shape = build("arch", name)
    return model, ChannelGraph(model, randn(shape, 2, seed=1))


def test_ignore_unknown_name_lists_the_modules():
    model, shape = build("arch", "pool_linear")
    with pytest.raises(ValueError, match=r"\['nonexistent'\] are not modules.*known: .*features\.0.*fc1"):
        ChannelGraph(model, randn(shape, 2, seed=1), ignore=["nonexistent", "fc1"])


BAD_PLANS = [
    ({"nope": (0,)}, r"plan names 'nope', which cannot be pruned: it is not the root of a prunable group"),
    ({"fc2": (0,)}, r"plan names 'fc2', which cannot be pruned"),  # the output layer
    ({"fc1": tuple(range(16))}, r"removes all 16 channels of 'fc1'; at least one must stay"),
    ({"fc1": (3, 16)}, r"removes channel 16 of 'fc1', which has 16 channels"),
    ({"features.0": (99,)}, r"removes channel 99 of 'features.0', which has 8 channels"),
]


@pytest.mark.parametrize("verb", ["masks", "apply_masks_", "shrink_"])
@pytest.mark.parametrize("removed,match", BAD_PLANS, ids=["unknown", "output", "all", "range16", "range99"])
def test_bad_plans_are_refused_and_change_nothing(verb, removed, match):
    model, graph = _graph()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        getattr(graph, verb)(ChannelPlan(removed))
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())


def test_plan_naming_a_skipped_group_gives_the_skip_reason():
    _, graph = _graph("mlp_layernorm")
    with pytest.raises(ValueError, match="'fc1', which cannot be pruned: coupled to norm .*LayerNorm"):
        graph.shrink_(ChannelPlan({"fc1": (0,)}))


@pytest.mark.parametrize("idxs", [(-1, 2), (3, 3), (0, 5, 0)])
def test_plan_rejects_negative_or_repeated_indices(idxs):
    with pytest.raises(ValueError, match="'conv' has negative or repeated channel indices"):
        ChannelPlan({"conv": idxs})


def test_plan_normalises_and_round_trips():
    plan = ChannelPlan({"b": [5, 1, 3], "a": (2,), "empty": ()})
    assert plan.removed == {"b": (1, 3, 5), "a": (2,)}
    assert plan.num_removed() == 4 and plan and not ChannelPlan({"x": []})
    assert ChannelPlan.from_dict(plan.to_dict()) == plan
    assert ChannelPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert plan.to_dict() == {"kind": "channels", "removed": {"b": [1, 3, 5], "a": [2]}}
    with pytest.raises(ValueError, match="not a channel plan"):
        ChannelPlan.from_dict({"kind": "unstructured", "removed": {}})
    with pytest.raises(ValueError, match="not a channel plan"):
        ChannelPlan.from_dict({"kind": "channels", "removed": [1, 2]})


def test_a_saved_plan_replays_on_a_fresh_model():
    model, shape = build("arch", "concat")
    graph = ChannelGraph(model, randn(shape, 2, seed=1))
    plan = random_plan(graph, seed=7)
    graph.shrink_(plan)
    fresh, _ = build("arch", "concat")
    ChannelGraph(fresh, randn(shape, 2, seed=1)).shrink_(ChannelPlan.from_dict(json.loads(json.dumps(plan.to_dict()))))
    assert {n: p.shape for n, p in fresh.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    x = randn(shape, 2, seed=8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ------------------------------------------------------------------------------------------------- rollback


def test_failed_shrink_names_the_group_and_rolls_back():
    model, shape = build("arch", "chunk")
    model.train()  # the training flag must survive the rollback too
    x = randn(shape, 2, seed=1)
    graph = ChannelGraph(model, x, probe=False)
    assert "stem" in graph.by_root  # without the probe the chunked stem looks prunable
    other = next(r for r in graph.by_root if r != "stem")
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    fresh = randn(shape, 2, seed=3)
    model.eval()
    with torch.no_grad():
        expected = model(fresh)
    model.train()
    plan = ChannelPlan({other: (1, 2), "stem": (3,)})

    with pytest.raises(UnsupportedModelError, match=r"stem.*ignore=\['stem'\]") as info:
        graph.shrink_(plan)
    assert "restored" in str(info.value)

    assert model.training
    for n, p in model.named_parameters():
        assert p is params[n][0], f"{n} is not the original parameter object"
        assert torch.equal(p, params[n][1]), n
    assert set(dict(model.named_parameters())) == set(params)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert model.stem.out_channels == 8
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(fresh), expected)

    # the suggested fix works: with that layer ignored the group is gone and the rest still shrinks
    graph = ChannelGraph(model, x, ignore=["stem"], probe=False)
    assert all(not (m.kind is SliceKind.OUT and m.name == "stem") for g in graph.groups for m in g.members)
    width = dict(model.named_modules())[other].out_channels
    graph.shrink_(ChannelPlan({other: (1, 2)}))
    assert dict(model.named_modules())[other].out_channels == width - 2


def test_shrink_mismatch_rolls_back():
    """With atol=0 the float noise of a residual network counts as a mismatch: refused, model restored."""
    model, graph = _graph("residual_add")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError):
        graph.shrink_(ChannelPlan({g.root: (0, 1) for g in graph.groups}), atol=0.0)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())


def test_shrink_mismatch_message_explains_itself_without_a_culprit():
    model, graph = _graph("residual_add")
    with pytest.raises(UnsupportedModelError, match="changes the model's outputs by"):
        graph.shrink_(ChannelPlan({g.root: (0, 1) for g in graph.groups}), atol=0.0)


def test_grouped_convolutions_are_pruned_with_tied_positions():
    model, graph = _graph("grouped_conv")
    assert not any("grouped" in reason for reason in graph.skipped.values()), graph.skipped
    tied = [g for g in graph.groups if g.tied]
    assert tied, "the groups feeding the grouped convolutions must be prunable, with tied channels"
    for g in tied:
        assert sorted(c for u in g.units for c in u) == list(range(g.size))
        assert len({len(u) for u in g.units}) == 1  # the same position in every block
    group = tied[0]
    with pytest.raises(ValueError, match="only part of the tied channels"):
        graph.masks(ChannelPlan({group.root: (group.units[0][0],)}))
    x = randn(ARCHITECTURES["grouped_conv"].input_shape, 3, seed=7)
    plan = ChannelPlan({group.root: group.units[1]})
    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters())
    with torch.no_grad():
        for name, mask in graph.masks(plan).items():
            params[name].mul_(mask)
        expected = masked(x)
    before = count_params(model)
    graph.shrink_(plan)
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= 1e-5
    assert count_params(model) < before
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
    assert convs and all(m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0 for m in convs)
