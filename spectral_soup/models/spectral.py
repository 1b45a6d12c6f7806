"""The spectral feature map psi(s) and the K basis policies built on it (docs/METHOD.md sections 2-4).

In a softmax LM the logits are bilinear, logit(s, a) = <h(s), U_a>, so the final hidden state h(s) of the shared
backbone is the natural feature map: `SpectralFeatureMap` returns psi(s) (h(s), optionally through a learned
low-rank projection) together with the reference logits. Two parameterizations of the K bases:

* `"heads"` (exact merging): basis k is a low-rank correction of the reference logits on psi,
  `logits_k = logits_ref + psi A_k B_k` (`A: [K, F, r]`, `B: [K, r, V]`). Parameter and explicit souping agree
  exactly, and the backbone runs once per token for all K bases.
* `"lora"` (the paper's choice): basis k is a LoRA adapter on the attention / MLP projections of every layer.
  The reference (a zero adapter) and the K adapters run as one batch of (K+1)*B rows: no Python loop over k.

`SpectralPolicy` returns reference logits and all K basis logits from one forward call:

    ref_logits, basis_logits, aux = policy.apply({"params": params}, tokens, mask=mask)
    # ref_logits: f32[B, T, V]; basis_logits: f32[K, B, T, V]; aux["psi"]: [B, T, F]; aux["cache"]
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectral_soup.models import layers
from spectral_soup.models.config import TransformerConfig
from spectral_soup.models.transformer import Cache, Transformer, init_cache
from spectral_soup.utils import reductions

Array = jax.Array
BASIS_KINDS = ("heads", "lora")
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


class SpectralFeatureMap(nn.Module):
  """psi(s) from the shared backbone.

  Attributes:
    config: the backbone's architecture.
    feature_dim: if set, psi = h(s) P with a learned P: [embed, feature_dim] (a low-rank projection).
    freeze_backbone: stop gradients into the backbone (and into the reference logits). Not with `lora`: the
      adapters' gradients flow through the backbone's activations, so there the trainer freezes the backbone by
      keeping its parameters out of the optimizer.
  """
  config: TransformerConfig
  feature_dim: Optional[int] = None
  freeze_backbone: bool = True

  @nn.compact
  def __call__(self, tokens: Array, *, mask: Optional[Array] = None, cache: Optional[Cache] = None,
               lora: Optional[Mapping[str, Any]] = None, return_logits: bool = True):
    """tokens: int[B, T] -> (psi: [B, T, F], ref_logits: f32[B, T, V] or None, aux)."""
    logits, aux = Transformer(self.config, name="backbone")(tokens, mask=mask, cache=cache, lora=lora,
                                                            return_logits=return_logits)
    hidden = aux["hidden"]
    if self.freeze_backbone and lora is None:
      hidden = jax.lax.stop_gradient(hidden)
      logits = None if logits is None else jax.lax.stop_gradient(logits)
    psi = hidden
    if self.feature_dim is not None:
      psi = layers.Projection((self.config.embed_dim,), (self.feature_dim,), ("embed",), ("features",),
                              dtype=self.config.dtype, weight_dtype=self.config.weight_dtype,
                              kernel_init=nn.initializers.normal(self.config.embed_dim**-0.5),
                              name="projection")(hidden)
    psi = layers.constrain(psi, ("batch", "length", "features"))
    return psi, logits, aux


def _fan_in_normal(key, shape, dtype):
  return jax.random.normal(key, shape, dtype) * shape[-2]**-0.5


class BasisHeads(nn.Module):
  """K basis policies as low-rank logit corrections on psi, stacked on a leading `basis` axis.

  Parameters {"a": [K, F, r], "b": [K, r, V]} (none at r = 0); logits_k = ref_logits + (psi A_k) B_k. B starts at
  zero, so every basis starts as the reference policy. Called with ref_logits=None it returns the corrections alone.

  With `logit_bias`, each basis also has a context-free logit vector {"c": [K, V]} (zero at init):
  logits_k = ref_logits + (psi A_k) B_k + c_k. Rank 0 with a bias gives the simplest basis, pi_k ~ pi_ref exp(c_k),
  whose implicit reward counts each response token's log-ratio against what the reference expected there; on small
  preference data it generalizes where the context term overfits (the README's embedded-basis table).
  """
  num_bases: int
  rank: int
  vocab_size: int
  dtype: Any = jnp.float32
  weight_dtype: Any = jnp.float32
  logit_bias: bool = False

  @nn.compact
  def __call__(self, psi: Array, ref_logits: Optional[Array]) -> Array:
    """psi: [B, T, F], ref_logits: [B, T, V] -> basis_logits: f32[K, B, T, V]."""
    features = psi.shape[-1]
    heads = {}
    if self.rank:  # Rank 0 (a bias-only basis) has no factors at all: zero-size arrays do not checkpoint.
      heads["a"] = layers.param_with_axes(self, "a", _fan_in_normal, (self.num_bases, features, self.rank),
                                          ("basis", "features", "head_rank"), self.weight_dtype)
      heads["b"] = layers.param_with_axes(self, "b", nn.initializers.zeros,
                                          (self.num_bases, self.rank, self.vocab_size), ("basis", "head_rank", "vocab"),
                                          self.weight_dtype)
    if self.logit_bias:
      heads["c"] = layers.param_with_axes(self, "c", nn.initializers.zeros, (self.num_bases, self.vocab_size),
                                          ("basis", "vocab"), self.weight_dtype)
    delta = head_delta_logits(heads, psi, self.dtype)
    if ref_logits is None:
      return delta
    return layers.constrain(ref_logits.astype(jnp.float32)[None] + delta, ("basis", "batch", "length", "vocab"))


def head_delta_logits(heads: Mapping[str, Array], psi: Array, dtype: Any = jnp.float32) -> Array:
  """Basis corrections psi A_k B_k (+ c_k if the heads have a logit bias).

  heads: {"a": [K, F, r], "b": [K, r, V]} and/or {"c": [K, V]}; psi: [..., F] -> f32[K, ..., V].
  """
  return _delta_from_factors(*_head_factors(heads, psi, dtype), psi.shape[:-1])


def _head_factors(heads: Mapping[str, Array], psi: Array, dtype: Any):
  """(h = psi A_k [K, ..., r], B_k [K, r, V], c_k f32[K, V]); None for the parts the heads do not have."""
  h = b = c = None
  if "a" in heads:
    h = jnp.einsum("...f,kfr->k...r", psi.astype(dtype), heads["a"].astype(dtype))
    b = heads["b"].astype(dtype)
  if "c" in heads:
    c = heads["c"].astype(jnp.float32)
  return h, b, c


def _delta_from_factors(h: Optional[Array], b: Optional[Array], c: Optional[Array], batch_shape) -> Array:
  """h B_k + c_k: f32[K, *batch_shape, V] (0.0 if neither)."""
  delta = 0.0
  if h is not None:
    delta = jnp.einsum("k...r,krv->k...v", h, b, preferred_element_type=jnp.float32)
  if c is not None:
    delta = delta + jnp.broadcast_to(c.reshape(c.shape[:1] + (1,) * len(batch_shape) + c.shape[1:]),
                                     c.shape[:1] + tuple(batch_shape) + c.shape[1:])
  return delta


def head_token_logprobs(heads: Mapping[str, Array], psi: Array, ref_logits: Array, tokens: Array,
                        dtype: Any = jnp.float32, axes: Optional[Sequence[Optional[str]]] = None) -> Array:
  """log softmax(ref_logits + head_delta_logits(heads, psi))[tokens] for every head basis, with a fused gradient.

  heads, psi: as in `head_delta_logits`; ref_logits: [..., V]; tokens: int[...] -> f32[K, ...]. `axes`: logical
  axis names of the [K, ..., V] basis logits for sharding constraints (None: none).

  The forward is `sequences.token_logprobs` of the basis logits without the mask, the same float operations, so
  the same values bit for bit. The gradient (a custom VJP) forms d/dlogits = g (onehot(token) - softmax) in one
  elementwise pass over the saved logits and feeds it to the two dots of the heads' low-rank product, where
  automatic differentiation adds the one-hot part with a scatter and, on XLA's CPU backend, transposes
  the whole [K, ..., V] cotangent for the weight gradient: a K = 8 training step of head bases
  (`experiments/benchmarks/train.py`, BENCHMARKS.md section 3) runs 1.3-1.5x faster on CPU. Gradients agree with
  automatic differentiation's up to float rounding. Being a custom VJP, it supports reverse mode (grad, vjp) and
  vmap, not forward mode (`jax.jvp` through it raises).
  """
  h, b, c = _head_factors(heads, psi, dtype)
  return _head_token_logprobs(
      tuple(axes) if axes is not None else None, ref_logits.astype(jnp.float32), h, b, c, tokens.astype(jnp.int32))


def _constrain(x: Array, axes) -> Array:
  return x if axes is None else layers.constrain(x, axes)


def _scores_and_logits(axes, ref_logits, h, b, c, tokens):
  """(log-probs [K, ...], basis logits [K, ..., V], log-normalizers [K, ...]) as `head_token_logprobs` defines them."""
  logits = _constrain(ref_logits[None] + _delta_from_factors(h, b, c, ref_logits.shape[:-1]), axes)
  out, log_norm = reductions.log_softmax_at_and_normalizer(logits, jnp.broadcast_to(tokens, logits.shape[:-1]))
  return out, logits, log_norm


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_token_logprobs(axes, ref_logits, h, b, c, tokens):
  return _scores_and_logits(axes, ref_logits, h, b, c, tokens)[0]


def _head_token_logprobs_fwd(axes, ref_logits, h, b, c, tokens):
  out, logits, log_norm = _scores_and_logits(axes, ref_logits, h, b, c, tokens)
  return out, (logits, log_norm, h, b, c, tokens)


def _head_token_logprobs_bwd(axes, residuals, g):
  logits, log_norm, h, b, c, tokens = residuals
  hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == tokens[None, ..., None]
  # d out / d logits, once: g (onehot - softmax); positions a caller masks out have g = 0.
  grad = g.astype(jnp.float32)[..., None] * (hit.astype(jnp.float32) - jnp.exp(logits - log_norm[..., None]))
  grad = _constrain(grad, axes)
  d_ref = jnp.sum(grad, axis=0)
  d_h = d_b = d_c = None
  if h is not None:
    d_h = jnp.einsum("k...v,krv->k...r", grad, b, preferred_element_type=jnp.float32).astype(h.dtype)
    d_b = jnp.einsum("k...r,k...v->krv", h, grad, preferred_element_type=jnp.float32).astype(b.dtype)
  if c is not None:
    d_c = jnp.sum(grad.reshape(grad.shape[0], -1, grad.shape[-1]), axis=1).astype(c.dtype)
  return d_ref, d_h, d_b, d_c, None


_head_token_logprobs.defvjp(_head_token_logprobs_fwd, _head_token_logprobs_bwd)


def support_delta_logits(heads: Mapping[str, Array], psi: Array, support: Array, dtype: Any = jnp.float32) -> Array:
  """`head_delta_logits` on the vocabulary columns `support` only: psi [..., F], support int[S] -> f32[K, ..., S]."""
  columns = {name: jnp.take(heads[name], support, axis=-1) for name in ("b", "c") if name in heads}
  return head_delta_logits({**heads, **columns}, psi, dtype)


def support_log_normalizer(delta_support: Array, support_probs: Array) -> Array:
  """log Z_k(s) / Z_ref(s) for heads whose corrections are zero outside a vocabulary support S.

  log( (1 - sum_{a in S} p_ref(a|s)) + sum_{a in S} p_ref(a|s) exp(delta_k(s, a)) ), computed stably.
  delta_support: [K, ..., S] corrections on the support; support_probs: [..., S] reference probabilities there.
  Returns f32[K, ...].
  """
  probs = support_probs.astype(jnp.float32)[None]
  tiny = jnp.finfo(jnp.float32).tiny
  # Reference mass outside the support: those logits do not move.
  log_tail = jnp.log(jnp.maximum(1.0 - probs.sum(-1), tiny))
  terms = jnp.log(jnp.maximum(probs, tiny)) + delta_support.astype(jnp.float32)  # log p_ref(a) + delta_k(a)
  # The largest term contributes exp(0) = 1.
  top = jax.lax.stop_gradient(jnp.maximum(reductions.max_last(terms), log_tail))
  return top + jnp.log(jnp.exp(log_tail - top) + jnp.sum(jnp.exp(terms - top[..., None]), -1))


def lora_shapes(config: TransformerConfig, targets: Sequence[str]) -> dict:
  """{name: (in, out)}: flattened input/output sizes of each LoRA target projection."""
  d, h, kv, hd, m = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim, config.mlp_dim
  sizes = {
      "q_proj": (d, h * hd),
      "k_proj": (d, kv * hd),
      "v_proj": (d, kv * hd),
      "o_proj": (h * hd, d),
      "gate_proj": (d, m),
      "up_proj": (d, m),
      "down_proj": (m, d)
  }
  for name in targets:
    if name not in sizes or (name == "gate_proj" and not config.gated_mlp):
      raise ValueError(f"Unknown LoRA target {name!r} for a {config.family} model; "
                       f"expected some of {sorted(sizes)}.")
  return {name: sizes[name] for name in targets}


class LoraBases(nn.Module):
  """K LoRA adapters per target projection and layer, stacked on leading `basis` and `layers` axes.

  Parameters {f"{name}_a": [K, L, in, r], f"{name}_b": [K, L, r, out]} (`split_lora_params` nests them);
  Delta W_k = a_k b_k (any scale folded into b).
  `a` ~ N(0, 1/in) and `b` = 0, so every basis starts as the reference policy.
  """
  config: TransformerConfig
  num_bases: int
  rank: int
  targets: Tuple[str, ...]

  @nn.compact
  def __call__(self) -> dict:
    k, num_layers, wd = self.num_bases, self.config.num_layers, self.config.weight_dtype
    out = {}
    for name, (n_in, n_out) in lora_shapes(self.config, self.targets).items():
      out[f"{name}_a"] = layers.param_with_axes(self, f"{name}_a", _fan_in_normal, (k, num_layers, n_in, self.rank),
                                                ("basis", "layers", None, "lora_rank"), wd)
      out[f"{name}_b"] = layers.param_with_axes(self, f"{name}_b", nn.initializers.zeros,
                                                (k, num_layers, self.rank, n_out),
                                                ("basis", "layers", "lora_rank", None), wd)
    return out


def split_lora_params(lora_params: Mapping[str, Array]) -> dict:
  """LoraBases params {"q_proj_a": x, "q_proj_b": y} -> {"q_proj": {"a": x, "b": y}}."""
  out: dict = {}
  for name, value in lora_params.items():
    target, part = name.rsplit("_", 1)
    out.setdefault(target, {})[part] = value
  return out


def group_targets(adapters: Mapping[str, Any]) -> dict:
  """{name: adapter} -> {"attn": {...}, "mlp": {...}}, the layout Transformer(lora=...) takes."""
  grouped: dict = {}
  for name, adapter in adapters.items():
    grouped.setdefault("attn" if name in ATTN_TARGETS else "mlp", {})[name] = adapter
  return grouped


def lora_for_scan(stacked: Mapping[str, Any], with_reference: bool = True) -> dict:
  """{name: {"a": [K, L, ...], "b": ...}} -> {"attn"|"mlp": {name: {"a": [L, K(+1), ...]}}} for the scanned layers.

  With `with_reference`, group 0 is a zero adapter (the reference policy) and group k+1 is basis k.
  """

  def one(x):
    if with_reference:
      x = jnp.concatenate([jnp.zeros_like(x[:1]), x], axis=0)
    return jnp.swapaxes(x, 0, 1)

  return group_targets({name: jax.tree.map(one, dict(adapter)) for name, adapter in stacked.items()})


class SpectralPolicy(nn.Module):
  """Reference policy + K basis policies on one shared backbone.

  Attributes:
    config: the backbone architecture.
    num_bases: K.
    basis_kind: "heads" or "lora" (see module docstring).
    head_rank: rank r of each basis head (heads); 0 with `logit_bias` leaves only the bias.
    logit_bias: each head basis also has a context-free logit vector c_k (see `BasisHeads`).
    feature_dim: optional learned projection width of psi (heads).
    lora_rank, lora_targets: adapter rank and the projections adapted (lora).
    freeze_backbone: the backbone is the frozen reference (the method's setting).
  """
  config: TransformerConfig
  num_bases: int
  basis_kind: str = "heads"
  head_rank: int = 8
  feature_dim: Optional[int] = None
  lora_rank: int = 4
  lora_targets: Tuple[str, ...] = ("q_proj", "v_proj")
  freeze_backbone: bool = True
  logit_bias: bool = False

  def setup(self):
    if self.basis_kind not in BASIS_KINDS:
      raise ValueError(f"basis_kind={self.basis_kind!r}: expected one of {BASIS_KINDS}.")
    if self.num_bases < 1:
      raise ValueError(f"num_bases={self.num_bases}: expected >= 1.")
    self.features = SpectralFeatureMap(self.config, self.feature_dim, self.freeze_backbone)
    if self.basis_kind == "heads":
      if self.head_rank < 0 or (self.head_rank == 0 and not self.logit_bias):
        raise ValueError(f"head_rank={self.head_rank}: expected >= 1, or 0 with logit_bias=True.")
      self.heads = BasisHeads(self.num_bases, self.head_rank, self.config.vocab_size, self.config.dtype,
                              self.config.weight_dtype, self.logit_bias)
    else:
      self.lora = LoraBases(self.config, self.num_bases, self.lora_rank, tuple(self.lora_targets))

  def __call__(self, tokens: Array, *, mask: Optional[Array] = None, cache: Optional[Cache] = None):
    """tokens: int[B, T]; cache from `init_policy_cache`.

    Returns (ref_logits: f32[B, T, V], basis_logits: f32[K, B, T, V], aux) with aux["psi"] ([B, T, F], heads
    only) and aux["cache"].
    """
    batch = tokens.shape[0]
    if self.basis_kind == "heads":
      psi, ref_logits, aux = self.features(tokens, mask=mask, cache=cache)
      return ref_logits, self.heads(psi, ref_logits), {"psi": psi, "cache": aux["cache"]}
    groups = self.num_bases + 1
    tiled = lambda x: None if x is None else jnp.tile(x, (groups,) + (1,) * (x.ndim - 1))
    _, logits, aux = self.features(tiled(tokens), mask=tiled(mask), cache=cache,
                                   lora=lora_for_scan(split_lora_params(self.lora())))
    logits = logits.reshape(groups, batch, *logits.shape[1:])
    return logits[0], logits[1:], {"cache": aux["cache"]}

  def hidden_states(self, tokens: Array, *, mask: Optional[Array] = None) -> dict:
    """The final hidden states instead of logits (no [T, V] logits anywhere): tokens int[B, T] ->

    {"hidden": [G, B, T, D]}: G = 1 (head bases: the backbone's states, gradient-free) or K + 1 (LoRA bases: the
    reference's, then each adapter's); head bases also give {"psi": [B, T, F]}. The logits of any position are
    `transformer.output_logits(config, backbone, hidden)` (+ the heads' correction for head bases): callers compute
    them at the positions they need, in pieces (`offline.features.pair_logprobs`).
    """
    if self.basis_kind == "heads":
      psi, _, aux = self.features(tokens, mask=mask, return_logits=False)
      return {"hidden": jax.lax.stop_gradient(aux["hidden"])[None], "psi": psi}
    groups = self.num_bases + 1
    tiled = lambda x: None if x is None else jnp.tile(x, (groups,) + (1,) * (x.ndim - 1))
    _, _, aux = self.features(tiled(tokens), mask=tiled(mask), lora=lora_for_scan(split_lora_params(self.lora())),
                              return_logits=False)
    return {"hidden": aux["hidden"].reshape(groups, tokens.shape[0], *aux["hidden"].shape[1:])}


def init_policy_cache(policy: SpectralPolicy, batch_size: int, max_len: int, dtype: Any = None) -> Cache:
  """A KV cache for `policy`: B rows for head bases, (K+1)*B rows (reference first) for LoRA bases."""
  rows = batch_size if policy.basis_kind == "heads" else (policy.num_bases + 1) * batch_size
  return init_cache(policy.config, rows, max_len, dtype)


def with_backbone(params: Mapping[str, Any], backbone_params: Mapping[str, Any]) -> dict:
  """Returns a copy of SpectralPolicy `params` whose backbone is `backbone_params` (e.g. from from_pretrained)."""
  params = dict(params)
  features = dict(params["features"])
  features["backbone"] = backbone_params
  params["features"] = features
  return params
