"""The decoding engine: every souped policy, for every basis kind, decoded in one compiled loop.

Evaluation, the online phase and `serving.generate` all decode here. A batch holds B rows; each row continues one
prefilled prompt with its own program (`Rows`) and its own sampling stream:

* prompts are prefilled once (`prefill`) and each row starts from a copy of its prompt's KV cache, so one prompt
  serves many (user, method) rows;
* at every step the policy runs once for all rows (a *pass*, below) and gives the reference logits and, for each of
  its H heads (K bases, possibly followed by other heads, e.g. bespoke per-user policies), a corrected policy;
* a row's program picks what it samples from (`MODES`; c = the row's `lam: [H]`, g = its `guide: [A]`):
    - `explicit`: log_softmax((1 - sum_h c_h) log pi_ref + sum_h c_h log pi_h) (`explicit.mix_logprobs`);
    - `params`: the merged-parameter soup. For head bases log_softmax(logits_ref + sum_h c_h Delta_h), which equals
      the explicit soup (the K + 1 normalizers cancel); for LoRA bases the per-row merged adapters (pass `merged`);
    - `implicit`: the explicit soup, drawn by rejection sampling from pi_ref (`implicit.rejection_sample`);
    - `guided`: log_softmax(logits_ref + scale * g . table[:, a]), decoding guided by a token-level reward table
      (`table: [A, V]`, one row per attribute; the PAD baseline).
  lam = 0 is the reference; one-hot on h is head h alone.
* the sampler returns, summed over each row's emitted tokens, the log-probs of the emitted tokens under the
  reference and under every head ([B], [B, H]: the online phase's features come out of decoding for free) and the
  exact per-token KL of the row's policy to the reference (KL(pi(.|s_t) || pi_ref(.|s_t)) summed along the sampled
  path: an unbiased, low-variance estimate of the sequence-level KL). These, and the returned `logprobs`, are of the
  policies themselves: at a temperature other than 1 the tokens are drawn from the tempered policy, but the
  statistics describe the untempered one (the main job samples at temperature 1). `stats=False` skips them.

Passes (`PASSES`, static): how the policy runs for the rows.
* `shared` (head bases): one backbone pass for all rows; the heads act on psi. With a vocabulary `support` (heads
  zero outside it) the heads cost O(H S) per row and step and no [H, B, V] array is built.
* `stacked` (LoRA bases): the reference and the K adapters as one batch of (K + 1) B rows with a stacked cache.
* `merged` (LoRA bases, `params` rows only): each row's adapters merged with its lam (rank K r), one pass per row;
  a row's prompt is prefilled with its own adapters, so rows and prompts correspond one to one.
* `separate`: K + 1 full model passes with K + 1 caches (the multi-objective-decoding reference; any basis kind).

Shapes, modes and passes are static; rows, weights, prompts and keys are runtime arrays (no recompiles between
rounds or users).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.models.sequences import left_pad
from spectral_soup.models.sequences import support_position
from spectral_soup.models.spectral import SpectralPolicy
from spectral_soup.models.spectral import group_targets
from spectral_soup.models.spectral import head_delta_logits
from spectral_soup.models.spectral import split_lora_params
from spectral_soup.models.spectral import support_delta_logits
from spectral_soup.models.spectral import support_log_normalizer
from spectral_soup.models.transformer import Transformer
from spectral_soup.models.transformer import cache_slots
from spectral_soup.models.transformer import init_cache
from spectral_soup.models.transformer import output_logits
from spectral_soup.models.transformer import take_cache_rows
from spectral_soup.soup import decoding
from spectral_soup.soup.explicit import mix_logprobs
from spectral_soup.soup import implicit
from spectral_soup.soup.implicit import rejection_sample
from spectral_soup.soup import validation
from spectral_soup.utils import reductions

Array = jax.Array
MODES = ("explicit", "params", "implicit", "guided")
MODE_IDS = {name: i for i, name in enumerate(MODES)}
PASSES = ("shared", "stacked", "merged", "separate")


@struct.dataclass
class Rows:
  """B row programs.

  Attributes:
    mode: int32[B], indices into MODES.
    lam: f32[B, H] weights over the policy's heads (explicit / params / implicit rows).
    guide: f32[B, A] weights over the token-reward table's rows (guided rows).
    prompt_index: int32[B], the prefilled prompt each row continues (an index past the last prompt reads the last).
    seed: int32[B], the row's sampling stream: rows with the same seed draw the same uniforms at every step
      (common random numbers: different policies answering one prompt then differ only where their policies do,
      which makes paired comparisons between methods far less noisy).
  """
  mode: Array
  lam: Array
  guide: Array
  prompt_index: Array
  seed: Array


def make_rows(mode, lam, guide=None, prompt_index=None, seed=None, num_guides: int = 1,
              num_prompts: Optional[int] = None) -> Rows:
  """Rows from host values: mode as names or ids [B]; lam [B, H]; guide [B, A] (None: zeros); prompt_index
  [B] (None: row b continues prompt b); seed [B] (None: the prompt index). `num_prompts`: how many prompts are
  prefilled (checked: a gather under jit clamps an index past them to the last prompt)."""
  unknown = sorted({
      repr(m) for m in mode if (m not in MODE_IDS if isinstance(m, str) else not (
          np.ndim(m) == 0 and np.asarray(m).dtype.kind in "iu" and 0 <= m < len(MODES)))
  })
  if unknown:
    raise ValueError(f"unknown decoding modes [{', '.join(unknown)}]: expected one of {MODES} (or their integer ids "
                     f"0..{len(MODES) - 1}).")
  mode = np.asarray([MODE_IDS[m] if isinstance(m, str) else int(m) for m in mode], np.int32)
  lam = np.asarray(lam, np.float32)
  if lam.ndim != 2 or lam.shape[0] != mode.shape[0]:
    raise ValueError(f"lam must be [B={mode.shape[0]}, H], got {lam.shape}.")
  if not np.all(np.isfinite(lam)):
    bad = int(np.flatnonzero(~np.isfinite(lam).all(axis=1))[0])
    raise ValueError(f"lam row {bad} is not finite: {lam[bad]}.")
  validation.check_weight_range(lam)
  guide = np.zeros((mode.shape[0], num_guides), np.float32) if guide is None else np.asarray(guide, np.float32)
  if guide.ndim != 2 or guide.shape[0] != mode.shape[0]:
    raise ValueError(f"guide must be [B={mode.shape[0]}, A] (one weight per guided reward), got {guide.shape}.")
  if not np.all(np.isfinite(guide)):
    bad = int(np.flatnonzero(~np.isfinite(guide).all(axis=1))[0])
    raise ValueError(f"guide row {bad} is not finite: {guide[bad]} (a NaN weight decoded the last token id at "
                     f"every step).")
  prompt_index = np.arange(mode.shape[0]) if prompt_index is None else np.asarray(prompt_index)
  beyond = num_prompts is not None and np.any(prompt_index >= num_prompts)
  if prompt_index.shape != mode.shape or np.any(prompt_index < 0) or beyond:
    where = f" below {num_prompts}" if num_prompts is not None else ""
    raise ValueError(f"prompt_index must be [B={mode.shape[0]}] indices >= 0{where} of prefilled prompts, got "
                     f"{prompt_index if prompt_index.size <= 8 else prompt_index.shape}" +
                     (f" (max {prompt_index.max()})." if beyond else "."))
  seed = prompt_index if seed is None else np.asarray(seed)
  return Rows(mode=jnp.asarray(mode), lam=jnp.asarray(lam), guide=jnp.asarray(guide),
              prompt_index=jnp.asarray(prompt_index, jnp.int32), seed=jnp.asarray(seed, jnp.int32))


def passes_for(policy: SpectralPolicy, mode: str) -> str:
  """The pass that serves rows of `mode` ("naive": the K + 1 separate passes) for `policy`'s basis kind."""
  if mode == "naive":
    return "separate"
  if policy.basis_kind == "heads":
    return "shared"
  return "merged" if mode == "params" else "stacked"


# ----------------------------------------------------------------------------------------------------------------
# Passes: (policy, params, tokens [B, T], mask, cache) -> (state at the last position, cache).


def _features(policy, params, tokens, mask, cache, return_logits=True):
  return policy.apply({"params": params}, tokens, mask=mask, cache=cache, return_logits=return_logits,
                      method=lambda m, *a, **kw: m.features(*a, **kw))


def _shared_pass(policy, params, tokens, mask, cache):
  if tokens.shape[1] == 1:
    psi, ref_logits, aux = _features(policy, params["policy"], tokens, mask, cache)
    return {"psi": psi[:, -1], "ref_logits": ref_logits[:, -1]}, aux["cache"]
  # A prompt: the output layer only at the last position (the loop reads nothing else).
  psi, _, aux = _features(policy, params["policy"], tokens, mask, cache, return_logits=False)
  backbone = params["policy"]["features"]["backbone"]
  return {"psi": psi[:, -1], "ref_logits": output_logits(policy.config, backbone, aux["hidden"][:, -1])}, aux["cache"]


def _stacked_pass(policy, params, tokens, mask, cache):
  ref, basis, aux = policy.apply({"params": params["policy"]}, tokens, mask=mask, cache=cache)
  return {"ref_logits": ref[:, -1], "basis_logits": basis[:, :, -1]}, aux["cache"]


def _merged_pass(policy, params, tokens, mask, cache):
  """LoRA bases merged per row: the K adapters concatenated (rank K r), rank dimensions scaled by the row's lam."""
  lam = params["rows"].lam.astype(jnp.float32)  # [B, K]
  num_layers = policy.config.num_layers
  row_scale = jnp.broadcast_to(
      jnp.repeat(lam, policy.lora_rank, axis=-1)[None], (num_layers, *lam.shape[:-1], lam.shape[-1] * policy.lora_rank))
  merged = {}
  for name, adapter in split_lora_params(params["policy"]["lora"]).items():
    k, layers_, n_in, r = adapter["a"].shape
    a_cat = jnp.transpose(adapter["a"], (1, 2, 0, 3)).reshape(layers_, n_in, k * r)  # [L, in, K*r]
    b_cat = adapter["b"].transpose(1, 0, 2, 3).reshape(layers_, k * r, -1)  # [L, K*r, out]
    merged[name] = {"a": a_cat, "b": b_cat, "row_scale": row_scale}
  logits, aux = Transformer(policy.config).apply({"params": params["policy"]["features"]["backbone"]}, tokens,
                                                 mask=mask, cache=cache, lora=group_targets(merged))
  return {"soup_logits": logits[:, -1]}, aux["cache"]


def _separate_pass(policy, params, tokens, mask, cache):
  """K + 1 full passes, each with its own cache: cache = {"ref": Cache, "bases": [Cache] * K}."""
  p = params["policy"]
  backbone, bb = Transformer(policy.config), p["features"]["backbone"]
  ref_logits, aux = backbone.apply({"params": bb}, tokens, mask=mask, cache=cache["ref"])
  new_cache, basis_logits = {"ref": aux["cache"], "bases": []}, []
  for k in range(policy.num_bases):  # Deliberately K separate models: this is the reference.
    if policy.basis_kind == "heads":
      # The feature map itself (the backbone, then the learned projection P when basis.feature_dim is set).
      psi, logits_k, aux_k = _features(policy, p, tokens, mask, cache["bases"][k])
      psi = psi.astype(jnp.float32)
      if "a" in p["heads"]:
        a_k, b_k = p["heads"]["a"][k].astype(jnp.float32), p["heads"]["b"][k].astype(jnp.float32)
        logits_k = logits_k + (psi @ a_k) @ b_k
      if "c" in p["heads"]:
        logits_k = logits_k + p["heads"]["c"][k].astype(jnp.float32)
    else:
      lora_k = {name: {"a": ad["a"][k], "b": ad["b"][k]} for name, ad in split_lora_params(p["lora"]).items()}
      logits_k, aux_k = backbone.apply({"params": bb}, tokens, mask=mask, cache=cache["bases"][k],
                                       lora=group_targets(lora_k))
    basis_logits.append(logits_k[:, -1])
    new_cache["bases"].append(aux_k["cache"])
  return {"ref_logits": ref_logits[:, -1], "basis_logits": jnp.stack(basis_logits)}, new_cache


_PASS_FNS = {"shared": _shared_pass, "stacked": _stacked_pass, "merged": _merged_pass, "separate": _separate_pass}


def _init_cache(policy: SpectralPolicy, passes: str, batch: int, max_len: int) -> Any:
  if passes == "separate":
    one = lambda: init_cache(policy.config, batch, max_len)
    return {"ref": one(), "bases": [one() for _ in range(policy.num_bases)]}
  groups = policy.num_bases + 1 if passes == "stacked" else 1
  return init_cache(policy.config, groups * batch, max_len)


def _take_rows(policy: SpectralPolicy, passes: str, cache: Any, index: Array, num_prompts: int) -> Any:
  """Each row's copy of its prompt's cache (a stacked cache holds K + 1 groups of the prompts' rows)."""
  if passes == "separate":
    return jax.tree.map(lambda c: take_cache_rows(c, index), cache, is_leaf=lambda c: isinstance(c, dict) and "k" in c)
  if passes == "stacked":
    index = (jnp.arange(policy.num_bases + 1)[:, None] * num_prompts + index[None]).reshape(-1)
  return take_cache_rows(cache, index)


# ----------------------------------------------------------------------------------------------------------------
# Every row's next-token log-probs from the pass's state.


def _mix(params: Any, state: dict, rows: Rows, modes: Tuple[str, ...], stats: bool) -> dict:
  """state -> {"logprobs": f32[B, V]} plus what the sampler needs ("ref", "heads", "delta_support", "log_z").

  With `params["support"]` (int32[S]: the heads are zero outside it, as `offline` trains them on a support), the
  heads are evaluated on S tokens only and their log-normalizers come from the reference probabilities there
  (`spectral.support_log_normalizer`): no [H, B, V] array unless implicit rows need the heads' full logits.
  """
  if "soup_logits" in state:  # LoRA parameter soups: the pass gave each row's policy directly.
    return {"logprobs": reductions.log_softmax(state["soup_logits"].astype(jnp.float32))}
  ref_logits = state["ref_logits"].astype(jnp.float32)
  c = rows.lam.astype(jnp.float32)  # [B, H]
  if "psi" in state and not stats and set(modes) <= {"explicit", "params"} and "support" not in params:
    # Head bases, no statistics: the K + 1 normalizers of the explicit soup cancel, so every row is one log-softmax
    # of logits_ref + sum_h c_h Delta_h, in factored form (no [H, B, V] array).
    return {"logprobs": reductions.log_softmax(ref_logits + _merged_delta(params["policy"]["heads"], state["psi"], c))}
  ref_lp = reductions.log_softmax(ref_logits)
  out = {"ref": ref_lp}
  support = params.get("support")
  if "psi" not in state:  # Full basis logits (LoRA stacked, or separate passes).
    out["heads"] = reductions.log_softmax(state["basis_logits"].astype(jnp.float32))
    explicit = mix_logprobs(ref_lp, out["heads"], c)
    merged = None
  elif support is None:
    delta = head_delta_logits(params["policy"]["heads"], state["psi"])  # [H, B, V]
    out["heads"] = reductions.log_softmax(ref_logits[None] + delta)  # [H, B, V]
    explicit = mix_logprobs(ref_lp, out["heads"], c)
    merged = ref_logits + jnp.einsum("bh,hbv->bv", c, delta)
  else:
    delta = support_delta_logits(params["policy"]["heads"], state["psi"], support)  # [H, B, S]
    log_z = support_log_normalizer(delta, jnp.exp(jnp.take(ref_lp, support, axis=-1)))  # [H, B]
    # On the vocabulary: a gather through each token's support position, not a scatter (~2x faster on CPU).
    on_vocab = lambda x: _on_vocabulary(x, params["support_position"])
    mixed = on_vocab(jnp.einsum("bh,hbs->bs", c, delta))  # [B, V]
    # The explicit soup in delta form: (1 - sum c) log pi_ref + sum_h c_h (log pi_ref + delta_h - log Z_h / Z_ref)
    # = log pi_ref + sum_h c_h delta_h - sum_h c_h log Z_h / Z_ref (renormalized below).
    explicit = ref_lp + mixed - jnp.einsum("bh,hb->b", c, log_z)[:, None]
    merged = ref_logits + mixed
    out["delta_support"], out["log_z"] = delta, log_z[..., None]  # [H, B, S], [H, B, 1]
    if params["need_head_logits"]:
      out["heads"] = reductions.log_softmax(ref_logits + on_vocab(delta))
  mixed_logits = explicit
  if "params" in modes:
    if merged is None:
      raise ValueError("params rows of LoRA bases decode with passes='merged' (their own adapters), not "
                       "beside rows of other modes.")
    mixed_logits = jnp.where(rows.mode[:, None] == MODE_IDS["params"], merged, mixed_logits)
  if "guided" in modes:
    guide = params["guide_scale"] * (rows.guide @ params["guide_table"])  # [B, V]
    mixed_logits = jnp.where(rows.mode[:, None] == MODE_IDS["guided"], ref_logits + guide, mixed_logits)
  out["logprobs"] = reductions.log_softmax(mixed_logits)
  return out


def _on_vocabulary(x: Array, position: Array) -> Array:
  """[..., S] values on a vocabulary support -> [..., V], zero off it (position: each token's index in the support,
  -1 outside)."""
  return jnp.where(position >= 0, jnp.take(x, jnp.maximum(position, 0), axis=-1, mode="clip"), 0.0)


def _merged_delta(heads: Any, psi: Array, lam: Array) -> Array:
  """sum_h lam_h Delta_h for head bases without any [H, B, V] array. psi: [B, F], lam: [B, H] -> f32[B, V]."""
  delta = 0.0
  if "a" in heads:  # Delta W_row = sum_h lam_h a_h b_h = A_cat diag(lam (x) 1_r) B_cat.
    h = jnp.einsum("bf,hfr->bhr", psi.astype(jnp.float32), heads["a"].astype(jnp.float32)) * lam[:, :, None]
    delta = delta + jnp.einsum("bhr,hrv->bv", h, heads["b"].astype(jnp.float32))
  if "c" in heads:  # Logit biases mix with the same weights.
    delta = delta + jnp.einsum("bh,hv->bv", lam, heads["c"].astype(jnp.float32))
  return delta


def _step_fn(policy: SpectralPolicy, passes: str, modes: Tuple[str, ...], stats: bool):
  """The decoding callback: one pass for all rows, then every row's program."""

  def logits_fn(params, tokens, mask, cache):
    state, cache = _PASS_FNS[passes](policy, params, tokens, mask, cache)
    out = _mix(params, state, params["rows"], modes, stats)
    return jax.tree.map(lambda x: x[..., None, :], out), cache

  return logits_fn


def _sample_fn(max_proposals: int, stats: bool):

  def sample(key, last, params, sampling):
    rows = params["rows"]
    k_std, k_rs = jax.random.split(key)
    # One uniform per row from the row's own stream: rows with one seed share it (common random numbers).
    uniforms = jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(k_std, s)))(rows.seed)
    token = decoding.sample_with_uniforms(last["logprobs"], uniforms, sampling)
    out = {}
    if max_proposals:
      # Each row's proposals and tests from its own stream too: with one key for the batch, rows at the same
      # position of different chunks drew the same samples, and a row's samples changed with the chunk size.
      rs_uniforms = jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(k_rs, s), (2 * max_proposals + 1,)))(
          rows.seed)
      rs_token, aux = rejection_sample(k_rs, last["ref"], last["heads"], rows.lam, max_proposals=max_proposals,
                                       temperature=sampling.temperature, uniforms=rs_uniforms)
      is_implicit = rows.mode == MODE_IDS["implicit"]
      token = jnp.where(is_implicit, rs_token, token)
      out["accepted"] = jnp.where(is_implicit, aux["accepted"].astype(jnp.float32), 0.0)
      out["proposals"] = jnp.where(is_implicit, aux["num_proposals"].astype(jnp.float32), 0.0)
    pick = lambda lp: jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0]
    logp = pick(last["logprobs"])
    if not stats:
      return token, logp, out
    out["ref_logp"] = pick(last["ref"])
    if "delta_support" in last:  # log pi_h(token) = log pi_ref(token) + delta_h(token) - log Z_h / Z_ref.
      position = params["support_position"][token]  # Index in the support, or -1.
      delta = jnp.take_along_axis(last["delta_support"], jnp.maximum(position, 0)[None, :, None], axis=-1)[..., 0]
      delta = jnp.where(position[None] >= 0, delta, 0.0)  # [H, B]
      out["head_logp"] = (out["ref_logp"][None] + delta - last["log_z"][..., 0]).T  # [B, H]
    else:
      out["head_logp"] = jax.vmap(pick)(last["heads"]).T  # [B, H]
    p = jnp.exp(last["logprobs"])
    out["kl"] = jnp.sum(jnp.where(p > 0, p * (last["logprobs"] - last["ref"]), 0.0), axis=-1)
    return token, logp, out

  return sample


# ----------------------------------------------------------------------------------------------------------------
# Front end: prefill the prompts once, then decode any rows from them.


@functools.partial(jax.jit, static_argnames=("policy", "max_len", "passes"))
def prefill(policy: SpectralPolicy, policy_params: Any, prompt: Array, prompt_mask: Array, lam: Optional[Array] = None,
            *, max_len: int, passes: str = "shared") -> dict:
  """Runs E prompts through the policy once, with cache room for `max_len` slots.

  prompt: int32[E, P] (any padding); prompt_mask: bool[E, P]; lam: f32[E, K], each prompt's weights (pass
  `merged` only, where the prompt is one row's). Returns {"state": the pass's state at each prompt's last token,
  "cache"}: what `decode_rows` continues from.
  """
  if passes not in PASSES:
    raise ValueError(f"passes={passes!r}: expected one of {PASSES}.")
  if passes == "merged" and (lam is None or lam.shape != (prompt.shape[0], policy.num_bases)):
    raise ValueError(f"passes='merged' prefills each prompt with its row's adapters: lam must be "
                     f"[E={prompt.shape[0]}, K={policy.num_bases}], got {None if lam is None else lam.shape}.")
  prompt, prompt_mask = left_pad(prompt, prompt_mask)
  params = {"policy": policy_params}
  if passes == "merged":
    params["rows"] = Rows(mode=None, lam=lam, guide=None, prompt_index=None, seed=None)
  cache = _init_cache(policy, passes, prompt.shape[0], max_len)
  state, cache = _PASS_FNS[passes](policy, params, prompt, prompt_mask, cache)
  return {"state": state, "cache": cache}


_STATE_KEYS = {
    "shared": {"psi", "ref_logits"},
    "stacked": {"ref_logits", "basis_logits"},
    "merged": {"soup_logits"},
    "separate": {"ref_logits", "basis_logits"}
}


def _check_rows(policy: SpectralPolicy, prompts: Any, rows: Rows, guide_table: Optional[Array],
                support: Optional[Array], passes: str) -> None:
  """Shape checks of `decode_rows`'s inputs (at trace time, before anything compiles), naming what is wrong."""
  if set(prompts.get("state", {})) != _STATE_KEYS[passes]:
    raise ValueError(f"prompts were not prefilled for passes={passes!r} (state {sorted(prompts.get('state', {}))}); "
                     f"call prefill(..., passes={passes!r}).")
  num_rows, heads = rows.mode.shape[0], policy.num_bases
  if rows.lam.shape != (num_rows, heads):
    raise ValueError(f"rows.lam must be [B={num_rows}, H={heads}] (one weight per head of the policy), got "
                     f"{rows.lam.shape}.")
  for name in ("guide", "prompt_index", "seed"):
    if getattr(rows, name).shape[0] != num_rows:
      raise ValueError(f"rows.{name} has {getattr(rows, name).shape[0]} rows, rows.mode {num_rows}.")
  if guide_table is not None and guide_table.shape != (rows.guide.shape[-1], policy.config.vocab_size):
    raise ValueError(f"guide_table must be [A={rows.guide.shape[-1]}, V={policy.config.vocab_size}] (one row per "
                     f"guide weight), got {guide_table.shape}.")
  if support is not None and len(support.shape) != 1:
    raise ValueError(f"support must be int[S] (token ids), got shape {support.shape}.")


def decode_rows(policy: SpectralPolicy, policy_params: Any, prompts: Any, rows: Rows, key: Array,
                guide_table: Optional[Array] = None, guide_scale: Any = 0.0, support: Optional[Array] = None, *,
                max_new_tokens: int, sampling: decoding.SamplingConfig = decoding.SamplingConfig(temperature=1.0),
                eos_id: Optional[int] = None, pad_id: int = 0, max_proposals: int = 0, passes: str = "shared",
                modes: Tuple[str, ...] = MODES, stats: bool = True) -> Tuple[Array, dict]:
  """Decodes B rows, each continuing prefilled prompt `rows.prompt_index` with its own program.

  Args:
    policy: a SpectralPolicy with H heads (K bases, then any others); policy_params its parameters.
    prompts: `prefill`'s output for the same `passes` (E prompts, cache room for prompt + max_new_tokens).
    rows: the B row programs.
    key: PRNG key.
    guide_table: f32[A, V] token-level rewards for guided rows (None: no guided rows).
    guide_scale: multiplies the guided reward (1 / beta); finite.
    support: int32[S] tokens outside which every head's correction is zero (heads trained on a vocabulary
      support), or None. With it the heads cost O(H S) per row and step instead of O(H V).
    max_new_tokens, sampling, eos_id, pad_id: see `decoding.decode`.
    max_proposals: proposals per token for implicit rows (0: the batch has no implicit rows).
    passes: one of PASSES (`passes_for` picks it).
    modes: the modes the rows may use (static, a tuple): the computation of the others is left out.
    stats: return the reference and head log-probs and the KL of each row.

  Returns:
    tokens: int32[B, N] and aux: `lengths`, `done`, `logprobs` [B, N] and `stats` with (stats=True) "ref_logp" [B],
    "head_logp" [B, H] (sums over the emitted tokens), "kl" [B] and, with max_proposals, "accepted" /
    "proposals" [B].
  """
  _check_room(prompts, max_new_tokens)
  if not isinstance(guide_scale, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(guide_scale, np.float64))):
    raise ValueError(f"guide_scale must be finite (the guided rows' 1 / beta), got {guide_scale!r}: a NaN scale "
                     f"decoded the last token id at every step.")
  return _decode_rows(policy, policy_params, prompts, rows, key, guide_table, guide_scale, support,
                      max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id, pad_id=pad_id,
                      max_proposals=max_proposals, passes=passes, modes=modes, stats=stats)


def _check_room(prompts: Any, max_new_tokens: int) -> None:
  """Refuses prefilled prompts whose cache has no room for `max_new_tokens` more (`prefill`'s max_len too small)."""
  for slots, index in cache_slots(prompts.get("cache", {}) if isinstance(prompts, dict) else {}):
    if not isinstance(index, jax.core.Tracer) and int(index) + max_new_tokens > slots:
      raise ValueError(
          f"the prompts were prefilled with max_len={slots} slots and hold {int(index)} tokens: no room for "
          f"max_new_tokens={max_new_tokens} (prefill with max_len >= {int(index) + max_new_tokens}); a "
          f"full cache overwrote its last slot at every step (wrong tokens, no error).")


@functools.partial(
    jax.jit, static_argnames=("policy", "max_new_tokens", "sampling", "eos_id", "pad_id", "max_proposals", "passes",
                              "modes", "stats"))
def _decode_rows(policy: SpectralPolicy, policy_params: Any, prompts: Any, rows: Rows, key: Array,
                 guide_table: Optional[Array] = None, guide_scale: Any = 0.0, support: Optional[Array] = None, *,
                 max_new_tokens: int, sampling: decoding.SamplingConfig = decoding.SamplingConfig(temperature=1.0),
                 eos_id: Optional[int] = None, pad_id: int = 0, max_proposals: int = 0, passes: str = "shared",
                 modes: Tuple[str, ...] = MODES, stats: bool = True) -> Tuple[Array, dict]:
  """`decode_rows` after its host-side checks."""
  modes = tuple(modes)
  if passes not in PASSES or not set(modes) <= set(MODES):
    raise ValueError(f"passes={passes!r}, modes={modes!r}: expected one of {PASSES} and a subset of {MODES}.")
  if passes != "separate" and (policy.basis_kind == "heads") != (passes == "shared"):
    raise ValueError(f"passes={passes!r} does not serve basis_kind={policy.basis_kind!r}; see `passes_for`.")
  if passes == "merged" and (set(modes) != {"params"} or stats or max_proposals):
    raise ValueError("passes='merged' serves params rows only, without statistics or implicit rows.")
  _check_rows(policy, prompts, rows, guide_table, support, passes)
  if max_proposals:
    implicit.check_sampling(sampling)
  vocab = policy.config.vocab_size
  table = jnp.zeros((rows.guide.shape[-1], vocab), jnp.float32) if guide_table is None else guide_table
  params = {
      "policy": policy_params,
      "rows": rows,
      "guide_table": table.astype(jnp.float32),
      "guide_scale": jnp.asarray(guide_scale, jnp.float32),
      "need_head_logits": bool(max_proposals)
  }
  if support is not None:
    params["support"] = jnp.asarray(support, jnp.int32)
    params["support_position"] = support_position(params["support"], vocab)
  num_prompts = jax.tree.leaves(prompts["state"])[0].shape[-2]
  cache = _take_rows(policy, passes, prompts["cache"], rows.prompt_index, num_prompts)
  # Materialized (optimization_barrier): gathered from one prompt, the rows' state is a broadcast, and jaxlib
  # 0.10.2's YNN dot fusion computes the heads' [B, F] x [K, F, R] product of a broadcast operand wrong on some
  # x86 CPUs (`_xla_cpu.py`; `tests/xla_cpu_regression.py`, probe "broadcast_dot").
  state = jax.lax.optimization_barrier(
      jax.tree.map(lambda x: jnp.take(x, rows.prompt_index, axis=-2, mode="clip"), prompts["state"]))
  last = _mix(params, state, rows, modes, stats)
  return decoding.decode_from(_step_fn(policy, passes, modes, stats), params, last, cache, key,
                              max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id, pad_id=pad_id,
                              sample_fn=_sample_fn(max_proposals, stats))
