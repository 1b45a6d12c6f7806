"""The online protocol, the evaluation harness, PAD's token rewards and the normalized-score statistics."""

import json
import os

import jax
import numpy as np
import pytest

from spectral_soup.baselines import pad as pad_lib
from spectral_soup.eval import harness as harness_lib
from spectral_soup.eval import metrics
from spectral_soup.online import protocol
from spectral_soup.online import fit as fit_lib
from spectral_soup.online import users as users_lib
from tests import tiny


class LinearHarness:
  """Responses are random attribute vectors s ~ N(lam @ M, I); the bases' features are f = s @ M^T (so the
  user's reward w . s is in the span of the features: the learner should recover the user's direction)."""

  def __init__(self, num_bases, num_attributes, seed=0):
    self.num_bases, self.num_attributes = num_bases, num_attributes
    rng = np.random.default_rng(seed)
    self.mix = np.eye(num_bases, num_attributes) + 0.1 * rng.normal(size=(num_bases, num_attributes))
    self.rng = rng

  def decode(self, prompt_ids, mode, lam, key):
    del mode, key
    assert lam.shape == (len(prompt_ids) * (len(lam) // len(prompt_ids)), self.num_bases)
    scores = 0.3 * lam @ self.mix + self.rng.normal(size=(len(lam), self.num_attributes))
    return {
        "features": scores @ np.linalg.pinv(self.mix),
        "kl": np.abs(lam).sum(-1),
        "scores": scores,
        "pad_features": scores
    }


def test_online_protocol_recovers_user_direction():
  users = users_lib.make_users("dirichlet", 6, seed=0, split="eval", num_attributes=3, temperature=0.2)
  cfg = protocol.OnlineConfig(rounds=6, prompts_per_round=16, l2=1.0)
  out = protocol.run_online(LinearHarness(3, 3), users, pool_size=50, cfg=cfg, key=jax.random.key(0))
  assert out["lam_history"].shape == (6, 6, 3) and out["reward"].shape == (6, 6)
  assert out["comparison_pad_features"].shape == (6, 96, 3)
  assert out["comparison_features"].shape == (6, 96, 3) and list(
      out["num_comparisons"]) == [16 * (t + 1) for t in range(6)]
  w = np.asarray(users.weights)
  cos = np.sum(out["lam"] * w, -1) / np.linalg.norm(out["lam"], axis=-1) / np.linalg.norm(w, axis=-1)
  assert np.all(cos > 0.8), cos
  # P-Soups weights live on the simplex; PAD's weights follow the same direction (its features are the scores).
  np.testing.assert_allclose(out["lam_p_soups"].sum(-1), 1.0, atol=1e-4)
  assert np.all(out["lam_p_soups"] >= -1e-6)
  pad_w = out["pad_weights"]
  cos_pad = np.sum(pad_w * w, -1) / np.linalg.norm(pad_w, axis=-1) / np.linalg.norm(w, axis=-1)
  assert np.all(cos_pad > 0.8), cos_pad
  # Later rounds predict the users' choices better than chance.
  assert out["choice_accuracy"][-2:].mean() > 0.6


def test_nonnegative_lambda_keeps_the_direction():
  """online.constraint='nonnegative': every fitted lambda is >= 0 (any scale) and still follows the user."""
  users = users_lib.make_users("dirichlet", 6, seed=0, split="eval", num_attributes=3, temperature=0.2)
  cfg = protocol.OnlineConfig(rounds=6, prompts_per_round=16, l2=1.0, constraint="nonnegative")
  out = protocol.run_online(LinearHarness(3, 3), users, pool_size=50, cfg=cfg, key=jax.random.key(0))
  lam, w = out["lam"], np.asarray(users.weights)
  assert np.all(out["lam_history"] >= 0) and np.any(np.abs(lam.sum(-1) - 1.0) > 0.1)  # Not the simplex.
  cos = np.sum(lam * w, -1) / np.linalg.norm(lam, axis=-1) / np.linalg.norm(w, axis=-1)
  assert np.all(cos > 0.8), cos


class NoisyBasesHarness(LinearHarness):
  """The bases' implicit rewards carry no signal; the reward model's predicted attributes are the scores."""

  def decode(self, prompt_ids, mode, lam, key):
    out = super().decode(prompt_ids, mode, lam, key)
    return {**out, "features": self.rng.normal(size=out["features"].shape)}


def test_reward_model_features():
  """online.features='reward_model': lambda regresses the choices on the reward model's predicted attributes of
  each basis (pad_features), not on the bases' implicit rewards (kept as comparison_implicit_features)."""
  users = users_lib.make_users("dirichlet", 6, seed=0, split="eval", num_attributes=3, temperature=0.2)
  run = lambda features: protocol.run_online(
      NoisyBasesHarness(3, 3), users, pool_size=50, key=jax.random.key(0), cfg=protocol.OnlineConfig(
          rounds=6, prompts_per_round=16, l2=1.0, features=features))
  w = np.asarray(users.weights)
  cos = lambda lam: np.sum(lam * w, -1) / np.linalg.norm(lam, axis=-1) / np.linalg.norm(w, axis=-1)
  model, implicit = run("reward_model"), run("implicit_reward")
  assert np.all(cos(model["lam"]) > 0.8) and np.all(cos(model["lam_p_soups"]) > 0.8), cos(model["lam"])
  assert cos(implicit["lam"]).mean() < 0.6, cos(implicit["lam"])  # Noise features: no direction.
  np.testing.assert_array_equal(model["comparison_features"], model["comparison_pad_features"])
  assert model["comparison_implicit_features"].shape == (6, 96, 3)
  assert np.abs(model["comparison_implicit_features"] - model["comparison_features"]).max() > 0.1
  np.testing.assert_array_equal(implicit["comparison_features"], implicit["comparison_implicit_features"])
  with pytest.raises(ValueError, match="online.features"):
    protocol.run_online(LinearHarness(4, 3), users, 50, protocol.OnlineConfig(features="reward_model"),
                        jax.random.key(0))
  with pytest.raises(ValueError, match="online.features"):
    protocol.run_online(LinearHarness(3, 3), users, 50, protocol.OnlineConfig(features="logits"), jax.random.key(0))


def test_pad_weights_have_their_own_penalty():
  """online.pad_weights_l2 shrinks PAD's user weights only; None means online.l2."""
  users = users_lib.make_users("dirichlet", 4, seed=0, split="eval", num_attributes=3, temperature=0.2)
  run = lambda **kw: protocol.run_online(LinearHarness(3, 3), users, pool_size=50, key=jax.random.key(0), cfg=protocol.
                                         OnlineConfig(rounds=2, prompts_per_round=16, l2=1.0, **kw))
  shared, strong = run(), run(pad_weights_l2=1e4)
  np.testing.assert_allclose(run(pad_weights_l2=1.0)["pad_weights"], shared["pad_weights"], rtol=1e-5, atol=1e-6)
  assert np.abs(strong["pad_weights"]).max() < 0.05 < np.abs(shared["pad_weights"]).max()
  np.testing.assert_allclose(strong["lam"], shared["lam"], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="online.pad_weights_l2"):
    run(pad_weights_l2=0.0)


def test_unit_total_weight():
  lam = np.array([[0.1, 0.3, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 2.0]])
  np.testing.assert_allclose(fit_lib.unit_total_weight(lam), [[0.25, 0.75, 0.0], [1 / 3] * 3, [0.5, 0.0, 0.5]])
  with pytest.raises(ValueError, match="nonnegative"):
    fit_lib.unit_total_weight(-lam)


def test_online_config_errors_name_the_field():
  users = users_lib.make_users("dirichlet", 2, seed=0, num_attributes=3)
  with pytest.raises(ValueError, match="online.prompts_per_round"):
    protocol.run_online(LinearHarness(3, 3), users, 4, protocol.OnlineConfig(prompts_per_round=8), jax.random.key(0))
  with pytest.raises(ValueError, match="online.mode"):
    protocol.run_online(LinearHarness(3, 3), users, 40, protocol.OnlineConfig(mode="naive"), jax.random.key(0))
  with pytest.raises(ValueError, match="online.constraint"):
    protocol.run_online(LinearHarness(3, 3), users, 40, protocol.OnlineConfig(constraint="simplex"), jax.random.key(0))


def test_cumulative_regret():
  np.testing.assert_allclose(protocol.cumulative_regret(np.array([[0.0, 1.0], [0.5, 1.0]]), np.array([1.0, 1.0])),
                             [[1.0, 0.0], [1.5, 0.0]])


def test_pad_token_rewards_recover_planted_table():
  rng = np.random.default_rng(0)
  vocab, support = 40, np.arange(5, 35)
  true = np.zeros((2, vocab))
  true[:, support] = rng.normal(size=(2, len(support)))
  tokens = rng.choice(support, size=(400, 12)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  counts = pad_lib.token_counts([tokens], [mask], support)
  np.testing.assert_array_equal(counts.sum(1), 12)
  scores = counts @ true[:, support].T + 0.1 * rng.normal(size=(400, 2))
  table = pad_lib.fit_token_rewards(counts, scores, support, vocab, l2=1.0)
  assert np.all(table[:, :5] == 0)
  for j in range(2):  # Up to a constant per attribute (counts sum to the length), the table is the planted one.
    est, ref = table[j, support] - table[j, support].mean(), true[j, support] - true[j, support].mean()
    assert np.corrcoef(est, ref)[0, 1] > 0.95
  np.testing.assert_allclose(pad_lib.pad_features(counts, table, support), counts @ table[:, support].T, rtol=1e-5)
  # What was counted or fitted silently: a NaN score (that attribute's whole table NaN), a negative token id
  # (counted as the highest support id), repeated support ids, an empty support (a numpy reduction error).
  nan = scores.copy()
  nan[3, 1] = np.nan
  with pytest.raises(ValueError, match=r"scores\[3, 1\] is nan: expected finite standardized scores"):
    pad_lib.fit_token_rewards(counts, nan, support, vocab)
  negative = tokens[:2].copy()
  negative[1, 0] = -1
  with pytest.raises(ValueError, match=r"token id -1 on a counted position of response 1"):
    pad_lib.token_counts([negative], [mask[:2]], support)
  with pytest.raises(ValueError, match=r"support repeats token ids \(e.g. 5\)"):
    pad_lib.token_counts([tokens], [mask], np.array([5, 5, 6]))
  with pytest.raises(ValueError, match=r"support must be a non-empty int\[S\]"):
    pad_lib.token_counts([tokens], [mask], np.zeros(0, np.int32))


def test_summarize_ratio_of_means_and_significance():
  rng = np.random.default_rng(0)
  noise = lambda: 0.05 * rng.normal(size=(3, 200))
  rewards = {"reference": noise(), "bespoke": 1.0 + noise(), "half": 0.5 + noise()}
  kl = {m: np.ones((3, 200)) for m in rewards}
  out = metrics.summarize(rewards, kl, num_bootstrap=500)
  assert out["bespoke_gain_significant"]
  half = out["methods"]["half"]
  assert abs(half["normalized_score"] - 0.5) < 0.02
  assert half["normalized_score_ci"][0] < half["normalized_score"] < half["normalized_score_ci"][1]
  assert out["methods"]["bespoke"]["normalized_score"] == pytest.approx(1.0)
  # No real bespoke gain: flagged, and the table says so instead of printing ratios.
  flat = {"reference": noise(), "bespoke": noise(), "half": noise()}
  out = metrics.summarize(flat, kl, num_bootstrap=500)
  assert not out["bespoke_gain_significant"]
  assert "not significant" in metrics.format_table(out)


def test_statistics_name_inputs_they_cannot_summarize():
  """A NaN reward made an interval over the bootstrap draws without it (beside a NaN score) and a NaN bespoke gain
  read as "not significant"; a KL of another shape was averaged; numpy's errors named no argument."""
  ones = np.ones((3, 8))
  rewards = {"reference": 0 * ones, "bespoke": ones, "soup": 0.5 * ones}
  kl = {m: ones for m in rewards}
  with_nan = dict(rewards, soup=np.where(np.arange(8) == 7, np.nan, 0.5) * ones)
  cases = [
      (lambda: metrics.summarize(with_nan, kl), r"rewards\['soup'\]\[0, 7\] is nan: expected finite numbers \(3 "),
      (lambda: metrics.summarize(rewards, dict(kl, soup=np.ones(5))), r"kl\['soup'\] must have shape \[U, E\]"),
      (lambda: metrics.summarize(rewards, dict(kl, soup=np.ones((3, 7)))), r"kl\['soup'\] has shape \(3, 7\): "
       r"expected \(3, 8\)"),
      (lambda: metrics.summarize(rewards, {"reference": ones}), r"kl has no entry for methods \['bespoke', 'soup'\]"),
      (lambda: metrics.summarize({
          "reference": ones,
          "soup": ones
      }, kl), r"rewards has no bespoke method 'bespoke'"),
      (lambda: metrics.summarize({
          m: r[0] for m, r in rewards.items()
      }, kl), r"must have shape \[U, E\] .* got "
       r"\(8,\)"),
      (lambda: metrics.summarize(rewards, kl, confidence=90), r"confidence=90: expected a level in \(0, 1\)"),
      (lambda: metrics.summarize(rewards, kl, num_bootstrap=0), r"num_bootstrap=0: expected an integer >= 1"),
      # One draw made a zero-width "interval" that could exclude its own estimate and decided significance.
      (lambda: metrics.summarize(rewards, kl, num_bootstrap=1), r"num_bootstrap=1: expected >= 20 for a 90% "),
      (lambda: metrics.summarize(rewards, kl, num_bootstrap=39, confidence=0.95), r"expected >= 40 for a 95% "),
      # One prompt: every resample is the same, every interval zero wide, any gain "significant".
      (lambda: metrics.summarize({
          m: r[:, :1] for m, r in rewards.items()
      }, {
          m: k[:, :1] for m, k in kl.items()
      }), r"rewards\['reference'\] has 1 evaluation prompt \(E = 1\)"),
      (lambda: metrics.attribute_shift(np.ones((1, 1, 2)), np.zeros((1, 2))), r"basis_scores has 1 evaluation prompt"),
      (lambda: metrics.frontiers({"soup": {
          1.0: (ones[:, :1], ones[:, :1])
      }}, ones[:, :1], (ones[:, :1], ones[:, :1])), r"reference has 1 evaluation prompt"),
      # A KL below 0 (beyond rounding) is a wrong input, not a cheap policy.
      (lambda: metrics.summarize(rewards, dict(kl, soup=-5 * ones)),
       r"kl\['soup'\]\[0, 0\] is -5.0: a KL divergence is "
       r">= 0 \(entries down to -0.001 count as rounding; 24 below"),
      (lambda: metrics.frontiers({"soup": {
          0.5: (ones, -ones)
      }}, ones, (ones, ones)), r"sweeps\['soup'\]\[0.5\]\[1\]\[0, 0\] is -1.0: a KL divergence is >= 0"),
      (lambda: metrics.frontiers({"soup": {
          0.5: (ones, ones)
      }}, ones, (ones, -2 * ones)), r"bespoke\[1\]\[0, 0\] is -2.0"),
      # Not arrays of real numbers: named, not truncated or parsed.
      (lambda: metrics.summarize(dict(rewards, soup=(0.5 + 9j) * ones), kl), r"rewards\['soup'\] must be an array of "
       r"real numbers .* got dtype complex128"),
      (lambda: metrics.summarize(dict(rewards, soup=np.full(
          (3, 8), "0.5")), kl), r"rewards\['soup'\] .* got dtype <U3"),
      (lambda: metrics.summarize(dict(rewards, soup=[[1.0, 2.0], [3.0]]), kl), r"rewards\['soup'\] must be an array "
       r"of numbers .* \(rows of equal length\), got a ragged list"),
      (lambda: metrics.frontiers([1], ones,
                                 (ones, ones)), r"sweeps must map each method to \{scale: \(rewards, kl\)\}, "
       r"got list"),
      (lambda: metrics.frontiers({"soup": [(ones, ones)]}, ones, (ones, ones)), r"sweeps\['soup'\] must map each scale "
       r"to \(rewards, kl\), got list"),
      (lambda: metrics.frontiers({"soup": {
          1.0: (ones, ones)
      }}, ones, None), r"bespoke must be \(rewards, kl\), f32\[U, "
       r"E\] each, got NoneType"),
      (lambda: metrics.frontiers({"soup": {
          "x": (ones, ones)
      }}, ones, (ones, ones)), r"sweeps\['soup'\] has the scale "
       r"'x': expected finite numbers"),
      (lambda: metrics.frontiers({"soup": {
          float("nan"): (ones, ones)
      }}, ones, (ones, ones)), r"has the scale nan"),
      (lambda: metrics.frontiers({"soup": {
          1.0: (ones[:2], ones[:2])
      }}, ones, (ones, ones)), r"sweeps\['soup'\]\[1.0\]\[0\] has shape \(2, 8\): expected \(3, 8\)"),
      (lambda: metrics.frontiers({"soup": {}}, ones, (ones, ones)), r"sweeps\['soup'\] has no point"),
      (lambda: metrics.attribute_shift(np.ones((2, 0, 3)), np.ones(
          (0, 3))), r"basis_scores must have shape \[K, E, A\]"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
  # Lists are arrays too.
  listed = metrics.summarize({m: r.tolist() for m, r in rewards.items()}, kl, num_bootstrap=20)
  # A KL within rounding below 0 (float32 sums of per-token KLs) is taken as it is.
  assert metrics.summarize(rewards, dict(kl, soup=-1e-4 * ones))["methods"]["soup"]["kl"] == pytest.approx(-1e-4)
  assert listed["methods"]["soup"]["normalized_score"] == pytest.approx(0.5)


def test_frontiers_compare_methods_at_the_bespoke_kl():
  rng = np.random.default_rng(0)
  noise = lambda: 0.01 * rng.normal(size=(4, 300))
  reference = noise()
  kl_of = lambda value: np.full((4, 300), value)
  # "steep" gains 0.1 per nat, "flat" 0.05 per nat; "short" stops at KL 1 (the bespoke KL, 3, is beyond its sweep).
  sweeps = {
      "steep": {
          s: (reference + 0.1 * 2 * s + noise(), kl_of(2 * s)) for s in (0.5, 1.0, 2.0)
      },
      "flat": {
          s: (reference + 0.05 * 2 * s + noise(), kl_of(2 * s)) for s in (2.0, 0.5, 1.0)
      },
      "short": {
          s: (reference + 0.2 * s + noise(), kl_of(s)) for s in (0.5, 1.0)
      }
  }
  out = metrics.frontiers(sweeps, reference, (reference + 0.25, kl_of(3.0)), num_bootstrap=300)
  assert out["bespoke_kl"] == pytest.approx(3.0)
  assert [pt["scale"] for pt in out["frontier"]["flat"]] == [0.5, 1.0, 2.0]
  assert [pt["kl"] for pt in out["frontier"]["flat"]] == pytest.approx([1.0, 2.0, 4.0])
  at = out["at_bespoke_kl"]
  assert at["steep"]["gain"] == pytest.approx(0.3, abs=0.01) and at["steep"]["covered"]
  assert at["flat"]["gain"] == pytest.approx(0.15, abs=0.01)
  assert at["steep"]["gain_ci"][0] < at["steep"]["gain"] < at["steep"]["gain_ci"][1]
  assert at["steep"]["gain_ci"][1] - at["steep"]["gain_ci"][0] < 0.01
  # No extrapolation beyond a sweep: the largest-KL point's gain, flagged.
  assert at["short"]["gain"] == pytest.approx(0.2, abs=0.01) and not at["short"]["covered"]
  # A largest KL short of the bespoke KL by float noise (the same policy computed another way) covers it; 1% does not.
  for shortfall, covered in ((2e-4, True), (1e-2, False)):
    same = {1.0: (reference + 0.25, kl_of(3.0 * (1 - shortfall)))}
    near = metrics.frontiers({"same": same}, reference, (reference + 0.25, kl_of(3.0)), num_bootstrap=50)
    assert near["at_bespoke_kl"]["same"]["covered"] is covered, shortfall
  # Below the sweep's first point the gain is interpolated from the reference (KL 0, gain 0).
  low = metrics.frontiers({"steep": sweeps["steep"]}, reference, (reference, kl_of(0.5)), num_bootstrap=50)
  assert low["at_bespoke_kl"]["steep"]["gain"] == pytest.approx(0.05, abs=0.01)
  # Points of equal KL count once, at their mean gain: the reading is continuous and independent of their order.
  zero, ones = np.zeros((2, 8)), np.ones((2, 8))
  for gains in ((0.1, 0.3), (0.3, 0.1)):
    tie = {"m": {0.5: (gains[0] * ones, 2 * ones), 1.0: (gains[1] * ones, 2 * ones)}}
    read = [
        metrics.frontiers(tie, zero, (ones, t * ones), num_bootstrap=20)["at_bespoke_kl"]["m"]["gain"]
        for t in (1.999, 2.0)
    ]
    assert read == pytest.approx([0.19990, 0.2], abs=1e-6), gains


def test_attribute_shift_is_paired_with_the_reference():
  rng = np.random.default_rng(0)
  prompt_effect = rng.normal(size=(200, 3))  # Large, shared by every policy on a prompt: cancels in the pairs.
  reference = prompt_effect + 0.05 * rng.normal(size=(200, 3))
  bases = np.stack([prompt_effect + 0.3 * np.eye(3)[k] + 0.05 * rng.normal(size=(200, 3)) for k in range(2)])
  out = metrics.attribute_shift(bases, reference, num_bootstrap=300)
  assert out["shift"].shape == (2, 3) and out["ci"].shape == (2, 3, 2)
  np.testing.assert_allclose(out["shift"], 0.3 * np.eye(2, 3), atol=0.02)
  assert out["ci"][0, 0, 0] > 0 and out["ci"][1, 1, 0] > 0
  assert np.all(out["ci"][..., 0] < out["shift"]) and np.all(out["shift"] < out["ci"][..., 1])
  assert np.all(out["ci"][..., 1] - out["ci"][..., 0] < 0.05)  # The prompt effects cancel in the pairs.
  with pytest.raises(ValueError, match="does not match"):
    metrics.attribute_shift(bases, reference[:10])


@pytest.mark.parametrize("beta", [0.0, -1.0, np.nan, np.inf, "0.5"])
def test_policy_harness_refuses_a_guide_scale_that_is_not_finite(beta):
  """Guided rows are scaled by 1 / beta inside the jitted decode: a NaN scale decoded the last token id."""
  policy, params = tiny.tiny_policy("heads", num_bases=2)
  prompts = np.array([[1, 2, 3, 4]], np.int32)
  with pytest.raises(ValueError, match=r"beta must be a finite number > 0"):
    harness_lib.PolicyHarness(policy, params, prompts, prompts != 0, ["a"], None, num_bases=2, beta=beta,
                              max_new_tokens=2, eos_id=None, pad_id=0, pad_table=np.zeros(
                                  (1, tiny.VOCAB)), support=np.arange(1, tiny.VOCAB))


def test_policy_harness_rows_and_common_random_numbers():
  policy, params = tiny.tiny_policy("heads", num_bases=4)  # 3 bases + 1 extra head.
  prompts = np.array([[1, 2, 3, 4], [0, 5, 6, 7], [0, 0, 8, 9]], np.int32)
  texts = ["a", "b", "c"]
  score_fn = lambda p, tokens, lengths: np.stack([(tokens == 3).sum(1), (tokens == 5).sum(1)], 1).astype(float)
  h = harness_lib.PolicyHarness(policy, params, prompts, prompts != 0, texts, score_fn, num_bases=3, beta=0.5,
                                max_new_tokens=5, eos_id=None, pad_id=0, pad_table=np.zeros(
                                    (2, tiny.VOCAB)), support=np.arange(1, tiny.VOCAB), chunk_rows=4, max_proposals=8)
  same = np.array([0.2, 0.1, 0.0, 0.0], np.float32)
  programs = [
      harness_lib.Program("a", None, "explicit", same),
      harness_lib.Program("b", 0, "params", same),
      harness_lib.Program("ref", None, "explicit", np.zeros(4, np.float32)),
      harness_lib.Program("imp", 0, "implicit", same)
  ]
  out = h.evaluate(programs, np.arange(3), jax.random.key(0), samples_per_prompt=2)
  assert out["scores"].shape == (4, 3, 2, 2) and out["tokens"].shape == (4, 3, 2, 5)
  # The same soup in explicit and params form, with the same random numbers: the same responses.
  np.testing.assert_array_equal(out["tokens"][0], out["tokens"][1])
  # Two samples of one prompt differ (their own streams); the reference has zero KL.
  assert np.any(out["tokens"][0, :, 0] != out["tokens"][0, :, 1])
  np.testing.assert_allclose(out["kl"][2], 0.0, atol=1e-5)
  assert out["proposals"][3].sum() > 0 and out["proposals"][:3].sum() == 0
  # The decode meter: 24 rows of 5 tokens (no EOS) in 6 chunks of 4 rows, 3 prompts prefilled once.
  rates = {"matmul_flops_per_s": 1e9, "bandwidth_bytes_per_s": 1e9}
  meter = h.decode_summary(rates)
  assert (meter["batch_rows"], meter["chunks"], meter["rows"], meter["prompts_prefilled"]) == (4, 6, 24, 3)
  assert meter["tokens"] == meter["row_steps"] == 120 and meter["busy_fraction"] == 1.0
  assert meter["compile_s"] > 0 and meter["decode_s"] > 0 and meter["score_s"] > 0
  # Implicit rows sample from their own streams too: with one chunk row, the samples of one prompt were identical
  # (each chunk drew the same rejection-sampling numbers), and they changed with the chunk size.
  implicit = [harness_lib.Program("imp", None, "implicit", same)]
  by_chunk = {}
  for rows in (1, 4):
    h.chunk_rows = rows
    by_chunk[rows] = h.evaluate(implicit, np.arange(1), jax.random.key(0), samples_per_prompt=4)["tokens"][0, 0]
  np.testing.assert_array_equal(by_chunk[1], by_chunk[4])
  assert len({tuple(t) for t in by_chunk[1].tolist()}) > 1
  assert meter["share_of_floor"] == pytest.approx(meter["floor_s"] / (meter["prefill_s"] + meter["decode_s"]))
  # The online interface: features are beta * (log pi_k - log pi_ref) of the shown responses.
  dec = h.decode(np.array([0, 2]), "explicit", np.tile(same[:3], (4, 1)), jax.random.key(1))
  assert dec["features"].shape == (4, 3) and dec["scores"].shape == (4, 2) and dec["pad_features"].shape == (4, 2)
  # Rows it cannot serve are named before anything compiles: a prompt index past the prefilled prompts decoded
  # the last one (a clamped gather), a transposed score_fn output was reshaped into the wrong layout.
  rows = lambda n: (["explicit"] * n, np.zeros((n, 4), np.float32), np.zeros((n, 2), np.float32))
  with pytest.raises(
      ValueError, match=r"prompt_index must be \[B=2\] indices >= 0 below 2 of prefilled prompts, got "
      r"\[0 5\] \(max 5\)"):
    h.run_rows(np.array([0, 1]), *rows(2), np.array([0, 5]), jax.random.key(0))
  with pytest.raises(ValueError, match=r"unknown decoding modes \['naive'\]"):
    h.run_rows(np.array([0]), ["naive"], *rows(1)[1:], np.array([0]), jax.random.key(0))
  with pytest.raises(ValueError, match=r"prompt_ids must be indices into the harness's 3 prompts"):
    h.run_rows(np.array([3]), *rows(1), np.array([0]), jax.random.key(0))
  with pytest.raises(ValueError, match=r"decode needs the same number of rows \(lam\) for each prompt: 5 rows for 2"):
    h.decode(np.array([0, 2]), "explicit", np.tile(same[:3], (5, 1)), jax.random.key(1))
  with pytest.raises(ValueError, match=r"samples_per_prompt=0"):
    h.evaluate(programs, np.arange(3), jax.random.key(0), samples_per_prompt=0)
  with pytest.raises(ValueError, match=r"at least one program and one prompt, got 0 and 3"):
    h.evaluate([], np.arange(3), jax.random.key(0))
  h.score_fn = lambda p, tokens, lengths: np.zeros((2, len(tokens)))
  with pytest.raises(ValueError, match=r"score_fn returned shape \(2, 4\): expected \[responses, attributes\] = "
                     r"\(4, 2\)"):
    h.decode(np.array([0, 2]), "explicit", np.tile(same[:3], (4, 1)), jax.random.key(1))


@pytest.mark.parametrize("choice", [0.0, 1.0])
def test_k_ablation_counts_a_zero_margin_as_a_coin_flip(choice):
  """As the online rounds score it: every choice of the second response was 'predicted' (accuracy 1.0 or 0.0)."""
  from experiments import main as main_lib  # pylint: disable=g-import-not-at-top
  history = {"comparison_features": np.zeros((4, 40, 3), np.float32), "comparison_prefs": np.full((4, 40), choice)}
  ablation = main_lib._k_ablation(history, 3, 1.0)  # pylint: disable=protected-access
  assert ablation["heldout_choice_accuracy"] == [0.5, 0.5, 0.5]


def _synthetic_results(rounds=2):
  """(results, history): the main job's results dict on a linear harness's online rounds and synthetic rewards."""
  from experiments import main as main_lib  # pylint: disable=g-import-not-at-top
  users = users_lib.make_users("dirichlet", 3, seed=0, split="eval", num_attributes=3, temperature=0.2)
  history = protocol.run_online(LinearHarness(3, 3), users, 40,
                                protocol.OnlineConfig(rounds=rounds, prompts_per_round=12), jax.random.key(0))
  ablation = main_lib._k_ablation(history, 3, 1.0)  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  rewards = {m: rng.normal(size=(3, 10)) + i for i, m in enumerate(main_lib.METHOD_ORDER)}
  summary = metrics.summarize(rewards, {m: np.ones((3, 10)) for m in rewards}, num_bootstrap=100)
  results = {
      **summary, "learning_curve": {
          "comparisons": history["num_comparisons"].tolist(),
          "reward": history["reward"].tolist(),
          "regret": protocol.cumulative_regret(history["reward"], np.ones(3)).tolist(),
          "choice_accuracy": history["choice_accuracy"].tolist()
      },
      "k_ablation": ablation,
      "pareto": {
          "bases": ["a", "b"],
          "alpha": [0.0, 1.0],
          "scores": [[0.0, 1.0], [1.0, 0.0]]
      },
      "attributes": ["a", "b", "c"],
      "offline": {
          "attribute_shift": np.eye(3).tolist(),
          "attribute_shift_ci": np.zeros((3, 3, 2)).tolist()
      }
  }
  results.update(
      metrics.frontiers({m: {
          s: (rewards[m] * s, np.full((3, 10), s)) for s in (0.5, 1.0)
      } for m in main_lib.SWEPT}, rewards["reference"], (rewards["bespoke"], np.ones((3, 10))), num_bootstrap=50))
  return results, history


def test_plots_and_k_ablation_from_results(tmp_path):
  """The main job's last phase on synthetic numbers: the K ablation and every plot file."""
  from spectral_soup.eval import plots  # pylint: disable=g-import-not-at-top
  results, _ = _synthetic_results()
  ablation = results["k_ablation"]
  assert ablation["k"] == [1, 2, 3] and all(0 <= a <= 1 for a in ablation["heldout_choice_accuracy"])
  paths = plots.write_all(results, str(tmp_path))
  assert [p.split("/")[-1] for p in paths] == [
      "learning_curve.png", "scores.png", "frontier.png", "attribute_shift.png", "pareto.png", "k_ablation.png"
  ]
  assert all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in paths)


def test_plots_draw_what_the_results_say(tmp_path, monkeypatch):
  """Each online round sits at the comparisons its lambda was fitted on (0 for the first round's prior), a NaN
  attribute shift leaves the others' colour range, and held-out accuracies below 0.4 stay on the K-ablation chart."""
  from spectral_soup.eval import plots  # pylint: disable=g-import-not-at-top
  figures = {}
  monkeypatch.setattr(plots, "_save", lambda fig, path: figures.__setitem__(os.path.basename(path), fig))
  results, history = _synthetic_results(rounds=3)
  assert results["learning_curve"]["comparisons"] == [12, 24, 36]
  results["offline"]["attribute_shift"][0][1] = float("nan")
  results["offline"]["attribute_shift"][2][2] = -1.5
  results["k_ablation"]["heldout_choice_accuracy"] = [0.25, None, 0.7]
  plots.write_all(results, str(tmp_path))
  for ax in figures["learning_curve.png"].axes:
    for line in ax.get_lines():
      if len(line.get_xdata()) == 3:  # Every per-round series (not the horizontal reference lines).
        assert list(line.get_xdata()) == [0, 12, 24], ax.get_title()
  mean_reward = [l for l in figures["learning_curve.png"].axes[0].get_lines() if l.get_label() == "mean over users"]
  assert np.allclose(mean_reward[0].get_ydata(), history["reward"].mean(1))
  image = figures["attribute_shift.png"].axes[0].get_images()[0]
  assert image.get_clim() == (-1.5, 1.5)
  low, high = figures["k_ablation.png"].axes[0].get_ylim()
  assert low <= 0.25 and high == 1


def test_plots_of_a_results_json_read_back(tmp_path, monkeypatch):
  """results.json holds null where the job had NaN: plotting it read back raised TypeError; an older file without
  a needed key raised a bare KeyError."""
  from experiments import main as main_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.eval import plots  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(plots, "_save", lambda fig, path: None)
  results, _ = _synthetic_results()
  results["methods"]["reference"]["normalized_score"] = float("nan")
  results["offline"]["attribute_shift"][0][1] = float("nan")
  read_back = json.loads(main_lib.json_text(results))
  assert read_back["methods"]["reference"]["normalized_score"] is None
  assert len(plots.write_all(read_back, str(tmp_path))) == 6
  del read_back["pareto"]
  with pytest.raises(ValueError, match=r"results lack \['pareto'\]: expected the main job's results.json"):
    plots.write_all(read_back, str(tmp_path))


def test_a_zero_margin_predicts_each_choice_as_a_coin_flip():
  """With lambda = 0 (the first round at prior_mean 0) no choice is predicted: the round's accuracy is 0.5, not
  the share of choices that happen to be 0."""
  users = users_lib.make_users("dirichlet", 4, seed=0, split="eval", num_attributes=3, temperature=0.2)
  history = protocol.run_online(LinearHarness(3, 3), users, 40, protocol.OnlineConfig(rounds=2, prompts_per_round=9),
                                jax.random.key(0))
  assert np.all(history["choice_accuracy"][0] == 0.5)
  assert not np.all(history["choice_accuracy"][1] == 0.5)


def test_write_npz_atomic_round_trip(tmp_path):
  from spectral_soup.utils import files  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "comparisons.npz")
  files.write_npz_atomic(path, features=np.ones((2, 3, 4), np.float32), prefs=np.zeros((2, 3)))
  with np.load(path) as data:
    assert data["features"].shape == (2, 3, 4) and data["prefs"].shape == (2, 3)
  assert os.listdir(tmp_path) == ["comparisons.npz"]  # No temporary file left.


def test_summaries_name_a_seed_or_a_table_they_cannot_use():
  rewards = {"reference": np.zeros((2, 3)), "bespoke": np.ones((2, 3))}
  kl = {"reference": np.zeros((2, 3)), "bespoke": np.ones((2, 3))}
  for seed in (-1, 1.5):
    with pytest.raises(ValueError, match=rf"seed={seed}: expected an integer in \[0, "):
      metrics.summarize(rewards, kl, num_bootstrap=20, seed=seed)
  with pytest.raises(ValueError, match=r"rewards must map each method's name to its f32\[U, E\] values, got list"):
    metrics.summarize([rewards["bespoke"]], kl, num_bootstrap=20)


class _CountingHarness(LinearHarness):
  """LinearHarness that counts its decodes (the expensive step the checks must precede)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.calls = 0

  def decode(self, *args, **kwargs):
    self.calls += 1
    return super().decode(*args, **kwargs)


@pytest.mark.parametrize("change, message", [
    (dict(prior_mean=float("nan")), r"online.prior_mean=nan is invalid: expected a finite number in \[-1e\+06, "),
    (dict(prior_mean=float("inf")), r"online.prior_mean=inf is invalid"),
    (dict(explore_scale=float("inf")), r"online.explore_scale=inf is invalid: expected a number in \[0, 1e\+06\]"),
    (dict(explore_scale="1"), r"online.explore_scale='1' is invalid"),
    (dict(pad_weights_l2="2"), r"online.pad_weights_l2='2' is invalid"),
    (dict(l2=True), r"online.l2=True is invalid"),
    (dict(rounds=2.5), r"online.rounds=2.5 is invalid: expected an integer >= 1"),
    (dict(rounds=True), r"online.rounds=True is invalid"),
    (dict(prompts_per_round=4.0), r"online.prompts_per_round=4.0 is invalid: expected an integer in 1..50"),
])
def test_online_settings_are_checked_before_the_first_decode(change, message):
  """NaN / inf priors and scales, parsed strings and fractional counts were decoded (or failed in the first
  round, naming internal arguments) instead of being named up front."""
  users = users_lib.make_users("dirichlet", 2, seed=0, split="eval", num_attributes=3, temperature=0.2)
  harness = _CountingHarness(3, 3)
  cfg = protocol.OnlineConfig(**{"rounds": 1, "prompts_per_round": 4, **change})
  assert protocol.config_problems(cfg), "the main job's up-front check must name it too"
  with pytest.raises(ValueError, match=message):
    protocol.run_online(harness, users, pool_size=50, cfg=cfg, key=jax.random.key(0))
  assert harness.calls == 0


def test_run_online_names_mismatched_users_pools_and_keys_before_decoding():
  users = users_lib.make_users("dirichlet", 2, seed=0, split="eval", num_attributes=4, temperature=0.2)
  harness = _CountingHarness(3, 3)
  cfg = protocol.OnlineConfig(rounds=1, prompts_per_round=4)
  cases = [
      (dict(users=users), r"the users weigh 4 attributes but the harness scores 3"),
      (dict(pool_size=-3), r"pool_size=-3: expected an integer >= 1"),
      (dict(pool_size=20.5), r"pool_size=20.5: expected an integer >= 1"),
      (dict(key=0), r"key must be a PRNG key"),
  ]
  good = dict(users=users_lib.make_users("dirichlet", 2, seed=0, split="eval", num_attributes=3, temperature=0.2),
              pool_size=50, key=jax.random.key(0))
  for change, message in cases:
    with pytest.raises(ValueError, match=message):
      protocol.run_online(harness, cfg=cfg, **{**good, **change})
  assert harness.calls == 0
