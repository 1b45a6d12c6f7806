"""Explicit (output) souping: combine the next-token log-probs of K basis policies and the reference.

For a user with mixing vector lam in R^K (docs/METHOD.md section 4):

  log pi_soup = log_softmax((1 - sum_k lam_k) * log pi_ref + sum_k lam_k * log pi_k),

where every policy is log-softmax normalized *before* mixing. At the sequence level this is the KL-optimal policy for
the reward sum_k lam_k r_k (the reverse-KL case of MOD); at the token level it is an approximation, the one the
reported sub-optimality bound controls (docs/METHOD.md sections 2 and 4).

Conventions shared by all functions here:
  * Everything is computed in float32 whatever the input dtype; outputs are float32 normalized log-probs.
  * Mixing uses elementwise multiply-and-sum over the basis axis (no matmul), so no reduced-precision matmul passes
    are involved on TPU.
  * A token that has log-prob -inf under a policy whose coefficient is non-zero gets -inf in the soup (the soup's
    support is the intersection of the supports it mixes), and a zero coefficient never produces 0 * inf = NaN.
    Caveat: with a *negative* coefficient, a finite but very negative log-prob (e.g. a -1e9 mask) becomes a huge
    positive score; mask with -inf, not with a large finite number, when weights can be negative.
  * `lam` is a runtime array (never static): one compiled function serves every user.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.soup.validation import check_lam
from spectral_soup.soup.validation import lam_per_row
from spectral_soup.utils import reductions

DIVERGENCES = ("reverse_kl", "forward_kl", "alpha")


def _log_normalize(logits: jax.Array) -> jax.Array:
  """`[..., V]` logits of any float dtype -> float32 log-probs `[..., V]`."""
  return reductions.log_softmax(jnp.asarray(logits).astype(jnp.float32))


def weighted_logp_sum(logps: jax.Array, coeffs: jax.Array) -> jax.Array:
  """`sum_n coeffs[n] * logps[n]` with -inf handled (see module docstring); not normalized.

  Args:
    logps: `[N, ..., V]` float32 log-probs (may contain -inf).
    coeffs: `[N, ...]` coefficients, broadcastable against `logps` after appending trailing axes.

  Returns:
    `[..., V]` float32 combined scores.
  """
  coeffs = jnp.asarray(coeffs, jnp.float32)
  coeffs = coeffs.reshape(coeffs.shape + (1,) * (logps.ndim - coeffs.ndim))
  neg_inf = jnp.isneginf(logps)
  finite = jnp.where(neg_inf, 0.0, logps)
  total = jnp.sum(coeffs * finite, axis=0)
  dead = jnp.any(neg_inf & (coeffs != 0), axis=0)
  return jnp.where(dead, -jnp.inf, total)


def mix_logprobs(ref_logp: jax.Array, basis_logp: jax.Array, lam: jax.Array) -> jax.Array:
  """The soup's unnormalized scores (1 - sum_k lam_k) log pi_ref + sum_k lam_k log pi_k, -inf handled.

  The mixing rule's reference form: full basis logits (LoRA bases, separate passes, rejection sampling's target)
  mix through it; for head bases the decoding engine computes the same soup in factored forms (`engine._mix`:
  one normalization of logits_ref + sum_h lam_h Delta_h, or the heads' support normalizers), tested equal to
  single-policy decoders. Callers renormalize (log-softmax) and may divide by a temperature first.

  Args:
    ref_logp: `[..., V]` float32 reference log-probs.
    basis_logp: `[K, ..., V]` float32 basis log-probs.
    lam: `[K]` (shared) or `[B, K]` with `ref_logp: [B, ..., V]` (one vector per row).

  Returns:
    `[..., V]` float32 scores.
  """
  lam = jnp.asarray(lam, jnp.float32)
  coeffs = jnp.concatenate([1.0 - jnp.sum(lam, axis=-1, keepdims=True), lam], axis=-1)  # [..., K + 1]
  return weighted_logp_sum(jnp.concatenate([ref_logp[None], basis_logp], axis=0), jnp.moveaxis(coeffs, -1, 0))


def _check_logit_shapes(ref_logits: jax.Array, basis_logits: jax.Array) -> int:
  ref_shape, basis_shape = np.shape(ref_logits), np.shape(basis_logits)
  if len(ref_shape) < 1:
    raise ValueError(f"ref_logits must have a vocabulary axis [..., V], got shape {ref_shape}.")
  if tuple(basis_shape[1:]) != tuple(ref_shape):
    raise ValueError(f"basis_logits must have shape [K, *ref_logits.shape] = [K, {', '.join(map(str, ref_shape))}], "
                     f"got {tuple(basis_shape)}.")
  return basis_shape[0]


def soup_logits(ref_logits: jax.Array, basis_logits: jax.Array, lam: jax.Array) -> jax.Array:
  """Explicit soup of one mixing vector.

  Vmap over users with `jax.vmap(soup_logits, in_axes=(0, 1, 0))` for `ref_logits: [U, ..., V]`,
  `basis_logits: [K, U, ..., V]`, `lam: [U, K]` (or use `soup_logits_batched`).

  Args:
    ref_logits: `[..., V]` reference-policy logits (normalized or not), any float dtype.
    basis_logits: `[K, ..., V]` logits of the K basis policies.
    lam: `[K]` mixing weights (may be negative or sum to more than 1).

  Returns:
    `[..., V]` float32 normalized log-probs of the soup.
  """
  num_bases = _check_logit_shapes(ref_logits, basis_logits)
  check_lam(lam, num_bases, allow_batch=False)
  return reductions.log_softmax(mix_logprobs(_log_normalize(ref_logits), _log_normalize(basis_logits), lam))


def soup_logits_batched(ref_logits: jax.Array, basis_logits: jax.Array, lam: jax.Array) -> jax.Array:
  """Explicit soup with one mixing vector per batch row (rows are users).

  Args:
    ref_logits: `[B, ..., V]` reference logits.
    basis_logits: `[K, B, ..., V]` basis logits.
    lam: `[B, K]` per-row mixing weights (a single `[K]` is broadcast to every row).

  Returns:
    `[B, ..., V]` float32 normalized log-probs; row b equals `soup_logits(ref_logits[b], basis_logits[:, b], lam[b])`.
  """
  num_bases = _check_logit_shapes(ref_logits, basis_logits)
  if np.ndim(ref_logits) < 2:
    raise ValueError(f"ref_logits must have shape [B, ..., V], got {np.shape(ref_logits)}.")
  batch = np.shape(ref_logits)[0]
  lam = lam_per_row(lam, num_bases, batch)
  return reductions.log_softmax(mix_logprobs(_log_normalize(ref_logits), _log_normalize(basis_logits), lam))


def mod_combine(logps: jax.Array, weights: jax.Array, divergence: str = "reverse_kl",
                alpha: Optional[float] = None) -> jax.Array:
  """MOD-style combination of N policies' next-token distributions (Shi et al., 2024), for the baselines.

  With w = weights and p_n = exp(logps[n]):
    * "reverse_kl": sum_n w_n log p_n (weighted geometric mean). With N = K + 1 policies [ref, basis_1..K] and
      weights [1 - sum(lam), lam] this is exactly `soup_logits`. Weights may be negative.
    * "forward_kl": -logsumexp_n(log w_n - log p_n) (weighted harmonic mean). Weights must be >= 0, one at least
      > 0; zero-weight policies are dropped.
    * "alpha": -(1/alpha) * logsumexp_n(log w_n - alpha * log p_n) (weighted power mean with exponent -alpha).
      alpha = 1 is "forward_kl"; alpha -> 0 tends to "reverse_kl" (with weights normalized to sum 1). Weights
      must be >= 0. Note: the MOD reference code omits the 1/alpha factor; that is equivalent for greedy decoding
      (a monotone transform) but samples a tempered distribution, and would not return p for N identical inputs.
  The combined scores are renormalized over the vocabulary (log-softmax), i.e. used as a token-level rule.

  Args:
    logps: `[N, ..., V]` normalized log-probs (they are re-normalized in float32 to be safe).
    weights: `[N]` policy weights (a runtime array; vmap for per-user weights).
    divergence: one of DIVERGENCES.
    alpha: required for "alpha"; a non-zero Python float.

  Returns:
    `[..., V]` float32 normalized log-probs.
  """
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}.")
  if np.ndim(logps) < 2:
    raise ValueError(f"logps must have shape [N, ..., V], got {np.shape(logps)}.")
  num_policies = np.shape(logps)[0]
  check_lam(weights, num_policies, name="weights", allow_batch=False)
  weights = jnp.asarray(weights, jnp.float32)
  logps = _log_normalize(logps)
  if divergence == "reverse_kl":
    return reductions.log_softmax(weighted_logp_sum(logps, weights))

  if divergence == "forward_kl":
    alpha = 1.0
  elif alpha is None or float(alpha) == 0.0 or not np.isfinite(float(alpha)):
    raise ValueError(f"divergence='alpha' needs a finite, non-zero alpha (alpha -> 0 is 'reverse_kl'), got {alpha}.")
  if not isinstance(weights, jax.core.Tracer) and (np.any(np.asarray(weights) < 0) or
                                                   not np.any(np.asarray(weights) > 0)):
    raise ValueError(f"divergence={divergence!r} needs non-negative weights, at least one positive, got "
                     f"{np.asarray(weights)}.")
  alpha = float(alpha)
  w = weights.reshape(weights.shape + (1,) * (logps.ndim - 1))
  # Zero-weight policies contribute exp(-inf) = 0; masking first avoids -inf + inf = NaN on -inf log-probs.
  terms = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)) - alpha * logps, -jnp.inf)
  return reductions.log_softmax(-jax.nn.logsumexp(terms, axis=0) / alpha)
