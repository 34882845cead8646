"""Compute scaling laws L(C) = a * C^-b + e, the compute multiplier between two of them, and a
bootstrap interval for it. numpy only.

The fit profiles the exponent: for a fixed b the model is linear in (a, e), solved by least
squares (with e clamped to [0, min L) and a > 0); b is found by a coarse grid then a golden-
section refinement of the residual. C is normalised by its smallest value first, so the linear
solve is well conditioned whatever the FLOP scale. With fewer than three points the
irreducible loss e is fixed at 0 (a two-parameter power law) and the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float
    e: float
    params: int
    """3 (a, b, e fitted) or 2 (e fixed at 0: too few points)."""

    def __call__(self, c):
        return self.a * np.asarray(c, dtype=float) ** (-self.b) + self.e

    def compute_for_loss(self, loss: float) -> float:
        """The compute at which this law reaches ``loss`` (inf if never: loss <= e)."""
        if loss <= self.e:
            return float("inf")
        return float(((loss - self.e) / self.a) ** (-1.0 / self.b))


def _solve_linear(x, y, b, free_e: bool):
    """Least-squares (a', e) for y = a' x^-b + e (x normalised), for one b or an array of
    them (vectorised: a bootstrap runs this ~10^5 times); returns (a', e, sse) alike."""
    b = np.asarray(b, dtype=float)
    f = x[None, :] ** (-b.reshape(-1, 1))  # [nb, n]
    n, sf, sff = len(x), f.sum(1), (f * f).sum(1)
    sy, sfy = y.sum(), f @ y
    if free_e:  # normal equations of [f 1][a e]^T = y, then e clamped to [0, min y)
        det = n * sff - sf * sf
        safe = np.where(det > 1e-12 * n * sff, det, np.inf)
        e = np.where(np.isfinite(safe), (sff * sy - sf * sfy) / safe, 0.0)
        e = np.clip(e, 0.0, y.min() * (1 - 1e-9))
    else:
        e = np.zeros_like(sf)
    a = np.maximum((sfy - e * sf) / sff, 1e-300)
    r = y[None, :] - (a[:, None] * f + e[:, None])
    sse = (r * r).sum(1)
    if b.ndim == 0:
        return float(a[0]), float(e[0]), float(sse[0])
    return a, e, sse


def fit_power_law(compute, loss, b_range=(1e-3, 3.0)) -> PowerLaw:
    c = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    if len(c) < 2 or len(c) != len(y):
        raise ValueError(f"need at least 2 (compute, loss) points, got {len(c)}")
    if (c <= 0).any() or not np.isfinite(y).all():
        raise ValueError("compute must be > 0 and losses finite")
    free_e = len(np.unique(c)) >= 3
    c0 = c.min()
    x = c / c0
    if not free_e:  # plain power law: log-linear regression is exact least squares in log space
        if len(np.unique(c)) < 2:
            raise ValueError("need at least 2 distinct compute values")
        slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
        b, a_n = -slope, float(np.exp(intercept))
        return PowerLaw(a=float(a_n * c0**b), b=float(b), e=0.0, params=2)

    def sse(b):
        return _solve_linear(x, y, b, True)[2]

    grid = np.geomspace(b_range[0], b_range[1], 300)
    i = int(_solve_linear(x, y, grid, True)[2].argmin())
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (np.sqrt(5) - 1) / 2
    for _ in range(40):  # golden section on [lo, hi] (a 2% bracket: 40 steps reach 1e-10)
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if sse(m1) < sse(m2):
            hi = m2
        else:
            lo = m1
    b = (lo + hi) / 2
    a_n, e, _ = _solve_linear(x, y, b, True)
    return PowerLaw(a=float(a_n * c0**b), b=float(b), e=float(e), params=3)


def compute_multiplier(base: PowerLaw, other: PowerLaw, at_compute: float) -> float:
    """How many times more compute ``base`` needs than ``other`` for the loss ``base`` reaches
    at ``at_compute``: C_base / C_other at equal loss (> 1: ``other`` is more efficient).
    ``other`` never reaching that loss gives 0."""
    target = float(base(at_compute))
    c_other = other.compute_for_loss(target)
    return 0.0 if not np.isfinite(c_other) else at_compute / c_other


def bootstrap_multiplier(base_pts, other_pts, at_compute: float, n: int = 1000,
                         seed: int = 0, level: float = 0.9) -> dict:  # fmt: skip
    """Residual bootstrap of ``compute_multiplier``: refit each law on its fitted values plus
    resampled residuals (resampling whole rungs breaks with 4-5 points per curve), ``n`` times.
    Returns the point estimate, the central ``level`` interval and the draws' median."""
    rng = np.random.default_rng(seed)
    fits, resid = [], []
    for c, y in (base_pts, other_pts):
        f = fit_power_law(c, y)
        fits.append(f)
        resid.append(np.asarray(y, dtype=float) - f(c))
    point = compute_multiplier(fits[0], fits[1], at_compute)
    draws = []
    for _ in range(n):
        refit = []
        for (c, _y), f, r in zip((base_pts, other_pts), fits, resid):
            y_star = f(c) + rng.choice(r, size=len(r), replace=True)
            try:
                refit.append(fit_power_law(c, y_star))
            except ValueError:
                break
        if len(refit) == 2:
            draws.append(compute_multiplier(refit[0], refit[1], at_compute))
    d = np.asarray(draws)
    q = (1 - level) / 2
    return {
        "multiplier": float(point),
        "low": float(np.quantile(d, q)) if len(d) else None,
        "high": float(np.quantile(d, 1 - q)) if len(d) else None,
        "median": float(np.median(d)) if len(d) else None,
        "level": level,
        "draws": int(len(d)),
        "at_compute": float(at_compute),
    }
