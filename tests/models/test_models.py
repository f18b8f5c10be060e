"""Tests of covguard.models: shapes, feature taps, checkpoint keys and loading."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from covguard.models import (
    MODELS,
    Normalize,
    ResNetCIFAR,
    SmallCNN,
    cifar_resnet,
    load_checkpoint,
    resnet18_32x32,
    resnet20,
)
from covguard.models.resnet_cifar import OptionAShortcut

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(
    os.environ.get("COVGUARD_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
CHECKPOINTS = {
    "resnet20": "resnet20-12fca82f.th",
    "resnet32": "resnet32-d509ac18.th",
    "resnet44": "resnet44-014dd654.th",
}

CIFAR_RESNET_FEATURES = {
    "layer1": (16, 32, 32),
    "layer2": (32, 16, 16),
    "layer3": (64, 8, 8),
    "avgpool": (64, 1, 1),
}
# name -> (input shape of one image, classifier attribute,
#          {feature layer: output shape of one image (C, H, W)}), as documented in the classes.
SPECS = {
    "small_cnn": (
        (1, 16, 16),
        "fc",
        {
            "block1": (16, 16, 16),
            "block2": (32, 8, 8),
            "block3": (64, 4, 4),
            "avgpool": (64, 1, 1),
        },
    ),
    "resnet20": (
        (3, 32, 32),
        "linear",
        CIFAR_RESNET_FEATURES,
    ),
    "resnet32": (
        (3, 32, 32),
        "linear",
        CIFAR_RESNET_FEATURES,
    ),
    "resnet44": (
        (3, 32, 32),
        "linear",
        CIFAR_RESNET_FEATURES,
    ),
    "resnet18_32x32": (
        (3, 32, 32),
        "fc",
        {
            "layer1": (64, 32, 32),
            "layer2": (128, 16, 16),
            "layer3": (256, 8, 8),
            "layer4": (512, 4, 4),
            "avgpool": (512, 1, 1),
        },
    ),
}


def _build(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name](**kwargs).eval()


def _images(name: str, n: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, *SPECS[name][0], generator=gen)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_registry_lists_every_model():
    assert set(MODELS) == set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("num_classes", [10, 7])
def test_logits_shape(name, num_classes):
    model = _build(name, num_classes=num_classes)
    with torch.no_grad():
        logits = model(_images(name, n=3))
    assert logits.shape == (3, num_classes)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_feature_layers_match_documented_shapes(name):
    _, classifier, expected = SPECS[name]
    model = _build(name)
    assert model.feature_layers == tuple(expected)
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [
        modules[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out)
        )
        for layer in model.feature_layers
    ]
    try:
        with torch.no_grad():
            logits = model(_images(name, n=2))
    finally:
        for handle in handles:
            handle.remove()
    assert {layer: tuple(out.shape) for layer, out in captured.items()} == {
        layer: (2, *shape) for layer, shape in expected.items()
    }
    # The contract: normalize first; avgpool, flatten and the classifier last.
    children = [child for child, _ in model.named_children()]
    assert children[0] == "normalize"
    assert children[-2:] == ["avgpool", classifier]
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    head = getattr(model, classifier)
    torch.testing.assert_close(head(captured["avgpool"].flatten(1)), logits)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_eval_outputs_do_not_depend_on_batch_size(name):
    model = _build(name)
    x = _images(name, n=4)
    with torch.no_grad():
        together = model(x)
        one_by_one = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_normalization_buffers_stay_out_of_state_dict(name):
    model = _build(name)
    assert isinstance(model.normalize, Normalize)
    assert {key for key, _ in model.named_buffers()} >= {"normalize.mean", "normalize.std"}
    assert not [key for key in model.state_dict() if key.startswith("normalize")]
    assert model.to(torch.float64).normalize.mean.dtype == torch.float64  # buffers follow .to()


def test_models_normalize_their_input():
    model = _build("resnet20")
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    x = _images("resnet20")
    with torch.no_grad():
        expected = F.relu(model.bn1(model.conv1((x - mean) / std)))
        got = F.relu(model.bn1(model.conv1(model.normalize(x))))
    torch.testing.assert_close(got, expected)
    r18 = resnet18_32x32(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.testing.assert_close(r18.normalize(torch.ones(1, 3, 2, 2)), torch.full((1, 3, 2, 2), 2.0))


def test_normalize_single_value_broadcasts_over_channels():
    norm = Normalize((0.5,), (0.5,))
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(norm(x), (x - 0.5) / 0.5)


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        ((), (), "at least one value"),
        ((0.1, 0.2), (0.3,), "same length"),
        ((0.1,), (0.0,), "positive"),
    ],
)
def test_normalize_rejects_bad_statistics(mean, std, match):
    with pytest.raises(ValueError, match=match):
        Normalize(mean, std)


def test_normalize_names_expected_channels():
    norm = Normalize((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"C=3; got \(2, 1, 4, 4\)"):
        norm(torch.rand(2, 1, 4, 4))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ResNetCIFAR(depth=21), "depth must be 6 n \\+ 2"),
        (lambda: ResNetCIFAR(depth=2), "depth must be 6 n \\+ 2"),
        (lambda: resnet20(num_classes=0), "num_classes"),
        (lambda: resnet18_32x32(num_classes=0), "num_classes"),
        (lambda: SmallCNN(width=0), "width"),
        (lambda: SmallCNN(in_channels=3, mean=(0.1, 0.2), std=(1.0, 1.0)), "in_channels=3"),
    ],
)
def test_constructors_reject_bad_hyperparameters(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_hyperparameters_are_keyword_only():
    with pytest.raises(TypeError):
        resnet20(7)
    with pytest.raises(TypeError):
        SmallCNN(3)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet20", 269_722),
        ("resnet32", 464_154),
        ("resnet44", 658_586),
        ("resnet18_32x32", 11_173_962),
    ],
)
def test_parameter_counts(name, expected):
    # He et al. / akamaster: 0.27M, 0.46M, 0.66M; ResNet-18 for CIFAR: 11.17M.
    assert _n_params(MODELS[name]()) == expected


def test_option_a_shortcut_matches_reference_and_has_no_parameters():
    planes = 32
    shortcut = OptionAShortcut(16, planes, stride=2)
    x = torch.randn(2, 16, 32, 32)
    # akamaster's LambdaLayer, written out independently.
    reference = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0)
    torch.testing.assert_close(shortcut(x), reference)
    assert not list(shortcut.parameters()) and not shortcut.state_dict()
    model = resnet20()
    projections = [m for m in model.modules() if isinstance(m, OptionAShortcut)]
    assert len(projections) == 2  # first block of layer2 and layer3
    assert not [key for key in model.state_dict() if "shortcut" in key]


def _cifar_resnet_keys(blocks_per_stage: int) -> list[str]:
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight", *(f"bn1.{p}" for p in bn)]
    for stage in (1, 2, 3):
        for block in range(blocks_per_stage):
            prefix = f"layer{stage}.{block}"
            for conv, norm in (("conv1", "bn1"), ("conv2", "bn2")):
                keys += [f"{prefix}.{conv}.weight", *(f"{prefix}.{norm}.{p}" for p in bn)]
    return keys + ["linear.weight", "linear.bias"]


@pytest.mark.parametrize(("name", "blocks"), [("resnet20", 3), ("resnet32", 5), ("resnet44", 7)])
def test_cifar_resnet_keys_follow_akamaster(name, blocks):
    assert list(MODELS[name]().state_dict()) == _cifar_resnet_keys(blocks)


def test_resnet18_keys_follow_openood():
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = ["conv1.weight", *(f"bn1.{p}" for p in bn)]
    for stage in (1, 2, 3, 4):
        for block in (0, 1):
            prefix = f"layer{stage}.{block}"
            for conv, norm in (("conv1", "bn1"), ("conv2", "bn2")):
                expected += [f"{prefix}.{conv}.weight", *(f"{prefix}.{norm}.{p}" for p in bn)]
            if stage > 1 and block == 0:
                expected.append(f"{prefix}.shortcut.0.weight")
                expected += [f"{prefix}.shortcut.1.{p}" for p in bn]
    expected += ["fc.weight", "fc.bias"]
    state = resnet18_32x32().state_dict()
    assert list(state) == expected
    assert state["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
    assert state["fc.weight"].shape == (10, 512)


# ---------------------------------------------------------------- real akamaster checkpoints


def _checkpoint(name: str) -> Path:
    path = DATA / "models" / CHECKPOINTS[name]
    if not path.is_file():
        pytest.skip(f"{path} not found (set COVGUARD_DATA to the shared data folder)")
    return path


@pytest.mark.data
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_state_dict_keys_equal_real_checkpoint(name):
    raw = torch.load(_checkpoint(name), map_location="cpu", weights_only=True)["state_dict"]
    checkpoint_keys = [key.removeprefix("module.") for key in raw]
    # Checkpoints from PyTorch < 0.4.1 have no BatchNorm num_batches_tracked; BatchNorm fills it.
    model_keys = [key for key in MODELS[name]().state_dict() if "num_batches_tracked" not in key]
    assert model_keys == checkpoint_keys


@pytest.mark.data
def test_real_resnet20_loads_strictly_and_deterministically():
    path = _checkpoint("resnet20")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = cifar_resnet("resnet20", path).eval()
        second = load_checkpoint(resnet20(), path).eval()
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(first.bn1.running_var, raw["module.bn1.running_var"])
    torch.testing.assert_close(first.linear.weight, raw["module.linear.weight"])
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out1, out2 = first(x), second(x)
    assert torch.isfinite(out1).all()
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    assert out1.argmax(1).unique().numel() > 1  # trained weights, not a constant prediction


# ---------------------------------------------------------------- load_checkpoint


def _tiny() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(width=2)


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("suffix", "wrap", "prefix"),
    [
        (".pt", None, ""),
        (".pth", "state_dict", "module."),
        (".th", "model", ""),
        (".pt", "net", "module."),
        (".safetensors", None, ""),
    ],
)
def test_load_checkpoint_accepts_common_layouts(tmp_path, suffix, wrap, prefix):
    source = _tiny()
    for p in source.parameters():
        nn.init.normal_(p)
    state = {prefix + key: value for key, value in source.state_dict().items()}
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        _save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    target = _tiny()
    assert load_checkpoint(target, path) is target
    _assert_same_weights(target, source)


def test_load_checkpoint_fills_legacy_batchnorm_counters(tmp_path):
    source = _tiny()
    legacy = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    target = load_checkpoint(_tiny(), _save({"state_dict": legacy}, tmp_path / "old.th"))
    _assert_same_weights(target, source)


def test_load_checkpoint_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(_tiny(), path)


def test_load_checkpoint_rejects_unknown_suffix(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.th, \.pt, \.pth"):
        load_checkpoint(_tiny(), path)


def test_load_checkpoint_rejects_content_without_state_dict(tmp_path):
    path = _save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="got a dict with keys epoch, optimizer"):
        load_checkpoint(_tiny(), path)


def test_load_checkpoint_strict_lists_missing_and_unexpected_keys(tmp_path):
    state = _tiny().state_dict()
    del state["fc.weight"]
    state.update({f"extra.{i}": torch.zeros(1) for i in range(15)})
    path = _save(state, tmp_path / "mismatch.pt")
    target = _tiny()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_checkpoint(target, path)
    message = str(info.value)
    assert "1 missing (fc.weight)" in message
    assert "15 unexpected" in message and "extra.9" in message and "extra.10" not in message
    assert "and 5 more" in message
    for key, value in target.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_load_checkpoint_non_strict_warns_and_loads_matching_keys(tmp_path):
    source = _tiny()
    for p in source.parameters():
        nn.init.normal_(p)
    state = source.state_dict()
    del state["fc.bias"]
    state["extra"] = torch.zeros(1)
    target = _tiny()
    with pytest.warns(UserWarning, match="1 missing \\(fc.bias\\), 1 unexpected \\(extra\\)"):
        load_checkpoint(target, _save(state, tmp_path / "partial.pt"), strict=False)
    torch.testing.assert_close(target.fc.weight, source.fc.weight, rtol=0, atol=0)
    assert not torch.equal(target.fc.bias, source.fc.bias)


def test_load_checkpoint_rejects_shape_mismatch(tmp_path):
    path = _save(SmallCNN(width=2, num_classes=3).state_dict(), tmp_path / "k3.pt")
    with pytest.raises(ValueError, match=r"fc.weight: checkpoint \(3, 8\), model \(10, 8\)"):
        load_checkpoint(_tiny(), path, strict=False)


def test_cifar_resnet_builds_and_loads(tmp_path):
    source = cifar_resnet("resnet32")
    wrapped = {"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}
    path = _save(wrapped, tmp_path / "r32.th")
    loaded = cifar_resnet("resnet32", path)
    assert len(loaded.layer1) == 5
    _assert_same_weights(loaded, source)
    with pytest.raises(ValueError, match="resnet20, resnet32, resnet44; got 'resnet56'"):
        cifar_resnet("resnet56")


# ---------------------------------------------------------------- demo training


@pytest.mark.slow
def test_small_cnn_learns_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)  # (N, 1, 16, 16)
    y = torch.from_numpy(digits.target).long()
    train, test = train_test_split(range(len(y)), test_size=0.25, random_state=0, stratify=y)
    train, test = torch.tensor(train), torch.tensor(test)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        model.train()
        for batch in train[torch.randperm(len(train))].split(64):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert accuracy > 0.95
