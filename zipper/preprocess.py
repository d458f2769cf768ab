"""The one preprocessing of images into network inputs, shared by the shards' streams, evaluation, the MLflow
model and ONNX export. A leaf module (numpy, Pillow, torch only), so a logged model needs nothing else."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# ImageNet statistics: what torchvision's pretrained weights expect, so imported teachers see their inputs.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_MEAN255 = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
_STD255 = torch.tensor(STD).view(1, 3, 1, 1) * 255


def resize_center(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bilinear) and centre-crop to size x size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def normalise(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), normalised with MEAN / STD."""
    t = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return ((t - _MEAN255) / _STD255).contiguous()


def compact(batch: torch.Tensor) -> torch.Tensor:
    """A `normalise`d batch as the uint8 (N, H, W, 3) images it was made from, a quarter of its memory
    (`expand` gives back the very same floats); any other batch as it is."""
    if batch.dtype != torch.float32 or batch.ndim != 4 or batch.shape[1] != 3:
        return batch
    images = (batch * _STD255 + _MEAN255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return images if torch.equal(normalise(images), batch) else batch


def expand(batch: torch.Tensor) -> torch.Tensor:
    """The inverse of `compact`."""
    return normalise(batch) if batch.dtype == torch.uint8 else batch


def preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB images of any size -> the normalised (N, 3, size, size) batch the validation
    stream makes (shorter side resized, centre crop)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
    if images.shape[1:3] != (size, size):
        images = np.stack([np.asarray(resize_center(Image.fromarray(img), size)) for img in images])
    return normalise(images)
