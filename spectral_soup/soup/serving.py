"""Serving U users at once: souped decoding and sequence log-probabilities on a `SpectralPolicy`.

Every row of a batch is one user with its own prompt and its own `lam: [K]`; `lam: [U, K]` is a runtime array,
so changing users or their weights never recompiles. Modes (`MODES`):

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

from spectral_soup.models.spectral import SpectralPolicy, group_targets, split_lora_params
from spectral_soup.models.transformer import Transformer, init_cache
from spectral_soup.soup import decoding
from spectral_soup.soup.explicit import soup_logits_batched
from spectral_soup.soup.implicit import rejection_sample
from spectral_soup.soup.validation import check_length
from spectral_soup.soup.validation import check_token_ids
from spectral_soup.soup.validation import lam_per_row

Array = jax.Array
MODES = ("explicit", "params", "implicit", "naive")


# ----------------------------------------------------------------------------------------------------------------
# Per-mode step functions: (params = {"policy": ..., "lam": [U, K]}, tokens, mask, cache) -> (out, cache).


def _policy_step(policy: SpectralPolicy, params, tokens, mask, cache):
  ref, basis, aux = policy.apply({"params": params["policy"]}, tokens, mask=mask, cache=cache)
  return ref, basis, aux["cache"]


def _explicit_step(policy, params, tokens, mask, cache):
  if policy.basis_kind == "heads":
    # The K + 1 normalizations of the explicit soup cancel for head bases (log pi_k = logits_ref + Delta_k -
    # log Z_k, and sum lam_k log Z_k is constant over the vocabulary), so the soup is one log-softmax of
    # logits_ref + sum_k lam_k Delta_k: the merged head, without the [K, U, V] basis logits.
    return _merged_heads_step(policy, params, tokens, mask, cache)
  ref, basis, cache = _policy_step(policy, params, tokens, mask, cache)
  return soup_logits_batched(ref, basis, params["lam"]), cache


def _implicit_step(policy, params, tokens, mask, cache):
  ref, basis, cache = _policy_step(policy, params, tokens, mask, cache)
  return {"logprobs": soup_logits_batched(ref, basis, params["lam"]), "ref": ref, "basis": basis}, cache


def _merged_heads_step(policy, params, tokens, mask, cache):
  """log_softmax(logits_ref + sum_k lam_k Delta_k) for head bases, in factored form (nothing per user is built)."""
  p = params["policy"]
  lam = params["lam"].astype(jnp.float32)  # [U, K]
  psi, ref_logits, aux = policy.apply({"params": p}, tokens, mask=mask, cache=cache,
                                      method=lambda m, *a, **kw: m.features(*a, **kw))
  heads = p["heads"]  # a: [K, F, r], b: [K, r, V]; c: [K, V]
  delta = 0.0
  if "a" in heads:
    # Merged head: Delta W_user = sum_k lam_k a_k b_k = A_cat diag(lam (x) 1_r) B_cat.
    h = jnp.einsum("btf,kfr->btkr", psi.astype(jnp.float32), heads["a"].astype(jnp.float32))
    h = h * lam[:, None, :, None]
    delta = delta + jnp.einsum("btkr,krv->btv", h, heads["b"].astype(jnp.float32))
  if "c" in heads:  # Logit biases mix with the same weights: sum_k lam_k c_k.
    delta = delta + jnp.einsum("bk,kv->bv", lam, heads["c"].astype(jnp.float32))[:, None, :]
  return jax.nn.log_softmax(ref_logits + delta, axis=-1), aux["cache"]


def _params_step(policy, params, tokens, mask, cache):
  """Per-user merged parameters, applied in exact factored form (nothing materialized per user)."""
  if policy.basis_kind == "heads":  # Exact merging: the same computation as the explicit soup of head bases.
    return _merged_heads_step(policy, params, tokens, mask, cache)
  p = params["policy"]
  lam = params["lam"].astype(jnp.float32)  # [U, K]
  # LoRA: concatenate the K adapters (rank K*r) and scale the rank dimensions by each row's lam.
  stacked = split_lora_params(p["lora"])
  num_layers = policy.config.num_layers
  row_scale = jnp.broadcast_to(jnp.repeat(lam, policy.lora_rank, axis=-1)[None],
                               (num_layers, *lam.shape[:-1], lam.shape[-1] * policy.lora_rank))
  merged = {}
  for name, adapter in stacked.items():
    k, layers_, n_in, r = adapter["a"].shape
    a_cat = jnp.transpose(adapter["a"], (1, 2, 0, 3)).reshape(layers_, n_in, k * r)  # [L, in, K*r]
    b_cat = adapter["b"].transpose(1, 0, 2, 3).reshape(layers_, k * r, -1)  # [L, K*r, out]
    merged[name] = {"a": a_cat, "b": b_cat, "row_scale": row_scale}
  backbone = Transformer(policy.config)
  logits, aux = backbone.apply({"params": p["features"]["backbone"]}, tokens, mask=mask, cache=cache,
                               lora=group_targets(merged))
  return jax.nn.log_softmax(logits, axis=-1), aux["cache"]


def _naive_step(policy, params, tokens, mask, cache):
  """K+1 full passes, each with its own cache: cache = {"ref": Cache, "bases": [Cache] * K}."""
  p = params["policy"]
  backbone = Transformer(policy.config)
  bb = p["features"]["backbone"]
  ref_logits, aux = backbone.apply({"params": bb}, tokens, mask=mask, cache=cache["ref"])
  new_cache = {"ref": aux["cache"], "bases": []}
  basis_logits = []
  for k in range(policy.num_bases):  # Deliberately K separate models: this is the baseline.
    if policy.basis_kind == "heads":
      logits_k, aux_k = backbone.apply({"params": bb}, tokens, mask=mask, cache=cache["bases"][k])
      psi = aux_k["hidden"].astype(jnp.float32)
      if "a" in p["heads"]:
        a_k, b_k = p["heads"]["a"][k].astype(jnp.float32), p["heads"]["b"][k].astype(jnp.float32)
        logits_k = logits_k + (psi @ a_k) @ b_k
      if "c" in p["heads"]:
        logits_k = logits_k + p["heads"]["c"][k].astype(jnp.float32)
    else:
      lora_k = {name: {"a": ad["a"][k], "b": ad["b"][k]} for name, ad in split_lora_params(p["lora"]).items()}
      logits_k, aux_k = backbone.apply({"params": bb}, tokens, mask=mask, cache=cache["bases"][k],
                                       lora=group_targets(lora_k))
    basis_logits.append(logits_k)
    new_cache["bases"].append(aux_k["cache"])
  return soup_logits_batched(ref_logits, jnp.stack(basis_logits), params["lam"]), new_cache


_STEPS = {"explicit": _explicit_step, "params": _params_step, "implicit": _implicit_step, "naive": _naive_step}


@functools.lru_cache(maxsize=None)
def souped_logits_fn(policy: SpectralPolicy, mode: str) -> decoding.LogitsFn:
  """The decoding callback of `mode` for `policy` (one function object per (policy, mode): jit reuses it)."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: expected one of {MODES}.")
  return functools.partial(_STEPS[mode], policy)


@functools.lru_cache(maxsize=None)
def implicit_sample_fn(max_proposals: int) -> decoding.SampleFn:
  """A decoding sampler that draws each token by rejection sampling from the reference."""
  def sample(key, last, params, sampling):
    del sampling  # Rejection sampling targets the soup itself (temperature 1).
    tokens, aux = rejection_sample(key, last["ref"], last["basis"], params["lam"], max_proposals=max_proposals)
    logp = jnp.take_along_axis(last["logprobs"], tokens[:, None], axis=-1)[:, 0]
    stats = {"accepted": aux["accepted"].astype(jnp.float32), "proposals": aux["num_proposals"].astype(jnp.float32)}
    return tokens, logp, stats
  return sample


def init_serving_cache(policy: SpectralPolicy, mode: str, batch_size: int, max_len: int) -> Any:
  """An empty cache for `mode` (`naive` keeps K+1 separate caches)."""
  if mode == "naive":
    one = lambda: init_cache(policy.config, batch_size, max_len)
    return {"ref": one(), "bases": [one() for _ in range(policy.num_bases)]}
  if mode == "params" or policy.basis_kind == "heads":
    return init_cache(policy.config, batch_size, max_len)
  return init_cache(policy.config, (policy.num_bases + 1) * batch_size, max_len)


def check_prompts(prompt: Any, prompt_mask: Any, vocab_size: Optional[int] = None) -> None:
  """Host-side checks on concrete prompts; raises ValueError naming the row (and the token, with vocab_size)."""
  prompt, prompt_mask = np.asarray(prompt), np.asarray(prompt_mask)
  if prompt.ndim != 2 or prompt_mask.shape != prompt.shape:
    raise ValueError(f"prompt must be int[U, T] with a mask of the same shape; got {prompt.shape} and "
                     f"{prompt_mask.shape}.")
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
    max_new_tokens, sampling, key, eos_id, pad_id: see `decoding.decode`.
    max_proposals: proposals per token in `implicit` mode before falling back to the explicit soup.

  Returns:
    tokens: int32[U, N] and aux (`lengths`, `done`, `logprobs` under the soup, and for `implicit` the per-row
    `acceptance_rate` and `fallback_rate`).
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: expected one of {MODES}.")
  check_prompts(prompt, prompt_mask, policy.config.vocab_size)
  users, length = np.shape(prompt)
  lam = lam_per_row(lam, policy.num_bases, users)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1.")
  check_length(length + max_new_tokens, policy.config.max_len,
               f"prompt length {length} + max_new_tokens={max_new_tokens}")
  prompt = jnp.asarray(prompt, jnp.int32)
  cache = init_serving_cache(policy, mode, users, length + max_new_tokens)
  key = jax.random.key(0) if key is None else key
  sample_fn = implicit_sample_fn(max_proposals) if mode == "implicit" else None
  tokens, aux = decoding.decode(souped_logits_fn(policy, mode), {"policy": policy_params, "lam": lam}, prompt,
                                jnp.asarray(prompt_mask, jnp.bool_), cache, key, max_new_tokens=max_new_tokens,
                                sampling=sampling, eos_id=eos_id, pad_id=pad_id, sample_fn=sample_fn)
  if mode == "implicit":
    steps = jnp.maximum(aux["lengths"], 1).astype(jnp.float32)
    aux["acceptance_rate"] = aux["stats"]["accepted"] / jnp.maximum(aux["stats"]["proposals"], 1.0)
    aux["fallback_rate"] = 1.0 - aux["stats"]["accepted"] / steps
  return tokens, aux


# ----------------------------------------------------------------------------------------------------------------
# Sequence log-probabilities (the online phase's features).


def sequence_logprobs(policy: SpectralPolicy, policy_params: Any, prompt: Array, prompt_mask: Array,
                      response: Array, response_mask: Array, lam: Optional[Array] = None) -> dict:
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
  check_length(np.shape(prompt)[1] + np.shape(response)[1], policy.config.max_len,
               f"prompt length {np.shape(prompt)[1]} + response length {np.shape(response)[1]}")
  if lam is not None:
    lam = lam_per_row(lam, policy.num_bases, np.shape(prompt)[0])
  return _sequence_logprobs(policy, policy_params, prompt, prompt_mask, response, response_mask, lam)


@functools.partial(jax.jit, static_argnames=("policy",))
def _sequence_logprobs(policy: SpectralPolicy, policy_params: Any, prompt: Array, prompt_mask: Array,
                       response: Array, response_mask: Array, lam: Optional[Array] = None) -> dict:
  tokens, mask, prev = join_prompt_response(prompt, prompt_mask, response, response_mask)
  ref, basis, _ = policy.apply({"params": policy_params}, tokens, mask=mask)
  gather = lambda logits: gather_positions(logits, prev).astype(jnp.float32)  # [B, R, V]
  ref, basis = gather(ref), jax.vmap(gather)(basis)
  score = lambda logits: token_logprobs(logits, response, response_mask)
  out = {"ref_tokens": score(ref), "basis_tokens": jax.vmap(score)(basis)}
  if lam is not None:
    out["soup_tokens"] = score(soup_logits_batched(ref, basis, lam))
  for name in list(out):
    out[name[:-len("_tokens")]] = out[name].sum(-1)
  return out


def join_prompt_response(prompt: Array, prompt_mask: Array, response: Array,
                         response_mask: Array) -> Tuple[Array, Array, Array]:
  """[prompt; response] as one left-padded-prompt sequence and where each response token is predicted.

  prompt: int32[B, P], response: int32[B, R] (any padding, bool masks). Returns (tokens: int32[B, P + R],
  mask: bool[B, P + R], prev: int32[B, R]): the logits at column prev[b, j] predict response[b, j].
  """
  prompt, prompt_mask = decoding.left_pad(prompt, prompt_mask)
  tokens = jnp.concatenate([prompt, response], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask.astype(jnp.bool_)], axis=1)
  p, r = prompt.shape[1], response.shape[1]
  # The token at column p + j is predicted at the last real column before it.
  return tokens, mask, _previous_real_index(mask)[:, p:p + r]


def gather_positions(x: Array, prev: Array) -> Array:
  """x: [B, T, ...] at the columns prev: int[B, R] -> [B, R, ...]."""
  return jnp.take_along_axis(x, prev.reshape(prev.shape + (1,) * (x.ndim - 2)), axis=1)


def token_logprobs(logits: Array, response: Array, response_mask: Array) -> Array:
  """log softmax(logits)[response], zero on padding. logits: [B, R, V], response: int[B, R] -> f32[B, R]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  out = jnp.take_along_axis(logp, response[:, :, None], axis=-1)[..., 0]
  return jnp.where(response_mask.astype(jnp.bool_), out, 0.0)


def _previous_real_index(mask: Array) -> Array:
  """For each column t, the index of the last real token strictly before t (0 if none). mask: bool[B, T]."""
  t = mask.shape[1]
  idx = jnp.where(mask, jnp.arange(t)[None, :], -1)
  running = jax.lax.cummax(idx, axis=1)
  prev = jnp.concatenate([jnp.full_like(running[:, :1], -1), running[:, :-1]], axis=1)
  return jnp.maximum(prev, 0)


def implicit_rewards(seq_logprobs: Mapping[str, Array], beta: float) -> Array:
  """f_k(x, y) = beta * (log pi_k(y|x) - log pi_ref(y|x)): [K, B] -> [B, K] features for the online phase."""
  return (beta * (seq_logprobs["basis"] - seq_logprobs["ref"][None])).T
