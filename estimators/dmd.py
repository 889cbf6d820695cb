"""Dynamic Mode Decomposition forecast (DMD, the exponential-basis forecaster cache-dit 1.5.3 ships
as its `dmd` calibrator, from HiCache++): the newest computed values y_0 .. y_{n-1}, evenly spaced
by s steps, are taken as y_{i+1} = A y_i. With X = [y_0 .. y_{n-2}] = U Σ V* (the modes above 1e-4
of the strongest, or `rank` of them) and X' = [y_1 .. y_{n-1}], the propagator seen from U is
Ã = U* X' V Σ⁻¹; its eigenpairs (λ, W) give the modes Φ = X' V Σ⁻¹ W, and b solves Φ b = y_{n-1}
in least squares. A call k·s steps after the last computed one gets Re Φ (λ^k ⊙ b), k fractional.

Fitted in float64, once per batch item (a prompt's forecast never depends on another's) and once
per window (every skipped call of a gap reuses the fit). Only the evenly spaced tail of the window
is fitted, since one application of A is one spacing; with fewer than 4 such values (a
data-dependent strategy's irregular steps, the warm-up) the forecast is first order, the last
change divided by its own gap. A fit that fails or a forecast that is not finite in the value's
dtype gives the last computed value. Reading the fit's rank (once per window) and checking the
forecast is finite (once per skipped call) are host syncs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cachekit.estimator import Estimator
from cachekit.hookspecs import hookimpl
from cachekit.schemas.estimators import DMDConfig
from cachekit.strategy import Step

#: Evenly spaced values a fit needs: a damped oscillation spends two complex modes.
FIT_FROM = 4
#: Modes weaker than this share of the strongest are noise (with rank 0).
CUTOFF = 1e-4

#: Per batch item: the modes Φ, their eigenvalues λ and amplitudes b.
Fit = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class _Window:
    values: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, computed value), oldest first
    fit: Fit | None = None
    fitted_on: tuple[int, int, int] | None = None  # (last step, values, spacing) the fit was made from


class DMDEstimator(Estimator[DMDConfig]):
    config_class = DMDConfig

    def new_state(self) -> _Window:
        return _Window()

    def record(self, state: _Window, value: torch.Tensor, step: Step) -> None:
        if state.values and state.values[-1][1].shape != value.shape:
            state.values.clear()
        state.values.append((step.index, value))
        del state.values[: -self.config.window]
        state.fit, state.fitted_on = None, None

    def estimate(self, state: _Window, step: Step) -> torch.Tensor:
        last_at, last = state.values[-1]
        tail, spacing = _even_tail(state.values)
        if len(tail) >= FIT_FROM:
            key = (last_at, len(tail), spacing)
            if state.fitted_on != key:
                state.fit, state.fitted_on = _fit(tail, self.config.rank, self.config.ridge), key
            forecast = None if state.fit is None else _advance(state.fit, (step.index - last_at) / spacing, last)
            return last if forecast is None else forecast
        if len(state.values) < 2:
            return last
        before_at, before = state.values[-2]
        return last + (last - before) * ((step.index - last_at) / (last_at - before_at))

    def kept(self, state: _Window) -> list[torch.Tensor]:
        return [value for _, value in state.values]

    def slots(self) -> int:
        return self.config.window


def _even_tail(values: list[tuple[int, torch.Tensor]]) -> tuple[list[torch.Tensor], int]:
    """The newest values spaced as the last two are (oldest first), and that spacing."""
    if len(values) < 2:
        return [], 0
    spacing = values[-1][0] - values[-2][0]
    start = len(values) - 2
    while start > 0 and values[start][0] - values[start - 1][0] == spacing:
        start -= 1
    return [value for _, value in values[start:]], spacing


def _fit(tail: list[torch.Tensor], rank: int, ridge: float) -> Fit | None:
    items = tail[-1].shape[0] if tail[-1].dim() > 1 else 1
    trajectories = torch.stack([value.reshape(items, -1) for value in tail], dim=-1).double()  # (items, d, n)
    fits = [_fit_one(trajectory, rank, ridge) for trajectory in trajectories]
    return None if any(fit is None for fit in fits) else fits  # type: ignore[return-value]


def _fit_one(
    trajectory: torch.Tensor, rank: int, ridge: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    earlier, later = trajectory[:, :-1], trajectory[:, 1:]
    try:
        left, singular, right_h = torch.linalg.svd(earlier, full_matrices=False)
    except RuntimeError:
        return None
    kept = rank or int((singular > singular[0] * CUTOFF).sum().clamp(min=1))
    kept = max(1, min(kept, singular.numel()))
    left, right = left[:, :kept], right_h[:kept].mH
    inverse = (1.0 / (singular[:kept] + ridge)).to(torch.complex128).unsqueeze(0)
    try:
        eigenvalues, eigenvectors = torch.linalg.eig((left.mH @ later @ right).to(torch.complex128) * inverse)
        modes = ((later @ right).to(torch.complex128) * inverse) @ eigenvectors
        amplitudes = torch.linalg.lstsq(modes, trajectory[:, -1:].to(torch.complex128)).solution.squeeze(1)
    except RuntimeError:
        return None
    return modes, eigenvalues, amplitudes


def _advance(fit: Fit, horizon: float, like: torch.Tensor) -> torch.Tensor | None:
    """The fit advanced `horizon` spacings past its last value, shaped and typed as `like`; None
    where it is not finite in that dtype."""
    rows = [(modes @ (eigenvalues.pow(horizon) * amplitudes)).real for modes, eigenvalues, amplitudes in fit]
    forecast = (torch.stack(rows) if like.dim() > 1 else rows[0]).to(like.dtype).reshape(like.shape)
    return forecast if bool(torch.isfinite(forecast).all()) else None


@hookimpl
def cachekit_register_estimators(register: Callable[[type[Estimator[Any]]], None]) -> None:
    register(DMDEstimator)
