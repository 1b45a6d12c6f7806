"""The posterior mean of a user's soup direction (online/direction.py): the math against NumPy, recovery, the prior."""

import jax
import numpy as np
import pytest

from spectral_soup.online import direction


def _numpy_reference(x, p, draws, lo, hi, num_scales):
  """float64 brute force of the posterior mean for one user."""
  scales = np.exp(np.linspace(np.log(lo), np.log(hi), num_scales))
  z = scales[:, None, None] * (x @ draws.T)[None]  # [G, N, M]
  log_sig = lambda v: -np.logaddexp(0.0, -v)
  ll = (p[None, :, None] * log_sig(z) + (1 - p[None, :, None]) * log_sig(-z)).sum(1)  # [G, M]
  log_w = np.logaddexp.reduce(ll, axis=0)
  w = np.exp(log_w - log_w.max())
  return (w / w.sum()) @ draws


def test_matches_a_float64_reference_with_the_same_draws():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 20, 4))
  p = rng.choice([0.0, 0.5, 1.0], size=(3, 20))
  draws = rng.dirichlet(np.ones(4), size=500)
  got = direction.posterior_mean_direction(x, p, directions=draws, scales=(0.2, 5.0), num_scales=7)
  want = np.stack([_numpy_reference(x[u], p[u], draws, 0.2, 5.0, 7) for u in range(3)])
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_recovers_a_planted_direction_and_keeps_every_basis_the_data_allow():
  rng = np.random.default_rng(1)
  truth = np.array([0.5, 0.3, 0.2, 0.0])
  x = rng.normal(size=(1, 800, 4))
  p = (rng.random((1, 800)) < 1 / (1 + np.exp(-5.0 * x[0] @ truth))).astype(np.float32)
  got = direction.posterior_mean_direction(x, p, key=jax.random.key(0), num_samples=8192)
  np.testing.assert_allclose(got[0], truth, atol=0.08)  # 800 noisy choices: the posterior is not a point.
  assert got[0, 3] < 0.03 and np.argmax(got[0]) == 0
  # Few comparisons: the estimate stays inside the simplex (no basis dropped to exactly zero).
  few = direction.posterior_mean_direction(x[:, :8], p[:, :8], key=jax.random.key(0))
  assert np.all(few > 0.01) and abs(few.sum() - 1) < 1e-5


def test_no_comparisons_give_the_prior_mean_and_users_are_independent():
  rng = np.random.default_rng(2)
  x, p = rng.normal(size=(2, 10, 5)), rng.integers(0, 2, size=(2, 10)).astype(np.float32)
  mask = np.ones((2, 10), bool)
  mask[1] = False
  draws = np.asarray(direction.prior_directions(jax.random.key(3), 5, 8192))
  got = direction.posterior_mean_direction(x, p, mask=mask, directions=draws)
  np.testing.assert_allclose(got[1], draws.mean(0), atol=1e-5)  # The prior mean, up to its own draws.
  np.testing.assert_allclose(got[1], 0.2, atol=0.01)
  alone = direction.posterior_mean_direction(x[:1], p[:1], directions=draws)
  np.testing.assert_allclose(got[0], alone[0], atol=1e-6)
  # A NaN on a row the mask drops is ignored.
  x[1, 0, 0] = np.nan
  np.testing.assert_allclose(direction.posterior_mean_direction(x, p, mask=mask, directions=draws), got, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({
        "prefs": np.full((2, 10), 2.0)
    }, r"prefs\[0, 0\] = 2.0: expected a label in \[0, 1\]"),
    ({
        "prefs": np.zeros((2, 9))
    }, r"prefs must have shape \[U, N\] = \[2, 10\]"),
    ({
        "concentration": 0.0
    }, "concentration=0.0: expected a finite number > 0"),
    ({
        "scales": (1.0, 0.5)
    }, r"expected \(scale_min, scale_max\) with 0 < scale_min <= scale_max"),
    ({
        "nan": True
    }, r"users \[1\] have non-finite delta_features or prefs"),
    ({
        "no_key": True
    }, "needs a key"),
])
def test_bad_inputs_name_what_was_expected(kwargs, match):
  x, p = np.zeros((2, 10, 3)), np.ones((2, 10))
  if kwargs.pop("nan", False):
    x[1, 4, 2] = np.nan
  key = None if kwargs.pop("no_key", False) else jax.random.key(0)
  p = kwargs.pop("prefs", p)
  with pytest.raises(ValueError, match=match):
    direction.posterior_mean_direction(x, p, key=key, **kwargs)
