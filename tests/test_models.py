"""The model zoo: every model builds and runs on every supported input, configs validate and round-trip,
and the registry lists by wildcard and explains unknown names."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.measurement.metrics import count_params
from prunekit.models import MODELS, ModelConfig, create_model, list_models
from prunekit.registry import Registry

ZOO = [
    "lenet300", "lenet5", "mobilenetv2", "resnet20", "resnet32", "resnet56", "vgg11", "vgg16", "vgg19", "vit_tiny",
]
# (channels, side): Fashion-MNIST, CIFAR, the 8x8 digits (lenet5 pads, vit uses 2-pixel patches, vgg skips pools).
INPUTS = [(1, 28), (3, 32), (1, 8)]


def test_zoo_lists_every_model():
    assert list_models() == ZOO
    assert list(MODELS) == ZOO


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("channels,side", INPUTS, ids=[f"{c}x{s}x{s}" for c, s in INPUTS])
def test_forward_shape(name, channels, side):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=channels, input_size=side).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, side, side))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "resnet20", "vit_tiny"])
@pytest.mark.parametrize("num_classes", [2, 100])
def test_num_classes_sets_the_output_width(name, num_classes):
    model = create_model(name, num_classes=num_classes, in_channels=1, input_size=28).eval()
    with torch.no_grad():
        assert model(torch.zeros(3, 1, 28, 28)).shape == (3, num_classes)


def test_known_parameter_counts():
    """Hand counts: LeNet-300-100 on 28x28 and LeNet-5 (20-50-500) on 28x28."""
    lenet300 = (784 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10)
    lenet5 = (1 * 20 * 25 + 20) + (20 * 50 * 25 + 50) + (50 * 4 * 4 * 500 + 500) + (500 * 10 + 10)
    assert count_params(create_model("lenet300", in_channels=1, input_size=28)) == lenet300 == 266_610
    assert count_params(create_model("lenet5", in_channels=1, input_size=28)) == lenet5 == 431_080


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "mobilenetv2", "resnet20", "vgg11", "vit_tiny"])
def test_width_multiplier_changes_parameter_count(name):
    counts = [count_params(create_model(name, in_channels=3, input_size=32, width=w)) for w in (0.5, 1.0, 2.0)]
    assert counts[0] < counts[1] < counts[2]


def test_width_scales_every_hidden_layer_of_lenet300():
    model = create_model("lenet300", in_channels=1, input_size=28, width=0.5)
    assert (model.fc1.out_features, model.fc2.out_features, model.fc3.out_features) == (150, 50, 10)


def test_lenet5_small_input_uses_padded_path():
    small = create_model("lenet5", in_channels=1, input_size=8)
    large = create_model("lenet5", in_channels=1, input_size=28)
    assert small.conv1.padding == (2, 2) and large.conv1.padding == (0, 0)


def test_lenet5_rejects_too_small_input():
    with pytest.raises(ValueError, match="lenet5 needs input_size"):
        create_model("lenet5", in_channels=1, input_size=3)


def test_vit_rejects_indivisible_input():
    with pytest.raises(ValueError, match="divisible by 4, got 30"):
        create_model("vit_tiny", in_channels=3, input_size=30)
    with pytest.raises(ValueError, match="divisible by 2, got 9"):
        create_model("vit_tiny", in_channels=1, input_size=9)


def test_create_model_from_config_equals_from_name():
    config = ModelConfig(name="resnet20", num_classes=5, in_channels=1, input_size=16, width=0.5)
    torch.manual_seed(0)
    a = create_model(config)
    torch.manual_seed(0)
    b = create_model("resnet20", num_classes=5, in_channels=1, input_size=16, width=0.5)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_create_model_rejects_config_plus_kwargs():
    with pytest.raises(TypeError, match="either a ModelConfig or a name"):
        create_model(ModelConfig(name="lenet300"), width=2.0)


# ----------------------------------------------------------------------------------------------- ModelConfig


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_classes": 1}, r"num_classes must be >= 2, got 1"),
        ({"num_classes": 0}, r"num_classes must be a positive int, got 0"),
        ({"in_channels": 0}, r"in_channels must be a positive int, got 0"),
        ({"in_channels": 1.5}, r"in_channels must be a positive int, got 1.5"),
        ({"input_size": -4}, r"input_size must be a positive int, got -4"),
        ({"input_size": True}, r"input_size must be a positive int, got True"),
        ({"width": 0}, r"width must be a positive number, got 0"),
        ({"width": -1.0}, r"width must be a positive number, got -1.0"),
        ({"width": "2"}, r"width must be a positive number, got '2'"),
        ({"width": float("nan")}, r"width must be a positive number, got nan"),
        ({"width": float("inf")}, r"width must be a positive number, got inf"),
    ],
)
def test_model_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(name="lenet300", **kwargs)


def test_model_config_unknown_name():
    with pytest.raises(ValueError, match=r"unknown model 'lenet'; known models: lenet300, lenet5"):
        ModelConfig(name="lenet")


def test_model_config_is_frozen():
    config = ModelConfig(name="lenet300")
    with pytest.raises(AttributeError):
        config.width = 2.0  # type: ignore[misc]


def test_model_config_round_trips_through_dict_and_json():
    config = ModelConfig(name="resnet32", num_classes=100, in_channels=3, input_size=32, width=4.0)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_model_config_from_dict_errors():
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields \['depth'\]; accepted: .*'width'"):
        ModelConfig.from_dict({"name": "lenet300", "depth": 3})
    with pytest.raises(TypeError, match="expects a dict, got list"):
        ModelConfig.from_dict(["lenet300"])  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------- registry


def test_wildcard_listing():
    assert list_models("resnet*") == ["resnet20", "resnet32", "resnet56"]
    assert list_models("vgg1?") == ["vgg11", "vgg16", "vgg19"]
    assert list_models("*net5") == ["lenet5"]
    assert list_models("transformer*") == []


def test_unknown_model_lists_known_names_and_close_matches():
    with pytest.raises(ValueError) as info:
        create_model("resnet21")
    message = str(info.value)
    assert "unknown model 'resnet21'" in message
    assert "known models: " + ", ".join(ZOO) in message
    assert "Did you mean" in message and "resnet20" in message.split("Did you mean")[1]


def test_unknown_name_without_close_match_has_no_hint():
    with pytest.raises(ValueError, match="known models") as info:
        create_model("zzzzzz")
    assert "Did you mean" not in str(info.value)


def test_registry_rejects_duplicates_and_non_strings():
    registry: Registry[int] = Registry("widget")
    registry.add("a", 1, "first")
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.add("a", 2)
    with pytest.raises(TypeError, match="widget name must be a str, got int"):
        registry.get(3)  # type: ignore[arg-type]
    assert registry.get("a") == 1 and registry.help("a") == "first" and "a" in registry and "b" not in registry
