"""The architecture zoo: exact parameter counts, stage shapes, classic parameter names, the staged forward."""

import pytest
import torch
import torchvision

from distill.models import StagedOutput, create_model, list_models

# docs/reproduction.md#architectures, at 100 classes.
CIFAR_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "ResNet50": 23_705_252,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
}
# torchvision's counts at 1000 classes.
IMAGENET_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872}

# (channels, side) of every stage output: CIFAR models at 32x32, ImageNet models at 64x64.
THIN, WIDE, VGG = (
    [(16, 32), (32, 16), (64, 8)],
    [(32, 32), (64, 16), (128, 8)],
    [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)],
)
STAGES = {
    **{name: THIN for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")},
    "resnet8x4": [(64, 32), (128, 16), (256, 8)],
    "resnet32x4": [(64, 32), (128, 16), (256, 8)],
    "ResNet50": [(256, 32), (512, 16), (1024, 8), (2048, 4)],
    "wrn_16_1": THIN,
    "wrn_40_1": THIN,
    "wrn_16_2": WIDE,
    "wrn_40_2": WIDE,
    **{name: VGG for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "MobileNetV2": [(12, 16), (16, 8), (48, 4), (160, 2)],
    "ShuffleV1": [(240, 16), (480, 8), (960, 4)],
    "ShuffleV2": [(116, 16), (232, 8), (464, 4)],
    "resnet18": [(64, 16), (128, 8), (256, 4), (512, 2)],
    "resnet34": [(64, 16), (128, 8), (256, 4), (512, 2)],
    "resnet50": [(256, 16), (512, 8), (1024, 4), (2048, 2)],
    "mobilenet_v2": [(24, 16), (32, 8), (96, 4), (320, 2)],
}
# Stage outputs are post-ReLU except after a pre-activation (WRN) or linear-bottleneck (MobileNetV2) block.
NOT_POST_ACT = {"wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "MobileNetV2", "mobilenet_v2"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of two gain nothing from intra-op threads, which crawl on a busy machine (``pytest -n``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_model():
    assert set(CIFAR_PARAMS) | set(IMAGENET_PARAMS) <= set(list_models())


@pytest.mark.parametrize("name", list(CIFAR_PARAMS))
def test_cifar_param_count(name):
    assert n_params(create_model(name, num_classes=100, in_chans=3)) == CIFAR_PARAMS[name]


@pytest.mark.parametrize("name", list(IMAGENET_PARAMS))
def test_imagenet_param_count(name):
    assert n_params(create_model(name, num_classes=1000)) == IMAGENET_PARAMS[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGES))
def test_staged_forward(name):
    imagenet = name in IMAGENET_PARAMS
    size, num_classes = (64, 10) if imagenet else (32, 100)
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes).eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x, features=True)
        logits = model(x)
    assert isinstance(out, StagedOutput)
    assert torch.equal(out.logits, logits) and logits.shape == (2, num_classes)
    assert [(s.shape[1], s.shape[2]) for s in out.stages] == STAGES[name]
    assert all(s.shape[2] == s.shape[3] for s in out.stages)
    assert len(model.stages) == len(STAGES[name])
    assert out.embedding.shape == (2, out.feature.shape[1])
    assert out.feature.min() >= 0  # every head reads a post-activation map
    if name not in NOT_POST_ACT:
        assert all(s.min() >= 0 for s in out.stages)
    # The views are built from the classic children and register nothing.
    assert list(model.state_dict()) == keys
    assert not any(k.split(".")[0] in ("stem", "stages", "head") for k in keys)
    view_params = {id(p) for m in [model.stem, *model.stages, model.head] for p in m.parameters()}
    assert view_params == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", list(CIFAR_PARAMS))
def test_cifar_small_input(name):
    model = create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 100)


def test_vgg_pools_before_block4_on_64x64_only():
    """As in the CRD code: block4 runs at 4x4 for 32x32 inputs and for 64x64 ones."""
    model = create_model("vgg8").eval()
    with torch.no_grad():
        stages = model(torch.randn(1, 3, 64, 64), features=True).stages
    assert [s.shape[-1] for s in stages] == [64, 32, 16, 8, 4]


@pytest.mark.parametrize(
    "name",
    ["resnet20", "ResNet50", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "resnet18", "mobilenet_v2"],
)
def test_in_chans(name):
    size = 64 if name in IMAGENET_PARAMS else 16
    model = create_model(name, num_classes=10, in_chans=1).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def bn_keys(prefix, channels):
    shapes = {
        "weight": (channels,),
        "bias": (channels,),
        "running_mean": (channels,),
        "running_var": (channels,),
        "num_batches_tracked": (),
    }
    return {f"{prefix}.{name}": shape for name, shape in shapes.items()}


def classic_cifar_resnet_keys(depth, widths, num_classes=100):
    """Names and shapes of a CRD-benchmark (RepDistiller ``models/resnet.py``) CIFAR ResNet state_dict."""
    keys = {"conv1.weight": (widths[0], 3, 3, 3), **bn_keys("bn1", widths[0])}
    inplanes = widths[0]
    for layer, planes in enumerate(widths[1:], start=1):
        for block in range((depth - 2) // 6):
            prefix, cin = f"layer{layer}.{block}", inplanes if block == 0 else planes
            keys[f"{prefix}.conv1.weight"] = (planes, cin, 3, 3)
            keys.update(bn_keys(f"{prefix}.bn1", planes))
            keys[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            keys.update(bn_keys(f"{prefix}.bn2", planes))
            if block == 0 and (layer > 1 or cin != planes):
                keys[f"{prefix}.downsample.0.weight"] = (planes, cin, 1, 1)
                keys.update(bn_keys(f"{prefix}.downsample.1", planes))
        inplanes = planes
    keys["fc.weight"], keys["fc.bias"] = (num_classes, widths[3]), (num_classes,)
    return keys


@pytest.mark.parametrize(
    "name,depth,widths", [("resnet56", 56, (16, 16, 32, 64)), ("resnet8x4", 8, (32, 64, 128, 256))]
)
def test_classic_cifar_resnet_state_dict_loads_strict(name, depth, widths):
    keys = classic_cifar_resnet_keys(depth, widths)
    state = {k: torch.tensor(3) if not shape else torch.rand(shape) + 0.5 for k, shape in keys.items()}
    model = create_model(name)
    assert list(model.state_dict()) == list(keys)  # same names, same order
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.layer3[-1].bn2.running_var, state[f"layer3.{(depth - 2) // 6 - 1}.bn2.running_var"])
    assert torch.equal(model.head.classifier.weight, state["fc.weight"])


@pytest.mark.parametrize(
    "name,keys",
    [
        (
            "wrn_40_2",
            [
                "conv1.weight",
                "block1.layer.0.bn1.weight",
                "block1.layer.0.convShortcut.weight",
                "block2.layer.5.conv2.weight",
                "bn1.running_var",
                "fc.weight",
            ],
        ),
        ("vgg13", ["block0.0.weight", "block0.0.bias", "block0.4.running_mean", "block4.3.weight", "classifier.bias"]),
        (
            "MobileNetV2",
            [
                "conv1.0.weight",
                "conv1.1.weight",
                "blocks.0.0.conv.0.weight",
                "blocks.6.0.conv.7.bias",
                "conv2.0.weight",
                "classifier.0.weight",
            ],
        ),
        ("ResNet50", ["conv1.weight", "layer1.0.shortcut.0.weight", "layer4.2.bn3.weight", "linear.weight"]),
        ("ShuffleV1", ["layer1.0.conv1.weight", "layer3.3.bn3.running_mean", "linear.weight"]),
        ("ShuffleV2", ["layer1.0.conv5.weight", "layer3.3.bn3.weight", "conv2.weight", "bn2.bias", "linear.weight"]),
    ],
)
def test_classic_names(name, keys):
    assert set(keys) <= set(create_model(name).state_dict())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_state_dict_loads_strict(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    model = create_model(name, num_classes=1000).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_unknown_model_lists_known_names():
    with pytest.raises(KeyError, match="unknown model 'resnet57'.*resnet56"):
        create_model("resnet57")
