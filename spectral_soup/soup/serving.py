"""Serving U users at once: souped decoding and sequence log-probabilities on a `SpectralPolicy`.

Every row of a batch is one user with its own prompt and its own `lam: [K]`; `lam: [U, K]` is a runtime array,
so changing users or their weights never recompiles. `generate` is a front end over the decoding engine
(`soup/engine.py`: one row per user, all in one mode). Modes (`MODES`):

* `explicit`: log-softmax every policy, mix with `lam`, renormalize. For head bases the K + 1 normalizers
  cancel, so this is one log-softmax of logits_ref + sum_k lam_k Delta_k (the backbone once per token, no
  [K, U, V] array); LoRA bases run the reference and the K adapters as one (K+1)*U-row batch with a stacked
  cache and mix their log-probs (`explicit.soup_logits_batched`).
* `params`: per-user merged parameters. Heads: `theta_ref + sum_k lam_k Delta theta_k` in the exact
  concatenated low-rank form (one log-softmax instead of K+1). LoRA: per-user concatenated adapters
  (`Delta W = sum_k lam_k A_k B_k`, rank K*r), so the backbone runs once per user row.
* `implicit`: rejection sampling from the reference (docs/METHOD.md section 4) with a bounded number of proposals per
  token and a fallback to the explicit soup; acceptance statistics are returned.
* `naive`: the multi-objective-decoding (MOD) reference: K+1 separate full model passes per token, each with its
  own KV cache. The correctness reference and the speed baseline.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.models import sequences
from spectral_soup.models.spectral import SpectralPolicy
from spectral_soup.soup import decoding
from spectral_soup.soup import engine
from spectral_soup.soup import implicit
from spectral_soup.soup import validation
from spectral_soup.soup.explicit import soup_logits_batched
from spectral_soup.soup.validation import check_int
from spectral_soup.soup.validation import check_key
from spectral_soup.soup.validation import check_length
from spectral_soup.soup.validation import check_mask
from spectral_soup.soup.validation import check_token_id
from spectral_soup.soup.validation import check_token_ids
from spectral_soup.soup.validation import lam_per_row

Array = jax.Array
MODES = ("explicit", "params", "implicit", "naive")


def check_prompts(prompt: Any, prompt_mask: Any, vocab_size: Optional[int] = None) -> None:
  """Host-side checks on concrete prompts; raises ValueError naming the row (and the token, with vocab_size)."""
  prompt, prompt_mask = np.asarray(prompt), np.asarray(prompt_mask)
  if prompt.ndim != 2 or prompt_mask.shape != prompt.shape:
    raise ValueError(f"prompt must be int[U, T] with a mask of the same shape; got {prompt.shape} and "
                     f"{prompt_mask.shape}.")
  if not prompt.shape[0] or not prompt.shape[1]:  # Zero rows compiled seven programs to return nothing.
    raise ValueError(f"prompt has shape {prompt.shape}: expected at least one row (user) and one token column.")
  check_mask("prompt_mask", prompt_mask)
  empty = np.flatnonzero(~prompt_mask.astype(bool).any(axis=1))
  if empty.size:
    raise ValueError(f"prompt row {int(empty[0])} is empty (its mask has no True entry); every user needs a prompt.")
  if vocab_size is not None:
    check_token_ids("prompt", prompt, prompt_mask, vocab_size)


def generate(policy: SpectralPolicy, policy_params: Any, lam: Any, prompt: Any, prompt_mask: Any, *,
             mode: str = "explicit", max_new_tokens: int = 32,
             sampling: decoding.SamplingConfig = decoding.SamplingConfig(), key: Optional[Array] = None,
             eos_id: Optional[int] = None, pad_id: int = 0, max_proposals: int = 32) -> Tuple[Array, dict]:
  """Decodes U users' souped responses in one compiled loop.

  Args:
    policy, policy_params: a SpectralPolicy and its parameters.
    lam: [U, K] (or [K], shared by every row) mixing weights.
    prompt: int32[U, T]; prompt_mask: bool[U, T] (left or right padding).
    mode: one of MODES.
    max_new_tokens, sampling, key, eos_id, pad_id: see `decoding.decode` (checked here: sampling a
      `SamplingConfig`, key one PRNG key, eos_id None or a token id, pad_id a token id).
    max_proposals: proposals per token in `implicit` mode before falling back to the explicit soup.

  Returns:
    tokens: int32[U, N] and aux (`lengths`, `done`, `logprobs` under the soup, and for `implicit` the per-row
    `acceptance_rate` and `fallback_rate`).
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: expected one of {MODES}.")
  check_prompts(prompt, prompt_mask, policy.config.vocab_size)
  if not isinstance(sampling, decoding.SamplingConfig):
    raise ValueError(f"sampling must be a decoding.SamplingConfig (e.g. SamplingConfig(temperature=1.0)), got "
                     f"{type(sampling).__name__} {sampling!r}"[:200] + ".")
  if key is not None:
    check_key(key)
  eos_id = check_token_id("eos_id", eos_id, policy.config.vocab_size, allow_none=True)
  pad_id = check_token_id("pad_id", pad_id, policy.config.vocab_size)
  users, length = np.shape(prompt)
  lam = lam_per_row(lam, policy.num_bases, users)
  max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
  max_proposals = check_int("max_proposals", max_proposals, 1 if mode == "implicit" else 0)
  if mode == "implicit":
    implicit.check_sampling(sampling)
  check_length(length + max_new_tokens, policy.config.max_len,
               f"prompt length {length} + max_new_tokens={max_new_tokens}")
  passes = engine.passes_for(policy, mode)
  row_mode = "explicit" if mode == "naive" else mode
  prompts = engine.prefill(policy, policy_params, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_mask, jnp.bool_),
                           lam if passes == "merged" else None, max_len=length + max_new_tokens, passes=passes)
  rows = engine.make_rows([row_mode] * users, lam)  # One row per user, each its own prompt and sampling stream.
  key = jax.random.key(0) if key is None else key
  tokens, aux = engine.decode_rows(policy, policy_params, prompts, rows, key, max_new_tokens=max_new_tokens,
                                   sampling=sampling, eos_id=eos_id, pad_id=pad_id,
                                   max_proposals=max_proposals if mode == "implicit" else 0, passes=passes,
                                   modes=(row_mode,), stats=False)
  if mode == "implicit":
    steps = jnp.maximum(aux["lengths"], 1).astype(jnp.float32)
    aux["acceptance_rate"] = aux["stats"]["accepted"] / jnp.maximum(aux["stats"]["proposals"], 1.0)
    aux["fallback_rate"] = 1.0 - aux["stats"]["accepted"] / steps
  return tokens, aux


# ----------------------------------------------------------------------------------------------------------------
# Sequence log-probabilities (the online phase's features).


def sequence_logprobs(policy: SpectralPolicy, policy_params: Any, prompt: Array, prompt_mask: Array, response: Array,
                      response_mask: Array, lam: Optional[Array] = None) -> dict:
  """Log-probabilities of given responses under the reference, every basis and (with `lam`) the soup.

  One forward pass over [prompt; response]. prompt: int32[B, P], response: int32[B, R] (any padding, bool masks),
  lam: [B, K] (or [K]) or None. Concrete inputs are checked first (lam finite, token ids in the vocabulary,
  P + R <= max_len); inside a jitted caller only the shapes are.
  Returns {"ref": f32[B], "basis": f32[K, B], "ref_tokens": f32[B, R], "basis_tokens": f32[K, B, R]} and, with lam,
  "soup": f32[B], "soup_tokens": f32[B, R] (explicit soup). Per-token arrays are zero on padding.
  """
  vocab = policy.config.vocab_size
  check_token_ids("prompt", prompt, prompt_mask, vocab)
  check_token_ids("response", response, response_mask, vocab)
  if not any(isinstance(x, jax.core.Tracer) for x in (prompt, prompt_mask)):
    check_prompts(prompt, prompt_mask)  # An empty prompt row would score a response to nothing.
  if np.shape(response)[0] != np.shape(prompt)[0]:
    raise ValueError(f"response has {np.shape(response)[0]} rows for {np.shape(prompt)[0]} prompt rows: expected one "
                     "response per prompt row.")
  check_length(
      np.shape(prompt)[1] + np.shape(response)[1], policy.config.max_len,
      f"prompt length {np.shape(prompt)[1]} + response length {np.shape(response)[1]}",
      "shorten the prompts or the responses")
  if lam is not None:
    lam = lam_per_row(lam, policy.num_bases, np.shape(prompt)[0])
  return _sequence_logprobs(policy, policy_params, prompt, prompt_mask, response, response_mask, lam)


@functools.partial(jax.jit, static_argnames=("policy",))
def _sequence_logprobs(policy: SpectralPolicy, policy_params: Any, prompt: Array, prompt_mask: Array, response: Array,
                       response_mask: Array, lam: Optional[Array] = None) -> dict:
  tokens, mask, prev = sequences.join_prompt_response(prompt, prompt_mask, response, response_mask)
  ref, basis, _ = policy.apply({"params": policy_params}, tokens, mask=mask)
  gather = lambda logits: sequences.gather_positions(logits, prev).astype(jnp.float32)  # [B, R, V]
  ref, basis = gather(ref), jax.vmap(gather)(basis)
  score = lambda logits: sequences.token_logprobs(logits, response, response_mask)
  out = {"ref_tokens": score(ref), "basis_tokens": jax.vmap(score)(basis)}
  if lam is not None:
    out["soup_tokens"] = score(soup_logits_batched(ref, basis, lam))
  for name in list(out):
    out[name[:-len("_tokens")]] = out[name].sum(-1)
  return out


def implicit_rewards(seq_logprobs: Mapping[str, Array], beta: float) -> Array:
  """f_k(x, y) = beta * (log pi_k(y|x) - log pi_ref(y|x)): [K, B] -> [B, K] features for the online phase.

  beta: the bases' KL strength, a finite number > 0 (checked when concrete: a negative one flips every feature).
  """
  if not isinstance(beta, jax.core.Tracer) and not (validation.is_real(beta) and 0 < beta < np.inf):
    raise ValueError(f"beta={beta!r}: expected a finite number > 0 (the bases' KL strength).")
  missing = [key for key in ("ref", "basis") if key not in seq_logprobs]
  if missing:  # A bare KeyError before.
    raise ValueError(f"seq_logprobs has no {missing[0]!r} (keys {sorted(seq_logprobs)}): expected "
                     "`sequence_logprobs`' output, with 'ref' [B] and 'basis' [K, B].")
  return (beta * (seq_logprobs["basis"] - seq_logprobs["ref"][None])).T
