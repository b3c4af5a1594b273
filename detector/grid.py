"""Images tiled into one picture: the HTTP service's grids (/v1/sample, /v1/interpolate) and the
training report's and `vaewatch sample`'s PNGs are laid out by this one function."""

from __future__ import annotations

import math

import numpy as np

from detector.config import IMAGE_SIDE


def image_grid(images: np.ndarray, *, columns: int | None = None, gap: int = 2) -> np.ndarray:
    """N images (N x 784 or N x 28 x 28; uint8, or floats in [0, 1]) row by row in one 2-D
    picture of their dtype, `gap` black pixels between neighbours; `columns` defaults to the
    smallest square that holds them."""
    images = np.asarray(images).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    n = len(images)
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    step = IMAGE_SIDE + gap
    grid = np.zeros((rows * step - gap, columns * step - gap), dtype=images.dtype)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * step : r * step + IMAGE_SIDE, c * step : c * step + IMAGE_SIDE] = image
    return grid
