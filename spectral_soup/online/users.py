"""Simulated users for online evaluation (docs/METHOD.md section 6).

A user scores a response by a true reward of its A attribute scores s in R^A (standardized: zero mean, unit
variance per attribute over a reference pool, see `standardize_scores`), and chooses between two responses by
Bradley-Terry with a temperature:

  P(a > b) = sigmoid((r(s_a) - r(s_b)) / temperature).

Kinds of users (`USER_KINDS`):
  * "dirichlet": r = w . s with w ~ Dirichlet(concentration * 1) (non-negative, sums to 1): in the span of the
    attribute rewards.
  * "signed": r = w . s with w = (Dirichlet draw) * (random signs): in the span, but needs negative weights (which
    the theory penalizes, docs/METHOD.md section 2).
  * "threshold": r = 1[s_j > t] for one attribute j and a threshold t ~ U(-1, 1): outside the span (a step
    function), e.g. "any answer that is helpful enough".
  * "product": r = tanh(s_i) * tanh(s_j) for two distinct attributes: outside the span (an interaction), bounded.
    The plain product s_i * s_j is not: standardized scores have long tails (on the embedded data's 640
    responses from -6.4 to 5.3 SD), so the product of two ranged from -33.9 to 20.2 while 74-85% of the
    responses lie within +-1; a handful of responses then decided each user's reward, and in the main job
    (`--config.users.kind=product`, seed 0) the bespoke heads fitted to it reached a KL of 29 nats per response
    with per-user gains from -32.7 to +20.1. tanh keeps the interaction near the scores' center (tanh(s) ~ s for
    |s| < 0.5; 0.76 at 1 SD) and saturates the tails. With it, the same run's bespoke heads sit at 1.2 nats and
    gain nothing (a context-free logit vector cannot express the interaction), while the explicit soup gains +0.07
    and the MOD oracle +0.15.
For the out-of-span kinds, `weights` holds the one-hot (threshold) or half-half (product) attribute weights, only
as a label of which attributes matter; `true_reward` does not use them.

Training and held-out evaluation users come from separate random streams: `make_users(..., seed, split)` seeds
numpy with the entropy (seed, split id, kind id), so the train and eval users of any seeds never coincide.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.online.checks import check_finite
from spectral_soup.online.checks import check_key
from spectral_soup.online.checks import check_numeric
from spectral_soup.soup.validation import check_int
from spectral_soup.soup.validation import is_real

Array = jax.Array
ArrayLike = Union[jax.Array, np.ndarray, float, Sequence[float]]

USER_KINDS = ("dirichlet", "signed", "threshold", "product")
SPLITS = ("train", "eval")
_SPLIT_IDS = {"train": 0, "eval": 1}
_KIND_IDS = {kind: i for i, kind in enumerate(USER_KINDS)}


@struct.dataclass
class SimulatedUsers:
  """U simulated users over A attributes (a pytree; `kind` is static).

  Attributes:
    weights: `[U, A]` linear weights ("dirichlet", "signed"); attribute labels for the other kinds.
    temperature: `[U]` Bradley-Terry temperatures (> 0; 0 = deterministic choice, ties -> 0.5).
    attributes: `[U, 2]` int32 attribute indices (threshold: [j, j]; product: [i, j]; linear kinds: [0, 0]).
    threshold: `[U]` thresholds of "threshold" users (0 otherwise).
    kind: one of USER_KINDS.
  """
  weights: Array
  temperature: Array
  attributes: Array
  threshold: Array
  kind: str = struct.field(pytree_node=False, default="dirichlet")

  @property
  def num_users(self) -> int:
    return self.weights.shape[0]

  @property
  def num_attributes(self) -> int:
    return self.weights.shape[1]


def _rng(seed: int, split: str, kind: str) -> np.random.Generator:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
  return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_IDS[split], _KIND_IDS[kind]]))


def make_users(kind: str, num_users: int, seed: int, *, split: str = "train", num_attributes: int = 4,
               temperature: float = 1.0, concentration: float = 1.0) -> SimulatedUsers:
  """Draws U users of one kind.

  Args:
    kind: one of USER_KINDS.
    num_users: U.
    seed: non-negative int.
    split: "train" or "eval": folded into the seed, so the two splits' users differ for every pair of seeds.
    num_attributes: A (>= 2 for "product").
    temperature: Bradley-Terry temperature (>= 0) shared by all users.
    concentration: Dirichlet concentration of the weights (small: near one-hot users; large: near uniform).

  Returns:
    SimulatedUsers.
  """
  if kind not in USER_KINDS:
    raise ValueError(f"kind must be one of {USER_KINDS}, got {kind!r}.")
  check_int("num_users", num_users, 1)
  check_int("num_attributes", num_attributes, 1)
  check_int("seed", seed, 0)
  if kind == "product" and num_attributes < 2:
    raise ValueError("'product' users need num_attributes >= 2.")
  if not is_real(temperature):  # A list or a string failed inside jnp.full.
    raise ValueError(f"temperature={temperature!r}: expected one number >= 0 shared by all users "
                     "(linear_users takes one per user).")
  _check_temperature(temperature)
  if not (is_real(concentration) and np.isfinite(concentration) and concentration > 0):
    raise ValueError(f"concentration={concentration!r}: expected a finite number > 0.")
  rng = _rng(seed, split, kind)
  weights = rng.dirichlet(np.full(num_attributes, concentration), size=num_users)
  attributes = np.zeros((num_users, 2), np.int32)
  threshold = np.zeros((num_users,))
  if kind == "signed":
    weights = weights * rng.choice([-1.0, 1.0], size=weights.shape)
  elif kind == "threshold":
    attributes[:] = rng.integers(0, num_attributes, size=(num_users, 1))
    threshold = rng.uniform(-1.0, 1.0, size=num_users)
    weights = np.eye(num_attributes)[attributes[:, 0]]
  elif kind == "product":
    for u in range(num_users):
      attributes[u] = rng.choice(num_attributes, size=2, replace=False)
    weights = 0.5 * (np.eye(num_attributes)[attributes[:, 0]] + np.eye(num_attributes)[attributes[:, 1]])
  return SimulatedUsers(
      weights=jnp.asarray(weights, jnp.float32),
      temperature=jnp.full((num_users,), temperature, jnp.float32),
      attributes=jnp.asarray(attributes),
      threshold=jnp.asarray(threshold, jnp.float32),
      kind=kind,
  )


def _check_temperature(temperature: Any) -> None:
  """Temperatures must be finite and >= 0: NaN or a negative one made every choice deterministic, silently."""
  values = np.asarray(temperature, np.float64)
  ok = np.isfinite(values) & (values >= 0) & (values <= np.finfo(np.float32).max)  # Stored as float32: 1e39 is inf.
  if not np.all(ok):
    bad = values.ravel()[~ok.ravel()][0]
    raise ValueError(f"temperature={float(bad)!r}: expected a finite number >= 0 within float32's range (0: "
                     "deterministic choices).")


def linear_users(weights: ArrayLike, temperature: ArrayLike = 1.0) -> SimulatedUsers:
  """Users with given linear weights `[U, A]` (kind "signed" if any weight is negative, else "dirichlet")."""
  check_numeric("weights", weights)
  weights = np.asarray(weights, np.float32)
  if weights.ndim != 2:
    raise ValueError(f"weights must have shape [U, A], got {weights.shape}.")
  check_finite("weights", weights)
  num_users = weights.shape[0]
  kind = "signed" if np.any(weights < 0) else "dirichlet"
  check_numeric("temperature", temperature)
  if np.shape(temperature) not in ((), (num_users,)):
    raise ValueError(f"temperature must be a number or one per user, [U] = [{num_users}], got shape "
                     f"{np.shape(temperature)}.")
  _check_temperature(temperature)
  temperature = np.broadcast_to(np.asarray(temperature, np.float32), (num_users,))
  return SimulatedUsers(weights=jnp.asarray(weights), temperature=jnp.asarray(temperature), attributes=jnp.zeros(
      (num_users, 2), jnp.int32), threshold=jnp.zeros((num_users,)), kind=kind)


def standardize_scores(scores: ArrayLike, mean: Optional[ArrayLike] = None,
                       std: Optional[ArrayLike] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Z-scores attribute scores per attribute (host-side numpy).

  Args:
    scores: `[..., N, A]` raw attribute scores; NaN marks a missing score (left out of the mean and std, and NaN
      in the output).
    mean: `[A]` (None: the mean over all leading axes of `scores`).
    std: `[A]` (None: the standard deviation over the same axes; zero-variance attributes get std 1).

  Returns:
    (standardized `[..., N, A]`, mean `[A]`, std `[A]`) float32: reuse mean / std to standardize held-out scores
    alike.
  """
  check_numeric("scores", scores)
  scores = np.asarray(scores, np.float64)
  if scores.ndim < 2 or (scores.shape[-2] == 0 and (mean is None or std is None)):
    raise ValueError(f"scores must be [..., N, A] with N >= 1 where mean or std is computed from them, got shape "
                     f"{scores.shape}.")
  if np.any(np.isinf(scores)):
    index = [int(i) for i in np.argwhere(np.isinf(scores))[0]]
    raise ValueError(f"scores{index} is {scores[tuple(index)]}: expected finite scores (NaN: a missing score).")
  flat = scores.reshape(-1, scores.shape[-1])
  known = ~np.isnan(flat)  # NaN marks a missing score: left out of the statistics, and NaN in the output.
  empty = np.flatnonzero(~known.any(axis=0)) if (mean is None or std is None) else np.array([], int)
  if empty.size:
    raise ValueError(f"scores[..., {int(empty[0])}] has no score (every entry NaN): its mean and std cannot be "
                     "estimated; pass mean= and std=, or drop the attribute.")
  for name, value in (("mean", mean), ("std", std)):
    if value is not None:
      check_numeric(name, value)
      if np.shape(value) != (scores.shape[-1],):
        raise ValueError(f"{name} must have shape [A] = [{scores.shape[-1]}] (one per attribute), got "
                         f"{np.shape(value)}.")
  complete = bool(known.all())
  if mean is None:
    mean = flat.mean(axis=0) if complete else np.nanmean(flat, axis=0)
  mean = np.asarray(mean, np.float64)
  if not np.all(np.isfinite(mean)):
    bad = int(np.flatnonzero(~np.isfinite(mean))[0])
    raise ValueError(f"mean[{bad}] = {mean[bad]:g}: expected finite numbers (one per attribute).")
  if std is None:
    std = flat.std(axis=0) if complete else np.nanstd(flat, axis=0)
    std = np.where(std > 0, std, 1.0)
  std = np.asarray(std, np.float64)
  if np.any(~np.isfinite(std) | (std <= 0)):  # A given std of 0 divided into inf.
    bad = int(np.flatnonzero(~np.isfinite(std) | (std <= 0))[0]) if std.ndim else 0
    raise ValueError(f"std[{bad}] = {np.ravel(std)[bad]:g}: expected finite numbers > 0 (one per attribute).")
  with np.errstate(over="ignore"):
    out = ((scores - mean) / std).astype(np.float32)
  overflow = np.argwhere(np.isinf(out))
  if overflow.size:  # Finite scores whose z-score (or mean / std) leaves float32: inf would pass on silently.
    index = tuple(int(i) for i in overflow[0])
    raise ValueError(f"scores{list(index)} = {scores[index]:g} standardizes to {out[index]} in float32 (mean "
                     f"{mean[index[-1]]:g}, std {std[index[-1]]:g}): expected scores whose z-scores are within "
                     "float32's range (rescale them).")
  if not (np.all(np.isfinite(mean.astype(np.float32))) and np.all(np.isfinite(std.astype(np.float32)))):
    raise ValueError(f"mean {mean} / std {std}: expected values within float32's range (rescale the scores).")
  return out, mean.astype(np.float32), std.astype(np.float32)


def _check_scores(users: SimulatedUsers, scores: ArrayLike, name: str) -> None:
  check_numeric(name, scores)  # Strings would be parsed.
  shape = np.shape(scores)
  ok = (len(shape) == 2 or (len(shape) == 3 and shape[0] == users.num_users)) and shape[-1] == users.num_attributes
  if not ok:
    raise ValueError(f"{name} must have shape [N, A] or [U, N, A] with U={users.num_users}, "
                     f"A={users.num_attributes}, got {tuple(shape)}.")


def _check_pair(users: SimulatedUsers, scores_a: ArrayLike, scores_b: ArrayLike) -> None:
  _check_scores(users, scores_a, "scores_a")
  _check_scores(users, scores_b, "scores_b")
  if np.shape(scores_a)[-2] != np.shape(scores_b)[-2]:
    raise ValueError(f"scores_a holds N={np.shape(scores_a)[-2]} responses and scores_b N={np.shape(scores_b)[-2]}: "
                     "expected one pair per row.")


def _reward(users: SimulatedUsers, scores: Array) -> Array:
  scores = jnp.asarray(scores, jnp.float32)
  if scores.ndim == 2:
    scores = jnp.broadcast_to(scores[None], (users.num_users,) + scores.shape)
  first = jnp.take_along_axis(scores, users.attributes[:, None, :1], axis=-1)[..., 0]  # [U, N]
  second = jnp.take_along_axis(scores, users.attributes[:, None, 1:], axis=-1)[..., 0]
  if users.kind in ("dirichlet", "signed"):
    return jnp.einsum("una,ua->un", scores, users.weights)
  if users.kind == "threshold":
    return (first > users.threshold[:, None]).astype(jnp.float32)
  if users.kind == "product":
    return jnp.tanh(first) * jnp.tanh(second)
  raise ValueError(f"unknown user kind {users.kind!r}.")


def _prob(users: SimulatedUsers, scores_a: Array, scores_b: Array) -> Array:
  margin = _reward(users, scores_a) - _reward(users, scores_b)
  temp = users.temperature[:, None]
  soft = jax.nn.sigmoid(margin / jnp.where(temp > 0, temp, 1.0))
  hard = 0.5 * (1.0 + jnp.sign(margin))
  return jnp.where(temp > 0, soft, hard)


_reward_jit = jax.jit(_reward)
_prob_jit = jax.jit(_prob)


@jax.jit
def _choice_jit(key: Array, users: SimulatedUsers, scores_a: Array, scores_b: Array) -> Array:
  return jax.random.bernoulli(key, _prob(users, scores_a, scores_b)).astype(jnp.float32)


def true_reward(users: SimulatedUsers, scores: ArrayLike) -> Array:
  """Each user's true reward of N responses.

  Args:
    users: U users over A attributes.
    scores: `[N, A]` (the same N responses for every user) or `[U, N, A]` (per-user responses) standardized
      attribute scores.

  Returns:
    `[U, N]` float32.
  """
  _check_scores(users, scores, "scores")
  check_finite("scores", scores)  # A NaN (missing) score gave a threshold user a reward of 0, silently.
  return _reward_jit(users, jnp.asarray(scores, jnp.float32))


def choice_prob(users: SimulatedUsers, scores_a: ArrayLike, scores_b: ArrayLike) -> Array:
  """P(a > b) = sigmoid((r(s_a) - r(s_b)) / temperature): `[U, N]` (temperature 0: 1, 0, or 0.5 for ties).

  Args:
    users: U users.
    scores_a: `[N, A]` or `[U, N, A]` standardized scores of the first responses.
    scores_b: the same for the second responses.

  Returns:
    `[U, N]` float32 probabilities that each user prefers a.
  """
  _check_pair(users, scores_a, scores_b)
  for name, scores in (("scores_a", scores_a), ("scores_b", scores_b)):
    check_finite(name, scores)  # NaN gave threshold users P = sigmoid(-1) or 0.5, silently.
  return _prob_jit(users, jnp.asarray(scores_a, jnp.float32), jnp.asarray(scores_b, jnp.float32))


def simulate_choice(key: Array, users: SimulatedUsers, scores_a: ArrayLike, scores_b: ArrayLike) -> Array:
  """Samples Bradley-Terry choices (one compiled call).

  Args:
    key: PRNG key.
    users: U users.
    scores_a: `[N, A]` or `[U, N, A]`.
    scores_b: `[N, A]` or `[U, N, A]`.

  Returns:
    `[U, N]` float32 labels, 1 where the user prefers a, else 0 (exact ties at temperature 0 are decided by a
    fair coin), usable as `fit_lambda` prefs.
  """
  check_key(key)
  _check_pair(users, scores_a, scores_b)
  for name, scores in (("scores_a", scores_a), ("scores_b", scores_b)):
    check_finite(name, scores)  # A NaN (missing) score would become a choice of response b (label 0).
  return _choice_jit(key, users, jnp.asarray(scores_a, jnp.float32), jnp.asarray(scores_b, jnp.float32))
