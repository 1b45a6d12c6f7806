"""SpectralFeatureMap / BasisHeads / LoRA bases: shapes, logical axes, identities, cache consistency."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_soup.models import layers, sequences
from spectral_soup.models.spectral import (SpectralPolicy, group_targets, head_delta_logits, head_token_logprobs,
                                           init_policy_cache, lora_shapes, split_lora_params, with_backbone)
from spectral_soup.models.transformer import Transformer
from tests import tiny

KINDS = ("heads", "lora")


def _tokens(batch=2, length=7, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, tiny.VOCAB)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_bases_equal_reference(kind):
  cfg = tiny.tiny_config()
  policy = SpectralPolicy(cfg, num_bases=3, basis_kind=kind, head_rank=4, lora_rank=2)
  params = nn.meta.unbox(jax.jit(policy.init)(jax.random.key(0), _tokens()))["params"]
  ref, basis, _ = jax.jit(policy.apply)({"params": params}, _tokens())
  chex.assert_shape(ref, (2, 7, tiny.VOCAB))
  chex.assert_shape(basis, (3, 2, 7, tiny.VOCAB))
  # B factors start at zero: every basis is the reference, and the reference is the plain backbone.
  np.testing.assert_allclose(basis, jnp.broadcast_to(ref, basis.shape), atol=1e-5)
  logits, _ = jax.jit(Transformer(cfg).apply)({"params": params["features"]["backbone"]}, _tokens())
  np.testing.assert_allclose(ref, logits, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_has_logical_axes(kind):
  cfg = tiny.tiny_config("gemma3")
  policy = SpectralPolicy(cfg, num_bases=2, basis_kind=kind, feature_dim=8 if kind == "heads" else None)
  boxed = jax.eval_shape(policy.init, jax.random.key(0), _tokens())["params"]
  specs = nn.get_partition_spec(boxed)
  shapes = nn.meta.unbox(boxed)
  for (path, spec), shape in zip(jax.tree_util.tree_leaves_with_path(specs), jax.tree.leaves(shapes)):
    assert len(spec) == len(shape.shape), (jax.tree_util.keystr(path), spec, shape.shape)
  flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(specs)}
  q_kernel = flat["['features']['backbone']['layers']['attn']['q_proj']['kernel']"]
  assert tuple(q_kernel) == ("layers", "embed", "heads", "kv")
  if kind == "heads":
    assert tuple(flat["['heads']['b']"]) == ("basis", "head_rank", "vocab")
  else:
    assert tuple(flat["['lora']['q_proj_a']"])[:2] == ("basis", "layers")


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_matches_full_forward(kind):
  policy, params = tiny.tiny_policy(kind)
  apply = jax.jit(lambda p, t, c: policy.apply({"params": p}, t, cache=c))
  tokens = _tokens(length=9)
  ref, basis, _ = apply(params, tokens, None)
  cache = init_policy_cache(policy, 2, 12)
  r1, b1, aux = apply(params, tokens[:, :5], cache)
  refs, bases = [r1], [b1]
  cache = aux["cache"]
  for t in range(5, 9):
    r, b, aux = apply(params, tokens[:, t:t + 1], cache)
    cache = aux["cache"]
    refs.append(r)
    bases.append(b)
  # Two float32 computations of the same logits (their dots accumulate in different orders): the rounding
  # differences grow with the logits' scale (about 20 here), so the tolerance is relative to it. A wrong cache
  # moves logits by O(1).
  atol = 1e-4 * float(jnp.abs(basis).max())
  np.testing.assert_allclose(jnp.concatenate(refs, 1), ref, rtol=1e-4, atol=atol)
  np.testing.assert_allclose(jnp.concatenate(bases, 2), basis, rtol=1e-4, atol=atol)


def test_lora_bases_equal_separate_adapters():
  """The (K+1)*B-row grouped batch equals K separate forward passes with one adapter each."""
  policy, params = tiny.tiny_policy("lora")
  tokens = _tokens()
  _, basis, _ = jax.jit(policy.apply)({"params": params}, tokens)
  model_apply = jax.jit(lambda p, t, lora: Transformer(policy.config).apply({"params": p}, t, lora=lora))
  stacked = split_lora_params(params["lora"])
  for k in range(policy.num_bases):
    adapter = group_targets({n: {"a": ad["a"][k], "b": ad["b"][k]} for n, ad in stacked.items()})
    logits, _ = model_apply(params["features"]["backbone"], tokens, adapter)
    np.testing.assert_allclose(basis[k], logits, rtol=1e-5, atol=1e-4 * float(jnp.abs(logits).max()))


def test_heads_are_low_rank_corrections_on_psi():
  policy, params = tiny.tiny_policy("heads")
  tokens = _tokens()
  ref, basis, aux = jax.jit(policy.apply)({"params": params}, tokens)
  psi = aux["psi"]
  for k in range(policy.num_bases):
    expected = ref + psi @ params["heads"]["a"][k] @ params["heads"]["b"][k]
    np.testing.assert_allclose(basis[k], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rank", [4, 0])
def test_heads_with_logit_bias(rank):
  """logits_k = ref + psi A_k B_k + c_k; rank 0 leaves the bias alone; c starts at zero and is ("basis", "vocab")."""
  policy, params = tiny.tiny_policy("heads", logit_bias=True)
  if rank == 0:  # No factors at all (zero-size arrays would not checkpoint).
    policy = policy.clone(head_rank=0)
    params = {**params, "heads": {"c": params["heads"]["c"]}}
  tokens = _tokens()
  ref, basis, aux = jax.jit(policy.apply)({"params": params}, tokens)
  assert float(jnp.abs(params["heads"]["c"]).max()) > 0
  for k in range(policy.num_bases):
    expected = ref + psi_term(aux["psi"], params["heads"], k) + params["heads"]["c"][k]
    np.testing.assert_allclose(basis[k], expected, rtol=1e-5, atol=1e-4)
  boxed = jax.eval_shape(policy.init, jax.random.key(0), tokens)["params"]
  assert tuple(nn.get_partition_spec(boxed)["heads"]["c"]) == ("basis", "vocab")
  fresh = nn.meta.unbox(jax.jit(policy.init)(jax.random.key(0), tokens))["params"]
  assert fresh["heads"]["c"].shape == (policy.num_bases, tiny.VOCAB) and not np.any(fresh["heads"]["c"])
  assert set(fresh["heads"]) == ({"c"} if rank == 0 else {"a", "b", "c"})
  with pytest.raises(ValueError, match="head_rank=0"):
    policy.clone(logit_bias=False, head_rank=0).init(jax.random.key(0), tokens)


def psi_term(psi, heads, k):
  return psi @ heads["a"][k] @ heads["b"][k] if "a" in heads else 0.0


@pytest.mark.parametrize("parts", ["ab", "abc", "c"])
def test_head_token_logprobs_matches_autodiff(parts):
  """The fused custom VJP: the same values bit for bit as log_softmax(ref + delta)[token], and the same gradients
  (heads, psi and the reference logits) as automatic differentiation of that formula, up to float rounding."""
  k, b, t, f, r, v = 3, 2, 5, 6, 4, 40
  keys = jax.random.split(jax.random.key(0), 6)
  heads = {
      "a": jax.random.normal(keys[0], (k, f, r)),
      "b": jax.random.normal(keys[1], (k, r, v)),
      "c": jax.random.normal(keys[2], (k, v))
  }
  heads = {name: value for name, value in heads.items() if name in parts}
  psi = jax.random.normal(keys[3], (b, t, f))
  ref = 3.0 * jax.random.normal(keys[4], (b, t, v))
  tokens = jax.random.randint(keys[5], (b, t), 0, v)
  mask = jnp.arange(t)[None, :] < jnp.array([[t], [t - 2]])  # Padding positions get no gradient.
  weights = jnp.linspace(0.5, 1.5, k)[:, None]

  def autodiff(heads, psi, ref):
    logits = ref[None] + head_delta_logits(heads, psi)
    return jax.vmap(lambda x: sequences.token_logprobs(x, tokens, mask))(logits)

  def fused(heads, psi, ref):
    return jnp.where(mask[None], head_token_logprobs(heads, psi, ref, tokens), 0.0)

  expected, got = jax.jit(autodiff)(heads, psi, ref), jax.jit(fused)(heads, psi, ref)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  loss = lambda fn: (lambda *args: jnp.sum(weights * fn(*args).sum(-1)**2))
  argnums = (0, 1, 2) if "a" in parts else (0, 2)
  want = jax.jit(jax.grad(loss(autodiff), argnums))(heads, psi, ref)
  have = jax.jit(jax.grad(loss(fused), argnums))(heads, psi, ref)
  for w, h in zip(jax.tree.leaves(want), jax.tree.leaves(have)):
    assert float(jnp.abs(w).max()) > 0
    np.testing.assert_allclose(np.asarray(h), np.asarray(w), rtol=2e-5, atol=2e-5 * float(jnp.abs(w).max()))
  # bf16 heads (the compute dtype of a bf16 policy): gradients in the parameters' dtype, close to the f32 ones.
  grads16 = jax.jit(
      jax.grad(lambda h: jnp.sum(weights * jnp.where(mask[None], head_token_logprobs(h, psi, ref, tokens, jnp.bfloat16),
                                                     0.0).sum(-1))))(heads)
  grads32 = jax.jit(jax.grad(lambda h: jnp.sum(weights * fused(h, psi, ref).sum(-1))))(heads)
  for name in heads:
    assert grads16[name].dtype == heads[name].dtype
    np.testing.assert_allclose(grads16[name], grads32[name], rtol=0.05, atol=0.05 * float(jnp.abs(grads32[name]).max()))


def test_frozen_backbone_gets_no_gradient():
  policy, params = tiny.tiny_policy("heads")
  tokens = _tokens()
  loss = lambda p: policy.apply({"params": p}, tokens)[1].mean()
  grads = jax.jit(jax.grad(loss))(params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["features"]["backbone"]))
  assert float(jnp.abs(grads["heads"]["b"]).max()) > 0.0


def test_with_backbone_swaps_only_the_backbone():
  policy, params = tiny.tiny_policy("heads")
  new_bb = jax.tree.map(jnp.zeros_like, params["features"]["backbone"])
  swapped = with_backbone(params, new_bb)
  assert swapped["heads"] is params["heads"]
  assert float(jnp.abs(jax.tree.leaves(swapped["features"]["backbone"])[0]).max()) == 0.0


def test_lora_update_row_scale_is_a_weighted_sum():
  """Concatenated adapters with a per-row scale equal sum_k lam_k a_k b_k for each row."""
  k, n_in, r, n_out, rows = 3, 5, 2, 4, 4
  keys = jax.random.split(jax.random.key(0), 4)
  a = jax.random.normal(keys[0], (k, n_in, r))
  b = jax.random.normal(keys[1], (k, r, n_out))
  lam = jax.random.normal(keys[2], (rows, k))
  x = jax.random.normal(keys[3], (rows, 3, n_in))
  adapter = {
      "a": jnp.transpose(a, (1, 0, 2)).reshape(n_in, k * r),
      "b": b.reshape(k * r, n_out),
      "row_scale": jnp.repeat(lam, r, axis=-1)
  }
  got = layers.lora_update(x, adapter, 1, (n_out,))
  delta = jnp.einsum("uk,kio->uio", lam, jnp.einsum("kir,kro->kio", a, b))
  np.testing.assert_allclose(got, jnp.einsum("uti,uio->uto", x, delta), rtol=1e-5, atol=1e-5)


def test_unknown_lora_target_is_named():
  with pytest.raises(ValueError, match="gate_projection"):
    lora_shapes(tiny.tiny_config(), ("gate_projection",))


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="num_kv_heads"):
    tiny.tiny_config(num_kv_heads=3)
  with pytest.raises(ValueError, match="layer_is_local"):
    tiny.tiny_config("gemma3", layer_is_local=(True, False))
