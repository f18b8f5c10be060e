"""finetune: which parameters move, augmentation geometry, seeding."""

import pytest
import torch

from covguard.finetune import finetune, random_crop
from covguard.models import ResNetCIFAR


def _data():
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(64, 3, 32, 32, generator=gen) * 255).to(torch.uint8)
    return x, torch.arange(64) % 10


def test_trainable_modules_only_move_and_the_run_is_seeded():
    torch.manual_seed(0)
    model = ResNetCIFAR(depth=8).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    losses = finetune(model, x, y, trainable=("layer3", "linear"), epochs=3, lr=0.05, batch_size=16, progress=False)
    assert len(losses) == 3 and losses[-1] < losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("layer3.", "linear.")) for k in changed), sorted(changed)
    assert any(k.startswith("layer3.") and k.endswith("running_mean") for k in changed)  # trained BN: train mode
    assert not model.training and all(p.requires_grad for p in model.parameters())
    again = ResNetCIFAR(depth=8)
    again.load_state_dict(before)
    assert finetune(again, x, y, trainable=("layer3", "linear"), epochs=3, lr=0.05, batch_size=16, progress=False) == losses


def test_whole_network_with_crops_moves_every_stage():
    torch.manual_seed(0)
    model = ResNetCIFAR(depth=8).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    finetune(model, x, y, epochs=1, lr=0.05, batch_size=16, crop_padding=4, progress=False)
    after = model.state_dict()
    for prefix in ("conv1.", "layer1.", "layer2.", "layer3.", "linear."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    gen = torch.Generator().manual_seed(3)
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6) + 1
    out = random_crop(x, 2, gen)
    gen = torch.Generator().manual_seed(3)
    top = torch.randint(0, 5, (2,), generator=gen)
    left = torch.randint(0, 5, (2,), generator=gen)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        expected = padded[i, :, top[i] : top[i] + 5, left[i] : left[i] + 6]
        assert torch.equal(out[i], expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"trainable": ("nope",)}, "trainable modules ['nope']"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"crop_padding": -1}, "crop_padding must be >= 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    x, y = _data()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        finetune(ResNetCIFAR(depth=8), x, y, progress=False, **kwargs)


def test_finetuned_weights_load_from_the_checkpoint_folder_and_bad_keys_are_named(tmp_path):
    from safetensors.torch import save_file

    from covguard.bench.common import finetuned_path, load_cifar_model
    from covguard.models import cifar_resnet

    torch.manual_seed(0)
    source = cifar_resnet("resnet20")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, finetuned_path("resnet20", tmp_path))
    model = load_cifar_model(tmp_path, "resnet20", checkpoints="finetuned", checkpoint_dir=tmp_path)
    assert not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    del state["linear.bias"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, finetuned_path("resnet32", tmp_path))  # resnet20 keys under resnet32's name
    with pytest.raises(ValueError, match="missing") as err:
        load_cifar_model(tmp_path, "resnet32", checkpoints="finetuned", checkpoint_dir=tmp_path)
    assert "unexpected" in str(err.value) and "extra.weight" in str(err.value)
    with pytest.raises(FileNotFoundError, match="covguard finetune writes it"):
        load_cifar_model(tmp_path, "resnet44", checkpoints="finetuned", checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoints must be one of"):
        load_cifar_model(tmp_path, "resnet20", checkpoints="best")


def test_finetune_command_never_overwrites_without_force(tmp_path, capsys):
    from covguard.cli import main

    out = tmp_path / "r20.safetensors"
    out.write_bytes(b"keep me")
    assert main(["finetune", "--model", "resnet20", "--data", str(tmp_path), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"keep me"

