"""The scaling-law fit recovers known laws; the multiplier and its interval behave."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_hybrid.science.fit import (
    PowerLaw,
    bootstrap_multiplier,
    compute_multiplier,
    fit_power_law,
)

C = np.geomspace(1e16, 3e18, 5)


@pytest.mark.parametrize("a,b,e", [(40.0, 0.07, 1.8), (3e3, 0.2, 2.5), (9.0, 0.05, 0.0)])
def test_fit_recovers_known_parameters(a, b, e):
    f = fit_power_law(C, a * C**-b + e)
    assert f.params == 3
    assert f.b == pytest.approx(b, rel=1e-4)
    assert f.e == pytest.approx(e, abs=1e-3)
    assert f.a == pytest.approx(a, rel=1e-2)


def test_fit_two_points_is_a_plain_power_law():
    f = fit_power_law(C[:2], 40.0 * C[:2] ** -0.1)
    assert f.params == 2 and f.e == 0.0 and f.b == pytest.approx(0.1, rel=1e-9)


def test_multiplier_of_a_law_shifted_in_compute():
    base = PowerLaw(40.0, 0.07, 1.8, 3)
    # the same law with every compute worth 1.5x: other(C) = base(1.5 C)
    other = PowerLaw(40.0 * 1.5**-0.07, 0.07, 1.8, 3)
    assert compute_multiplier(base, other, 1e18) == pytest.approx(1.5, rel=1e-9)
    assert compute_multiplier(other, base, 1e18) == pytest.approx(1 / 1.5, rel=1e-9)
    # a law whose floor is above the target never reaches it
    assert compute_multiplier(base, PowerLaw(40.0, 0.07, 4.5, 3), 1e18) == 0.0
    # fitted from noisy points the interval holds the truth and orders its ends
    rng = np.random.default_rng(1)
    base_y = base(C) + rng.normal(0, 2e-3, len(C))
    other_y = other(C) + rng.normal(0, 2e-3, len(C))
    m = bootstrap_multiplier((C, base_y), (C, other_y), C[-1], n=200, seed=0)
    assert m["low"] <= m["multiplier"] <= m["high"] and m["draws"] == 200
    assert m["low"] < 1.5 < m["high"] and 1.2 < m["multiplier"] < 1.9


def test_fit_free_multiplier_reads_a_shifted_law_off_the_measured_points():
    from megatron_hybrid.science.ladder_report import _interpolated_multiplier

    law = PowerLaw(a=50.0, b=0.3, e=1.5, params=3)
    hybrid_c = np.geomspace(1e15, 1e17, 12)
    hybrid_l = [float(law(c * 2.0)) for c in hybrid_c]  # the hybrid: half the compute, same loss
    c = 3e16
    got = _interpolated_multiplier(c, float(law(c)), hybrid_c, hybrid_l)
    assert got == pytest.approx(2.0, rel=0.01)
    assert _interpolated_multiplier(1e14, float(law(1e14)), hybrid_c, hybrid_l) is None
