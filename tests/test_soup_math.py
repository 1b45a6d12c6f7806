"""Identities of the model-independent souping math (spectral_soup.soup)."""

from __future__ import annotations

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from spectral_soup import soup

_ATOL = 1e-5


def _normal(seed: int, shape, scale: float = 1.0) -> np.ndarray:
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _log_softmax64(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _soup_reference(ref_logits, basis_logits, lam) -> np.ndarray:
  """float64 numpy version of the explicit soup for one `[K]` lam."""
  lam = np.asarray(lam, np.float64)
  combined = (1 - lam.sum()) * _log_softmax64(ref_logits)
  combined = combined + np.tensordot(lam, _log_softmax64(basis_logits), axes=1)
  return _log_softmax64(combined)


# ----------------------------------------------------------------------------------------------------------------------
# Explicit souping.
# ----------------------------------------------------------------------------------------------------------------------


class ExplicitSoupTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.num_bases, self.shape = 3, (4, 2, 11)  # K; [B, T, V]
    self.ref = _normal(0, self.shape, 2.0)
    self.basis = _normal(1, (self.num_bases,) + self.shape, 2.0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0, 1, 2)
  def test_one_hot_lam_reproduces_basis(self, k):
    lam = jnp.eye(self.num_bases)[k]
    out = self.variant(soup.soup_logits)(self.ref, self.basis, lam)
    chex.assert_shape(out, self.shape)
    chex.assert_trees_all_close(out, _log_softmax64(self.basis[k]), atol=_ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_lam_reproduces_reference(self):
    out = self.variant(soup.soup_logits)(self.ref, self.basis, jnp.zeros(self.num_bases))
    chex.assert_trees_all_close(out, _log_softmax64(self.ref), atol=_ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(([0.5, 0.3, 0.4],), ([1.5, -0.7, 0.2],))
  def test_matches_float64_formula(self, lam):
    out = self.variant(soup.soup_logits)(self.ref, self.basis, jnp.asarray(lam))
    chex.assert_trees_all_close(out, _soup_reference(self.ref, self.basis, lam), atol=_ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_row_constants_change_nothing(self):
    lam = jnp.asarray([0.7, -0.4, 0.9])
    basis_shift = _normal(2, (self.num_bases,) + self.shape[:-1] + (1,), 10.0)  # per basis, per row.
    ref_shift = _normal(3, self.shape[:-1] + (1,), 10.0)
    soup_fn = self.variant(soup.soup_logits)
    chex.assert_trees_all_close(soup_fn(self.ref + ref_shift, self.basis + basis_shift, lam),
                                soup_fn(self.ref, self.basis, lam), atol=_ATOL)

  def test_low_precision_input_gives_normalized_float32(self):
    out = soup.soup_logits(self.ref.astype(jnp.bfloat16), self.basis.astype(jnp.bfloat16), jnp.asarray([0.2, 0.3, 0.1]))
    self.assertEqual(out.dtype, jnp.float32)
    chex.assert_trees_all_close(jax.nn.logsumexp(out, axis=-1), jnp.zeros(self.shape[:-1]), atol=_ATOL)

  def test_vmap_over_users_equals_loop(self):
    num_users = 4  # The leading axis of self.ref is the user axis here.
    lam = _normal(4, (num_users, self.num_bases))
    vmapped = jax.jit(jax.vmap(soup.soup_logits, in_axes=(0, 1, 0)))(self.ref, self.basis, lam)
    looped = jnp.stack([soup.soup_logits(self.ref[u], self.basis[:, u], lam[u]) for u in range(num_users)])
    chex.assert_trees_all_close(vmapped, looped, atol=_ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_batched_equals_loop(self):
    lam = _normal(5, (self.shape[0], self.num_bases))
    batched = self.variant(soup.soup_logits_batched)(self.ref, self.basis, lam)
    looped = jnp.stack([soup.soup_logits(self.ref[b], self.basis[:, b], lam[b]) for b in range(self.shape[0])])
    chex.assert_trees_all_close(batched, looped, atol=_ATOL)
    # A single [K] lam is broadcast to every row.
    shared = soup.soup_logits_batched(self.ref, self.basis, lam[0])
    chex.assert_trees_all_close(shared, soup.soup_logits(self.ref, self.basis, lam[0]), atol=_ATOL)

  def test_batched_rejects_wrong_number_of_rows(self):
    with self.assertRaisesRegex(ValueError, "lam has 3 rows but the batch has 4 rows"):
      soup.soup_logits_batched(self.ref, self.basis, np.zeros((3, self.num_bases)))

  def test_minus_inf_masking(self):
    ref = self.ref.copy()
    ref[..., 0] = -np.inf  # Token 0 is impossible under the reference only.
    one_hot = soup.soup_logits(ref, self.basis, jnp.asarray([0.0, 1.0, 0.0]))  # Reference coefficient is 0.
    chex.assert_trees_all_close(one_hot, _log_softmax64(self.basis[1]), atol=_ATOL)
    mixed = soup.soup_logits(ref, self.basis, jnp.asarray([0.3, -0.2, 0.4]))
    self.assertFalse(np.any(np.isnan(mixed)))
    np.testing.assert_array_equal(mixed[..., 0], -np.inf)
    chex.assert_trees_all_close(jax.nn.logsumexp(mixed, axis=-1), jnp.zeros(self.shape[:-1]), atol=_ATOL)


class ModCombineTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.logps = _log_softmax64(_normal(10, (4, 3, 9), 2.0)).astype(np.float32)  # [N, B, V]

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("reverse_kl", None), ("forward_kl", None), ("alpha", 0.5), ("alpha", 2.0), ("alpha", -0.5))
  def test_equal_weights_over_identical_inputs_return_input(self, divergence, alpha):
    num = 3
    stacked = jnp.broadcast_to(self.logps[0], (num,) + self.logps.shape[1:])
    combine = self.variant(functools.partial(soup.mod_combine, divergence=divergence, alpha=alpha))
    chex.assert_trees_all_close(combine(stacked, jnp.full((num,), 1.0 / num)), self.logps[0], atol=_ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_reverse_kl_equals_soup_logits(self):
    lam = jnp.asarray([0.6, -0.3, 0.5])
    weights = jnp.concatenate([1.0 - lam.sum(keepdims=True), lam])
    mod = self.variant(soup.mod_combine)(self.logps, weights)
    chex.assert_trees_all_close(mod, soup.soup_logits(self.logps[0], self.logps[1:], lam), atol=_ATOL)

  def test_forward_kl_is_alpha_one_and_harmonic_mean(self):
    weights = jnp.asarray([0.1, 0.2, 0.3, 0.4])
    forward = soup.mod_combine(self.logps, weights, "forward_kl")
    chex.assert_trees_all_close(forward, soup.mod_combine(self.logps, weights, "alpha", alpha=1.0), atol=_ATOL)
    harmonic = 1.0 / np.tensordot(np.asarray(weights, np.float64), np.exp(-self.logps.astype(np.float64)), axes=1)
    chex.assert_trees_all_close(forward, _log_softmax64(np.log(harmonic)), atol=_ATOL)

  @parameterized.parameters(("forward_kl", None), ("alpha", 0.5))
  def test_one_hot_weight_selects_policy(self, divergence, alpha):
    logps = self.logps.copy()
    logps[0, :, 0] = -np.inf  # A zero-weight policy with -inf entries must not produce NaN.
    out = soup.mod_combine(logps, jnp.asarray([0.0, 1.0, 0.0, 0.0]), divergence, alpha=alpha)
    chex.assert_trees_all_close(out, self.logps[1], atol=_ATOL)

  def test_invalid_arguments(self):
    with self.assertRaisesRegex(ValueError, "non-negative weights"):
      soup.mod_combine(self.logps, jnp.asarray([0.5, -0.5, 0.5, 0.5]), "forward_kl")
    with self.assertRaisesRegex(ValueError, "non-zero alpha"):
      soup.mod_combine(self.logps, jnp.full((4,), 0.25), "alpha", alpha=0.0)
    for alpha in (np.nan, np.inf):  # All-NaN log-probs before.
      with self.assertRaisesRegex(ValueError, "finite, non-zero alpha"):
        soup.mod_combine(self.logps, jnp.full((4,), 0.25), "alpha", alpha=alpha)
    for divergence in ("forward_kl", "alpha"):  # Every policy dropped: all NaN before.
      with self.assertRaisesRegex(ValueError, "at least one positive"):
        soup.mod_combine(self.logps, jnp.zeros(4), divergence, alpha=0.5)
    with self.assertRaisesRegex(ValueError, "divergence must be one of"):
      soup.mod_combine(self.logps, jnp.full((4,), 0.25), "jsd")
    with self.assertRaisesRegex(ValueError, "weights has 3 weights but there are 4 bases"):
      soup.mod_combine(self.logps, jnp.full((3,), 0.25))


# ----------------------------------------------------------------------------------------------------------------------
# Parameter souping.
# ----------------------------------------------------------------------------------------------------------------------


class ParamSoupTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.num_bases, dim, vocab = 3, 16, 13
    self.hidden = _normal(20, (5, dim))  # h(s): [B, D]
    self.ref_params = {"head": {"w": _normal(21, (dim, vocab)), "bias": _normal(22, (vocab,))}}
    self.basis_params = {
        "head": {
            "w": _normal(23, (self.num_bases, dim, vocab)),
            "bias": _normal(24, (self.num_bases, vocab))
        }
    }

  def _logits(self, params):
    head = params["head"]
    return jnp.matmul(self.hidden, head["w"], precision=jax.lax.Precision.HIGHEST) + head["bias"]  # [B, V]

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(([0.5, 0.3, 0.4],), ([1.2, -0.6, 0.1],))
  def test_linear_head_parameter_soup_equals_explicit_soup(self, lam):
    lam = jnp.asarray(lam)
    souped = self.variant(soup.soup_params)(self.ref_params, self.basis_params, lam)
    basis_logits = jax.vmap(self._logits)(self.basis_params)  # [K, B, V]
    explicit = soup.soup_logits(self._logits(self.ref_params), basis_logits, lam)
    chex.assert_trees_all_close(jax.nn.log_softmax(self._logits(souped)), explicit, atol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0, 1, 2)
  def test_one_hot_lam_recovers_basis_params(self, k):
    souped = self.variant(soup.soup_params)(self.ref_params, self.basis_params, jnp.eye(self.num_bases)[k])
    chex.assert_trees_all_close(souped, jax.tree.map(lambda x: x[k], self.basis_params), atol=1e-6)

  def test_zero_lam_recovers_reference_and_dtypes_are_kept(self):
    ref_params = {"w": self.ref_params["head"]["w"].astype(jnp.bfloat16), "bias": self.ref_params["head"]["bias"]}
    basis_params = {"w": self.basis_params["head"]["w"].astype(jnp.bfloat16), "bias": self.basis_params["head"]["bias"]}
    souped = soup.soup_params(ref_params, basis_params, jnp.zeros(self.num_bases))
    chex.assert_trees_all_equal_dtypes(souped, ref_params)
    chex.assert_trees_all_equal(souped, jax.tree.map(jnp.asarray, ref_params))

  def test_vmap_over_users(self):
    lam = _normal(25, (4, self.num_bases))
    batched = jax.jit(jax.vmap(soup.soup_params, in_axes=(None, None, 0)))(self.ref_params, self.basis_params, lam)
    for u in range(4):
      chex.assert_trees_all_close(jax.tree.map(lambda x: x[u], batched),
                                  soup.soup_params(self.ref_params, self.basis_params, lam[u]), atol=1e-6)

  def test_structure_mismatch_names_path(self):
    basis = {"head": {"w": self.basis_params["head"]["w"]}}
    with self.assertRaisesRegex(ValueError, r"ref_params has a leaf at \['head'\]\['bias'\] that basis_params lacks"):
      soup.soup_params(self.ref_params, basis, jnp.zeros(self.num_bases))
    basis = {"head": {**self.basis_params["head"], "extra": self.basis_params["head"]["bias"]}}
    with self.assertRaisesRegex(ValueError, r"basis_params has a leaf at \['head'\]\['extra'\]"):
      soup.soup_params(self.ref_params, basis, jnp.zeros(self.num_bases))
    basis = {"head": {**self.basis_params["head"], "bias": self.basis_params["head"]["bias"][0]}}
    with self.assertRaisesRegex(ValueError, r"basis_params\['head'\]\['bias'\] has shape \(13,\); expected"):
      soup.soup_params(self.ref_params, basis, jnp.zeros(self.num_bases))

  def test_refuses_lora_trees(self):
    ref = {"q": {"a": np.zeros((4, 2), np.float32), "b": np.zeros((2, 6), np.float32)}}
    basis = jax.tree.map(lambda x: np.zeros((3,) + x.shape, np.float32), ref)
    with self.assertRaisesRegex(ValueError, r"\['q'\] looks like a LoRA adapter"):
      soup.soup_params(ref, basis, jnp.zeros(3))
    soup.soup_params(ref, basis, jnp.zeros(3), lora_guard=False)


class LoraSoupTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.num_bases, self.scale = 3, 0.5
    # Two adapters, one with a layers axis L = 2: a [K, L, in, r], b [K, L, r, out].
    self.stacked = {
        "attn_q": {
            "a": _normal(30, (3, 2, 8, 4)),
            "b": _normal(31, (3, 2, 4, 6))
        },
        "mlp_up": {
            "a": _normal(32, (3, 5, 2)),
            "b": _normal(33, (3, 2, 7))
        },
    }

  def _weighted_sum(self, lam):
    """float64 scale * sum_k lam_k a_k @ b_k, per adapter."""
    lam = np.asarray(lam, np.float64)
    return {
        name: self.scale * np.einsum("k,k...ir,k...ro->...io", lam, ad["a"].astype(np.float64), ad["b"])
        for name, ad in self.stacked.items()
    }

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(([0.5, 0.3, 0.4],), ([1.0, 0.0, 0.0],), ([0.0, 0.0, 1.0],), ([0.9, -0.5, 0.2],))
  def test_dense_and_concat_equal_weighted_sum(self, lam):
    lam = jnp.asarray(lam)
    expected = self._weighted_sum(lam)
    dense = self.variant(functools.partial(soup.soup_lora_dense, scale=self.scale))(self.stacked, lam)
    chex.assert_trees_all_close(dense, expected, atol=1e-5)
    concat = self.variant(soup.soup_lora_concat)(self.stacked, lam)
    chex.assert_shape(concat["attn_q"]["a"], (2, 8, 12))
    chex.assert_shape(concat["attn_q"]["b"], (2, 12, 6))
    chex.assert_trees_all_close(soup.lora_delta(concat, self.scale), expected, atol=1e-5)

  @parameterized.parameters(0, 1, 2)
  def test_one_hot_recovers_adapter(self, k):
    lam = jnp.eye(self.num_bases)[k]
    adapter_k = jax.tree.map(lambda x: x[k], self.stacked)
    expected = soup.lora_delta(adapter_k, self.scale)
    chex.assert_trees_all_close(soup.soup_lora_dense(self.stacked, lam, self.scale), expected, atol=1e-5)
    chex.assert_trees_all_close(soup.lora_delta(soup.soup_lora_concat(self.stacked, lam), self.scale), expected,
                                atol=1e-5)

  def test_averaging_factors_separately_is_wrong(self):
    adapter = self.stacked["attn_q"]
    a, b = adapter["a"].astype(np.float64), adapter["b"].astype(np.float64)
    lam = np.asarray([0.5, 0.3, 0.4])
    right = self._weighted_sum(lam)["attn_q"]
    # P-SOUPS style: soup a and b tensor by tensor -> sum_{k,l} lam_k lam_l a_k @ b_l (cross terms).
    naive = self.scale * np.tensordot(lam, a, axes=1) @ np.tensordot(lam, b, axes=1)
    self.assertGreater(np.abs(naive - right).max(), 0.1)
    # Peer bug: scale a by lam, sum b unweighted. A one-hot lam does not give adapter k back.
    one_hot = np.eye(3)[1]
    buggy = self.scale * np.tensordot(one_hot, a, axes=1) @ b.sum(axis=0)
    self.assertGreater(np.abs(buggy - self.scale * a[1] @ b[1]).max(), 0.1)

  def test_lora_delta_single_adapter_and_errors(self):
    adapter = {"a": _normal(34, (8, 4)), "b": _normal(35, (4, 6))}
    chex.assert_trees_all_close(soup.lora_delta(adapter, 2.0), 2.0 * adapter["a"] @ adapter["b"], atol=1e-5)
    with self.assertRaisesRegex(ValueError, r"adapter \['bad'\]"):
      soup.soup_lora_dense({"bad": {"a": np.zeros((3, 8, 4)), "b": np.zeros((3, 5, 6))}}, jnp.ones(3), 1.0)
    with self.assertRaisesRegex(ValueError, "lam has 2 weights but there are 3 bases"):
      soup.soup_lora_concat(self.stacked, jnp.ones(2))
    for scale in (np.nan, np.inf, [1.0, 2.0]):  # NaN / inf weights before.
      with self.assertRaisesRegex(ValueError, "scale must be a finite number"):
        soup.lora_delta(adapter, scale)
      with self.assertRaisesRegex(ValueError, "scale must be a finite number"):
        soup.soup_lora_dense(self.stacked, jnp.ones(3), scale)


# ----------------------------------------------------------------------------------------------------------------------
# Implicit souping (rejection sampling).
# ----------------------------------------------------------------------------------------------------------------------


def _chisquare_pvalue(tokens, log_probs) -> float:
  """Goodness-of-fit p-value of `tokens` against the distribution exp(log_probs) `[V]`, pooling bins under 5."""
  tokens = np.asarray(tokens)
  probs = np.exp(np.asarray(log_probs, np.float64))
  probs = probs / probs.sum()
  counts = np.bincount(tokens, minlength=probs.size).astype(np.float64)
  expected = probs * tokens.size
  small = expected < 5
  if small.any():
    counts = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
  if expected[-1] == 0:  # All pooled bins had probability 0: a sample there is an outright failure.
    return 0.0 if counts[-1] > 0 else stats.chisquare(counts[:-1], expected[:-1]).pvalue
  return stats.chisquare(counts, expected).pvalue


_jitted_rejection_sample = jax.jit(soup.rejection_sample, static_argnames=("max_proposals",))


class ImplicitSoupTest(chex.TestCase):
  num_samples = 20_000
  vocab = 8

  def setUp(self):
    super().setUp()
    self.ref_row = _normal(40, (self.vocab,), 1.0)
    self.basis_rows = _normal(41, (3, self.vocab), 1.0)
    self.ref = np.broadcast_to(self.ref_row, (self.num_samples, self.vocab))
    self.basis = np.broadcast_to(self.basis_rows[:, None], (3, self.num_samples, self.vocab))

  def _sample(self, lam, seed=0, basis=None, max_proposals=64, temperature=1.0):
    # One jitted sampler with fixed shapes and explicit arguments, so that tests share compilations.
    basis = self.basis if basis is None else basis
    return _jitted_rejection_sample(jax.random.key(seed), self.ref, basis, jnp.asarray(lam, jnp.float32),
                                    max_proposals=max_proposals, temperature=temperature)

  @parameterized.named_parameters(
      ("positive", [0.5, 0.3, 0.4], 1.0),
      ("negative_weight", [0.9, -0.6, 0.5], 1.0),
      ("temperature", [0.5, 0.3, 0.4], 0.7),
  )
  def test_goodness_of_fit_to_explicit_soup(self, lam, temperature):
    tokens, aux = self._sample(lam, temperature=temperature)
    self.assertEqual(tokens.dtype, jnp.int32)
    chex.assert_shape(tokens, (self.num_samples,))
    target = soup.soup_logits(self.ref_row, self.basis_rows, jnp.asarray(lam)) / temperature
    self.assertGreater(_chisquare_pvalue(tokens, jax.nn.log_softmax(target)), 1e-3)
    self.assertGreater(np.mean(aux["accepted"]), 0.9)  # The test exercises acceptance, not just the fallback.

  def test_wrong_target_is_rejected(self):
    lam = [0.5, 0.3, 0.4]
    tokens, _ = self._sample(lam)
    # Same samples against the proposal (reference) distribution: the test must be able to fail.
    self.assertLess(_chisquare_pvalue(tokens, _log_softmax64(self.ref_row)), 1e-3)

  def test_aux_statistics(self):
    max_proposals = 64
    tokens, aux = self._sample([0.9, -0.6, 0.5], max_proposals=max_proposals)
    del tokens
    for name in ("acceptance_rate", "empirical_acceptance_rate"):
      self.assertTrue(np.all((aux[name] >= 0) & (aux[name] <= 1)), name)
    # Exact acceptance probability matches the fraction of proposals that passed.
    self.assertAlmostEqual(float(np.mean(aux["empirical_acceptance_rate"])), float(aux["acceptance_rate"][0]),
                           delta=0.01)
    num_proposals = np.asarray(aux["num_proposals"])
    self.assertTrue(np.all((num_proposals >= 1) & (num_proposals <= max_proposals)))
    np.testing.assert_array_equal(num_proposals[~np.asarray(aux["accepted"])], max_proposals)
    # The number of proposals to the first acceptance is geometric: mean 1 / rate (truncated at P).
    rate = float(aux["acceptance_rate"][0])
    truncated_mean = (1 - (1 - rate)**max_proposals) / rate
    self.assertAlmostEqual(float(np.mean(num_proposals)), truncated_mean, delta=0.05 * truncated_mean)

  def test_single_proposal_peaked_target_falls_back_correctly(self):
    basis = self.basis.copy()
    basis[:, :, 5] += 6.0  # Every basis strongly prefers token 5; the reference does not.
    lam = jnp.asarray([0.4, 0.4, 0.4])
    tokens, aux = self._sample(lam, seed=1, basis=basis, max_proposals=1)
    self.assertGreater(1.0 - np.mean(aux["accepted"]), 0.5)  # Most rows fell back.
    np.testing.assert_array_equal(aux["num_proposals"], 1)
    target = soup.soup_logits(self.ref_row, basis[:, 0], lam)
    self.assertGreater(_chisquare_pvalue(tokens, target), 1e-3)
    self.assertLess(_chisquare_pvalue(tokens, _log_softmax64(self.ref_row)), 1e-3)

  def test_a_zero_uniform_does_not_accept_an_improbable_proposal(self):
    """jax's float32 uniforms are 0 one time in 2^23, and log(0) passed every finite threshold: a token of
    acceptance probability 1e-20 was accepted 2^-23 of the time (46% of the accepted samples when the soup's
    acceptance rate is small). The tests now use the uniforms' cell midpoints."""
    ref = jnp.log(jnp.asarray([[1.0 - 1e-7, 1e-7]]))
    basis = jnp.asarray([[[-60.0, 0.0]]])  # Token 0: log-ratio -60 below token 1's.
    uniforms = jnp.asarray([[0.0, 0.0, 0.5]])  # Proposal u = 0: token 0; its test u = 0; the fallback's 0.5.
    tokens, aux = soup.rejection_sample(None, ref, basis, jnp.ones(1), max_proposals=1, uniforms=uniforms)
    self.assertFalse(bool(aux["accepted"][0]))  # Rejected; the fallback draws the soup (token 1: all its mass).
    self.assertEqual(int(tokens[0]), 1)
    # A probability-1 proposal still passes at the smallest uniform, and one of 2^-23 at the grid's half of the time.
    _, aux = soup.rejection_sample(None, ref, jnp.asarray([[[0.0, -60.0]]]), jnp.ones(1), max_proposals=1,
                                   uniforms=uniforms)
    self.assertTrue(bool(aux["accepted"][0]))
    with self.assertRaisesRegex(ValueError, "temperature must be finite and > 0"):
      soup.rejection_sample(None, ref, basis, jnp.ones(1), temperature=np.inf, uniforms=jnp.zeros((1, 129)))

  def test_a_soup_that_shares_no_token_with_a_masked_reference_accepts_nothing(self):
    """A caller's masked reference (-inf logits) and a basis on the other tokens: no proposal can pass, so the
    acceptance rate is 0 (it read NaN: -inf - -inf); the fallback draws the soup, whose support is tokens 2 and 3."""
    ref = jnp.asarray([[0.0, 0.0, -jnp.inf, -jnp.inf]])
    basis = jnp.asarray([[[-jnp.inf, -jnp.inf, 0.0, 0.0]]])
    tokens, aux = soup.rejection_sample(None, ref, basis, jnp.ones(1), max_proposals=4, uniforms=jnp.full((1, 9), 0.25))
    self.assertEqual(float(aux["acceptance_rate"][0]), 0.0)
    self.assertFalse(bool(aux["accepted"][0]))
    self.assertIn(int(tokens[0]), (2, 3))

  def test_shared_lam_equals_per_row_lam(self):
    # Jitted only: eager sampling compiles each random primitive separately and costs seconds on CPU.
    lam = np.asarray([0.5, 0.3, 0.4], np.float32)
    tokens_shared, _ = self._sample(lam, seed=2)
    tokens_rows, _ = self._sample(np.broadcast_to(lam, (self.num_samples, 3)), seed=2)
    np.testing.assert_array_equal(tokens_shared, tokens_rows)


# ----------------------------------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------------------------------


class ValidationTest(parameterized.TestCase):

  def test_wrong_length(self):
    with self.assertRaisesRegex(ValueError, "lam has 3 weights but there are 4 bases"):
      soup.check_lam(np.ones(3), 4)

  def test_nan_and_inf_are_located(self):
    lam = np.zeros((3, 2))
    lam[2, 1] = np.nan
    with self.assertRaisesRegex(ValueError, r"lam\[2, 1\] is NaN"):
      soup.check_lam(lam, 2)
    with self.assertRaisesRegex(ValueError, r"user_lam\[1\] is -inf"):
      soup.check_lam(jnp.asarray([0.0, -jnp.inf, 1.0]), 3, name="user_lam")

  def test_wrong_rank_and_dtype(self):
    with self.assertRaisesRegex(ValueError, r"lam must have shape \[K\] or \[B, K\] with K=3"):
      soup.check_lam(np.zeros((2, 2, 3)), 3)
    with self.assertRaisesRegex(ValueError, r"lam must have shape \[K\] with K=3"):
      soup.check_lam(np.zeros((2, 3)), 3, allow_batch=False)
    with self.assertRaisesRegex(ValueError, "must hold real numbers"):
      soup.check_lam(np.array([True, False]), 2)

  def test_accepts_valid_lam(self):
    soup.check_lam([0, 1, 0], 3)
    soup.check_lam(jnp.ones((5, 3), jnp.bfloat16), 3)

  def test_skips_values_of_tracers(self):

    @jax.jit
    def fn(lam):
      soup.check_lam(lam, 3)
      return lam * 2

    self.assertTrue(np.isnan(fn(jnp.asarray([0.0, jnp.nan, 1.0]))[1]))

  def test_public_entry_points_validate(self):
    ref, basis = np.zeros((2, 5), np.float32), np.zeros((4, 2, 5), np.float32)
    with self.assertRaisesRegex(ValueError, "lam has 3 weights but there are 4 bases"):
      soup.soup_logits(ref, basis, np.ones(3))
    with self.assertRaisesRegex(ValueError, r"lam\[1, 2\] is NaN"):
      soup.soup_logits_batched(ref, basis, np.array([[0, 0, 0, 0], [0, 0, np.nan, 0]]))
    with self.assertRaisesRegex(ValueError, r"lam\[0\] is inf"):
      soup.rejection_sample(jax.random.key(0), ref, basis, np.array([np.inf, 0, 0, 0]))
    with self.assertRaisesRegex(ValueError, r"lam\[3\] is NaN"):
      soup.soup_params({"w": np.zeros(2)}, {"w": np.zeros((4, 2))}, np.array([0, 0, 0, np.nan]))
    with self.assertRaisesRegex(ValueError, "basis_logits must have shape"):
      soup.soup_logits(ref, basis[:, :1], np.ones(4))


if __name__ == "__main__":
  absltest.main()
