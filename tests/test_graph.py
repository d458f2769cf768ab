"""The one stage graph: dvc.yaml is generated from it and the Prefect flow keys its cache by it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from zipper import graph
from zipper.cli import main
from zipper.config import load_params
from zipper.dvc_yaml import render
from zipper.flows import cache
from zipper.graph import STAGES, Layout, stage_io, stage_of

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "zipper"
TINY = REPO / "tests" / "fixtures" / "params.tiny.yaml"


def test_committed_dvc_yaml_is_the_generated_one(capsys):
    expected = render(load_params(REPO / "params.yaml"))
    assert (REPO / "dvc.yaml").read_text() == expected, "dvc.yaml is stale: run `zipper dvc-yaml > dvc.yaml`"
    assert main(["dvc-yaml", "--params", str(REPO / "params.yaml")]) == 0
    assert capsys.readouterr().out == expected


def _flow_runs(params) -> list[tuple[str, object]]:
    """(command, task or depth) of every task the flow submits for these params."""
    depths = [0, *params.zipper.depths]
    return (
        [(c, t) for c in ("data", "teachers", "features") for t in params.tasks]
        + [(c, d) for c in ("zip", "evaluate") for d in depths]
        + [("report", None), ("register", None)]
    )


def test_flow_and_dvc_run_the_same_stage_objects():
    import yaml

    params = load_params(TINY)
    flow_stages = [stage_of(command, arg) for command, arg in _flow_runs(params)]
    assert all(any(s is t for t in STAGES) for s in flow_stages)
    assert {s.name for s in flow_stages} == {s.name for s in STAGES}
    assert list(yaml.safe_load(render(params))["stages"]) == [s.name for s in STAGES]
    assert cache.stage_io is graph.stage_io  # the flow's cache identity reads the same declaration
    assert stage_of("zip", 0).name == "zip0" and stage_of("zip", 2).name == "zip"


def test_stage_runs_fill_the_layout(tmp_path):
    params = load_params(TINY)
    layout = Layout(tmp_path)
    zip2 = stage_io(stage_of("zip", 2), params, layout, 2)
    assert zip2.writes == (layout.zipped(2), layout.curves(2))
    assert layout.zipped(1) in zip2.reads and layout.zipped(2) not in zip2.reads
    assert {layout.teacher(t) for t in params.tasks} <= set(zip2.reads)
    teacher = stage_io(stage_of("teachers", "shapes"), params, layout, "shapes")
    assert teacher.reads == (layout.shards("shapes"),) and teacher.writes == (layout.teacher("shapes"),)
    assert teacher.shared == ((layout.teacher_metrics, "shapes"),)
    data = stage_io(stage_of("data", "textures"), params, layout, "textures")
    assert data.params == ("data.tasks.textures", "data.maxcount", "data.on_bad_sample", "teachers.input_size")
    evaluate3 = stage_io(stage_of("evaluate", 3), params, layout, 3)
    assert layout.metrics(0) in evaluate3.reads and evaluate3.writes == (layout.metrics(3),)
    report = stage_io(stage_of("report"), params, layout)
    assert report.reads == tuple(layout.metrics(d) for d in (0, 1, 2, 3))
    assert report.writes == layout.report_files


def test_imported_teachers_are_dependencies(tmp_path):
    import yaml

    params = load_params(TINY, {"teachers.checkpoints": {"shapes": "imported/shapes.pt"}})
    teachers = yaml.safe_load(render(params))["stages"]["teachers"]
    assert "imported/shapes.pt" in teachers["deps"]
    io = stage_io(stage_of("teachers", "shapes"), params, Layout(tmp_path), "shapes")
    assert Path("imported/shapes.pt") in io.reads


def test_image_folders_and_local_datasets_are_dependencies(tmp_path):
    import yaml

    params = load_params(
        TINY,
        {
            "data.tasks.shapes": {"source": "imagefolder", "root": "images/pets"},
            "data.tasks.textures": {"source": "torchvision", "dataset": "MNIST", "root": "tv", "download": True},
        },
    )
    data = yaml.safe_load(render(params))["stages"]["data"]
    assert "images/pets" in data["deps"] and "tv" not in data["deps"]  # a download has no folder to track yet
    shapes = stage_io(stage_of("data", "shapes"), params, Layout(tmp_path), "shapes")
    assert shapes.reads == (Path("images/pets"),)
    assert stage_io(stage_of("data", "textures"), params, Layout(tmp_path), "textures").reads == ()


def test_editing_an_image_folder_changes_the_flow_key(tmp_path):
    from PIL import Image

    from zipper.flows.cache import stage_key

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / "pets" / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "pets" / split / cls / "0.png")
    params = load_params(TINY, {"data.tasks.shapes": {"source": "imagefolder", "root": str(tmp_path / "pets")}})
    before = stage_key("data", params, Layout(tmp_path), "shapes")
    Image.new("RGB", (8, 8), (99, 20, 30)).save(tmp_path / "pets" / "val" / "dog" / "0.png")
    assert stage_key("data", params, Layout(tmp_path), "shapes") != before


def _imported(nodes, path: Path) -> set[Path]:
    """Package files that the relative `from ... import` statements among `nodes` of `path` name."""
    found = set()
    for node in nodes:
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        base = path.parents[node.level - 1]
        targets = [base.joinpath(*node.module.split("."))] if node.module else [base / a.name for a in node.names]
        found |= {p for t in targets for p in (t.with_suffix(".py"), t / "__init__.py") if p.is_file()}
    return found


def _closure(start: set[Path]) -> set[Path]:
    """Everything `start` imports, anywhere in each file, transitively. config.py takes only constants and
    config classes from its imports (params keys track what they hold): not followed; nor is stages.py,
    whose other stages' functions are not run."""
    seen, todo = set(), set(start)
    while todo:
        path = todo.pop()
        seen.add(path)
        if path.name not in ("config.py", "stages.py"):
            todo |= _imported(ast.walk(ast.parse(path.read_text())), path) - seen
    return seen


def _stage_entry(command: str) -> set[Path]:
    """stages.py's module-level imports and those of its `run_<command>`."""
    source = PACKAGE / "stages.py"
    body = ast.parse(source.read_text()).body
    fn = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == f"run_{command}")
    return {source} | _imported(body, source) | _imported(ast.walk(fn), source)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_code_deps_name_everything_the_stage_runs(stage):
    runs = _closure(_stage_entry(stage.command))
    declared = [PACKAGE / c for c in stage.all_code]
    missing = sorted(
        str(p.relative_to(PACKAGE))
        for p in runs
        if p.name != "graph.py" and not any(p == d or d in p.parents for d in declared)
    )
    assert not missing, f"{stage.name} runs {missing}, which its code deps do not name"


def test_stages_warn_when_dvc_yaml_is_stale(tmp_path, caplog):
    (tmp_path / "dvc.yaml").write_text(render(load_params(TINY)))
    renamed = tmp_path / "params.yaml"
    renamed.write_text(TINY.read_text().replace("textures", "patterns"))
    for params, stale in ((TINY, False), (renamed, True)):
        caplog.clear()
        assert main(["report", "--params", str(params), "--root", str(tmp_path)]) == 2  # no metrics yet
        assert ("regenerate it with `zipper dvc-yaml > dvc.yaml`" in caplog.text) == stale, caplog.text
