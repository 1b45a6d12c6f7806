"""Souped decoding against an independent float64 NumPy model (catches miscompiled decode steps).

The explicit, parameter and naive (K+1 passes) soups of head bases are the same distribution, so their greedy
tokens must be identical, and every token must be the float64 reference's argmax with the reference's log-prob
(teacher-forced on the decoded prefix). XLA CPU fusions that miscompute the step (see `spectral_soup/_xla_cpu.py`)
fail here on the machines where they miscompute.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import spectral_soup
from spectral_soup.models.spectral import SpectralPolicy
from spectral_soup.soup import serving
from tests import numpy_reference
from tests import tiny

K = 3
STEPS = 5
CONFIG = tiny.tiny_config(vocab_size=2_048, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96)


@pytest.fixture(scope="module")
def policy():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  pol = SpectralPolicy(CONFIG, num_bases=K, basis_kind="heads", head_rank=4, logit_bias=True)
  shapes = nn.meta.unbox(jax.eval_shape(pol.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  params = tiny.random_params(shapes, seed=3)
  # Weights of std 1 / sqrt(fan_in): tiny.random_params' sharper ones make some prefixes so ill-conditioned that
  # float32 rounding alone moves a log-prob by 1e-3 (a relative change of 1e-7 in the weights does too).
  params["features"]["backbone"] = jax.tree_util.tree_map_with_path(
      lambda path, x: 0.5 * x
      if jax.tree_util.keystr(path).endswith("['kernel']") else x, params["features"]["backbone"])
  rng = np.random.default_rng(4)
  params["heads"]["c"] = jnp.asarray(0.5 * rng.normal(size=params["heads"]["c"].shape), jnp.float32)
  return pol, params


def _inputs(users: int, seed: int):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 8, users)
  prompts = [rng.integers(1, CONFIG.vocab_size, n).astype(np.int32) for n in lengths]
  padded = np.zeros((users, lengths.max()), np.int32)
  for u, p in enumerate(prompts):
    padded[u, padded.shape[1] - len(p):] = p
  lam = rng.dirichlet(np.ones(K + 1), users)[:, 1:].astype(np.float32)
  lam[0] = [1.2, -0.3, 0.4]  # An extrapolated user too.
  return prompts, padded, padded != 0, lam


def test_package_keeps_ynn_fusions_to_dots():
  """Importing the package is enough for the XLA CPU workaround (the tests set no flag of their own for it): the
  broadcast-weighted sum that YNN's reduction fusion miscomputes (tests/xla_cpu_regression.py) compiles without a
  YNN fusion, while plain dots may keep theirs."""
  import jax  # pylint: disable=g-import-not-at-top
  from spectral_soup import _xla_cpu  # pylint: disable=g-import-not-at-top
  if not _xla_cpu._jaxlib_knows(_xla_cpu.YNN_FLAG):
    pytest.skip("this jaxlib has no YNN fusions")
  assert spectral_soup.XLA_CPU_SAFE
  assert _xla_cpu.YNN_SAFE in os.environ.get("XLA_FLAGS", "").split()
  c, x = jnp.ones((3,)), jnp.ones((3, 2, 16_385))
  hlo = jax.jit(lambda c, x: (c[:, None, None] * x).sum(0)).lower(c, x).compile().as_text()
  assert "__ynn_fusion" not in hlo


@pytest.mark.parametrize("users", [5, 32])
def test_head_soups_decode_the_float64_reference(policy, users):
  pol, params = policy
  prompts, padded, mask, lam = _inputs(users, seed=users)
  decoded = {}
  for mode in ("explicit", "params", "naive"):
    tokens, aux = serving.generate(pol, params, lam, padded, mask, mode=mode, max_new_tokens=STEPS)
    decoded[mode] = (np.asarray(tokens), np.asarray(aux["logprobs"]))
  tokens, logprobs = decoded["explicit"]
  for mode in ("params", "naive"):
    np.testing.assert_array_equal(decoded[mode][0], tokens, err_msg=f"{mode} vs explicit greedy tokens")
    np.testing.assert_allclose(decoded[mode][1], logprobs, atol=1e-4, err_msg=f"{mode} vs explicit log-probs")
  check = numpy_reference.check_decode(CONFIG, params, np.array(prompts, dtype=object), lam, tokens, logprobs, STEPS)
  near_tie = check["margin"] < 1e-4  # A float32 argmax may legitimately flip there.
  assert near_tie.mean() < 0.05, "the test's random model should rarely produce near-ties"
  bad = ~check["argmax_ok"] & ~near_tie
  assert not bad.any(), f"tokens that are not the float64 argmax at (row, step) {np.argwhere(bad)[:5].tolist()}"
  assert check["logprob_err"].max() < 1e-4, f"max log-prob error {check['logprob_err'].max():.2e}"


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_single_query_attention_matches_full_attention(softcap):
  """A decoding step's attention over the head-major cache (plus the token's own key and value) equals
  `dot_product_attention` over the same keys laid out by slot, masked slots included."""
  from spectral_soup.models import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  b, s, hkv, g, d = 3, 7, 2, 3, 8
  q = rng.normal(size=(b, 1, hkv * g, d)).astype(np.float32)
  k, v = (rng.normal(size=(b, s + 1, hkv, d)).astype(np.float32) for _ in range(2))  # Slot s: the token itself.
  mask = rng.random((b, 1, s)) < 0.6
  mask[:, :, 0] = True
  head_major = lambda a: jnp.asarray(a.transpose(0, 2, 1, 3))
  got = layers.single_query_attention(jnp.asarray(q), head_major(k[:, :s]), head_major(v[:, :s]), jnp.asarray(mask),
                                      scale=0.3, softcap=softcap, own=(head_major(k[:, s:]), head_major(v[:, s:])))
  full_mask = np.concatenate([mask, np.ones((b, 1, 1), bool)], axis=-1)
  want = layers.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(full_mask), scale=0.3,
                                      softcap=softcap)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
