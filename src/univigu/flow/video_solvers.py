"""Video ODE solvers on a descending grid of noise levels: Euler, Heun and DPM-Solver++(2M)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .options import VideoSolver
from .paths import RectifiedFlowPath


def _lambda(s: float) -> float:
    """Half log-SNR of the rectified-flow path, ``log((1 - s) / s)``."""
    if s >= 1.0:
        return -math.inf
    if s <= 0.0:
        return math.inf
    return math.log1p(-s) - math.log(s)


class VideoODESolver:
    """Steps ``x_s`` down a descending grid of noise levels with Euler, Heun or DPM-Solver++(2M).

    The final step to ``s = 0`` is always first order, so the model is never evaluated on a clean
    video (which a ``clean_isolated`` model treats as a clean modality).
    """

    def __init__(self, solver: VideoSolver, grid: torch.Tensor):
        self.solver = solver
        self.grid = [float(v) for v in grid]
        self._previous: tuple[torch.Tensor, float] | None = None  # (data estimate, h) of the last step

    def step(self, i: int, x: torch.Tensor, velocity: torch.Tensor,
             evaluate: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """One step from ``grid[i]`` to ``grid[i + 1]``; `velocity` is the (guided) velocity at x.

        `evaluate(x, j)` returns the velocity at grid point ``j`` (Heun's corrector needs it).
        """
        s, s_next = self.grid[i], self.grid[i + 1]
        if self.solver == "euler":
            return x + (s_next - s) * velocity
        if self.solver == "heun":
            predicted = x + (s_next - s) * velocity
            if s_next <= 0.0:
                return predicted
            return x + (s_next - s) * 0.5 * (velocity + evaluate(predicted, i + 1))
        return self._dpmpp2m(x, velocity, s, s_next)

    def _dpmpp2m(self, x, velocity, s, s_next):
        # Data prediction with alpha = 1 - s, sigma = s; the first-order update is exact Euler.
        data = RectifiedFlowPath.velocity_to_data(x, velocity, torch.full(x.shape[:1], s, dtype=x.dtype))
        if s_next <= 0.0:
            self._previous = None
            return data
        h = _lambda(s_next) - _lambda(s)
        estimate = data
        if self._previous is not None and math.isfinite(self._previous[1]) and math.isfinite(h):
            r = self._previous[1] / h
            estimate = (1.0 + 0.5 / r) * data - (0.5 / r) * self._previous[0]
        self._previous = (data, h)
        ratio = s_next / s
        coefficient = (1.0 - s_next) - (1.0 - s) * ratio  # alpha_next (1 - e^{-h})
        return ratio * x + coefficient * estimate
