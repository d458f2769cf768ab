"""Checkpoint files: identical content gives identical bytes; non-finite weights are never written."""

from __future__ import annotations

import pytest
import torch

from zipper.io import load_torch, save_torch


def test_identical_content_saves_identical_bytes(tmp_path):
    state = {"state_dict": torch.nn.Linear(3, 4).state_dict(), "provenance": {"seed": 0}}
    save_torch(state, tmp_path / "a.pt")
    save_torch(state, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert torch.equal(load_torch(tmp_path / "b.pt")["state_dict"]["weight"], state["state_dict"]["weight"])


def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path):
    state = {"state_dict": {"fc.weight": torch.tensor([1.0, float("nan")])}, "step": 3}
    with pytest.raises(ValueError, match=r"refusing to write .*bad.pt: tensor 'state_dict.fc.weight' holds non-finite"):
        save_torch(state, tmp_path / "bad.pt")
    assert list(tmp_path.iterdir()) == []
