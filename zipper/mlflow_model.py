"""The ZipperNet pyfunc flavour, logged as MLflow "models from code" (nothing pickled).

`mlflow.pyfunc.load_model("models:/<name>@champion").predict(images)` takes a uint8 array of RGB
images (N, H, W, 3) of any size, preprocessed exactly as in training and evaluation (shorter side
resized to the input size, centre crop, ImageNet mean / std), and returns one column per task: the
predicted class name, or with `params={"output": "probabilities"}` the per-class probabilities (a list
per row, in the order of the task's classes).
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc.model import PythonModel

OUTPUTS = ("labels", "probabilities")


class ZipperPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from zipper import load

        self.net = load(context.artifacts["checkpoint"]).eval()
        self.classes = json.loads(open(context.artifacts["classes"]).read())

    def predict(self, context, model_input, params=None):
        from zipper.preprocess import preprocess

        output = (params or {}).get("output", "labels")
        if output not in OUTPUTS:
            raise ValueError(f"params output: expected one of {OUTPUTS}, got {output!r}")
        with torch.no_grad():
            logits = self.net(preprocess(np.asarray(model_input), self.net.spec.input_size))
        if output == "probabilities":
            return pd.DataFrame({t: list(v.softmax(1).numpy()) for t, v in logits.items()})
        return pd.DataFrame({t: [self.classes[t][i] for i in v.argmax(1).tolist()] for t, v in logits.items()})


mlflow.models.set_model(ZipperPyfunc())
