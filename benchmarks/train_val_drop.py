"""Is a depth's drop a fit or a generalisation gap? Each calibrated depth against its teachers, on the
train split (what calibration distils on, with any held-out samples) and on val: the drop in points and
the agreement with the teacher's predictions, per task.

A drop on train as large as on val says calibration has not yet matched the teachers on the images it
trains on (more images per depth help); a drop on val only says the student matched them there and does
not carry it over.

    .venv/bin/python benchmarks/train_val_drop.py ROOT [--depths 1,3,6] [--batch-size 256]

ROOT is a project root or one arch's folder of a `sweep_archs.py` root (holding models/ and data/).
"""

from __future__ import annotations

import argparse
from itertools import count, takewhile
from pathlib import Path

import torch

from zipper.data import val_batches
from zipper.graph import Layout
from zipper.merge import load as load_zipper
from zipper.teachers import load_teacher

SPLITS = ("train", "val")


@torch.no_grad()
def predictions(predict, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, label) of every sample of the batches."""
    preds, labels = [], []
    for x, y in batches:
        preds.append(predict(x).argmax(1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def percent_equal(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100 * (a == b).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--depths", help="comma-separated depths (default: every calibrated depth under ROOT)")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    layout = Layout(args.root)
    depths = (
        [int(d) for d in args.depths.split(",")]
        if args.depths
        else list(takewhile(lambda d: layout.zipped(d).exists(), count(1)))  # the chain, from depth 1 up
    )
    if not depths:
        raise SystemExit(f"{layout.zipped(1).parent}: no calibrated depth")
    tasks = load_zipper(layout.zipped(depths[0])).spec.task_names
    teachers = {t: load_teacher(layout.teacher(t)) for t in tasks}

    def batches(task: str, split: str):
        size = teachers[task][1]["input_size"]
        return val_batches(layout.shards(task), input_size=size, batch_size=args.batch_size, split=split)

    cells = [(t, s) for t in tasks for s in SPLITS]
    reference = {(t, s): predictions(teachers[t][0], batches(t, s)) for t, s in cells}
    print("drop in points (agreement with the teacher, %)\n")
    print("| depth | " + " | ".join(f"{t} {s}" for t, s in cells) + " |")
    print("|---:|" + "---:|" * len(cells))
    print("| teacher accuracy | " + " | ".join(f"{percent_equal(*reference[c]):.2f}" for c in cells) + " |")
    for depth in depths:
        net = load_zipper(layout.zipped(depth)).eval()
        row = []
        for t, s in cells:
            ref, y = reference[(t, s)]
            pred, _ = predictions(lambda x: net.forward_tasks(x, [t])[t], batches(t, s))
            row.append(f"{percent_equal(ref, y) - percent_equal(pred, y):.2f} ({percent_equal(pred, ref):.2f})")
        print(f"| {depth} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
