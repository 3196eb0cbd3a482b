import os
import pickle

import pytest
import torch
from torch import nn

from distill.models.weights import WeightLoadError, load_weights, read_state_dict


class Tiny(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3)
        self.fc = nn.Linear(width, 10)


def test_lightning_checkpoint_prefixes_are_stripped(tmp_path):
    src = Tiny()
    path = tmp_path / "run.ckpt"
    state = {f"student.{k}": v for k, v in src.state_dict().items()}
    state["terms.0.regressor.weight"] = torch.zeros(1)  # a connector of a KD run is not the student's
    torch.save({"state_dict": state, "epoch": 3}, path)
    dst = load_weights(Tiny(), path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_ddp_and_compile_prefixes_are_stripped(tmp_path):
    src = Tiny()
    path = tmp_path / "w.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}, path)
    assert torch.equal(load_weights(Tiny(), path).fc.weight, src.fc.weight)


def test_mismatches_are_named(tmp_path):
    path = tmp_path / "w.pt"
    state = Tiny(width=8).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    torch.save(state, path)
    with pytest.raises(WeightLoadError) as err:
        load_weights(Tiny(), path)
    message = str(err.value)
    assert "missing keys (1): fc.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "conv1.weight: checkpoint (8, 3, 3, 3) vs model (4, 3, 3, 3)" in message


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"fc.weight": Payload()}, handle)
    with pytest.raises(WeightLoadError, match="refused to load"):
        read_state_dict(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")
