"""params.yaml validation: the shipped files load; bad keys and types name the key at fault."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zipper.config import load_params

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "params.tiny.yaml"


@pytest.mark.parametrize("path", ["params.yaml", "tests/fixtures/params.tiny.yaml"])
def test_shipped_params_load(path):
    params = load_params(REPO / path)
    assert params.tasks == ["shapes", "textures"]
    assert params.zipper.depths == list(range(1, len(params.zipper.depths) + 1))


def _write(tmp_path, mutate) -> Path:
    raw = yaml.safe_load((REPO / "tests/fixtures/params.tiny.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r["calibrate"].update(learning_rate=0.1), r"unknown key 'calibrate.learning_rate'"),
    (lambda r: r["calibrate"].update(lr="fast"), r"calibrate.lr: expected float, got 'fast'"),
    (lambda r: r["teachers"].update(steps=1.5), r"teachers.steps: expected int"),
    (lambda r: r.update(extra={}), r"unknown key 'extra'"),
    (lambda r: r["zipper"].update(scope="layer"), r"zipper.scope: unknown 'layer'"),
    (lambda r: r["zipper"].update(chain={"2": 1}), r"zipper.chain: entry 1 must be"),
    (lambda r: r["zipper"].update(chain={1: 0}), r"zipper.chain: entry 1 must be '\"1\": 0'"),
    (lambda r: r["data"]["tasks"].pop("textures"), r"at least two tasks"),
    (lambda r: r["teachers"].update(arch="vgg"), r"teachers.arch: unknown 'vgg'"),
    (lambda r: r["teachers"].update(label_smoothing=1.0), r"teachers.label_smoothing: expected a value in \[0, 1\)"),
])
def test_bad_params_name_the_key(tmp_path, mutate, match):
    with pytest.raises(ValueError, match=match):
        load_params(_write(tmp_path, mutate))


def test_overrides_apply_dotted_keys():
    params = load_params(REPO / "tests/fixtures/params.tiny.yaml", {"calibrate.steps": 3, "zipper.init": "weights"})
    assert params.calibrate.steps == 3 and params.zipper.init == "weights"


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "chain":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_tiny_fixture_is_params_yaml_with_these_keys_changed():
    shipped, tiny = (_flat(yaml.safe_load(p.read_text())) for p in (REPO / "params.yaml", TINY))
    assert set(tiny) <= set(shipped)
    changed = {k for k in shipped if tiny.get(k, "unset") != shipped[k]}
    sizes = {f"data.tasks.{t}.{n}" for t in ("shapes", "textures") for n in ("n_train", "n_val")}
    assert changed == sizes | {  # small and fast: 16 px, few images and steps, 3 depths, one thread
        "teachers.input_size", "teachers.steps", "teachers.batch_size", "teachers.lr", "teachers.label_smoothing",
        "zipper.chain", "calibrate.steps", "calibrate.batch_size", "calibrate.bn_reset_batches",
        "calibrate.checkpoint_every", "evaluate.latency_repeats", "runtime.threads", "runtime.channels_last"}


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")
