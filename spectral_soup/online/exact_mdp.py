"""A small exact benchmark: a token-level MDP solved by backward induction (docs/METHOD.md sections 2, 4 and 5).

States are prefixes y_<t of length t = 0..H-1 over a vocabulary of V tokens (deterministic transitions), so there
are V^t states at depth t and V^H complete sequences. A prefix's index at depth t is its base-V number (first token
most significant), so the child of state i by token a is i * V + a and the depth-H index is the sequence index.

Representations (float64 numpy: exact to ~1e-15, no compilation):
  * a policy is a tuple of H arrays `logp[t]: [..., V^t, V]` of normalized log-probs (leading axes, e.g. K bases,
    broadcast);
  * a reward is a tuple of H arrays `r[t]: [..., V^t, V]` (per-token rewards r(s, a)), or a `[..., V^H]` array of
    sequence-level rewards (paid at the last token), or a callable mapping all sequences `int[V^H, H]` to one.

The KL-regularized optimum of any reward r (max_pi E[sum_t r] - beta KL(pi || pi_ref)) is computed exactly by
soft value iteration:
  Q_t(s, a) = r_t(s, a) + V_{t+1}(s a),   V_t(s) = beta log sum_a pi_ref(a|s) exp(Q_t(s, a) / beta),   V_H = 0,
  log pi*(a|s) = log pi_ref(a|s) + (Q_t(s, a) - V_t(s)) / beta.
At the sequence level pi*(y) = pi_ref(y) exp(R(y) / beta) / Z with R(y) the total reward, so:

(a) Sequence-level souping is exact: pi_ref(y)^(1 - sum lam) prod_k pi_k(y)^lam_k (normalized) is proportional to
    pi_ref(y) exp(sum_k lam_k R_k(y) / beta), the optimum of r = sum_k lam_k r_k, for every lam (any signs).

(b) The token-level explicit soup, log_softmax((1 - sum lam) log pi_ref + sum lam_k log pi_k) per state, is
    log pi_ref(a|s) + (r_lam(s, a) + sum_k lam_k V_k(s a)) / beta up to normalization, while the optimum uses
    V_lam(s a). It is exact iff eps(s a) = sum_k lam_k V_k(s a) - V_lam(s a) does not depend on a: always at the
    last token (V_H = 0), and at every state when the soft values combine linearly up to a per-state constant,
    e.g. rewards per token that depend only on (t, a) with a reference that does not depend on the prefix
    ("context-free": V_k(s) then depends only on the depth). Otherwise the soup is the optimum tilted by
    exp(eps / beta), and the error is bounded as follows (`token_soup_kl_bound`):
      * per state, KL(tilted || optimum) <= range_a(eps(s a))^2 / (8 beta^2) (the tilt's log-partition has second
        derivative Var(eps / beta) <= range^2 / 4, integrated against the KL's Taylor weight, which is <= 1/2);
      * for lam in the simplex, Hoelder's inequality on V = beta log E_ref exp(R / beta) (R: the reward still to
        come from s a, expectation over pi_ref's completions) gives eps(s a) >= 0, and Jensen (V_lam >= E_ref R_lam)
        with either V_k <= max R_k or Hoeffding's lemma (V_k <= E_ref R_k + Delta_k^2 / (8 beta)) gives
        eps(s a) <= B = min(sum_k lam_k Delta_k, sum_k lam_k Delta_k^2 / (8 beta)), Delta_k = max_y R_k(y) -
        min_y R_k(y); so range_a eps <= B;
      * for any lam, range_a eps <= Delta(R_lam) + sum_k |lam_k| Delta_k, which grows with negative /
        extrapolated weights (and eps has no sign any more);
      * the chain rule sums the per-state KLs along the H - 1 depths where eps can vary:
        KL(token soup || optimum) <= (H - 1) * B^2 / (8 beta^2).
    E.g. rewards in [0, 1], beta = 1, H = 4: KL <= 3 * (1/8)^2 / 8 = 5.9e-3 for every lam in the simplex (the tests
    measure 1.5e-5 to 6.4e-5 on random sequence rewards, and 5.8e-4 to 3.4e-3 for lam with negative entries,
    growing with extrapolation: 8.5e-2 at lam = (4, -3, 0)).

(c) `run_online` simulates the online phase: a user with true weights w over the K basis rewards (or any simulated
    user, e.g. outside the span) compares two sequences sampled from the current soup, the choice is
    Bradley-Terry on the true rewards, and lam is refit
    (`update_users`) on the implicit-reward features f_k(y) = beta (log pi_k(y) - log pi_ref(y)) = R_k(y) - V_k(root)
    (exactly: the constant cancels in differences, so the pairwise model is exactly in the feature span). The regret
    is G(pi*_w) - G(soup(lam_t)) = beta KL(soup(lam_t) || pi*_w) >= 0 with G(pi) = E_pi[R_w] - beta KL(pi || pi_ref),
    and pi*_w is itself the sequence-level soup with lam = w (claim (a)).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.online import checks
from spectral_soup.online import laplace
from spectral_soup.online import state as state_lib
from spectral_soup.online import users as users_lib
from spectral_soup.soup.validation import check_int
from spectral_soup.soup.validation import is_real

Policy = Tuple[np.ndarray, ...]
Reward = Union[Tuple[np.ndarray, ...], np.ndarray, Callable[[np.ndarray], np.ndarray]]


def _check_beta(beta: Any) -> float:
  """beta as a float; ValueError unless it is a finite real number > 0 (NaN or inf made every policy NaN)."""
  if not (is_real(beta) and np.isfinite(beta) and beta > 0):
    raise ValueError(f"beta must be a finite number > 0 (the KL coefficient), got {beta!r}.")
  return float(beta)


def _finite(name: str, x: Any) -> np.ndarray:
  """`x` as float64; ValueError naming `name` and the first entry that is not a finite real number."""
  checks.check_numeric(name, x)
  a = np.asarray(x, np.float64)
  bad = np.argwhere(~np.isfinite(a))
  if bad.size:
    index = [int(i) for i in bad[0]] if a.ndim else []
    raise ValueError(f"{name}{index if index else ''} is {a[tuple(index)]}: expected finite numbers.")
  return a


def _check_lam(lam: Any, num_bases: int) -> np.ndarray:
  """lam `[..., K]` as float64, finite, with K = num_bases."""
  lam = _finite("lam", lam)
  if lam.ndim < 1 or lam.shape[-1] != num_bases:
    raise ValueError(f"lam has shape {lam.shape}: expected [K] or [..., K] with K = {num_bases} (one weight per "
                     "basis).")
  return lam


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  shifted = x - np.max(x, axis=-1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
  top = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(top, axis) + np.log(np.sum(np.exp(x - top), axis=axis))


@dataclasses.dataclass(frozen=True)
class TokenMDP:
  """A V-token, horizon-H prefix MDP with its reference policy.

  Attributes:
    vocab_size: V.
    horizon: H (sequence length).
    ref: the reference policy, a tuple of H arrays `[V^t, V]` of log-probs.
  """
  vocab_size: int
  horizon: int
  ref: Policy

  @property
  def num_sequences(self) -> int:
    return self.vocab_size**self.horizon

  def sequences(self) -> np.ndarray:
    """`int[V^H, H]` every sequence, row i being the base-V digits of i (first token most significant)."""
    idx = np.arange(self.num_sequences)
    powers = self.vocab_size**np.arange(self.horizon - 1, -1, -1)
    return (idx[:, None] // powers[None, :]) % self.vocab_size


def make_mdp(vocab_size: int = 4, horizon: int = 4, seed: int = 0, *, ref_scale: float = 1.0,
             context_free: bool = False) -> TokenMDP:
  """A random reference policy: softmax(ref_scale * N(0, 1) logits) per state.

  Args:
    vocab_size: V >= 2.
    horizon: H >= 1.
    seed: numpy seed.
    ref_scale: logit scale (larger: more peaked reference).
    context_free: one next-token distribution per depth, shared by all prefixes.

  Returns:
    TokenMDP.
  """
  vocab_size, horizon = check_int("vocab_size", vocab_size, 2), check_int("horizon", horizon, 1)  # 2.5: a TypeError.
  rng = np.random.default_rng(seed)
  ref = []
  for t in range(horizon):
    rows = 1 if context_free else vocab_size**t
    logits = ref_scale * rng.standard_normal((rows, vocab_size))
    ref.append(np.broadcast_to(_log_softmax(logits), (vocab_size**t, vocab_size)).copy())
  return TokenMDP(vocab_size, horizon, tuple(ref))


def random_sequence_rewards(mdp: TokenMDP, num: int, seed: int, *, low: float = 0.0, high: float = 1.0) -> np.ndarray:
  """`[num, V^H]` sequence-level rewards, i.i.d. uniform in [low, high]."""
  return np.random.default_rng(seed).uniform(low, high, size=(num, mdp.num_sequences))


def random_token_rewards(mdp: TokenMDP, num: int, seed: int, *, context_free: bool = False) -> Policy:
  """Per-token rewards, uniform in [0, 1 / H] (totals in [0, 1]): a tuple of H arrays `[num, V^t, V]`.

  context_free: r_t(s, a) depends only on (t, a).
  """
  rng = np.random.default_rng(seed)
  out = []
  for t in range(mdp.horizon):
    rows = 1 if context_free else mdp.vocab_size**t
    r = rng.uniform(0.0, 1.0 / mdp.horizon, size=(num, rows, mdp.vocab_size))
    out.append(np.broadcast_to(r, (num, mdp.vocab_size**t, mdp.vocab_size)).copy())
  return tuple(out)


def token_rewards(reward: Reward, mdp: TokenMDP) -> Tuple[np.ndarray, ...]:
  """Any reward representation -> a tuple of H arrays `[..., V^t, V]` of per-token rewards."""
  if callable(reward):
    reward = np.asarray(reward(mdp.sequences()), np.float64)
  if isinstance(reward, (tuple, list)):
    if len(reward) != mdp.horizon:
      raise ValueError(f"a per-token reward needs {mdp.horizon} arrays (one per depth), got {len(reward)}.")
    out = tuple(_finite(f"reward[{t}]", r) for t, r in enumerate(reward))
    batch = out[0].shape[:-2]
    for t, r in enumerate(out):
      expected = batch + (mdp.vocab_size**t, mdp.vocab_size)
      if r.shape != expected:
        raise ValueError(f"reward[{t}] has shape {r.shape}: expected [..., V^t, V] = {list(expected)} (depth {t}: "
                         f"one row per prefix of length {t}, one column per token; the same leading axes at every "
                         "depth).")
    return out
  reward = _finite("reward", reward)
  if reward.ndim < 1 or reward.shape[-1] != mdp.num_sequences:
    raise ValueError(f"a sequence reward needs a last axis of V^H={mdp.num_sequences}, got {reward.shape}.")
  batch = reward.shape[:-1]
  out = [np.zeros(batch + (mdp.vocab_size**t, mdp.vocab_size)) for t in range(mdp.horizon - 1)]
  out.append(reward.reshape(batch + (mdp.vocab_size**(mdp.horizon - 1), mdp.vocab_size)))
  return tuple(out)


def total_reward(reward: Reward, mdp: TokenMDP) -> np.ndarray:
  """`[..., V^H]` the total reward R(y) = sum_t r_t(y_<t, y_t) of every sequence."""
  per_token = token_rewards(reward, mdp)
  total = np.zeros(per_token[0].shape[:-2] + (1,))
  for r in per_token:
    total = (total[..., :, None] + r).reshape(r.shape[:-2] + (-1,))
  return total


def soft_value_iteration(reward: Reward, mdp: TokenMDP, beta: float) -> Tuple[Policy, Tuple[np.ndarray, ...]]:
  """Exact KL-regularized optimum by backward induction.

  Args:
    reward: any reward representation (leading batch axes allowed, e.g. `[K, V^H]` for K rewards at once).
    mdp: the MDP (its reference policy).
    beta: KL coefficient > 0.

  Returns:
    (policy: tuple of H `[..., V^t, V]` log-probs, values: tuple of H + 1 `[..., V^t]` soft values, values[H] = 0).
  """
  beta = _check_beta(beta)
  per_token = token_rewards(reward, mdp)
  batch = per_token[0].shape[:-2]
  values = [None] * (mdp.horizon + 1)
  values[mdp.horizon] = np.zeros(batch + (mdp.num_sequences,))
  policy = [None] * mdp.horizon
  for t in range(mdp.horizon - 1, -1, -1):
    q = per_token[t] + values[t + 1].reshape(batch + (mdp.vocab_size**t, mdp.vocab_size))
    logits = mdp.ref[t] + q / beta
    values[t] = beta * _logsumexp(logits)
    policy[t] = logits - values[t][..., None] / beta
  return tuple(policy), tuple(values)


def optimal_policy(reward: Reward, mdp: TokenMDP, beta: float) -> Policy:
  """The KL-regularized optimal policy of `reward` (see `soft_value_iteration`)."""
  return soft_value_iteration(reward, mdp, beta)[0]


def sequence_log_probs(policy: Policy) -> np.ndarray:
  """`[..., V^H]` log-probabilities of every complete sequence under a token-level policy."""
  logp = np.zeros(policy[0].shape[:-2] + (1,))
  for lp in policy:
    logp = (logp[..., :, None] + lp).reshape(lp.shape[:-2] + (-1,))
  return logp


def sequence_distribution(policy: Policy) -> np.ndarray:
  """`[..., V^H]` probabilities of every complete sequence (sums to 1)."""
  return np.exp(sequence_log_probs(policy))


def explicit_soup_policy(basis_policies: Policy, ref: Policy, lam: Any) -> Policy:
  """Token-level explicit soup: per state log_softmax((1 - sum lam) log pi_ref + sum_k lam_k log pi_k).

  Args:
    basis_policies: tuple of H arrays `[K, V^t, V]`.
    ref: tuple of H arrays `[V^t, V]`.
    lam: `[K]` (any signs).

  Returns:
    tuple of H `[V^t, V]` log-probs (float64; `spectral_soup.soup.soup_logits` computes the same in float32).
  """
  lam = _check_lam(lam, np.shape(basis_policies[0])[0])
  if lam.ndim != 1:
    raise ValueError(f"lam has shape {lam.shape}: expected [K] (one soup).")
  return tuple(_log_softmax((1.0 - lam.sum()) * r + np.tensordot(lam, b, axes=1)) for b, r in zip(basis_policies, ref))


def sequence_soup(basis_seq_logp: np.ndarray, ref_seq_logp: np.ndarray, lam: Any) -> np.ndarray:
  """Sequence-level product of experts pi_ref^(1 - sum lam) prod_k pi_k^lam_k, normalized.

  Args:
    basis_seq_logp: `[K, V^H]` sequence log-probs of the basis policies.
    ref_seq_logp: `[V^H]`.
    lam: `[K]` or `[U, K]`.

  Returns:
    `[V^H]` or `[U, V^H]` normalized log-probs.
  """
  lam = _check_lam(lam, np.shape(basis_seq_logp)[0])
  scores = (1.0 - lam.sum(-1, keepdims=True)) * ref_seq_logp + lam @ basis_seq_logp
  return _log_softmax(scores)


def kl(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
  """KL(p || q) over the last axis from log-probs (0 log 0 = 0)."""
  p = np.exp(logp)
  return np.sum(np.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def expected_reward(logp: np.ndarray, seq_reward: np.ndarray) -> np.ndarray:
  """J = E_p[R] over the last axis."""
  return np.sum(np.exp(logp) * seq_reward, axis=-1)


def regularized_value(logp: np.ndarray, ref_logp: np.ndarray, seq_reward: np.ndarray, beta: float) -> np.ndarray:
  """G = E_p[R] - beta KL(p || p_ref), maximized by the optimal policy of R (where it equals V(root))."""
  return expected_reward(logp, seq_reward) - beta * kl(logp, ref_logp)


def implicit_features(basis_seq_logp: np.ndarray, ref_seq_logp: np.ndarray, beta: float) -> np.ndarray:
  """`[V^H, K]` f_k(y) = beta (log pi_k(y) - log pi_ref(y)) (= R_k(y) - V_k(root) at the optimum)."""
  return (beta * (basis_seq_logp - ref_seq_logp)).T


def token_soup_kl_bound(basis_seq_rewards: np.ndarray, lam: Any, beta: float, horizon: int) -> float:
  """Upper bound of KL(token-level soup || exact optimum of sum_k lam_k R_k) (module docstring, (b)).

  Args:
    basis_seq_rewards: `[K, V^H]` total rewards R_k(y) of the bases.
    lam: `[K]`.
    beta: KL coefficient.
    horizon: H.

  Returns:
    (H - 1) * B^2 / (8 beta^2) with B = min(sum_k lam_k Delta_k, sum_k lam_k Delta_k^2 / (8 beta)) for lam in
    the simplex (within 1e-9), else B = Delta(R_lam) + sum_k |lam_k| Delta_k; Delta = max - min over sequences.
  """
  beta = _check_beta(beta)
  horizon = check_int("horizon", horizon, 1)  # 0 or less gave a bound of 0 or below.
  r = _finite("basis_seq_rewards", basis_seq_rewards)
  if r.ndim != 2:
    raise ValueError(f"basis_seq_rewards has shape {r.shape}: expected [K, V^H].")
  lam = _check_lam(lam, r.shape[0])
  if lam.ndim != 1:
    raise ValueError(f"lam has shape {lam.shape}: expected [K] (one soup).")
  spread = r.max(axis=-1) - r.min(axis=-1)
  if np.all(lam >= -1e-9) and abs(lam.sum() - 1.0) <= 1e-9:
    bound = float(min(lam @ spread, lam @ spread**2 / (8.0 * beta)))
  else:
    r_lam = lam @ r
    bound = float(r_lam.max() - r_lam.min() + np.abs(lam) @ spread)
  return (horizon - 1) * bound**2 / (8.0 * beta**2)


def run_online(mdp: TokenMDP, basis_rewards: Reward, beta: float, users: Union[users_lib.SimulatedUsers, Any], *,
               num_rounds: int, l2: float = 1.0, seed: int = 0, temperature: float = 1.0, pair_source: str = "soup",
               soup: str = "sequence", num_candidates: int = 8,
               num_iters: int = state_lib.DEFAULT_NUM_ITERS) -> Dict[str, np.ndarray]:
  """Simulates the online phase for S users at once (module docstring, (c)).

  Each round, every user is shown two sequences and chooses by Bradley-Terry on its true reward, and all users'
  lam are refit in one `update_users` call (warm start, prior 0: the first soup is pi_ref).

  Args:
    mdp: the MDP.
    basis_rewards: the K basis rewards (any representation with a leading K axis).
    beta: KL coefficient of the bases, the soups and the regret.
    users: either `[S, K]` true weights w over the raw basis rewards (reward R_w = sum_k w_k R_k, in the span:
      the pairwise model is well specified and lam -> w / temperature), or `SimulatedUsers` over A = K attributes
      whose scores are the basis rewards standardized over all sequences (any kind, e.g. "threshold" or
      "product" users outside the span; their own temperatures are used). Either way the user's reward, for the
      choices and for the regret, is its Bradley-Terry utility r / temperature.
    num_rounds: R comparisons per user (the ring buffer holds all of them).
    l2: fit_lambda's penalty.
    seed: seeds the sampled pairs and the choices.
    temperature: Bradley-Terry temperature (> 0) of weight-vector users.
    pair_source: "soup" (two independent samples of the current soup), "ref" (of pi_ref), or "active"
      (`num_candidates` samples of the soup, the pair chosen by `choose_pair(rule="max_info")` on the Laplace
      posterior).
    soup: "sequence" (the exact sequence-level soup) or "token" (the token-level explicit soup, which adds the
      approximation error of (b)) is the policy shown and evaluated.
    num_candidates: candidates per round for "active".
    num_iters: Newton steps per refit.

  Returns:
    dict of numpy arrays: "regret" `[S, R + 1]` (round 0: before any feedback) G(pi*) - G(pi_lam) with pi* the
    user's bespoke KL-optimal policy, "score" `[S, R + 1]` normalized score (J(pi_lam) - J(pi_ref)) /
    (J(pi*) - J(pi_ref)), "kl_to_ref" `[S, R + 1]`, "lam" `[S, R + 1, K]`.
  """
  if pair_source not in ("soup", "ref", "active"):
    raise ValueError(f"pair_source must be 'soup', 'ref' or 'active', got {pair_source!r}.")
  beta = _check_beta(beta)
  check_int("num_rounds", num_rounds, 1)
  check_int("num_candidates", num_candidates, 2)
  checks.check_l2(l2)
  if not (is_real(temperature) and np.isfinite(temperature) and temperature > 0):
    raise ValueError(f"temperature must be a finite number > 0 (the users' Bradley-Terry temperature), got "
                     f"{temperature!r}.")
  if soup not in ("sequence", "token"):
    raise ValueError(f"soup must be 'sequence' or 'token', got {soup!r}.")
  basis_policy = optimal_policy(basis_rewards, mdp, beta)
  basis_logp = sequence_log_probs(basis_policy)  # [K, V^H]
  ref_logp = sequence_log_probs(mdp.ref)  # [V^H]
  basis_r = total_reward(basis_rewards, mdp)  # [K, V^H]
  num_bases = basis_r.shape[0]
  if isinstance(users, users_lib.SimulatedUsers):
    if users.num_attributes != num_bases:
      raise ValueError(f"users have {users.num_attributes} attributes but there are {num_bases} basis rewards.")
    scores = users_lib.standardize_scores(basis_r.T)[0]  # [V^H, K]
    user_r = np.asarray(users_lib.true_reward(users, scores), np.float64)  # [S, V^H]
    temps = np.asarray(users.temperature, np.float64)
  else:
    w = _finite("users", users)
    if w.ndim != 2 or w.shape[1] != num_bases:
      raise ValueError(f"true weights must have shape [S, K={num_bases}], got {w.shape}.")
    user_r = w @ basis_r
    temps = np.full((w.shape[0],), temperature, np.float64)
  if not np.all(np.isfinite(temps) & (temps > 0)):
    raise ValueError("run_online needs finite Bradley-Terry temperatures > 0 (the utility r / T is the user's "
                     f"reward), got {temps[~(np.isfinite(temps) & (temps > 0))][:3].tolist()}.")
  # The user's reward is its Bradley-Terry utility r / T: what a reward model (or bespoke RLHF) fitted to the
  # user's choices learns, and the scale lam learns too (the temperature is not identifiable apart from it).
  user_r = user_r / temps[:, None]
  num_users = user_r.shape[0]
  feats = implicit_features(basis_logp, ref_logp, beta)  # [V^H, K]
  opt_logp = _log_softmax(ref_logp + user_r / beta)  # [S, V^H]: the bespoke optimum of each user's reward.
  opt_g = regularized_value(opt_logp, ref_logp, user_r, beta)
  ref_j = expected_reward(ref_logp, user_r)
  gain = expected_reward(opt_logp, user_r) - ref_j
  gain = np.where(np.abs(gain) > 1e-12, gain, np.nan)  # A user indifferent to every sequence has no score.
  # Choices are Bradley-Terry on each user's reward: a one-attribute linear user whose "score" is that reward.
  chooser = users_lib.linear_users(np.ones((num_users, 1)), 1.0)

  def policy_logp(lam):
    if soup == "sequence":
      return sequence_soup(basis_logp, ref_logp, lam)
    return np.stack([sequence_log_probs(explicit_soup_policy(basis_policy, mdp.ref, l)) for l in lam])

  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  rows = np.arange(num_users)
  state = state_lib.init_user_state(num_users, num_bases, num_rounds, l2=l2)
  history = {"regret": [], "score": [], "kl_to_ref": [], "lam": []}
  for t in range(num_rounds + 1):
    lam = np.asarray(state.lam, np.float64)
    logp = policy_logp(lam)
    history["regret"].append(opt_g - regularized_value(logp, ref_logp, user_r, beta))
    history["score"].append((expected_reward(logp, user_r) - ref_j) / gain)
    history["kl_to_ref"].append(kl(logp, ref_logp))
    history["lam"].append(lam)
    if t == num_rounds:
      break
    probs = np.exp(np.broadcast_to(ref_logp, logp.shape) if pair_source == "ref" else logp)
    probs = probs / probs.sum(-1, keepdims=True)
    if pair_source == "active":
      cands = np.stack([rng.choice(mdp.num_sequences, size=num_candidates, p=p) for p in probs])  # [S, M]
      mean, cov = state_lib.state_posterior(state)
      i, j = laplace.choose_pair_batched(jnp.asarray(feats[cands], jnp.float32), mean, cov, rule="max_info")
      ya, yb = cands[rows, np.asarray(i)], cands[rows, np.asarray(j)]
    else:
      ya = np.array([rng.choice(mdp.num_sequences, p=p) for p in probs])
      yb = np.array([rng.choice(mdp.num_sequences, p=p) for p in probs])
    key, sub = jax.random.split(key)
    prefs = users_lib.simulate_choice(sub, chooser, user_r[rows, ya][:, None, None], user_r[rows, yb][:, None, None])
    state = state_lib.update_users(state, jnp.asarray(feats[ya] - feats[yb], jnp.float32), prefs[:, 0],
                                   num_iters=num_iters)
  return {name: np.stack(values, axis=1) for name, values in history.items()}
