"""Batched autoregressive decoding with a KV cache, in one compiled loop.

The loop is model-agnostic: it calls a `logits_fn(params, tokens, mask, cache) -> (logprobs, cache)` callback
(the `tokens_ids_to_logits` seam of flax's lm1b example), which is where a soup mixes its bases. Everything that
changes between users or requests (params, the users' lam inside them, prompts, PRNG keys) is a runtime array;
only shapes and the sampling *kind* are static, so a new set of users never recompiles.

Prompts are left-padded inside the loop (right-padded input is accepted and moved), so every row's last prompt
token sits in the last column and all rows write the same cache slot at each step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.models.sequences import left_pad  # Re-exported: prompts are left-padded inside the loop.
from spectral_soup.models.transformer import cache_slots
from spectral_soup.models.transformer import output_logits
from spectral_soup.soup import validation
from spectral_soup.utils import reductions

Array = jax.Array
# logits_fn(params, tokens: int32[B, T], mask: bool[B, T], cache) -> (out, cache), where `out` is the normalized
# log-probs f32[B, T, V], or a dict holding them under "logprobs" beside whatever a custom sampler needs
# (every leaf with the [..., T, V] trailing axes). `decode` reads only the last position of a prompt's `out`, so for
# T > 1 a callback may return that position alone ([..., 1, V]).
LogitsFn = Callable[[Any, Array, Array, Any], Tuple[Any, Any]]
# sample_fn(key, last, params, sampling) -> (tokens int32[B], token_logprobs f32[B], stats {name: f32[B]}), where
# `last` is `out` at the last position ([..., V] leaves).
SampleFn = Callable[[Array, Any, Any, "SamplingConfig"], Tuple[Array, Array, dict]]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick the next token. temperature == 0 means greedy."""
  temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature).
  top_k: int = 0  # Keep only the k most likely tokens (0: off).
  top_p: float = 1.0  # Nucleus sampling: the smallest set with probability >= top_p (1.0: off).

  def __post_init__(self):
    if not (validation.is_real(self.temperature) and 0 <= self.temperature < np.inf):  # NaN fails every comparison.
      raise ValueError(f"SamplingConfig.temperature={self.temperature!r}: expected a finite number >= 0.")
    if 0 < self.temperature < np.finfo(np.float32).tiny:  # Logits are divided by it in float32, where it is 0.
      raise ValueError(f"SamplingConfig.temperature={self.temperature!r}: expected 0 (greedy) or a number >= "
                       f"{np.finfo(np.float32).tiny:.3g} (float32's smallest normal number).")
    validation.check_int("SamplingConfig.top_k", self.top_k, 0)
    if not (validation.is_real(self.top_p) and 0.0 < self.top_p <= 1.0):
      raise ValueError(f"SamplingConfig.top_p={self.top_p!r}: expected a number in (0, 1].")


def temper(logits: Array, temperature: Any) -> Array:
  """f32 `logits / temperature`, shifted so that each row's maximum is exactly 0 (the same distribution).

  Shifting before dividing keeps the division out of the maximum's subtraction: written as `logits / T - max`, a
  compiled step may fuse the two into one multiply-add whose unrounded product differs from the rounded maximum by
  up to an ulp of |logits / T| (about 1e3 at T = 1e-10), and exp of that residual makes the distribution garbage
  (the last vocabulary id was drawn instead of the most likely token).
  """
  logits = logits.astype(jnp.float32)
  return (logits - reductions.max_last(logits, keepdims=True)) / temperature


def filter_logits(logits: Array, sampling: SamplingConfig) -> Array:
  """Applies temperature, top-k and top-p to logits [B, V]; removed tokens get -inf. The result is shifted so
  that each row's maximum is 0 (`temper`)."""
  logits = temper(logits, sampling.temperature)
  if sampling.top_k:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]  # k >= V keeps every token.
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    logits = jnp.where(logits >= nucleus_threshold(logits, sampling.top_p), logits, -jnp.inf)
  return logits


def nucleus_threshold(logits: Array, top_p: float, iterations: int = 40) -> Array:
  """f32[B, 1]: the logit of the last token of each row's nucleus, by bisection instead of a vocabulary sort.

  The nucleus is the smallest set of most likely tokens whose probability reaches `top_p` (ties at its edge are
  kept); its last token's logit t* is the largest t with P(logit >= t) >= top_p. Bisection keeps `lo` on the
  feasible side of t*: each step costs one masked sum over the vocabulary, where a sort of [B, V] costs ~20x that
  on CPU (49,152 tokens). 40 halvings of the row's logit range reach float32 resolution, so `logits >= t` selects
  exactly the sorted-prefix nucleus (up to float rounding of the cumulative sums).
  """
  finite = jnp.isfinite(logits)
  probs = jax.nn.softmax(logits, axis=-1)
  hi = reductions.max_last(logits, keepdims=True) + 1.0  # P(logit >= hi) = 0 < top_p.
  lo = reductions.min_last(jnp.where(finite, logits, jnp.inf), keepdims=True)  # P(logit >= lo) = 1 >= top_p.

  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    feasible = jnp.sum(jnp.where(logits >= mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
    return jnp.where(feasible, mid, lo), jnp.where(feasible, hi, mid)

  lo, _ = jax.lax.fori_loop(0, iterations, halve, (lo, hi))
  return lo


def sample_tokens(key: Array, logprobs: Array, sampling: SamplingConfig) -> Array:
  """logprobs: [B, V] -> int32[B] (one uniform per row; see `sample_with_uniforms`)."""
  if sampling.temperature == 0.0:
    return reductions.argmax_last(logprobs)
  return sample_with_uniforms(logprobs, jax.random.uniform(key, logprobs.shape[:-1]), sampling)


def sample_with_uniforms(logprobs: Array, uniforms: Array, sampling: SamplingConfig) -> Array:
  """Greedy / temperature / top-k / top-p draw of one token per row from one uniform per row.

  logprobs: [B, V]; uniforms: f32[B] in [0, 1) -> int32[B]. Sampling by inverse CDF needs one random number per
  row, where the Gumbel trick of `jax.random.categorical` draws V (49,152 for SmolLM2), which on CPU costs more than
  the rest of the sampling step. Rows given the same uniform are coupled monotonically (common random numbers: two close
  distributions give the same token unless their CDFs separate at that uniform). At temperature 1 without top-k or
  top-p the log-probs are used as they are (the inverse CDF normalizes): no second log-softmax.
  """
  if sampling.temperature == 0.0:
    return reductions.argmax_last(logprobs)
  if sampling.temperature == 1.0 and not sampling.top_k and sampling.top_p == 1.0:
    logp = logprobs
  else:
    logp = reductions.log_softmax(filter_logits(logprobs, sampling))
  return inverse_cdf_sample(logp, uniforms[:, None])[:, 0]


# Tokens per block of the two-level inverse CDF (`inverse_cdf_sample`).
CDF_BLOCK = 256


def inverse_cdf_sample(logp: Array, uniforms: Array) -> Array:
  """Inverse-CDF sampling: `logp: [B, V]` log-weights (normalized or not), `uniforms: [B, N]` in [0, 1) ->
  `int32[B, N]` tokens.

  Token a is returned iff cdf[a-1] <= u * cdf[-1] < cdf[a]. The CDF is taken in two levels, which reads the
  vocabulary once instead of running a cumulative sum along it (5x faster on CPU at [128, 49,152]): the sums of
  blocks of `CDF_BLOCK` tokens and their cumulative sum pick the block, the chosen block's own cumulative sum picks
  the token. Targets are kept inside [0, total) of each level even where float32 rounding of the two levels'
  sums disagrees, so a zero-probability token is never returned.
  """
  b, v = logp.shape
  block = min(CDF_BLOCK, v)
  num_blocks = -(-v // block)
  logp = logp.astype(jnp.float32)
  p = jnp.exp(logp - reductions.max_last(logp, keepdims=True))
  p = jnp.pad(p, ((0, 0), (0, num_blocks * block - v))).reshape(b, num_blocks, block)
  block_cdf = jnp.cumsum(jnp.sum(p, axis=-1), axis=-1)  # [B, blocks]
  below = lambda x: jnp.nextafter(x, jnp.zeros_like(x))
  total = block_cdf[:, -1:]
  targets = jnp.minimum(uniforms * total, below(total))  # [B, N]
  search = jax.vmap(functools.partial(jnp.searchsorted, side="right"))
  chosen = jnp.minimum(search(block_cdf, targets), num_blocks - 1)  # [B, N]: its block sum is > 0.
  before = jnp.where(chosen > 0, jnp.take_along_axis(block_cdf, jnp.maximum(chosen - 1, 0), axis=-1), 0.0)
  local_cdf = jnp.cumsum(jnp.take_along_axis(p, chosen[..., None], axis=1), axis=-1)  # [B, N, block]
  local = jnp.clip(targets - before, 0.0, below(local_cdf[..., -1]))
  within = jax.vmap(search)(local_cdf, local)
  return jnp.minimum(chosen * block + within, v - 1).astype(jnp.int32)


def pad_prompts(encoded, batch_size: int, length: int, pad_id: int = 0):
  """Token-id lists -> left-padded numpy (tokens int32[batch_size, length], mask bool[batch_size, length]).

  Rows past len(encoded) are fillers holding one pad token (so no row is empty); drop their outputs.
  """
  if len(encoded) > batch_size:
    raise ValueError(f"{len(encoded)} prompts do not fit a batch of {batch_size}.")
  tokens = np.full((batch_size, length), pad_id, np.int32)
  mask = np.zeros((batch_size, length), bool)
  for i, ids in enumerate(encoded):
    if not 0 < len(ids) <= length:
      raise ValueError(f"prompt {i} has {len(ids)} tokens: expected 1 to {length}.")
    tokens[i, length - len(ids):] = ids
    mask[i, length - len(ids):] = True
  mask[len(encoded):, -1] = True
  return tokens, mask


def standard_sample_fn(key: Array, last: Any, params: Any, sampling: SamplingConfig):
  """The default sampler: greedy / temperature / top-k / top-p on `last` log-probs."""
  del params
  logprobs = last["logprobs"] if isinstance(last, dict) else last
  token = sample_tokens(key, logprobs, sampling)
  return token, jnp.take_along_axis(logprobs.astype(jnp.float32), token[:, None], axis=-1)[:, 0], {}


@functools.partial(jax.jit,
                   static_argnames=("logits_fn", "max_new_tokens", "sampling", "eos_id", "pad_id", "sample_fn"))
def decode(logits_fn: LogitsFn, params: Any, prompt: Array, prompt_mask: Array, cache: Any, key: Array, *,
           max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(), eos_id: Optional[int] = None,
           pad_id: int = 0, sample_fn: Optional[SampleFn] = None) -> Tuple[Array, dict]:
  """Decodes `max_new_tokens` tokens for B rows at once.

  Args:
    logits_fn: the model callback (static: pass the same function object to reuse the compiled loop).
    params: anything `logits_fn` needs at run time (model params, users' lam, ...).
    prompt: int32[B, T] prompts (left or right padded); prompt_mask: bool[B, T].
    cache: an empty cache with room for T + max_new_tokens slots (model-specific layout).
    key: PRNG key (unused when greedy).
    max_new_tokens: N.
    sampling: greedy / temperature / top-k / top-p.
    eos_id: a row stops after emitting it (it is kept in the output); None: never stop early.
    pad_id: emitted after a row stops.
    sample_fn: a custom sampler (static), e.g. implicit souping's rejection sampler; default `standard_sample_fn`.

  Returns:
    tokens: int32[B, N] new tokens (pad_id after a row's EOS), and aux with `lengths: int32[B]` (tokens up to and
    including EOS), `done: bool[B]`, `logprobs: f32[B, N]` (log-prob of each emitted token under logits_fn) and
    `stats` (the sampler's per-row statistics summed over the emitted tokens).
  """
  if np.shape(prompt_mask) != np.shape(prompt) or np.ndim(prompt) != 2:
    raise ValueError(f"prompt must be int32[B, T] and prompt_mask bool[B, T] of the same shape, got "
                     f"{np.shape(prompt)} and {np.shape(prompt_mask)}.")
  for slots, _ in cache_slots(cache):  # An empty cache: the prompt and every new token need a slot.
    if np.shape(prompt)[1] + max_new_tokens > slots:
      raise ValueError(
          f"the cache has {slots} slots, fewer than the prompt's {np.shape(prompt)[1]} + "
          f"max_new_tokens={max_new_tokens}: make it with max_len >= {np.shape(prompt)[1] + max_new_tokens} "
          f"(a full cache overwrote its last slot at every step: wrong tokens, no error).")
  prompt, prompt_mask = left_pad(prompt, prompt_mask, pad_id)
  out_, cache = logits_fn(params, prompt, prompt_mask, cache)
  last = jax.tree.map(lambda x: x[..., -1, :], out_)
  return decode_from(logits_fn, params, last, cache, key, max_new_tokens=max_new_tokens, sampling=sampling,
                     eos_id=eos_id, pad_id=pad_id, sample_fn=sample_fn)


def decode_from(logits_fn: LogitsFn, params: Any, last: Any, cache: Any, key: Array, *, max_new_tokens: int,
                sampling: SamplingConfig = SamplingConfig(), eos_id: Optional[int] = None, pad_id: int = 0,
                sample_fn: Optional[SampleFn] = None) -> Tuple[Array, dict]:
  """The loop of `decode` after the prompt: starts from `logits_fn`'s output at the last prompt position.

  last: `out` of `logits_fn` at the last prompt column ([..., V] leaves, B rows); cache: the prompt's filled
  cache. Lets callers prefill a prompt once and decode many rows from copies of its cache (e.g. one prompt for
  many users and methods). Not jitted itself: call it inside a jitted function. Returns what `decode` returns.
  Sampler statistics may have trailing axes ([B, ...]); they are summed over each row's emitted tokens.
  """
  sample_fn = sample_fn or standard_sample_fn
  batch = jax.tree.leaves(last)[0].shape[-2]
  _, _, stats_shape = jax.eval_shape(lambda k, l: sample_fn(k, l, params, sampling), key, last)
  stats = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), stats_shape)

  def masked(done, s):
    return jnp.where(done.reshape(done.shape + (1,) * (s.ndim - 1)), 0.0, s)

  def body(state):
    step, last, cache, key, out, out_logp, done, stats = state
    key, sub = jax.random.split(key)
    token, token_logp, step_stats = sample_fn(sub, last, params, sampling)
    stats = jax.tree.map(lambda acc, s: acc + masked(done, s), stats, step_stats)
    token = jnp.where(done, pad_id, token)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
    out_logp = jax.lax.dynamic_update_slice(out_logp, jnp.where(done, 0.0, token_logp)[:, None], (0, step))
    active = ~done
    if eos_id is not None:
      done = done | (token == eos_id)
    step_out, cache = logits_fn(params, token[:, None], active[:, None], cache)
    last = jax.tree.map(lambda x: x[..., -1, :], step_out)
    return step + 1, last, cache, key, out, out_logp, done, stats

  def cond(state):
    step, done = state[0], state[6]
    return (step < max_new_tokens) & ~jnp.all(done)

  state = (jnp.zeros((), jnp.int32), last, cache, key, jnp.full(
      (batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch, max_new_tokens),
                                                             jnp.float32), jnp.zeros((batch,), jnp.bool_), stats)
  _, _, _, _, out, out_logp, done, stats = jax.lax.while_loop(cond, body, state)
  if eos_id is None:
    lengths = jnp.full((batch,), max_new_tokens, jnp.int32)
  else:
    is_eos = out == eos_id
    first_eos = jnp.argmax(is_eos, axis=1)
    lengths = jnp.where(jnp.any(is_eos, axis=1), first_eos + 1, max_new_tokens).astype(jnp.int32)
  return out, {"lengths": lengths, "done": done, "logprobs": out_logp, "stats": stats}


@functools.lru_cache(maxsize=None)
def model_logits_fn(model) -> LogitsFn:
  """A LogitsFn for a plain `Transformer`: params are its parameter dict; returns normalized log-probs.

  One function object per model (cached), so `decode`'s compiled loop is reused across calls. For a prompt
  (T > 1) it returns the last position only ([B, 1, V]): the output layer over every prompt position would cost
  B * T * V * D multiply-adds that `decode` never reads.
  """

  def logits_fn(params, tokens, mask, cache):
    if tokens.shape[1] == 1:
      logits, aux = model.apply({"params": params}, tokens, mask=mask, cache=cache)
    else:  # A prompt: `decode` reads the last position only, so skip the output layer everywhere else.
      _, aux = model.apply({"params": params}, tokens, mask=mask, cache=cache, return_logits=False)
      logits = output_logits(model.config, params, aux["hidden"][:, -1:])
    return reductions.log_softmax(logits), aux["cache"]

  return logits_fn
