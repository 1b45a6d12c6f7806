"""Normalized score against the bespoke policy, with a paired bootstrap over prompts (docs/METHOD.md section 6).

For a user u and a method m, J_m(u) is the user's expected true reward of the method's responses (estimated over E
evaluation prompts; every method answers the same prompts). The normalized score

    score(m) = mean_u (J_m(u) - J_ref(u)) / mean_u (J_bespoke(u) - J_ref(u))

is a ratio of means over users: per-user ratios are ill-conditioned when a user's bespoke policy barely beats the
reference. Its confidence interval resamples the prompts (paired: the same resample for every method and user).
When the bespoke gain's interval contains zero the ratio is meaningless, and `summarize` says so.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping

import numpy as np

from spectral_soup.soup.validation import check_int
from spectral_soup.soup.validation import is_real


def _ratio(rewards: Mapping[str, np.ndarray], method: str, reference: str, bespoke: str) -> float:
  gain = np.mean(rewards[bespoke] - rewards[reference])
  return float(np.mean(rewards[method] - rewards[reference]) / gain) if gain != 0 else float("nan")


# A KL below this (nats per response) is not float rounding of a KL >= 0 but a wrong input (e.g. a log-ratio with
# its sign flipped, or rewards passed as KLs).
KL_ROUNDING = 1e-3


def min_bootstrap(confidence: float = 0.9) -> int:
  """The fewest bootstrap draws for a two-sided `confidence` percentile interval: 2 / (1 - confidence) (20 for 90%),
  so that each tail beyond the interval holds at least one draw (with fewer, the interval is the draws' min and max,
  or a single draw that need not contain the estimate)."""
  return math.ceil(2.0 / (1.0 - confidence) - 1e-9)


def _table(name: str, x, shape=None, rank: int = 2, what: str = "[U, E] (users x evaluation prompts)", *,
           kl: bool = False) -> np.ndarray:
  """`x` as a finite float64 array of `rank` axes (described by `what`; every axis >= 1; `shape` when given; `kl`:
  no entry below -KL_ROUNDING); ValueError naming `name` and the first bad entry otherwise. A NaN reward would
  otherwise drop the bootstrap draws that hold it (an interval over a subsample beside a NaN score) or make the
  bespoke gain read as "not significant"."""
  try:
    raw = np.asarray(x)
  except (TypeError, ValueError):  # Ragged nested lists.
    raise ValueError(f"{name} must be an array of numbers {what} (rows of equal length), got a ragged "
                     f"{type(x).__name__}.") from None
  if raw.dtype.kind not in "biuf":  # Strings are not parsed, complex numbers not truncated, objects not guessed.
    raise ValueError(f"{name} must be an array of real numbers {what}, got dtype {raw.dtype}.")
  a = raw.astype(np.float64)
  if a.ndim != rank or 0 in a.shape:
    raise ValueError(f"{name} must have shape {what} with every axis >= 1, got {a.shape}.")
  if shape is not None and a.shape != tuple(shape):
    raise ValueError(f"{name} has shape {a.shape}: expected {tuple(shape)}, as the others on the same users and "
                     "prompts.")
  bad = np.argwhere(~np.isfinite(a))
  if bad.size:
    index = tuple(int(i) for i in bad[0])
    raise ValueError(f"{name}{list(index)} is {a[index]}: expected finite numbers ({len(bad)} non-finite in all).")
  if kl:
    bad = np.argwhere(a < -KL_ROUNDING)
    if bad.size:
      index = tuple(int(i) for i in bad[0])
      raise ValueError(f"{name}{list(index)} is {a[index]}: a KL divergence is >= 0 (entries down to "
                       f"-{KL_ROUNDING:g} count as rounding; {len(bad)} below in all).")
  return a


def _bootstrap(num_prompts: int, num_bootstrap: int, confidence: float, seed: int, name: str = "rewards"):
  """Resampled prompt indices int[num_bootstrap, E] and the two-sided interval's percentiles (lo, hi)."""
  check_int("seed", seed, 0, 2**63 - 1)  # numpy's SeedSequence takes non-negative integers.
  if isinstance(confidence, (bool, np.bool_)) or not isinstance(confidence,
                                                                (int, float, np.number)) or not (0 < confidence < 1):
    raise ValueError(f"confidence={confidence!r}: expected a level in (0, 1), e.g. 0.9 for a 90% interval.")
  check_int("num_bootstrap", num_bootstrap, 1)
  if num_bootstrap < min_bootstrap(confidence):
    raise ValueError(f"num_bootstrap={num_bootstrap}: expected >= {min_bootstrap(confidence)} for a "
                     f"{100 * confidence:g}% interval (2 / (1 - confidence) draws, so that each tail holds one; "
                     "the default 2,000 gives percentiles to about 1%).")
  if num_prompts < 2:
    raise ValueError(f"{name} has {num_prompts} evaluation prompt (E = 1): the intervals resample the prompts and "
                     "need at least 2 (with one, every resample is the same and every interval has zero width).")
  draws = np.random.default_rng(seed).integers(0, num_prompts, size=(num_bootstrap, num_prompts))
  return draws, (100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2)


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
  for name, table in (("rewards", rewards), ("kl", kl)):
    if not isinstance(table, Mapping):
      raise ValueError(f"{name} must map each method's name to its f32[U, E] values, got {type(table).__name__}.")
  for role, method in (("reference", reference), ("bespoke", bespoke)):
    if method not in rewards:
      raise ValueError(f"rewards has no {role} method {method!r} (methods: {sorted(rewards)}).")
  missing = [m for m in rewards if m not in kl]
  if missing:
    raise ValueError(f"kl has no entry for methods {missing} (every method of rewards needs its [U, E] KLs).")
  rewards = {m: _table(f"rewards[{m!r}]", r) for m, r in rewards.items()}
  shapes = {m: r.shape for m, r in rewards.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"every method needs rewards of the same [U, E] shape, got {shapes}.")
  shape = shapes[reference]
  kl = {m: _table(f"kl[{m!r}]", kl[m], shape, kl=True) for m in rewards}
  num_prompts = shape[1]
  draws, (lo_q, hi_q) = _bootstrap(num_prompts, num_bootstrap, confidence, seed, f"rewards[{reference!r}]")
  user_means = {m: r.mean(axis=1) for m, r in rewards.items()}
  boot = {m: r[:, draws].mean(axis=2) for m, r in rewards.items()}  # [U, num_bootstrap]
  gain = user_means[bespoke] - user_means[reference]
  boot_gain = (boot[bespoke] - boot[reference]).mean(axis=0)
  gain_ci = np.percentile(boot_gain, [lo_q, hi_q])
  out = {
      "methods": {},
      "bespoke_gain": float(gain.mean()),
      "bespoke_gain_ci": [float(x) for x in gain_ci],
      "bespoke_gain_significant": bool(gain_ci[0] > 0),
      "confidence": confidence
  }
  for m in rewards:
    ratio = _ratio(user_means, m, reference, bespoke)
    boot_ratio = (boot[m] - boot[reference]).mean(axis=0) / np.where(boot_gain != 0, boot_gain, np.nan)
    ratio_ci = np.nanpercentile(boot_ratio, [lo_q, hi_q]) if np.isfinite(boot_ratio).any() else [np.nan] * 2
    reward_ci = np.percentile(boot[m].mean(axis=0), [lo_q, hi_q])
    out["methods"][m] = {
        "normalized_score": ratio,
        "normalized_score_ci": [float(x) for x in ratio_ci],
        "mean_reward": float(user_means[m].mean()),
        "mean_reward_ci": [float(x) for x in reward_ci],
        "kl": float(np.mean(kl[m])),
        "per_user_gain": [float(x) for x in user_means[m] - user_means[reference]],
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
  lines.append(f"bespoke gain over the reference: {summary['bespoke_gain']:.3f} ({conf}% CI [{lo:.3f}, {hi:.3f}])" +
               ("" if significant else ": not significant, so normalized scores are not reported"))
  return "\n".join(lines)


def attribute_shift(basis_scores: np.ndarray, reference_scores: np.ndarray, *, num_bootstrap: int = 2_000,
                    confidence: float = 0.9, seed: int = 0) -> Dict[str, np.ndarray]:
  """How far each basis moves each attribute: paired differences with the reference's responses.

  Args:
    basis_scores: f32[K, E, A] standardized attribute scores of basis k's responses to E prompts (mean over the
      samples of a prompt).
    reference_scores: f32[E, A] the reference's, on the same prompts (common random numbers).

  Returns:
    {"shift": f32[K, A] mean shift, "ci": f32[K, A, 2] bootstrap interval over the prompts}.
  """
  basis_scores = _table("basis_scores", basis_scores, rank=3, what="[K, E, A] (bases x prompts x attributes)")
  reference_scores = _table("reference_scores", reference_scores, what="[E, A] (prompts x attributes)")
  if basis_scores.shape[1:] != reference_scores.shape:
    raise ValueError(f"basis_scores {basis_scores.shape} does not match reference_scores {reference_scores.shape} "
                     "([K, E, A] and [E, A]).")
  diff = basis_scores - reference_scores[None]  # [K, E, A]
  draws, (lo_q, hi_q) = _bootstrap(diff.shape[1], num_bootstrap, confidence, seed, "basis_scores")
  boot = diff[:, draws].mean(axis=2)  # [K, num_bootstrap, A]
  ci = np.moveaxis(np.percentile(boot, [lo_q, hi_q], axis=1), 0, -1)  # [K, A, 2]
  return {"shift": diff.mean(axis=1), "ci": ci}


def _gain_at_kl(kls: np.ndarray, gains: np.ndarray, target) -> np.ndarray:
  """Gain interpolated along a sweep at KL `target`; every sweep starts at the reference (KL 0, gain 0).

  kls, gains: [P] or [P, N] (N sweeps, e.g. bootstrap draws); target: scalar or [N]. Beyond the sweep's largest
  KL the gain stays at that point's (no extrapolation). Points of equal KL (the anchor included) count as one, at
  their mean gain, so the reading is continuous in the target and does not depend on the points' order. Returns
  f64[N] (N = 1 for a single sweep).
  """
  kls = np.asarray(kls, np.float64).reshape(len(kls), -1)
  gains = np.asarray(gains, np.float64).reshape(len(gains), -1)
  target = np.broadcast_to(np.asarray(target, np.float64).ravel(), (kls.shape[1],))
  out = np.empty(kls.shape[1])
  for j in range(kls.shape[1]):
    k, g = np.concatenate([[0.0], kls[:, j]]), np.concatenate([[0.0], gains[:, j]])
    unique, which = np.unique(k, return_inverse=True)  # Sorted.
    mean = np.bincount(which, weights=g) / np.bincount(which)
    out[j] = np.interp(target[j], unique, mean)
  return out


# How far (relative) the bespoke KL may lie beyond a sweep's largest KL and still count as covered by it.
COVERED_RTOL = 1e-3


def frontiers(sweeps: Mapping[str, Mapping[float, tuple]], reference: np.ndarray, bespoke: tuple, *,
              num_bootstrap: int = 2_000, confidence: float = 0.9, seed: int = 0) -> Dict[str, dict]:
  """Reward-KL trade-offs of methods swept over one strength knob, and their gains at the bespoke policy's KL.

  A method with more KL can buy more reward, so methods are compared along their sweeps: each method's gain over
  the reference is interpolated (linearly in KL, from the reference's (0, 0)) at the bespoke policy's mean KL.

  Args:
    sweeps: method -> {scale: (rewards f32[U, E], kl f32[U, E])}, one entry per point of its sweep.
    reference: f32[U, E] the reference's rewards on the same prompts.
    bespoke: (rewards, kl) of the bespoke policies, f32[U, E] each.

  Returns:
    {"frontier": {method: [{"scale", "kl", "mean_reward"}]}, "at_bespoke_kl": {method: {"gain", "gain_ci",
    "covered"}}, "bespoke_kl": float}. `covered` is False when the bespoke KL lies beyond the sweep's largest KL
    by more than `COVERED_RTOL` of it (the gain is then the largest-KL point's). The tolerance keeps a method that
    is the bespoke policy computed another way (the MOD oracle of linear bases) from being flagged for a KL a few
    parts in 10^4 short, float noise of the same policy.
  """
  reference = _table("reference", reference)
  pair = lambda x: isinstance(x, (tuple, list)) and len(x) == 2
  if not pair(bespoke):
    raise ValueError(f"bespoke must be (rewards, kl), f32[U, E] each, got {type(bespoke).__name__}"
                     f"{f' of {len(bespoke)} items' if isinstance(bespoke, (tuple, list)) else ''}.")
  bespoke = tuple(_table(f"bespoke[{i}]", x, reference.shape, kl=i == 1) for i, x in enumerate(bespoke))
  if not isinstance(sweeps, Mapping):
    raise ValueError(f"sweeps must map each method to {{scale: (rewards, kl)}}, got {type(sweeps).__name__}.")
  checked = {}
  for method, sweep in sweeps.items():
    if not isinstance(sweep, Mapping):
      raise ValueError(f"sweeps[{method!r}] must map each scale to (rewards, kl), got {type(sweep).__name__}.")
    if not sweep:
      raise ValueError(f"sweeps[{method!r}] has no point: expected {{scale: (rewards, kl)}} with at least one.")
    checked[method] = {}
    for scale, point in sweep.items():
      if not (is_real(scale) and math.isfinite(scale)):
        raise ValueError(f"sweeps[{method!r}] has the scale {scale!r}: expected finite numbers (the sweep's "
                         "strengths, which order its frontier).")
      if not pair(point):
        raise ValueError(
            f"sweeps[{method!r}][{scale!r}] must be (rewards, kl), f32[U, E] each, got "
            f"{type(point).__name__}{f' of {len(point)} items' if isinstance(point, (tuple, list)) else ''}.")
      checked[method][scale] = tuple(
          _table(f"sweeps[{method!r}][{scale!r}][{i}]", x, reference.shape, kl=i == 1) for i, x in enumerate(point))
  sweeps = checked
  draws, (lo_q, hi_q) = _bootstrap(reference.shape[1], num_bootstrap, confidence, seed, "reference")
  boot_mean = lambda x: np.asarray(x)[:, draws].mean(axis=(0, 2))  # [U, E] -> [num_bootstrap]
  target, boot_target = float(np.mean(bespoke[1])), boot_mean(bespoke[1])
  ref_mean, boot_ref = float(np.mean(reference)), boot_mean(reference)
  out = {"frontier": {}, "at_bespoke_kl": {}, "bespoke_kl": target}
  for method, sweep in sweeps.items():
    scales = sorted(sweep)
    out["frontier"][method] = [{
        "scale": float(s),
        "kl": float(np.mean(sweep[s][1])),
        "mean_reward": float(np.mean(sweep[s][0]))
    } for s in scales]
    kls = np.asarray([np.mean(sweep[s][1]) for s in scales])
    gains = np.asarray([np.mean(sweep[s][0]) - ref_mean for s in scales])
    boot_kls = np.stack([boot_mean(sweep[s][1]) for s in scales])  # [P, num_bootstrap]
    boot_gains = np.stack([boot_mean(sweep[s][0]) - boot_ref for s in scales])
    boot = _gain_at_kl(boot_kls, boot_gains, boot_target)
    out["at_bespoke_kl"][method] = {
        "gain": float(_gain_at_kl(kls, gains, target)[0]),
        "gain_ci": [float(x) for x in np.percentile(boot, [lo_q, hi_q])],
        "covered": bool(target <= kls.max() * (1 + COVERED_RTOL))
    }
  return out
