"""params.yaml validation: the shipped files load; bad keys and types name the key at fault."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from zipper.config import RANGES, Params, load_params
from zipper.graph import param_value

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
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r["calibrate"].update(learning_rate=0.1), r"unknown key 'calibrate.learning_rate'"),
        (lambda r: r["calibrate"].update(lr="fast"), r"calibrate.lr: expected float, got 'fast'"),
        (lambda r: r["teachers"].update(steps=1.5), r"teachers.steps: expected int"),
        (lambda r: r.update(extra={}), r"unknown key 'extra'"),
        (lambda r: r["zipper"].update(scope="layer"), r"zipper.scope: unknown 'layer'"),
        (lambda r: r["zipper"].update(chain={"2": 1}), r"zipper.chain: entry 1 must be"),
        (lambda r: r["zipper"].update(chain={1: 0}), r"zipper.chain: entry 1 must be '\"1\": 0'"),
        (lambda r: r["data"]["tasks"].pop("textures"), r"at least two tasks"),
        (lambda r: r["data"]["tasks"]["shapes"].update(n_trian=5), r"data.tasks.shapes: .*unknown key 'n_trian'"),
        (lambda r: r["data"]["tasks"].update(pets={"source": "imagefolder"}), r"data.tasks.pets: .*missing key 'root'"),
        (lambda r: r["teachers"].update(arch="vgg"), r"teachers.arch: unknown 'vgg'"),
        (
            lambda r: r["teachers"].update(label_smoothing=1.0),
            r"teachers.label_smoothing: expected a value in \[0, 1\)",
        ),
        (
            lambda r: r["calibrate"].update(checkpoint_every=0),
            r"calibrate.checkpoint_every: expected a value in \[1, inf\), got 0",
        ),
        (lambda r: r["evaluate"].update(threads=0), r"evaluate.threads: expected a value in \[1, inf\)"),
        (lambda r: r["calibrate"].update(lr=-0.1), r"calibrate.lr: expected a value in \(0, inf\)"),
        (lambda r: r["teachers"].update(lr=float("nan")), r"teachers.lr: expected a value in \(0, inf\), got nan"),
        (lambda r: r["runtime"].update(nproc_per_node=0), r"runtime.nproc_per_node: expected a value in \[1, inf\)"),
        (lambda r: r["teachers"].update(checkpoints={"shape": "t.pt"}), r"teachers.checkpoints: 'shape' is not a task"),
        (
            lambda r: r["zipper"].update(chain={str(d): d - 1 for d in range(1, 15)}),
            r"zipper.chain: depth 14 is deeper than mobilenet_v1, which has 13 blocks",
        ),
    ],
)
def test_bad_params_name_the_key(tmp_path, mutate, match):
    with pytest.raises(ValueError, match=match):
        load_params(_write(tmp_path, mutate))


def test_every_range_names_a_numeric_setting():
    params = load_params(TINY, {"calibrate.until": {}, "data.holdout": 0.2})  # the optional section, at its defaults
    for key in RANGES:
        assert isinstance(param_value(params, key), (int, float)), key


def test_dataclass_defaults_are_the_shipped_params():
    """One source per value: a section left out of params.yaml means what params.yaml says, except
    for the two values that depend on the tasks and the architecture."""
    shipped = load_params(REPO / "params.yaml")
    defaults = dataclasses.asdict(Params(data=shipped.data))
    differ = {
        f"{section}.{key}"
        for section, values in dataclasses.asdict(shipped).items()
        for key, value in values.items()
        if defaults[section][key] != value
    }
    assert differ == {"zipper.chain", "tracking.registered_model"}


def test_tracking_credentials_come_from_the_environment_and_are_never_shown(monkeypatch, tmp_path):
    from zipper.tracking import redacted

    with pytest.raises(ValueError, match="tracking.uri: holds a password; .*MLFLOW_TRACKING_URI"):
        load_params(TINY, {"tracking.uri": "https://ann:s3cret@mlflow.example.com"})
    params = load_params(TINY)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert params.tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://ann:s3cret@mlflow.example.com:5000/path")
    assert params.tracking.tracking_uri(tmp_path) == "https://ann:s3cret@mlflow.example.com:5000/path"
    assert redacted(params.tracking.tracking_uri(tmp_path)) == "https://ann:***@mlflow.example.com:5000/path"
    assert redacted("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


@pytest.mark.spawns
def test_connecting_leaves_the_environment_to_the_user(monkeypatch, tmp_path):
    """mlflow exports the URI it is given; a stage or test run after it, for another root, must not
    find it there and log into the wrong store."""
    from zipper.tracking import connect

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    params = load_params(TINY)
    connect(params.tracking, tmp_path / "a")
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert params.tracking.tracking_uri(tmp_path / "b") == f"sqlite:///{(tmp_path / 'b').resolve() / 'mlflow.db'}"


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
        "teachers.input_size",
        "teachers.steps",
        "teachers.batch_size",
        "teachers.lr",
        "teachers.label_smoothing",
        "zipper.chain",
        "zipper.init",  # average: the tiny pipelines' checks were settled at it
        "calibrate.steps",
        "calibrate.lr",  # 0.01: the tiny pipelines' checks were settled at it
        "calibrate.batch_size",
        "calibrate.bn_reset_batches",
        "calibrate.checkpoint_every",
        "evaluate.latency_repeats",
        "evaluate.memory",
        "tracking.live",  # on in the fixtures that check it (an MLflow import per stage process)
        "runtime.threads",
        "runtime.channels_last",
    }


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")
