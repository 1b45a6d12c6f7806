"""Many policies decoded in one compiled loop: every row runs its own program over one shared backbone pass.

Evaluation and the online phase decode the same prompts for many (user, method) rows: soups with per-user
weights, the reference, bespoke heads, reward-guided decoding. With head bases all of them read the same backbone
state, so one loop serves every row:

* the prompts are prefilled once (`prefill`), and each row starts from a copy of its prompt's KV cache;
* at every step the backbone runs once for all rows; the H heads of the policy (K bases, possibly followed by
  other heads, e.g. bespoke per-user policies) give H corrected logit vectors;
* a row's program (`Rows`) picks what it samples from:
    - `explicit`: (1 - sum_h c_h) log pi_ref + sum_h c_h log pi_h, renormalized (docs/METHOD.md section 4);
    - `params`: log-softmax(logits_ref + sum_h c_h Delta_h), the merged-parameter soup of head bases;
    - `implicit`: the explicit soup, drawn by rejection sampling from pi_ref (`implicit.rejection_sample`);
    - `guided`: log-softmax(logits_ref + scale * g . table[:, a]), decoding guided by a token-level reward table
      (`table: [A, V]`, one row per attribute; the PAD baseline).
  Coefficients c: [H] (zero: the reference; one-hot on h: head h alone), guide weights g: [A].
* the sampler also returns, summed over each row's emitted tokens, the log-probs of the emitted tokens under the
  reference and under every head ([B], [B, H]; the online phase's features come out of decoding for free), and the
  exact per-token KL of the row's policy to the reference (KL(pi(.|s_t) || pi_ref(.|s_t)) summed along the
  sampled path: an unbiased, low-variance estimate of the sequence-level KL).

Shapes and kinds are static; rows, weights, prompts and keys are runtime arrays (no recompiles between rounds).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

from flax import struct
import jax
import jax.numpy as jnp

from spectral_soup.models.spectral import SpectralPolicy, head_delta_logits, support_delta_logits
from spectral_soup.models.spectral import support_log_normalizer
from spectral_soup.models.transformer import init_cache, output_logits, take_cache_rows
from spectral_soup.soup import decoding
from spectral_soup.soup.implicit import rejection_sample

Array = jax.Array
KINDS = ("explicit", "params", "implicit", "guided")
KIND_IDS = {name: i for i, name in enumerate(KINDS)}


@struct.dataclass
class Rows:
  """B row programs.

  Attributes:
    kind: int32[B], indices into KINDS.
    coefs: f32[B, H] weights over the policy's heads (explicit / params / implicit rows).
    guide: f32[B, A] weights over the token-reward table's rows (guided rows).
    prompt_index: int32[B], the prefilled prompt each row continues.
    seed: int32[B], the row's sampling stream: rows with the same seed draw the same uniforms at every step
      (common random numbers: different policies answering one prompt then differ only where their policies do,
      which makes paired comparisons between methods far less noisy).
  """
  kind: Array
  coefs: Array
  guide: Array
  prompt_index: Array
  seed: Array


def make_rows(kind, coefs, guide=None, prompt_index=None, seed=None, num_guides: int = 1) -> Rows:
  """Rows from host values: kind as names or ids [B]; coefs [B, H]; guide [B, A] (None: zeros); prompt_index
  [B] (None: row b continues prompt b); seed [B] (None: the prompt index)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  kind = np.asarray([KIND_IDS[k] if isinstance(k, str) else int(k) for k in kind], np.int32)
  coefs = np.asarray(coefs, np.float32)
  if coefs.ndim != 2 or coefs.shape[0] != kind.shape[0]:
    raise ValueError(f"coefs must be [B={kind.shape[0]}, H], got {coefs.shape}.")
  if not np.all(np.isfinite(coefs)):
    bad = int(np.flatnonzero(~np.isfinite(coefs).all(axis=1))[0])
    raise ValueError(f"coefs row {bad} is not finite: {coefs[bad]}.")
  guide = np.zeros((kind.shape[0], num_guides), np.float32) if guide is None else np.asarray(guide, np.float32)
  prompt_index = np.arange(kind.shape[0]) if prompt_index is None else np.asarray(prompt_index)
  seed = prompt_index if seed is None else np.asarray(seed)
  return Rows(kind=jnp.asarray(kind), coefs=jnp.asarray(coefs), guide=jnp.asarray(guide),
              prompt_index=jnp.asarray(prompt_index, jnp.int32), seed=jnp.asarray(seed, jnp.int32))


def _mix(params: Any, psi: Array, ref_logits: Array, rows: Rows) -> dict:
  """Every row's next-token log-probs from one backbone state. psi: [B, F], ref_logits: [B, V] -> dict of [.., V].

  With `params["support"]` (int32[S]: the heads are zero outside it, as `offline` trains them on a support), the
  heads are evaluated on S tokens only and their log-normalizers come from the reference probabilities there
  (`spectral.support_log_normalizer`): no [H, B, V] array unless implicit rows need the heads' full logits.
  """
  heads = params["policy"]["heads"]
  support = params.get("support")
  ref_logits = ref_logits.astype(jnp.float32)
  ref_lp = jax.nn.log_softmax(ref_logits, axis=-1)
  c = rows.coefs.astype(jnp.float32)  # [B, H]
  guide = params["guide_scale"] * (rows.guide @ params["guide_table"])  # [B, V]
  kind = rows.kind[:, None]
  out = {"ref": ref_lp}
  if support is None:
    delta = head_delta_logits(heads, psi)  # [H, B, V]
    head_lp = jax.nn.log_softmax(ref_logits[None] + delta, axis=-1)  # [H, B, V]
    explicit = (1.0 - c.sum(-1, keepdims=True)) * ref_lp + jnp.einsum("bh,hbv->bv", c, head_lp)
    merged = ref_logits + jnp.einsum("bh,hbv->bv", c, delta)
    out["heads"] = head_lp
  else:
    delta = support_delta_logits(heads, psi, support)  # [H, B, S]
    log_z = support_log_normalizer(delta, jnp.exp(jnp.take(ref_lp, support, axis=-1)))  # [H, B]
    mixed = jnp.einsum("bh,hbs->bs", c, delta)
    # Explicit: (1 - sum c) log pi_ref + sum_h c_h (log pi_ref + delta_h - log Z_h / Z_ref), renormalized.
    explicit = ref_lp.at[:, support].add(mixed) - jnp.einsum("bh,hb->b", c, log_z)[:, None]
    merged = ref_logits.at[:, support].add(mixed)
    out["delta_support"], out["log_z"] = delta, log_z[..., None]  # [H, B, S], [H, B, 1]
    if params["need_head_logits"]:
      out["heads"] = jax.nn.log_softmax(jnp.broadcast_to(ref_logits, delta.shape[:2] + ref_logits.shape[-1:])
                                        .at[:, :, support].add(delta), axis=-1)
  mixed_logits = jnp.where(kind == KIND_IDS["params"], merged,
                           jnp.where(kind == KIND_IDS["guided"], ref_logits + guide, explicit))
  out["logprobs"] = jax.nn.log_softmax(mixed_logits, axis=-1)
  return out


def _step_fn(policy: SpectralPolicy):
  """The decoding callback: one backbone step for all rows, then every row's program."""
  def logits_fn(params, tokens, mask, cache):
    psi, ref_logits, aux = policy.apply({"params": params["policy"]}, tokens, mask=mask, cache=cache,
                                        method=lambda m, *a, **kw: m.features(*a, **kw))
    out = _mix(params, psi[:, -1], ref_logits[:, -1], params["rows"])
    return jax.tree.map(lambda x: x[..., None, :], out), aux["cache"]
  return logits_fn


def _sample_fn(max_proposals: int):
  def sample(key, last, params, sampling):
    rows = params["rows"]
    k_std, k_rs = jax.random.split(key)
    # One uniform per row from the row's own stream: rows with one seed share it (common random numbers).
    uniforms = jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(k_std, s)))(rows.seed)
    token = decoding.sample_with_uniforms(last["logprobs"], uniforms, sampling)
    stats = {}
    if max_proposals:
      rs_token, aux = rejection_sample(k_rs, last["ref"], last["heads"], rows.coefs, max_proposals=max_proposals)
      implicit = rows.kind == KIND_IDS["implicit"]
      token = jnp.where(implicit, rs_token, token)
      stats["accepted"] = jnp.where(implicit, aux["accepted"].astype(jnp.float32), 0.0)
      stats["proposals"] = jnp.where(implicit, aux["num_proposals"].astype(jnp.float32), 0.0)
    pick = lambda lp: jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0]
    logp = pick(last["logprobs"])
    stats["ref_logp"] = pick(last["ref"])
    if "delta_support" in last:  # log pi_h(token) = log pi_ref(token) + delta_h(token) - log Z_h / Z_ref.
      position = params["support_position"][token]  # Index in the support, or -1.
      delta = jnp.take_along_axis(last["delta_support"], jnp.maximum(position, 0)[None, :, None], axis=-1)[..., 0]
      delta = jnp.where(position[None] >= 0, delta, 0.0)  # [H, B]
      stats["head_logp"] = (stats["ref_logp"][None] + delta - last["log_z"][..., 0]).T  # [B, H]
    else:
      stats["head_logp"] = jax.vmap(pick)(last["heads"]).T  # [B, H]
    p = jnp.exp(last["logprobs"])
    stats["kl"] = jnp.sum(jnp.where(p > 0, p * (last["logprobs"] - last["ref"]), 0.0), axis=-1)
    return token, logp, stats
  return sample


@functools.partial(jax.jit, static_argnames=("policy", "max_len"))
def prefill(policy: SpectralPolicy, policy_params: Any, prompt: Array, prompt_mask: Array, *, max_len: int):
  """Runs E prompts through the backbone once: {"psi": [E, F], "ref_logits": f32[E, V], "cache"} (room for
  `max_len` slots). prompt: int32[E, P] (any padding); prompt_mask: bool[E, P]."""
  prompt, prompt_mask = decoding.left_pad(prompt, prompt_mask)
  cache = init_cache(policy.config, prompt.shape[0], max_len)
  psi, _, aux = policy.apply({"params": policy_params}, prompt, mask=prompt_mask, cache=cache, return_logits=False,
                             method=lambda m, *a, **kw: m.features(*a, **kw))
  ref_logits = output_logits(policy.config, policy_params["features"]["backbone"], aux["hidden"][:, -1])
  return {"psi": psi[:, -1], "ref_logits": ref_logits, "cache": aux["cache"]}


@functools.partial(jax.jit, static_argnames=("policy", "max_new_tokens", "sampling", "eos_id", "pad_id",
                                             "max_proposals"))
def rollout(policy: SpectralPolicy, policy_params: Any, prompts: Any, rows: Rows, key: Array,
            guide_table: Optional[Array] = None, guide_scale: Any = 0.0, support: Optional[Array] = None, *,
            max_new_tokens: int,
            sampling: decoding.SamplingConfig = decoding.SamplingConfig(temperature=1.0),
            eos_id: Optional[int] = None, pad_id: int = 0, max_proposals: int = 0) -> Tuple[Array, dict]:
  """Decodes B rows, each continuing prefilled prompt `rows.prompt_index` with its own program.

  Args:
    policy: a head-basis SpectralPolicy with H heads; policy_params its parameters.
    prompts: `prefill`'s output (E prompts, cache room for prompt + max_new_tokens).
    rows: the B row programs.
    key: PRNG key.
    guide_table: f32[A, V] token-level rewards for guided rows (None: no guided rows).
    guide_scale: multiplies the guided reward (1 / beta).
    support: int32[S] tokens outside which every head's correction is zero (heads trained on a vocabulary
      support), or None. With it the heads cost O(H S) per row and step instead of O(H V).
    max_new_tokens, sampling, eos_id, pad_id: see `decoding.decode`.
    max_proposals: proposals per token for implicit rows (0: the batch has no implicit rows).

  Returns:
    tokens: int32[B, N] and aux: `lengths`, `done`, `logprobs` [B, N] and `stats` with "ref_logp" [B],
    "head_logp" [B, H] (sums over the emitted tokens), "kl" [B] and, with max_proposals, "accepted" /
    "proposals" [B].
  """
  if policy.basis_kind != "heads":
    raise ValueError(f"rollout needs head bases; the policy has basis_kind={policy.basis_kind!r}.")
  vocab = policy.config.vocab_size
  table = jnp.zeros((rows.guide.shape[-1], vocab), jnp.float32) if guide_table is None else guide_table
  params = {"policy": policy_params, "rows": rows, "guide_table": table.astype(jnp.float32),
            "guide_scale": jnp.asarray(guide_scale, jnp.float32), "need_head_logits": bool(max_proposals)}
  if support is not None:
    support = jnp.asarray(support, jnp.int32)
    params["support"] = support
    params["support_position"] = jnp.full((vocab,), -1, jnp.int32).at[support].set(
        jnp.arange(support.shape[0], dtype=jnp.int32))
  cache = take_cache_rows(prompts["cache"], rows.prompt_index)
  last = _mix(params, prompts["psi"][rows.prompt_index], prompts["ref_logits"][rows.prompt_index], rows)
  return decoding.decode_from(_step_fn(policy), params, last, cache, key, max_new_tokens=max_new_tokens,
                              sampling=sampling, eos_id=eos_id, pad_id=pad_id,
                              sample_fn=_sample_fn(max_proposals))
