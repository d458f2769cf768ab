"""`zipper export`: one calibrated depth as an ONNX graph (input `images`, one output per task), kept only
once ONNX Runtime's outputs match PyTorch's on the same images."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_path, sha256_file
from .merge import load
from .preprocess import normalise

log = logging.getLogger(__name__)

CHECK_IMAGES = 8
TOLERANCE = 1e-3  # largest |logit difference| accepted: float32 kernels differ in their last bits, not more


def export(checkpoint: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write `checkpoint`'s net to `out` as ONNX and check it; returns where, its sha256 and the largest
    logit difference per task. A graph that disagrees with PyTorch is removed and reported."""
    import onnxruntime

    net = load(checkpoint).eval()
    out = Path(out)
    size = net.spec.input_size
    images = normalise(np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES, size, size, 3), dtype=np.uint8))
    with torch.no_grad():
        expected = net(images)
    with atomic_path(out) as tmp:  # a file already at `out` stays unless the new graph passes
        net.export_onnx(tmp)
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": images.numpy()})))
        diff = {t: float(np.abs(got[t] - expected[t].numpy()).max()) for t in net.spec.task_names}
        worst = max(diff.values())
        if worst > TOLERANCE:
            raise ValueError(
                f"{checkpoint}: the ONNX graph's logits differ from PyTorch's by up to {worst:.2e} "
                f"(per task: {diff}); nothing written"
            )
    log.info("exported %s to %s (largest logit difference to PyTorch %.1e)", checkpoint, out, worst)
    return {
        "checkpoint": str(checkpoint),
        "onnx": str(out.resolve()),
        "sha256": sha256_file(out),
        "tasks": net.spec.task_names,
        "max_abs_diff": diff,
        "input": {"name": "images", "shape": ["batch", 3, size, size], "normalised": "MEAN / STD of zipper.preprocess"},
    }
