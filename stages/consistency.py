"""Character consistency score: do a character's drawings look like the same character?

The measure, per character: every crop of the character (one per keyframe it appears in)
becomes a colour histogram in HSV — 16 hue × 4 saturation × 4 value bins, ignoring pixels
that are nearly white or nearly black (background, line art) — and the score is the mean
pairwise cosine similarity of those histograms, in 0 … 1. Hair, skin and outfit colours
dominate it, which is what a viewer notices first when a character "changes"; it is blind
to shape. A character with a single crop scores 1.0. Numpy and OpenCV only (no torch), so the
driver can compute it for MLflow.
"""
from __future__ import annotations

import cv2
import numpy as np

BINS = (16, 4, 4)


def colour_histogram(image: np.ndarray) -> np.ndarray:
    """L2-normalised HSV histogram of an RGB uint8 crop, without near-white and near-black pixels."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"colour_histogram: expected an RGB uint8 image, got {image.shape} {image.dtype}")
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    v, s = hsv[..., 2].astype(int), hsv[..., 1].astype(int)
    mask = ((v > 40) & ~((v > 235) & (s < 20))).astype(np.uint8)
    hist = cv2.calcHist([hsv], [0, 1, 2], mask, list(BINS), [0, 180, 0, 256, 0, 256]).ravel()
    norm = float(np.linalg.norm(hist))
    return hist / norm if norm > 0 else hist


def consistency_score(images_by_character: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Mean pairwise cosine similarity of each character's crop histograms (1.0 = identical colours)."""
    out: dict[str, float] = {}
    for name, crops in images_by_character.items():
        if not crops:
            raise ValueError(f"consistency_score: no crops for character {name!r}")
        hists = np.stack([colour_histogram(c) for c in crops])
        if len(hists) == 1:
            out[name] = 1.0
            continue
        sims = hists @ hists.T
        iu = np.triu_indices(len(hists), k=1)
        out[name] = float(sims[iu].mean())
    return out
