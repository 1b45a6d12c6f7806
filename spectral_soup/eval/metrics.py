"""Normalized score against the bespoke policy, with a paired bootstrap over prompts (docs/METHOD.md section 6).

For a user u and a method m, J_m(u) is the user's expected true reward of the method's responses (estimated over E
evaluation prompts; every method answers the same prompts). The normalized score

    score(m) = mean_u (J_m(u) - J_ref(u)) / mean_u (J_bespoke(u) - J_ref(u))

is a ratio of means over users: per-user ratios are ill-conditioned when a user's bespoke policy barely beats the
reference. Its confidence interval resamples the prompts (paired: the same resample for every method and user).
When the bespoke gain's interval contains zero the ratio is meaningless, and `summarize` says so.
"""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np


def _ratio(rewards: Mapping[str, np.ndarray], method: str, reference: str, bespoke: str) -> float:
  gain = np.mean(rewards[bespoke] - rewards[reference])
  return float(np.mean(rewards[method] - rewards[reference]) / gain) if gain != 0 else float("nan")


def summarize(rewards: Mapping[str, np.ndarray], kl: Mapping[str, np.ndarray], *, reference: str = "reference",
              bespoke: str = "bespoke", num_bootstrap: int = 2_000, confidence: float = 0.9,
              seed: int = 0) -> Dict[str, object]:
  """Per-method normalized scores, mean rewards, KLs and bootstrap intervals.

  Args:
    rewards: method -> f32[U, E] true reward of each user's response to each evaluation prompt.
    kl: method -> f32[U, E] KL of the method's policy to the reference along each response.
    reference, bespoke: the methods defining 0 and 1.
    num_bootstrap: resamples of the E prompts.
    confidence: two-sided level of the intervals.

  Returns:
    {"methods": {m: {"normalized_score", "normalized_score_ci", "mean_reward", "mean_reward_ci", "kl",
    "per_user_gain"}}, "bespoke_gain", "bespoke_gain_ci", "bespoke_gain_significant"}.
  """
  shapes = {m: np.shape(r) for m, r in rewards.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"every method needs rewards of the same [U, E] shape, got {shapes}.")
  num_prompts = next(iter(shapes.values()))[1]
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, num_prompts, size=(num_bootstrap, num_prompts))
  lo_q, hi_q = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
  user_means = {m: r.mean(axis=1) for m, r in rewards.items()}
  boot = {m: r[:, draws].mean(axis=2) for m, r in rewards.items()}  # [U, num_bootstrap]
  gain = user_means[bespoke] - user_means[reference]
  boot_gain = (boot[bespoke] - boot[reference]).mean(axis=0)
  gain_ci = np.percentile(boot_gain, [lo_q, hi_q])
  out = {"methods": {}, "bespoke_gain": float(gain.mean()), "bespoke_gain_ci": [float(x) for x in gain_ci],
         "bespoke_gain_significant": bool(gain_ci[0] > 0), "confidence": confidence}
  for m in rewards:
    ratio = _ratio(user_means, m, reference, bespoke)
    boot_ratio = (boot[m] - boot[reference]).mean(axis=0) / np.where(boot_gain != 0, boot_gain, np.nan)
    ratio_ci = np.nanpercentile(boot_ratio, [lo_q, hi_q]) if np.isfinite(boot_ratio).any() else [np.nan] * 2
    reward_ci = np.percentile(boot[m].mean(axis=0), [lo_q, hi_q])
    out["methods"][m] = {
        "normalized_score": ratio, "normalized_score_ci": [float(x) for x in ratio_ci],
        "mean_reward": float(user_means[m].mean()), "mean_reward_ci": [float(x) for x in reward_ci],
        "kl": float(np.mean(kl[m])), "per_user_gain": [float(x) for x in user_means[m] - user_means[reference]],
    }
  return out


def format_table(summary: Mapping[str, object], order=None) -> str:
  """A plain-text table of `summarize`'s output."""
  methods = summary["methods"]
  order = [m for m in (order or methods) if m in methods]
  significant = summary["bespoke_gain_significant"]
  lines = [f"{'method':<24} {'normalized score':>24} {'mean reward':>12} {'KL':>8}"]
  for m in order:
    r = methods[m]
    if significant:
      lo, hi = r["normalized_score_ci"]
      score = f"{r['normalized_score']:.2f} [{lo:.2f}, {hi:.2f}]"
    else:
      score = "n/a (see below)"
    lines.append(f"{m:<24} {score:>24} {r['mean_reward']:>12.3f} {r['kl']:>8.2f}")
  lo, hi = summary["bespoke_gain_ci"]
  conf = int(round(100 * summary["confidence"]))
  lines.append(f"bespoke gain over the reference: {summary['bespoke_gain']:.3f} ({conf}% CI [{lo:.3f}, {hi:.3f}])"
               + ("" if significant else ": not significant, so normalized scores are not reported"))
  return "\n".join(lines)
