"""rmserve.activations.sigmoid: the logistic function, exact where float64 can be, and without
overflow (a warning, which the suite turns into an error) for rewards of any magnitude."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rmserve.activations import sigmoid


@pytest.mark.parametrize("x", [-30.0, -2.5, -1e-9, 0.0, 1e-9, 0.7, 3.0, 30.0])
def test_sigmoid_is_the_logistic_function(x: float) -> None:
    assert float(sigmoid(x)) == pytest.approx(1.0 / (1.0 + math.exp(-x)), rel=1e-15)


def test_sigmoid_saturates_without_overflow_and_keeps_shape() -> None:
    values = np.array([[-1e308, -800.0], [800.0, 1e308]])
    out = sigmoid(values)
    assert out.shape == (2, 2)
    assert out.dtype == np.float64
    assert out.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    # Symmetric: sigmoid(-x) = 1 - sigmoid(x).
    x = np.linspace(-20, 20, 41)
    assert np.allclose(sigmoid(-x), 1.0 - sigmoid(x), rtol=0, atol=1e-15)
