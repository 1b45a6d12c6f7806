"""The folded reductions equal their jnp / jax.nn counterparts bit for bit, NaN, ties and odd widths included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_soup.utils import reductions

WIDTHS = (1, 3, 8, 17, 1000, 1025, 50257)
EXACT = {
    "max_last": lambda x: jnp.max(x, axis=-1),
    "min_last": lambda x: jnp.min(x, axis=-1),
    "argmax_last": lambda x: jnp.argmax(x, axis=-1),
    "log_softmax": lambda x: jax.nn.log_softmax(x, axis=-1),
}


def _cases(width: int, rng: np.random.Generator):
  x = rng.normal(size=(4, width)).astype(np.float32)
  x[0, width // 3] = 40.0  # A clear maximum inside.
  x[1, -1] = 40.0  # ... in the last column (set aside when a width is odd).
  ties = np.round(x * 0.5).astype(np.float32)  # Many ties: argmax must return the first.
  nans = np.where(rng.random(x.shape) < 0.01, np.nan, x).astype(np.float32)
  nans[2, -1] = np.nan
  infs = x.copy()
  infs[0] = -np.inf  # A row with nothing finite.
  infs[3, width // 2] = np.inf
  return {"normal": x, "ties": ties, "nans": nans, "infs": infs}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", sorted(EXACT))
def test_equals_jnp_bit_for_bit(name, width):
  rng = np.random.default_rng(width)
  ours, theirs = jax.jit(getattr(reductions, name)), jax.jit(EXACT[name])
  for case, x in _cases(width, rng).items():
    got, want = np.asarray(ours(jnp.asarray(x))), np.asarray(theirs(jnp.asarray(x)))
    assert got.shape == want.shape and got.dtype == want.dtype or name == "argmax_last", (case, got.dtype)
    np.testing.assert_array_equal(got, want, err_msg=f"{name} on {case} rows of width {width}")


def test_argmax_is_int32_and_handles_leading_axes_and_integers():
  x = jnp.asarray(np.random.default_rng(0).integers(-5, 5, size=(2, 3, 77)), jnp.int32)
  got = reductions.argmax_last(x)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))
  np.testing.assert_array_equal(reductions.max_last(x, keepdims=True), jnp.max(x, axis=-1, keepdims=True))


@pytest.mark.parametrize("width", (5, 1024, 3001))
def test_gradients_match_jax(width):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, width)).astype(np.float32) * 4)
  w = jnp.asarray(rng.normal(size=(width,)).astype(np.float32))
  g1 = jax.grad(lambda v: jnp.sum(reductions.log_softmax(v) * w))(x)
  g2 = jax.grad(lambda v: jnp.sum(jax.nn.log_softmax(v) * w))(x)
  np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", (7, 1024, 50257))
def test_log_softmax_at_equals_picked_log_softmax(width):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 5, width)).astype(np.float32) * 3)
  index = jnp.asarray(rng.integers(0, width, size=(3, 5)), jnp.int32)
  want = lambda v: jnp.take_along_axis(jax.nn.log_softmax(v, axis=-1), index[..., None], axis=-1)[..., 0]
  got = lambda v: reductions.log_softmax_at(v, index)
  np.testing.assert_array_equal(jax.jit(got)(x), jax.jit(want)(x))
  w = jnp.asarray(rng.normal(size=(3, 5)).astype(np.float32))
  np.testing.assert_allclose(
      jax.grad(lambda v: jnp.sum(got(v) * w))(x),
      jax.grad(lambda v: jnp.sum(want(v) * w))(x), rtol=1e-5, atol=1e-6)


def test_the_normalizer_of_a_row_without_a_finite_maximum_is_logsumexps():
  """An all -inf row (or one holding +inf) shifted by its own maximum gave NaN where logsumexp gives -inf / +inf."""
  x = jnp.array([[-jnp.inf, -jnp.inf, -jnp.inf], [0.0, jnp.inf, 1.0], [1.0, 2.0, -jnp.inf]], jnp.float32)
  _, normalizer = jax.jit(reductions.log_softmax_at_and_normalizer)(x, jnp.array([0, 0, 1], jnp.int32))
  np.testing.assert_array_equal(normalizer[:2], [-np.inf, np.inf])
  np.testing.assert_allclose(normalizer[2], jax.nn.logsumexp(x[2]), rtol=1e-6)
