"""Implicit souping: sample the explicit soup by rejection sampling from the reference (docs/METHOD.md section 4).

Target (at temperature T): pi_soup(a) proportional to exp(s(a) / T) with
s = (1 - sum_k lam_k) log pi_ref + sum_k lam_k log pi_k. Proposal: pi_ref at the same temperature,
q(a) proportional to exp(log pi_ref(a) / T). Their log-ratio is, up to a constant,

  g(a) = sum_k lam_k (log pi_k(a) - log pi_ref(a)) / T,

and a proposal a ~ q is accepted with probability exp(g(a) - M), M = max_a g(a) (so it is <= 1). An accepted token
is distributed exactly as pi_soup. All `max_proposals` proposals of a row are drawn at once and the first accepted
one is kept; a row with no accepted proposal falls back to sampling pi_soup directly, so the returned tokens are
pi_soup-distributed whatever `max_proposals` is (the fallback only changes the cost accounting), exactly up to the
float32 uniforms' resolution: each test passes with its acceptance probability rounded to the nearest multiple of
2^-23 (the uniforms are multiples of 2^-23 and are tested at their cells' midpoints, u + 2^-24, never 0; tested at
u itself, every probability rounded up, and a token of acceptance probability 1e-20 passed 2^-23 of the time).

Restriction: rejection from pi_ref can only produce tokens in pi_ref's support. Tokens with pi_ref = 0 (-inf
logits) are excluded from g and M; if the soup puts mass there (possible only when the reference coefficient
1 - sum(lam) is 0), the accepted samples follow the soup restricted to pi_ref's support, whereas the fallback does not.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.soup import decoding
from spectral_soup.soup.explicit import _log_normalize
from spectral_soup.soup.explicit import mix_logprobs
from spectral_soup.soup.explicit import weighted_logp_sum

# Half the spacing of jax.random.uniform's float32 values (multiples of 2^-23).
_HALF_CELL = 2.0**-24
from spectral_soup.soup.validation import lam_per_row
from spectral_soup.utils import reductions


def check_sampling(sampling: decoding.SamplingConfig) -> None:
  """Raises ValueError unless `sampling` is plain sampling at a temperature > 0: rejection sampling draws exact
  samples of the soup at that temperature; it has no greedy form, and top-k / top-p truncate a distribution it never
  computes (use the explicit mode, the same distribution, for those)."""
  if sampling.temperature == 0 or sampling.top_k or sampling.top_p < 1.0:
    raise ValueError(f"mode='implicit' draws exact samples of the soup by rejection sampling: it needs temperature > 0 "
                     f"and no top_k / top_p, got temperature={sampling.temperature!r}, top_k={sampling.top_k!r}, "
                     f"top_p={sampling.top_p!r}. Use mode='explicit' (the same distribution) for greedy or "
                     "truncated decoding.")


def rejection_sample(key: jax.Array, ref_logits: jax.Array, basis_logits: jax.Array, lam: jax.Array, *,
                     max_proposals: int = 64, temperature: float = 1.0,
                     uniforms: Any = None) -> tuple[jax.Array, dict[str, Any]]:
  """Draws one token per row from the explicit soup by rejection sampling from pi_ref.

  jit it with `static_argnames=("max_proposals",)`; `lam` and `temperature` may be traced.

  Args:
    key: PRNG key (unused when `uniforms` is given).
    ref_logits: `[B, V]` reference logits (any float dtype; computed in float32).
    basis_logits: `[K, B, V]` basis logits.
    lam: `[B, K]` per-row mixing weights, or `[K]` shared by all rows.
    max_proposals: P, proposals drawn per row (static).
    temperature: T > 0, applied to both target and proposal.
    uniforms: `[B, 2 P + 1]` uniform draws in [0, 1) to use instead of drawing them from `key` (each row's own
      stream: the decoding engine draws them from each row's seed, so that a row's samples do not depend on which
      rows share its batch).

  Returns:
    tokens: `int32[B]`, distributed as softmax(soup / T) per row.
    aux: dict with
      accepted: `bool[B]`, False where no proposal was accepted and the row fell back to the explicit soup.
      num_proposals: `int32[B]`, proposals a sequential sampler would have used (index of the first accepted
        proposal + 1, or P on fallback).
      acceptance_rate: `float32[B]`, exact per-proposal acceptance probability E_q[exp(g - M)] in [0, 1]
        (expected proposals per token = 1 / acceptance_rate).
      empirical_acceptance_rate: `float32[B]`, fraction of the P drawn proposals that passed the test.
  """
  if isinstance(max_proposals, bool) or not isinstance(max_proposals, (int, np.integer)) or max_proposals < 1:
    raise ValueError(f"max_proposals must be a positive Python int, got {max_proposals!r}.")
  if not isinstance(temperature,
                    jax.core.Tracer) and not np.all(np.isfinite(temperature) & (np.asarray(temperature) > 0)):
    raise ValueError(f"temperature must be finite and > 0, got {temperature}.")
  ref_shape, basis_shape = np.shape(ref_logits), np.shape(basis_logits)
  if len(ref_shape) != 2 or len(basis_shape) != 3 or tuple(basis_shape[1:]) != tuple(ref_shape):
    raise ValueError(f"Expected ref_logits [B, V] and basis_logits [K, B, V], got {tuple(ref_shape)} and "
                     f"{tuple(basis_shape)}.")
  num_bases, batch = basis_shape[0], ref_shape[0]
  lam = lam_per_row(lam, num_bases, batch)
  # x / T with each row's maximum shifted to exactly 0 first (`decoding.temper`: at small T, x / T - max can be
  # fused into a multiply-add that misses the maximum by far more than exp tolerates). At T = 1 the same bits.
  tempered = lambda x: decoding.temper(x, jnp.asarray(temperature, jnp.float32))

  ref_logp = _log_normalize(ref_logits)  # [B, V]
  basis_logp = _log_normalize(basis_logits)  # [K, B, V]
  # Log-ratio target / proposal up to a per-row constant, restricted to the proposal's support.
  ref_support = ~jnp.isneginf(ref_logp)
  diffs = basis_logp - jnp.where(ref_support, ref_logp, 0.0)[None]  # [K, B, V]
  g = jnp.where(ref_support, weighted_logp_sum(diffs, lam.T), -jnp.inf)  # [B, V], times T.
  # [B, V], <= 0, 0 at the argmax. A row whose g is -inf everywhere (the soup and a masked reference share no
  # token) has no maximum: -inf, not -inf - -inf = NaN (its acceptance rate read NaN; every proposal fails).
  log_accept = jnp.where(jnp.isneginf(g), -jnp.inf, tempered(g))
  proposal_logp = reductions.log_softmax(tempered(ref_logp))  # [B, V]

  soup_logp = reductions.log_softmax(tempered(mix_logprobs(ref_logp, basis_logp, lam)))

  # One uniform draw per row: P proposals, P acceptance tests and one fallback draw. Sampling by inverse CDF costs
  # O(P log V) per row instead of the O(P V) Gumbel noise of jax.random.categorical (V can be 256k).
  if uniforms is None:
    uniforms = jax.random.uniform(key, (batch, 2 * max_proposals + 1), jnp.float32)
  elif tuple(np.shape(uniforms)) != (batch, 2 * max_proposals + 1):
    raise ValueError(f"uniforms must be [B={batch}, 2 * max_proposals + 1 = {2 * max_proposals + 1}], got "
                     f"{tuple(np.shape(uniforms))}.")
  proposals = decoding.inverse_cdf_sample(proposal_logp, uniforms[:, :max_proposals])  # [B, P]
  proposal_log_accept = jnp.take_along_axis(log_accept, proposals, axis=-1)  # [B, P]
  # u < exp(log_accept) <=> log(u) < log_accept, at the midpoint of u's float32 cell (module docstring): never
  # log(0) = -inf, which passed any finite threshold.
  tests = jnp.asarray(uniforms[:, max_proposals:2 * max_proposals], jnp.float32) + _HALF_CELL
  passed = jnp.log(tests) < proposal_log_accept  # [B, P]
  accepted = jnp.any(passed, axis=-1)  # [B]
  first = jnp.argmax(passed, axis=-1)  # [B], index of the first True (0 when none).
  accepted_token = jnp.take_along_axis(proposals, first[:, None], axis=-1)[:, 0]
  fallback_token = decoding.inverse_cdf_sample(soup_logp, uniforms[:, -1:])[:, 0]  # [B]

  tokens = jnp.where(accepted, accepted_token, fallback_token).astype(jnp.int32)
  aux = {
      "accepted": accepted,
      "num_proposals": jnp.where(accepted, first + 1, max_proposals).astype(jnp.int32),
      "acceptance_rate": jnp.clip(jnp.sum(jnp.exp(proposal_logp + log_accept), axis=-1), 0.0, 1.0),
      "empirical_acceptance_rate": jnp.mean(passed.astype(jnp.float32), axis=-1),
  }
  return tokens, aux
