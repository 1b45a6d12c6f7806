"""Souped decoding for many users and sequence log-probabilities (identities, batching, recompilation, errors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_soup.soup import decoding
from spectral_soup.soup import engine
from spectral_soup.soup import serving
from tests import tiny

K = 3
PROMPT = np.array([[1, 2, 3, 4, 5], [0, 0, 6, 7, 8], [9, 10, 11, 0, 0], [0, 12, 13, 14, 0]], np.int32)
MASK = PROMPT != 0
LAM = np.array([[0.5, 0.3, 0.4], [-0.2, 0.6, 0.1], [1.0, 0.0, 0.0], [0.2, 0.2, 0.2]], np.float32)
N = 6


@pytest.fixture(scope="module", params=["heads", "heads+bias", "lora"])
def policy(request):
  kind, _, bias = request.param.partition("+")
  return tiny.tiny_policy(kind, num_bases=K, **({"logit_bias": True} if bias else {}))


def _generate(policy, lam=LAM, prompt=PROMPT, mask=MASK, **kw):
  pol, params = policy
  tokens, aux = serving.generate(pol, params, lam, prompt, mask, max_new_tokens=N, **kw)
  return np.asarray(tokens), aux


def test_sequence_logprobs_identities(policy):
  """One-hot lam reproduces basis k, lam = 0 the reference; the soup's sequence log-prob is what decoding saw."""
  pol, params = policy
  tokens, aux = _generate(policy)
  resp_mask = np.ones_like(tokens, bool)
  for k in range(K):
    one_hot = np.zeros((4, K), np.float32)
    one_hot[:, k] = 1.0
    out = serving.sequence_logprobs(pol, params, PROMPT, MASK, tokens, resp_mask, lam=jnp.asarray(one_hot))
    np.testing.assert_allclose(out["soup"], out["basis"][k], rtol=1e-5, atol=1e-4)
  out = serving.sequence_logprobs(pol, params, PROMPT, MASK, tokens, resp_mask, lam=jnp.zeros((4, K)))
  np.testing.assert_allclose(out["soup"], out["ref"], rtol=1e-5, atol=1e-4)
  out = serving.sequence_logprobs(pol, params, PROMPT, MASK, tokens, resp_mask, lam=jnp.asarray(LAM))
  np.testing.assert_allclose(out["soup"], np.asarray(aux["logprobs"]).sum(1), rtol=1e-5, atol=1e-4)
  # Features for the online phase: f_k = beta * (log pi_k - log pi_ref).
  feats = serving.implicit_rewards(out, beta=0.1)
  np.testing.assert_allclose(feats, 0.1 * (out["basis"] - out["ref"][None]).T, rtol=1e-6)


def test_sequence_logprobs_ignore_padding_side(policy):
  pol, params = policy
  response = np.array([[3, 4, 0], [5, 0, 0], [6, 7, 8], [9, 9, 0]], np.int32)
  resp_mask = response != 0
  right = decoding.left_pad(jnp.asarray(PROMPT), jnp.asarray(MASK))
  a = serving.sequence_logprobs(pol, params, PROMPT, MASK, response, resp_mask)
  b = serving.sequence_logprobs(pol, params, right[0], right[1], response, resp_mask)
  np.testing.assert_allclose(a["basis"], b["basis"], rtol=1e-5, atol=1e-4)
  # Response padding contributes nothing.
  assert float(jnp.abs(a["basis_tokens"][:, ~resp_mask]).max()) == 0.0


def test_users_together_equal_users_alone(policy):
  together, _ = _generate(policy)
  for u in range(len(PROMPT)):
    alone, _ = _generate(policy, lam=LAM[u:u + 1], prompt=PROMPT[u:u + 1], mask=MASK[u:u + 1])
    np.testing.assert_array_equal(together[u], alone[0])


@pytest.mark.parametrize("mode", ["naive", "params"])
def test_fused_decoder_matches_other_modes(policy, mode):
  """Explicit == naive K+1-pass decoder always; parameter soup == explicit for head bases (exact merging)."""
  pol, _ = policy
  explicit, _ = _generate(policy)
  other, _ = _generate(policy, mode=mode)
  if mode == "naive" or pol.basis_kind == "heads":
    np.testing.assert_array_equal(explicit, other)
  else:  # LoRA parameter soups are approximate, except for a one-hot lam, which is basis k exactly.
    one_hot = np.tile(np.eye(K, dtype=np.float32)[1], (4, 1))
    np.testing.assert_array_equal(_generate(policy, lam=one_hot)[0], _generate(policy, lam=one_hot, mode=mode)[0])


@pytest.mark.parametrize("feature_dim", [16, 32])  # 32 = the tiny backbone's width: a silently skipped projection.
def test_naive_decoder_applies_the_learned_feature_projection(feature_dim):
  """Head bases on psi = h P (basis.feature_dim): the K + 1-pass reference runs the same feature map."""
  policy = tiny.tiny_policy("heads", num_bases=K, feature_dim=feature_dim)
  explicit, aux_e = _generate(policy)
  naive, aux_n = _generate(policy, mode="naive")
  np.testing.assert_array_equal(explicit, naive)
  np.testing.assert_allclose(aux_e["logprobs"], aux_n["logprobs"], atol=1e-5)


def test_lora_parameter_soup_distance_is_reported():
  """For LoRA bases the parameter soup approximates the explicit soup; measure how far (per-token KL)."""
  pol, params = tiny.tiny_policy("lora", num_bases=K)
  lam = jnp.asarray(LAM)

  def next_token(mode):  # The soup's next-token log-probs after each prompt, as the engine computes them.
    passes = engine.passes_for(pol, mode)
    prompts = engine.prefill(pol, params, PROMPT, MASK, lam if passes == "merged" else None,
                             max_len=PROMPT.shape[1] + 1, passes=passes)
    rows = engine.make_rows([mode] * 4, LAM)
    return engine._mix({"policy": params}, prompts["state"], rows, (mode,), False)["logprobs"]

  explicit, merged = next_token("explicit"), next_token("params")
  kl = jnp.sum(jnp.exp(explicit) * (explicit - merged), -1)
  print(f"LoRA parameter soup vs explicit soup: mean per-token KL {float(kl.mean()):.4f}, max {float(kl.max()):.4f}")
  assert np.isfinite(float(kl.max())) and float(kl.min()) >= -1e-5
  assert float(kl.mean()) > 0  # Not identical: merging in intermediate layers is an approximation.


def test_implicit_mode_reports_acceptance(policy):
  sampling = decoding.SamplingConfig(temperature=1.0)
  tokens, aux = _generate(policy, mode="implicit", key=jax.random.key(1), max_proposals=8, sampling=sampling)
  rate = np.asarray(aux["acceptance_rate"])
  assert tokens.shape == (4, N) and np.all((rate >= 0) & (rate <= 1))
  # lam = 0: the target is the proposal itself, so every first proposal is accepted.
  _, aux = _generate(policy, lam=np.zeros((4, K), np.float32), mode="implicit", max_proposals=8, sampling=sampling)
  np.testing.assert_allclose(aux["acceptance_rate"], 1.0)
  np.testing.assert_allclose(aux["fallback_rate"], 0.0)


def test_implicit_mode_samples_at_the_given_temperature_and_refuses_what_it_cannot_draw(policy):
  """Rejection sampling draws the explicit soup at the sampling temperature (it drew at temperature 1 whatever was
  asked): near 0 that is the explicit soup's greedy decode. Greedy, top-k and top-p are refused before compiling."""
  greedy, _ = _generate(policy)
  cold = decoding.SamplingConfig(temperature=1e-5)
  for seed in (1, 2):
    tokens, _ = _generate(policy, mode="implicit", max_proposals=4, sampling=cold, key=jax.random.key(seed))
    np.testing.assert_array_equal(tokens, greedy)
  for sampling in (decoding.SamplingConfig(), decoding.SamplingConfig(1.0,
                                                                      top_k=5), decoding.SamplingConfig(1.0,
                                                                                                        top_p=0.9)):
    with pytest.raises(ValueError, match=r"mode='implicit' draws exact samples of the soup .* needs temperature > 0"):
      _generate(policy, mode="implicit", sampling=sampling)


@pytest.mark.parametrize("vocab", [64, 49_152])
def test_small_temperatures_sample_the_most_likely_token(vocab):
  """Compiled, logits / T - max was fused into one multiply-add whose residual at the maximum (an ulp of |logits /
  T|) made exp garbage: T = 1e-10 drew the last vocabulary id. Shifted before dividing, every T > 0 is exact."""
  logprobs = jax.nn.log_softmax(jnp.asarray(np.random.default_rng(0).normal(size=(4, vocab)) * 3, jnp.float32))
  expected = np.argmax(np.asarray(logprobs), axis=-1)
  uniforms = jnp.asarray([0.5, 0.1, 0.9, 0.0], jnp.float32)
  for temperature in (1e-4, 1e-10, 1e-37):  # 1e-10 drew the last id; 1e-37 is near float32's smallest normal.
    for top in ({}, {"top_k": 8}, {"top_p": 0.9}):
      sampling = decoding.SamplingConfig(temperature, **top)
      draw = jax.jit(lambda lp, u, sampling=sampling: decoding.sample_with_uniforms(lp, u, sampling))
      np.testing.assert_array_equal(draw(logprobs, uniforms), expected, err_msg=f"T={temperature}, {top}")
  with pytest.raises(ValueError, match=r"temperature=1e-45: expected 0 \(greedy\) or a number >= 1.18e-38"):
    decoding.SamplingConfig(1e-45)


def test_eos_stops_each_row(policy):
  tokens, _ = _generate(policy)
  eos = int(tokens[0, 2])
  stopped, aux = _generate(policy, eos_id=eos, pad_id=63)
  lengths = np.asarray(aux["lengths"])
  for u in range(len(PROMPT)):
    hits = np.flatnonzero(stopped[u] == eos)
    expected = hits[0] + 1 if hits.size else N
    assert lengths[u] == expected
    assert np.all(stopped[u, expected:] == 63)
  assert lengths[0] <= 3


def test_lam_changes_do_not_recompile():
  """U = 64 users x K = 8 bases: new weights and new prompts reuse the compiled loop."""
  pol, params = tiny.tiny_policy("heads", num_bases=8)
  rng = np.random.default_rng(0)
  prompt = rng.integers(1, tiny.VOCAB, (64, 6)).astype(np.int32)
  mask = np.ones_like(prompt, bool)
  serving.generate(pol, params, rng.normal(size=(64, 8)).astype(np.float32), prompt, mask, max_new_tokens=4)
  before = engine._decode_rows._cache_size()
  for _ in range(3):
    lam = rng.normal(size=(64, 8)).astype(np.float32)
    prompt = rng.integers(1, tiny.VOCAB, (64, 6)).astype(np.int32)
    serving.generate(pol, params, lam, prompt, mask, max_new_tokens=4)
  assert engine._decode_rows._cache_size() == before


@pytest.mark.parametrize("lam, match", [
    (np.zeros((4, K - 1), np.float32), "2 weights but there are 3 bases"),
    (np.zeros((4, K + 1), np.float32), "4 weights but there are 3 bases"),
    (np.array([[0.1, np.nan, 0.2]] * 4, np.float32), "NaN"),
])
def test_bad_lam_fails_before_compiling(lam, match):
  pol, params = tiny.tiny_policy("heads", num_bases=K)
  before = engine._decode_rows._cache_size()
  with pytest.raises(ValueError, match=match):
    serving.generate(pol, params, lam, PROMPT, MASK, max_new_tokens=2)
  assert engine._decode_rows._cache_size() == before


def test_empty_prompt_fails_before_compiling():
  pol, params = tiny.tiny_policy("heads", num_bases=K)
  mask = MASK.copy()
  mask[2] = False
  before = engine._decode_rows._cache_size()
  with pytest.raises(ValueError, match="prompt row 2 is empty"):
    serving.generate(pol, params, LAM, PROMPT, mask, max_new_tokens=2)
  with pytest.raises(ValueError, match="mode='beam'"):
    serving.generate(pol, params, LAM, PROMPT, MASK, mode="beam", max_new_tokens=2)
  assert engine._decode_rows._cache_size() == before


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_mask=np.where(MASK, 1, -1)), r"prompt_mask\[1, 0\] is -1: expected bools, or 0 / 1"),
    (dict(prompt_mask=np.where(MASK, 1.0, np.nan)), r"prompt_mask\[1, 0\] is nan"),
    (dict(key=0), r"key must be a PRNG key \(jax.random.key\(seed\)"),
    (dict(key=jax.random.split(jax.random.key(0), 4)), r"key must be one PRNG key"),
    (dict(sampling={"temperature": 1.0}), r"sampling must be a decoding.SamplingConfig"),
    (dict(sampling=None), r"sampling must be a decoding.SamplingConfig"),
    (dict(eos_id=1.5), r"eos_id=1.5: expected an integer in \[0, 63\]"),
    (dict(eos_id=-1), r"eos_id=-1: expected an integer in \[0, 63\]"),
    (dict(eos_id=10**6), r"eos_id=1000000"),
    (dict(eos_id="1"), r"eos_id='1'"),
    (dict(pad_id=None), r"pad_id=None: expected an integer in \[0, 63\]"),
    (dict(pad_id=-7), r"pad_id=-7"),
])
def test_decode_options_that_were_misread_or_failed_inside_jax_are_named(kwargs, match):
  """A -1 / NaN mask entry was padding read as a prompt token; an int key, a dict of sampling options, a float or
  out-of-vocabulary eos_id (never matched: no row stopped) failed inside JAX or went through silently."""
  pol, params = tiny.tiny_policy("heads", num_bases=K)
  assert pol.config.vocab_size == 64
  before = engine._decode_rows._cache_size()
  mask = kwargs.pop("prompt_mask", MASK)
  with pytest.raises(ValueError, match=match):
    serving.generate(pol, params, LAM, PROMPT, mask, max_new_tokens=2, **kwargs)
  assert engine._decode_rows._cache_size() == before


def test_a_ragged_lam_and_features_without_their_bases_are_named():
  """numpy's "setting an array element with a sequence" and a bare KeyError: 'basis' before."""
  pol, params = tiny.tiny_policy("heads", num_bases=K)
  with pytest.raises(ValueError,
                     match=r"lam must be a rectangular array of shape \[K\] or \[B, K\] with K=3, got rows"):
    serving.generate(pol, params, [[1.0, 0.0, 0.0], [1.0, 0.0]], PROMPT[:2], MASK[:2], max_new_tokens=2)
  with pytest.raises(ValueError, match=r"prompt has shape \(0, 5\): expected at least one row"):
    serving.generate(pol, params, np.zeros((0, K)), PROMPT[:0], MASK[:0], max_new_tokens=2)
  with pytest.raises(ValueError, match=r"seq_logprobs has no 'basis' \(keys \['ref'\]\)"):
    serving.implicit_rewards({"ref": np.zeros(2)}, beta=0.1)


def test_sequence_logprobs_refuses_padding_marked_minus_one_and_an_empty_prompt():
  """A -1 response mask scored padding as response tokens (the reference log-prob doubled); an all-False prompt
  row scored a response to no prompt."""
  pol, params = tiny.tiny_policy("heads", num_bases=K)
  response = np.array([[3, 4, 0], [5, 0, 0], [6, 7, 8], [9, 0, 0]], np.int32)
  response_mask = response != 0
  with pytest.raises(ValueError, match=r"response_mask\[0, 2\] is -1"):
    serving.sequence_logprobs(pol, params, PROMPT, MASK, response, np.where(response_mask, 1, -1))
  with pytest.raises(ValueError, match=r"prompt_mask\[1, 0\] is nan"):
    serving.sequence_logprobs(pol, params, PROMPT, np.where(MASK, 1.0, np.nan), response, response_mask)
  empty = MASK.copy()
  empty[3] = False
  with pytest.raises(ValueError, match="prompt row 3 is empty"):
    serving.sequence_logprobs(pol, params, PROMPT, empty, response, response_mask)
  ones = serving.sequence_logprobs(pol, params, PROMPT, MASK.astype(np.int32), response, response_mask.astype(float))
  bools = serving.sequence_logprobs(pol, params, PROMPT, MASK, response, response_mask)
  np.testing.assert_array_equal(ones["ref"], bools["ref"])  # 0 / 1 numbers are masks too.


def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
  keep = lambda **kw: np.isfinite(np.asarray(decoding.filter_logits(logits, decoding.SamplingConfig(1.0, **kw))))
  np.testing.assert_array_equal(keep(top_k=2), [[True, True, False, False]])
  np.testing.assert_array_equal(keep(top_p=0.5), [[True, False, False, False]])
  np.testing.assert_array_equal(keep(top_p=0.7), [[True, True, False, False]])
  np.testing.assert_array_equal(keep(top_p=0.76), [[True, True, True, False]])
  draws = jax.vmap(lambda k: decoding.sample_tokens(k, logits, decoding.SamplingConfig(1.0, top_k=2)))(jax.random.split(
      jax.random.key(0), 2000))
  freq = np.bincount(np.asarray(draws).ravel(), minlength=4) / 2000
  np.testing.assert_allclose(freq, [2 / 3, 1 / 3, 0, 0], atol=0.04)
  with pytest.raises(ValueError, match="top_p"):
    decoding.SamplingConfig(1.0, top_p=0.0)


def test_nucleus_by_bisection_equals_the_sorted_prefix():
  """The bisection threshold keeps exactly the smallest most-likely prefix reaching top_p (a sort's answer)."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 3000)).astype(np.float32) * rng.uniform(0.5, 4.0, size=(64, 1)).astype(np.float32)
  logits[:8, 100:] = -np.inf  # Rows restricted to a few tokens.
  logits[8:16, :50] = logits[8:16, :1]  # Ties at the top.
  for top_p in (0.3, 0.9, 0.95):
    kept = np.isfinite(
        np.asarray(decoding.filter_logits(jnp.asarray(logits), decoding.SamplingConfig(1.0, top_p=top_p))))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    order = np.argsort(-logits, axis=1, kind="stable")
    mass = np.cumsum(np.take_along_axis(probs, order, 1), axis=1)
    n_keep = (mass - np.take_along_axis(probs, order, 1) < top_p).sum(1)
    threshold = np.take_along_axis(logits, order, 1)[np.arange(64), n_keep - 1]
    expected = logits >= threshold[:, None]
    # Only a token whose cumulative mass sits on top_p to float32 rounding may go either way.
    before = np.empty_like(probs)
    np.put_along_axis(before, order, mass - np.take_along_axis(probs, order, 1), 1)
    ambiguous = np.abs(before - top_p) < 1e-5
    assert np.all((kept == expected) | ambiguous), f"top_p={top_p}"
    assert np.sum(kept != expected) <= 2, f"top_p={top_p}"


def test_left_pad_moves_real_tokens_right():
  tokens, mask = decoding.left_pad(jnp.asarray(PROMPT), jnp.asarray(MASK))
  np.testing.assert_array_equal(tokens[2], [0, 0, 9, 10, 11])
  np.testing.assert_array_equal(tokens[3], [0, 0, 12, 13, 14])
  np.testing.assert_array_equal(mask.sum(1), MASK.sum(1))


def test_inverse_cdf_sampling_draws_the_distribution_and_never_a_removed_token():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 50)).astype(np.float32) * 2.0
  logits[:, 40:] = -np.inf  # Removed tokens at the end: the edge where rounding would land.
  logits[1, :39] = -np.inf  # A row with one token left.
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
  u = jnp.asarray(rng.uniform(size=(3, 20_000)), jnp.float32)
  draws = np.asarray(decoding.inverse_cdf_sample(logp, u))
  for b in range(3):
    freq = np.bincount(draws[b], minlength=50) / draws.shape[1]
    np.testing.assert_allclose(freq, probs[b], atol=0.015)
  edge = jnp.asarray(np.tile([0.0, np.nextafter(np.float32(1.0), np.float32(0.0))], (3, 1)), jnp.float32)
  ends = np.asarray(decoding.inverse_cdf_sample(logp, edge))
  assert (ends < 40).all() and ends[1].tolist() == [39, 39]
  assert ends[:, 0].tolist() == [int(np.argmax(probs[b] > 0)) for b in range(3)]
  # One uniform per row through the sampling config (temperature, top-k): the same draw as the inverse CDF.
  same = decoding.sample_with_uniforms(jnp.asarray(logits), u[:, 0], decoding.SamplingConfig(1.0))
  np.testing.assert_array_equal(np.asarray(same), draws[:, 0])
