"""Quality audit: how close the in-betweener's frame is to one the keyframe backend really drew.

Per shot the plan picks one in-between drawing (the one farthest from any keyframe); the
keyframe backend also draws it, and the in-betweener's version is compared against it:

* PSNR in dB on RGB, ``10·log10(255² / MSE)`` (identical images: ``IDENTICAL_PSNR``);
* SSIM on luma (Wang et al. 2004: Gaussian window σ = 1.5, K1 = 0.01, K2 = 0.03).

``flicker`` measures temporal instability of a frame stream: the mean absolute luma change
between consecutive *distinct* frames (holds excluded), in grey levels.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

VERSION = "1"
IDENTICAL_PSNR = 100.0


@dataclass(frozen=True)
class Fidelity:
    frame: int
    psnr_db: float
    ssim: float


def psnr(truth: np.ndarray, test: np.ndarray) -> float:
    _check(truth, test)
    mse = float(np.mean((truth.astype(np.float32) - test.astype(np.float32)) ** 2))
    return IDENTICAL_PSNR if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(truth: np.ndarray, test: np.ndarray) -> float:
    _check(truth, test)
    x = cv2.cvtColor(truth, cv2.COLOR_RGB2GRAY).astype(np.float32)
    y = cv2.cvtColor(test, cv2.COLOR_RGB2GRAY).astype(np.float32)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(img: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(img, (11, 11), 1.5)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    score = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(score.mean())


def fidelity(frame: int, truth: np.ndarray, test: np.ndarray) -> Fidelity:
    """Compare the in-betweener's ``test`` frame with the backend's ``truth`` for that frame."""
    return Fidelity(frame=frame, psnr_db=psnr(truth, test), ssim=ssim(truth, test))


class FlickerMeter:
    """Accumulates mean absolute luma change between consecutive distinct frames."""

    def __init__(self) -> None:
        self._last: np.ndarray | None = None
        self._total, self._count = 0.0, 0

    def add(self, frame: np.ndarray) -> None:
        if self._last is not None and frame is self._last:
            return  # a held frame is the same drawing: no change to measure
        luma = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if self._last is not None:
            self._total += float(cv2.absdiff(luma, self._last_luma).mean())
            self._count += 1
        self._last, self._last_luma = frame, luma

    @property
    def value(self) -> float:
        return self._total / self._count if self._count else 0.0


def _check(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"audit: images must be uint8 of one shape, got {a.shape} {a.dtype} and {b.shape} {b.dtype}")
