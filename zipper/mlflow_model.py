"""The ZipperNet pyfunc flavour, logged as MLflow "models from code" (nothing pickled).

`mlflow.pyfunc.load_model("models:/<name>@champion").predict(images)` takes a uint8 array of
RGB images (N, H, W, 3) or normalised float (N, 3, H, W) and returns one column per task with
the predicted class name.
"""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F


class ZipperPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from zipper import load

        self.net = load(context.artifacts["checkpoint"]).eval()
        self.classes = json.loads(open(context.artifacts["classes"]).read())

    def predict(self, context, model_input, params=None):
        from zipper.data import MEAN, STD

        x = np.asarray(model_input)
        if x.dtype == np.uint8:  # (N, H, W, 3) RGB images
            x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
                / torch.tensor(STD).view(1, 3, 1, 1)
        else:
            x = torch.as_tensor(x, dtype=torch.float32)
        size = self.net.spec.input_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            logits = self.net(x)
        return pd.DataFrame({t: [self.classes[t][i] for i in v.argmax(1).tolist()] for t, v in logits.items()})


mlflow.models.set_model(ZipperPyfunc())
