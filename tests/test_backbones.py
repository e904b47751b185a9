import pytest
import torch

from kamal_engine.backbones import (ARCHITECTURES, GRANULARITIES, build_model, detect_architecture,
                                    normalize_state_dict_keys, split_model)
from kamal_engine.errors import CheckpointError, KamalError

UNITS = {"resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet101": 33, "resnet152": 50, "densenet121": 58,
         "densenet169": 82, "mobilenet_v2": 17, "vgg11": 8, "vgg16": 13, "smallnet": 4, "lenet5": 3}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_blocks_reassemble_to_the_original_model(arch):
    model = build_model(arch, 7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for granularity in GRANULARITIES:
            net = split_model(model, arch, granularity)
            assert torch.equal(net(x), expected), f"{arch} at {granularity} granularity"
            features = net.features(x)
            assert [tuple(f.shape[1:]) for f in features] == net.output_shapes((32, 32))
            k = len(net) // 2
            assert torch.equal(net.forward_from(k, features[k - 1]), expected)
            # the split shares the model's parameters: nothing is copied
            assert {id(p) for p in net.parameters()} <= {id(p) for p in model.parameters()}
    detected, kwargs = detect_architecture(normalize_state_dict_keys(model.state_dict()))
    assert detected == arch
    rebuilt = build_model(detected, 7, **kwargs)
    rebuilt.load_state_dict(model.state_dict())


@pytest.mark.parametrize("arch,units", sorted(UNITS.items()))
def test_unit_and_stage_counts(arch, units):
    model = build_model(arch, 3)
    assert len(split_model(model, arch, "unit")) == units
    stages = 5 if arch.startswith("vgg") else 3 if arch == "lenet5" else 4
    assert len(split_model(model, arch, "stage")) == stages


def test_resnet18_block_names_and_shapes_at_224():
    net = split_model(build_model("resnet18", 10), "resnet18", "unit")
    assert net.block_names == ["b1_1", "b1_2", "b2_1", "b2_2", "b3_1", "b3_2", "b4_1", "b4_2"]
    stage = split_model(build_model("resnet18", 10), "resnet18", "stage")
    assert stage.block_names == ["b1", "b2", "b3", "b4"]
    assert stage.output_shapes((224, 224)) == [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "densenet121"])
def test_stages_end_at_strides_4_8_16_32(arch):
    shapes = split_model(build_model(arch, 3), arch, "stage").output_shapes((224, 224))
    assert [s[1] for s in shapes] == [56, 28, 14, 7]


def test_resnet50_has_the_papers_b3_6_unit():
    names = split_model(build_model("resnet50", 3), "resnet50", "unit").block_names
    assert "b3_6" in names and "b4_3" in names and len(names) == 16


def test_smallnet_width_and_depth_are_detected():
    model = build_model("smallnet", 5, width=8, depth=[2, 1, 1, 3])
    arch, kwargs = detect_architecture(model.state_dict())
    assert (arch, kwargs) == ("smallnet", {"width": 8, "depth": [2, 1, 1, 3]})
    assert len(split_model(model, arch, "unit")) == 7


def test_old_densenet_keys_and_dataparallel_prefix_are_normalised():
    sd = build_model("densenet121", 4).state_dict()
    old = {}
    for k, v in sd.items():
        k = k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2.")
        old["module." + k] = v
    fixed = normalize_state_dict_keys(old)
    assert set(fixed) == set(sd)
    assert detect_architecture(fixed)[0] == "densenet121"


def test_unrecognised_weights_name_the_choices():
    with pytest.raises(CheckpointError, match="could not be recognised.*resnet18"):
        detect_architecture({"encoder.weight": torch.zeros(2, 2)})


def test_unknown_architecture_and_granularity():
    with pytest.raises(KamalError, match="unknown architecture 'resnet7'"):
        build_model("resnet7", 3)
    with pytest.raises(KamalError, match="granularity"):
        split_model(build_model("lenet5", 3), "lenet5", "layer")


def test_shape_inference_keeps_every_modules_own_mode():
    model = build_model("smallnet", 3).eval()
    net = split_model(model, "smallnet", "unit")  # a new wrapper is in training mode
    net.output_shapes((56, 56))
    assert not any(m.training for m in model.modules())
    model.train()
    net.output_shapes((56, 56))
    assert all(m.training for m in model.modules())
