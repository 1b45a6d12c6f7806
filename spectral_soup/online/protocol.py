"""The online protocol over generated responses (docs/METHOD.md section 5): T rounds, all users at once.

Each round, for every user at once:
  1. draw M prompts (shared by all users, so the backbone prefills them once);
  2. draw two mixing vectors per (user, prompt) from the user's Laplace posterior of lambda (Thompson sampling:
     early rounds explore widely, later ones show two soups the posterior still finds plausible), and generate one
     response from each soup (`config.online.mode`: explicit, params or implicit);
  3. the simulated user picks one of the two by Bradley-Terry on its true reward of their attribute scores;
  4. refit every learner on all the user's comparisons so far, warm-started (one compiled call per learner):
       * "spectral": L2-regularized logistic regression of the choices on the difference of the responses'
         features, shrunk toward `prior_mean`: the bases' implicit rewards f_k(x, y) = beta (log pi_k(y|x) -
         log pi_ref(y|x)) (`features="implicit_reward"`, read off the decoder, no extra pass) or each basis's
         attribute as PAD's token-level reward model predicts it (`features="reward_model"`, the demo's);
       * "p_soups": the same fit constrained to the simplex (P-Soups averages experts with convex weights);
       * "pad": the same logistic regression on PAD's predicted attribute vectors (`baselines.pad`).
The harness (`Harness`) owns the model: it decodes row programs and scores responses; the protocol only sees
arrays, so tests can run it on a tiny model with synthetic attributes.

Recorded per round: each user's mean true reward of the two shown responses, their mean KL to the reference and
lambda; `cumulative_regret` turns the rewards into regret against a policy's value (the bespoke one) afterwards.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Protocol, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.online import checks
from spectral_soup.online import fit
from spectral_soup.online import laplace
from spectral_soup.online import users as users_lib
from spectral_soup.soup.validation import check_int
from spectral_soup.soup.validation import check_key
from spectral_soup.soup.validation import is_real
from spectral_soup.utils import progress

LEARNERS = ("spectral", "p_soups", "pad")
CONSTRAINTS = ("none", "nonnegative")
FEATURES = ("implicit_reward", "reward_model")  # What the soups' lambda regresses the choices on.
MODES = ("explicit", "params", "implicit")  # How the shown responses are generated.


class Harness(Protocol):
  """What the protocol needs from the model side."""

  num_bases: int  # K
  num_attributes: int  # A

  def decode(self, prompt_ids: np.ndarray, mode: str, lam: np.ndarray, key: jax.Array) -> Dict[str, np.ndarray]:
    """Responses for R rows: row r continues prompt `prompt_ids[prompt_index[r]]` with the `mode` soup of `lam[r]`
    ([R, K]).

    `prompt_ids`: int[M] indices into the online prompt pool; rows are ordered (prompt, row) with
    R = M * (rows per prompt). Returns {"features": [R, K] beta * (log pi_k - log pi_ref), "kl": [R],
    "scores": [R, A] standardized attribute scores, "pad_features": [R, A] the attributes predicted by PAD's
    token-level reward model}.
    """


@dataclasses.dataclass
class OnlineConfig:
  rounds: int = 4  # T
  prompts_per_round: int = 16  # M: comparisons per user per round.
  l2: float = 1.0  # Penalty of the lambda fits (spectral and P-Soups: the same features).
  pad_weights_l2: Optional[float] = None  # Penalty of PAD's user-weight fit (other features: its own; None: l2).
  prior_mean: float = 0.0  # lambda is shrunk toward prior_mean * 1 (0: the reference; 1/K: the uniform soup).
  explore_scale: float = 1.0  # Thompson samples: mean + explore_scale * (posterior noise).
  mode: str = "explicit"  # How the shown responses are generated: explicit, params or implicit.
  # Spectral lambda: "none" (any sign) or "nonnegative" (lam >= 0, any scale: users who want more of each basis's
  # attribute or do not care, as Dirichlet users do; P-Soups further fixes sum lam = 1).
  constraint: str = "none"
  # What lambda regresses the choices on (spectral and P-Soups): "implicit_reward" (the bases' beta * log pi_k /
  # pi_ref of each response) or "reward_model" (each basis's attribute as predicted by the harness's token-level
  # reward model, `pad_features`: needs one basis per attribute, K = A, in the same order).
  features: str = "implicit_reward"


# Beyond these a soup's logits are lambda-scaled implicit rewards far outside float32's useful range (the fits' and
# the decoder's), whatever the data: refused up front rather than decoded as NaN.
MAX_PRIOR_MEAN = 1e6
MAX_EXPLORE_SCALE = 1e6
L2_EXPECTED = f"a number in [{checks.L2_RANGE[0]:.3g}, {checks.L2_RANGE[1]:.3g}] (> 0, and float32's range)"


def config_problems(cfg: OnlineConfig, pool_size: Optional[int] = None) -> List[Tuple[str, str]]:
  """(field, what was expected) for every invalid field of `cfg`; the prompt pool bounds prompts_per_round if given.

  The one list of these checks: `run_online` raises on the first, and the main job's config check names them before
  anything loads.
  """
  most = pool_size if pool_size is not None else math.inf
  is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
  # Real numbers only (`is_real`): a string would be parsed (or compared with an int: a bare TypeError), True taken
  # as 1.
  l2_ok = lambda v: is_real(v) and checks.l2_in_range(v)
  problems = (
      (is_int(cfg.rounds) and cfg.rounds >= 1, "rounds", "an integer >= 1"),
      (is_int(cfg.prompts_per_round) and 1 <= cfg.prompts_per_round <= most, "prompts_per_round",
       "an integer >= 1" if pool_size is None else f"an integer in 1..{pool_size} (the prompt pool)"),
      (l2_ok(cfg.l2), "l2", L2_EXPECTED),
      (cfg.pad_weights_l2 is None or
       l2_ok(cfg.pad_weights_l2), "pad_weights_l2", L2_EXPECTED + " (or None: online.l2)"),
      # lambda starts at prior_mean * 1: a NaN / inf prior decoded NaN soups after the offline phase.
      (is_real(cfg.prior_mean) and abs(float(cfg.prior_mean)) <= MAX_PRIOR_MEAN, "prior_mean",
       f"a finite number in [-{MAX_PRIOR_MEAN:g}, {MAX_PRIOR_MEAN:g}]"),
      (is_real(cfg.explore_scale) and 0 <= cfg.explore_scale <= MAX_EXPLORE_SCALE, "explore_scale",
       f"a number in [0, {MAX_EXPLORE_SCALE:g}] (Thompson samples' spread; 1: the posterior's own)"),
      (cfg.mode in MODES, "mode", " or ".join(map(repr, MODES))),
      (cfg.constraint in CONSTRAINTS, "constraint", f"one of {CONSTRAINTS}"),
      (cfg.features in FEATURES, "features", f"one of {FEATURES}"),
  )
  return [(field, expected) for ok, field, expected in problems if not ok]


def run_online(harness: Harness, users: users_lib.SimulatedUsers, pool_size: int, cfg: OnlineConfig,
               key: jax.Array) -> Dict[str, np.ndarray]:
  """Runs the protocol for U users. Returns the history and every learner's final weights.

  Returns:
    {"lam": [U, K] (spectral), "lam_p_soups": [U, K], "pad_weights": [U, A], "lam_history": [T, U, K],
     "reward": [T, U] mean true reward of the round's two responses, "kl": [T, U], "num_comparisons": [T],
     "choice_accuracy": [T, U] fraction of the round's choices the previous lambda predicted (a zero margin, as
     with lambda = 0 in the first round, counts 0.5),
     "comparison_features": [U, T * M, K] (the kind `cfg.features` names), "comparison_implicit_features":
     [U, T * M, K] (the bases' implicit rewards, whatever `cfg.features`), "comparison_pad_features": [U, T * M, A]
     and "comparison_prefs": [U, T * M], every comparison}.
  """
  check_int("pool_size", pool_size, 1)
  check_key(key, "key")
  for field, expected in config_problems(cfg, pool_size)[:1]:
    raise ValueError(f"online.{field}={getattr(cfg, field)!r} is invalid: expected {expected}.")
  num_users, num_bases, num_attr = users.num_users, harness.num_bases, harness.num_attributes
  check_int("harness.num_bases", num_bases, 1)
  if users.num_attributes != num_attr:  # Else the first decode's scores failed to broadcast, after the decode.
    raise ValueError(f"the users weigh {users.num_attributes} attributes but the harness scores {num_attr}: the "
                     "simulated users' attributes must be the harness's (the same A, in the same order).")
  if cfg.features == "reward_model" and num_bases != num_attr:
    raise ValueError(f"online.features='reward_model' needs one basis per attribute: the harness has {num_bases} "
                     f"bases and {num_attr} attributes. Use online.features='implicit_reward'.")
  capacity = cfg.rounds * cfg.prompts_per_round
  feats = np.zeros((num_users, capacity, num_bases), np.float32)
  pad_feats = np.zeros((num_users, capacity, num_attr), np.float32)
  implicit = np.zeros((num_users, capacity, num_bases), np.float32)  # The implicit rewards' differences, always.
  prefs = np.zeros((num_users, capacity), np.float32)
  mask = np.zeros((num_users, capacity), bool)
  prior = np.full((num_bases,), cfg.prior_mean, np.float32)
  sign = {"constraint": "box", "box": (0.0, np.inf)} if cfg.constraint == "nonnegative" else {}
  lam = np.broadcast_to(prior, (num_users, num_bases)).copy()
  lam_ps = np.full((num_users, num_bases), 1.0 / num_bases, np.float32)
  pad_l2 = cfg.l2 if cfg.pad_weights_l2 is None else cfg.pad_weights_l2
  pad_w = np.zeros((num_users, num_attr), np.float32)
  history = {"lam_history": [], "reward": [], "kl": [], "num_comparisons": [], "choice_accuracy": []}
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel()[-1])
  m = cfg.prompts_per_round
  for t in progress.track(range(cfg.rounds), desc="online rounds", unit="round"):
    key, k_explore, k_decode, k_choice = jax.random.split(key, 4)
    prompt_ids = rng.choice(pool_size, size=m, replace=False)
    mean, cov = laplace.posterior_batched(jnp.asarray(lam), jnp.asarray(feats), jnp.asarray(mask), l2=cfg.l2)
    root = jax.vmap(laplace.cov_sqrt)(cov)  # [U, K, K]
    eps = jax.random.normal(k_explore, (num_users, m, 2, num_bases))
    shown = mean[:, None, None, :] + cfg.explore_scale * jnp.einsum("umjk,ulk->umjl", eps, root)
    # Rows ordered (prompt, user, side): row = (i * U + u) * 2 + j.
    shown = np.asarray(jnp.transpose(shown, (1, 0, 2, 3))).reshape(m * num_users * 2, num_bases)
    out = harness.decode(prompt_ids, cfg.mode, shown, k_decode)
    shape = (m, num_users, 2)
    f_implicit = np.asarray(out["features"]).reshape(*shape, num_bases).transpose(1, 0, 2, 3)  # [U, M, 2, K]
    s = np.asarray(out["scores"]).reshape(*shape, num_attr).transpose(1, 0, 2, 3)  # [U, M, 2, A]
    g = np.asarray(out["pad_features"]).reshape(*shape, num_attr).transpose(1, 0, 2, 3)
    f = g if cfg.features == "reward_model" else f_implicit
    kl = np.asarray(out["kl"]).reshape(shape).transpose(1, 0, 2)
    choice = np.asarray(users_lib.simulate_choice(k_choice, users, s[:, :, 0], s[:, :, 1]))  # [U, M]
    reward = np.asarray(users_lib.true_reward(users, s.reshape(num_users, m * 2, num_attr)))
    delta = f[:, :, 0] - f[:, :, 1]
    margin = np.einsum("umk,uk->um", delta, lam)  # > 0: the previous lambda prefers the first response.
    # A zero margin (lambda = 0 in the first round, or a tie) predicts nothing: it counts as a coin flip, 0.5.
    predicted_right = np.where(margin == 0, 0.5, (margin > 0) == (choice > 0.5))
    lo = t * m
    feats[:, lo:lo + m], pad_feats[:, lo:lo + m] = delta, g[:, :, 0] - g[:, :, 1]
    implicit[:, lo:lo + m] = f_implicit[:, :, 0] - f_implicit[:, :, 1]
    prefs[:, lo:lo + m], mask[:, lo:lo + m] = choice, True
    lam = np.asarray(
        fit.fit_lambda_batched(feats, prefs, l2=cfg.l2, mask=mask, init=lam, prior_mean=prior, tol=1e-5, **sign))
    lam_ps = np.asarray(fit.fit_lambda_batched(feats, prefs, l2=cfg.l2, mask=mask, init=lam_ps, constraint="simplex"))
    pad_w = np.asarray(fit.fit_lambda_batched(pad_feats, prefs, l2=pad_l2, mask=mask, init=pad_w, tol=1e-5))
    history["lam_history"].append(lam.copy())
    history["reward"].append(reward.mean(axis=1))
    history["kl"].append(kl.mean(axis=(1, 2)))
    history["num_comparisons"].append(lo + m)
    history["choice_accuracy"].append(predicted_right.mean(axis=1))
  out = {name: np.asarray(value) for name, value in history.items()}
  out.update(lam=lam, lam_p_soups=lam_ps, pad_weights=pad_w, comparison_features=feats,
             comparison_pad_features=pad_feats, comparison_prefs=prefs, comparison_implicit_features=implicit)
  return out


def cumulative_regret(round_rewards: np.ndarray, best_value: np.ndarray) -> np.ndarray:
  """sum_{s <= t} (best_value[u] - round_rewards[s, u]): [T, U] -> [T, U].

  An unbiased regret needs best_value on the rounds' own prompts; with a value measured on other prompts (the main
  job's bespoke value on the evaluation prompts) every round adds their difference of pools to the regret.
  """
  rewards, best = np.asarray(round_rewards), np.asarray(best_value)
  if rewards.ndim != 2 or best.shape != rewards.shape[1:]:  # numpy's broadcast error named neither.
    raise ValueError(f"round_rewards has shape {rewards.shape} and best_value {best.shape}: expected [T, U] and [U].")
  return np.cumsum(best[None, :] - rewards, axis=0)
