"""The embedded default data: two seeded procedural 10-class tasks that need no download.

- `shapes`: which of 10 shapes (circle, square, triangle, ...) sits somewhere in the image, drawn
  in a random colour, position, scale and rotation over a faint random texture, with clutter.
- `textures`: which of 10 patterns (stripes at 4 angles, checks, dots, ...) fills the image, in
  random colours, period, phase and (where the label allows) rotation, partly hidden by a shape.

Both are built from the same primitives (edges, orientations, colour blobs), so low-level features
are shared, while each task must ignore exactly the cue the other one asks for. Everything is drawn
vectorised with numpy on a supersampled grid (antialiased by box filtering), a few seconds for
thousands of images. The same (task, n, seed, size) always gives the same pixels.

Orientation is part of the label for stripes, so `textures` must not be flipped or rotated by
augmentation (see `HFLIP`).
"""

from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart", "arrow", "bar")
TEXTURES = ("stripes_0", "stripes_45", "stripes_90", "stripes_135", "checks", "dots", "grid", "noise", "waves", "rings")
TASKS: dict[str, tuple[str, ...]] = {"shapes": SHAPES, "textures": TEXTURES}
# Whether a horizontal flip keeps the label (stripes_45 <-> stripes_135 would swap).
HFLIP: dict[str, bool] = {"shapes": True, "textures": False}

SUPERSAMPLE = 3  # sub-pixels per pixel side; box-filtered down for antialiasing
CHUNK = 256  # images drawn at once (bounds memory: CHUNK * (size*SUPERSAMPLE)^2 floats per array)

# Difficulty knobs. Figure/ground brightness contrast matters most (with 8 stem channels the net sees
# luma edges first); then rotation and position range for shapes. BLANK_FRACTION sets the ceiling:
# 1 - 0.9 * BLANK_FRACTION (chance is 1 in 10 on a blank image). docs/teachers.md has the recipe sweep.
NOISE_SIGMA = (0.02, 0.07)  # per-image Gaussian pixel noise (0..1 scale), uniform range
SHAPE_RADIUS = (0.29, 0.43)  # shape radius as a fraction of the image side
POSITION_JITTER = 0.5  # 0: centred shapes, 1: anywhere they fit
ROTATION = 0.1  # shape rotation range as a fraction of +-180 degrees (+-18 degrees)
MIN_COLOUR_DIST = 0.5  # min RGB distance (0..sqrt(3)) between a shape and its background
MIN_LUMA_DIFF = 0.35  # min brightness difference between any figure and its ground (0..1)
TEXTURE_CONTRAST = (0.3, 0.9)  # min/max RGB distance between a texture's two colours
BG_TEXTURE_ALPHA = (0.0, 0.15)  # strength of the faint texture behind a shape (shapes task)
OCCLUDER_PROB = 0.25  # textures task: chance of a shape occluding part of the pattern
CLUTTER_LINES = 2  # up to this many thin random line segments over every image (each with p=0.5)
# Share of images whose figure (shape or pattern) is drawn at zero contrast: unreadable images, as
# real data sets have. No net can beat chance on them, so accuracy has a ceiling below 100% that a
# converged teacher reaches on every machine, rather than creeping towards 100% with more steps.
BLANK_FRACTION = 0.06


def generate(task: str, n: int, *, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`n` images of `task` as (uint8 array (n, size, size, 3), int64 labels (n,)), balanced over classes."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; built-in: {', '.join(TASKS)}")
    if n < 0 or size < 8:
        raise ValueError(f"synthetic: need n >= 0 and size >= 8, got n={n}, size={size}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, list(TASKS).index(task), n, size]))
    labels = rng.permutation(np.arange(n) % len(TASKS[task])).astype(np.int64)
    images = np.empty((n, size, size, 3), np.uint8)
    draw = _draw_shapes if task == "shapes" else _draw_textures
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        images[start:stop] = draw(labels[start:stop], size, rng)
    return images, labels


# --- drawing -------------------------------------------------------------------------------------


def _grid(b: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel centre coordinates in pixels, shaped (1, S, S) for broadcasting over a batch."""
    s = size * SUPERSAMPLE
    c = (np.arange(s, dtype=np.float32) + 0.5) / SUPERSAMPLE
    return c[None, None, :], c[None, :, None]  # x varies along columns, y along rows


def _down(a: np.ndarray, size: int) -> np.ndarray:
    """Box-filter a (B, S, S[, C]) supersampled array down to (B, size, size[, C])."""
    b = a.shape[0]
    return a.reshape(b, size, SUPERSAMPLE, size, SUPERSAMPLE, *a.shape[3:]).mean(axis=(2, 4))


def _u(rng: np.random.Generator, lo: float, hi: float, b: int) -> np.ndarray:
    return rng.uniform(lo, hi, b).astype(np.float32)[:, None, None]


def _colours(rng: np.random.Generator, b: int) -> np.ndarray:
    return rng.uniform(0, 1, (b, 3)).astype(np.float32)


LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _distinct_colour(rng: np.random.Generator, ref: np.ndarray, lo: float, hi: float = 2.0) -> np.ndarray:
    """Colours whose RGB distance to `ref` (B, 3) lies in [lo, hi] and whose luma differs by at least
    MIN_LUMA_DIFF (rejection sampling, vectorised)."""
    out = _colours(rng, len(ref))
    for _ in range(100):
        d = np.linalg.norm(out - ref, axis=1)
        bad = (d < lo) | (d > hi) | (np.abs((out - ref) @ LUMA) < MIN_LUMA_DIFF)
        if not bad.any():
            break
        out[bad] = _colours(rng, int(bad.sum()))
    return out


def _shape_mask(kind: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-mask of SHAPES[kind[i]] in unit local coordinates (u, v) of shape (B, S, S)."""
    out = np.zeros(u.shape, bool)
    r = np.sqrt(u * u + v * v)
    th = np.arctan2(v, u)
    for k, name in enumerate(SHAPES):
        idx = np.nonzero(kind == k)[0]
        if len(idx) == 0:
            continue
        uu, vv, rr, tt = u[idx], v[idx], r[idx], th[idx]
        if name == "circle":
            m = rr < 0.8
        elif name == "square":
            m = np.maximum(np.abs(uu), np.abs(vv)) < 0.68
        elif name == "triangle":
            m = _polygon(rr, tt, 3, 0.5)
        elif name == "star":
            sector = 2 * np.pi / 5
            f = np.abs(((tt - np.pi / 2) % sector) / sector - 0.5) * 2  # 1 at a point, 0 between points
            m = rr < 0.38 + 0.62 * f**1.5
        elif name == "cross":
            m = ((np.abs(uu) < 0.85) & (np.abs(vv) < 0.27)) | ((np.abs(uu) < 0.27) & (np.abs(vv) < 0.85))
        elif name == "ring":
            m = (rr < 0.85) & (rr > 0.5)
        elif name == "crescent":
            m = (rr < 0.85) & ((uu - 0.38) ** 2 + vv * vv > 0.68**2)
        elif name == "heart":
            x, y = uu * 1.25, -vv * 1.25 + 0.25
            m = (x * x + y * y - 1) ** 3 - x * x * y**3 < 0
        elif name == "arrow":
            m = ((uu > -0.9) & (uu < 0.15) & (np.abs(vv) < 0.17)) | (
                (uu >= 0.1) & (uu < 0.9) & (np.abs(vv) < (0.9 - uu) * 0.85)
            )
        elif name == "bar":
            m = (np.abs(uu) < 0.95) & (np.abs(vv) < 0.26)
        else:  # pragma: no cover - SHAPES and this table are edited together
            raise AssertionError(name)
        out[idx] = m
    return out


def _polygon(r: np.ndarray, th: np.ndarray, n: int, apothem: float) -> np.ndarray:
    sector = 2 * np.pi / n
    return r * np.cos(((th - np.pi / 2) % sector) - sector / 2) < apothem


def _place(
    b: int, size: int, rng: np.random.Generator, radius: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random local coordinates (u, v) of a shape (unit = its radius) and its radius in pixels."""
    x, y = _grid(b, size)
    rad = _u(rng, radius[0] * size, radius[1] * size, b)
    lo, hi = 0.5 - POSITION_JITTER / 2, 0.5 + POSITION_JITTER / 2
    cx = rng.uniform(lo, hi, b).astype(np.float32)[:, None, None] * (size - 1.6 * rad) + 0.8 * rad
    cy = rng.uniform(lo, hi, b).astype(np.float32)[:, None, None] * (size - 1.6 * rad) + 0.8 * rad
    a = _u(rng, -ROTATION * np.pi, ROTATION * np.pi, b)
    dx, dy = x - cx, y - cy
    u = (dx * np.cos(a) + dy * np.sin(a)) / rad
    v = (-dx * np.sin(a) + dy * np.cos(a)) / rad
    return u, v, rad


def _pattern(kind: np.ndarray, b: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Pattern field in [0, 1] of TEXTURES[kind[i]], shape (B, S, S)."""
    x, y = _grid(b, size)
    x, y = (
        np.broadcast_to(x, (b, size * SUPERSAMPLE, size * SUPERSAMPLE)),
        np.broadcast_to(y, (b, size * SUPERSAMPLE, size * SUPERSAMPLE)),
    )
    period = _u(rng, 4.0, 9.0, b)
    phase = _u(rng, 0, 1, b)
    sharp = _u(rng, 1.5, 12.0, b)  # soft (sine) to hard (square wave) edges
    free = _u(rng, 0, np.pi, b)  # rotation for the patterns whose label ignores it
    out = np.zeros(x.shape, np.float32)
    for k, name in enumerate(TEXTURES):
        idx = np.nonzero(kind == k)[0]
        if len(idx) == 0:
            continue
        xx, yy, per, ph, sh = x[idx], y[idx], period[idx], phase[idx], sharp[idx]
        if name.startswith("stripes_"):
            ang = np.deg2rad(float(name.split("_")[1])) + _u(rng, -0.17, 0.17, len(idx))
        else:
            ang = free[idx]
        u = xx * np.cos(ang) + yy * np.sin(ang)
        v = -xx * np.sin(ang) + yy * np.cos(ang)
        wave = lambda t: 1 / (1 + np.exp(-sh * np.sin(2 * np.pi * t)))
        if name.startswith("stripes_"):
            p = wave(v / per + ph)
        elif name == "checks":
            p = wave(u / per + ph) * wave(v / per + ph) + (1 - wave(u / per + ph)) * (1 - wave(v / per + ph))
        elif name == "dots":
            fu, fv = (u / per + ph) % 1 - 0.5, (v / per + ph) % 1 - 0.5
            rad = _u(rng, 0.18, 0.32, len(idx))
            p = (np.sqrt(fu * fu + fv * fv) < rad).astype(np.float32)
        elif name == "grid":
            fu, fv = np.abs((u / per + ph) % 1 - 0.5), np.abs((v / per + ph) % 1 - 0.5)
            w = _u(rng, 0.08, 0.16, len(idx))
            p = ((fu < w) | (fv < w)).astype(np.float32)
        elif name == "noise":
            p = _smooth_noise(len(idx), size, rng)
            p = 1 / (1 + np.exp(-sh * 0.6 * (p - 0.5) * 4))
        elif name == "waves":
            amp = _u(rng, 0.25, 0.6, len(idx))
            q = _u(rng, 8.0, 16.0, len(idx))
            p = wave(v / per + amp * np.sin(2 * np.pi * u / q) + ph)
        elif name == "rings":
            cx, cy = _u(rng, -8, size + 8, len(idx)), _u(rng, -8, size + 8, len(idx))
            p = wave(np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / per + ph)
        else:  # pragma: no cover
            raise AssertionError(name)
        out[idx] = p
    return out


def _smooth_noise(b: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Blotchy value noise in [0, 1] on the supersampled grid (random coarse grid, bilinear upsampled)."""
    s = size * SUPERSAMPLE
    cells = int(rng.integers(4, 9))
    g = rng.uniform(0, 1, (b, cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0, cells, s, dtype=np.float32)
    i0 = np.minimum(t.astype(int), cells - 1)
    f = t - i0
    rows = g[:, i0] * (1 - f)[None, :, None] + g[:, i0 + 1] * f[None, :, None]
    return rows[:, :, i0] * (1 - f)[None, None, :] + rows[:, :, i0 + 1] * f[None, None, :]


def _lines(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Overlay 0..CLUTTER_LINES thin random line segments of random colours (clutter)."""
    b: int = img.shape[0]
    x, y = _grid(b, size)
    for _ in range(CLUTTER_LINES):
        on = rng.uniform(0, 1, b) < 0.5
        if not on.any():
            continue
        p0 = rng.uniform(0, size, (b, 2)).astype(np.float32)
        p1 = p0 + rng.uniform(-size / 2, size / 2, (b, 2)).astype(np.float32)
        d = p1 - p0
        t = (x - p0[:, 0, None, None]) * d[:, 0, None, None] + (y - p0[:, 1, None, None]) * d[:, 1, None, None]
        t = np.clip(t / np.maximum((d * d).sum(1), 1e-6)[:, None, None], 0, 1)
        px = p0[:, 0, None, None] + t * d[:, 0, None, None] - x
        py = p0[:, 1, None, None] + t * d[:, 1, None, None] - y
        width = rng.uniform(0.4, 0.9, b).astype(np.float32)[:, None, None]
        m = ((px * px + py * py) < width * width) & on[:, None, None]
        col = _colours(rng, b)
        img = np.where(m[..., None], col[:, None, None, :], img)
    return img


def _finish(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Clutter, box-filter down, per-image Gaussian noise, quantise to uint8."""
    img = _down(_lines(img, size, rng), size)
    sigma = rng.uniform(*NOISE_SIGMA, len(img)).astype(np.float32)[:, None, None, None]
    img = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _readable(b: int, rng: np.random.Generator) -> np.ndarray:
    """(B, 1, 1) mask: False for the BLANK_FRACTION of images drawn without their figure."""
    return (rng.uniform(0, 1, b) >= BLANK_FRACTION)[:, None, None]


def _draw_shapes(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    b = len(labels)
    bg = _colours(rng, b)
    # A faint texture of random kind behind the shape: shared low-level statistics with `textures`.
    tex = _pattern(rng.integers(0, len(TEXTURES), b), b, size, rng)
    tex_col = _distinct_colour(rng, bg, 0.2)
    alpha = _u(rng, *BG_TEXTURE_ALPHA, b) * tex
    img = bg[:, None, None, :] * (1 - alpha[..., None]) + tex_col[:, None, None, :] * alpha[..., None]
    u, v, _ = _place(b, size, rng, SHAPE_RADIUS)
    m = _shape_mask(labels, u, v) & _readable(b, rng)
    fg = _distinct_colour(rng, bg, MIN_COLOUR_DIST)
    img = np.where(m[..., None], fg[:, None, None, :], img)
    return _finish(img, size, rng)


def _draw_textures(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    b = len(labels)
    c0 = _colours(rng, b)
    c1 = _distinct_colour(rng, c0, *TEXTURE_CONTRAST)
    p = _pattern(labels, b, size, rng)[..., None] * _readable(b, rng)[..., None]
    img = c0[:, None, None, :] * (1 - p) + c1[:, None, None, :] * p
    # An occluding shape of random kind: the shapes task's cue is clutter here.
    u, v, _ = _place(b, size, rng, (0.15, 0.3))
    m = _shape_mask(rng.integers(0, len(SHAPES), b), u, v) & (rng.uniform(0, 1, b) < OCCLUDER_PROB)[:, None, None]
    img = np.where(m[..., None], _colours(rng, b)[:, None, None, :], img)
    return _finish(img, size, rng)
