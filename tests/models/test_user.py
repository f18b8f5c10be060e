"""``--model-file PATH.py:FACTORY``: a user's own model, built by running their file."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from covguard.models.user import load_classifier, load_model_file

NET = """
from torch import nn

class Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))

def build(classes=3):
    return Net(classes)

def not_a_model():
    return 42

def broken():
    raise RuntimeError("boom")
"""


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(NET)
    return path


def test_builds_the_model_with_keyword_arguments(net_file, tmp_path):
    model = load_model_file(f"{net_file}:build", model_args=["classes=5"])
    assert isinstance(model, nn.Module) and model.fc.out_features == 5
    assert isinstance(load_model_file(f"{net_file}:Net"), nn.Module)  # a class is a factory too
    torch.manual_seed(0)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_classifier(name=None, model_file=f"{net_file}:build", weights=tmp_path / "w.safetensors", model_args=["classes=5"])
    assert not loaded.training and torch.equal(loaded.conv.weight, model.conv.weight)


def test_errors_name_the_option(net_file, tmp_path):
    with pytest.raises(ValueError, match="--model-file must be PATH.py:FACTORY"):
        load_model_file(str(net_file))
    with pytest.raises(FileNotFoundError, match="--model-file .* does not exist"):
        load_model_file(f"{tmp_path / 'none.py'}:build")
    with pytest.raises(ValueError, match=r"has no callable 'make'; its module-level callables: \['Net', 'broken', 'build'"):
        load_model_file(f"{net_file}:make")
    with pytest.raises(ValueError, match="must return a torch.nn.Module; got int"):
        load_model_file(f"{net_file}:not_a_model")
    with pytest.raises(ValueError, match="raised RuntimeError: boom"):
        load_model_file(f"{net_file}:broken")
    (tmp_path / "bad.py").write_text("import no_such_module_here\n")
    with pytest.raises(ValueError, match="failed to import: ModuleNotFoundError"):
        load_model_file(f"{tmp_path / 'bad.py'}:build")
    save_file({"other.weight": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="--weights: checkpoint .* does not match the keys of Net"):
        load_classifier(name=None, model_file=f"{net_file}:build", weights=tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="--weights: checkpoint file not found"):
        load_classifier(name=None, model_file=f"{net_file}:build", weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="exactly one of --model NAME and --model-file"):
        load_classifier(name="small_cnn", model_file=f"{net_file}:build", weights="w.pt")
