"""Parameter souping: merge K basis policies into one set of weights for a user (docs/METHOD.md section 4).

  theta_soup = theta_ref + sum_k lam_k (theta_k - theta_ref).

For bases that are linear heads on a shared feature map psi (logits = psi @ W) this is *identical* to explicit
souping, because log-softmax only subtracts a per-row constant and the coefficients (1 - sum lam, lam) sum to one.
Cost: one forward pass per token whatever K is.

LoRA bases merge their full updates Delta W_k = scale * a_k @ b_k, either densely (`soup_lora_dense`) or as one
exact adapter of rank K * r (`soup_lora_concat`). An adapter is a dict `{'a': [..., in, r], 'b': [..., r, out]}`;
K stacked adapters carry a leading basis axis, `a: [K, ..., in, r]`, `b: [K, ..., r, out]` (`...` may be a layers
axis L). The LoRA functions accept one adapter or any pytree (e.g. a dict name -> adapter) of adapters.

Why never average `a` and `b` separately: the product of averages is not the average of products,
  (sum_k lam_k a_k) @ (sum_l lam_l b_l) = sum_{k,l} lam_k lam_l a_k @ b_l,
which has cross terms a_k @ b_l between unrelated adapters and weights quadratic in lam (so it is not a weighted sum
of updates; P-SOUPS' uniform tensor-by-tensor average is this). A known peer bug scaled `a` by lam and summed `b`
unweighted, giving sum_k lam_k a_k @ sum_l b_l: even a one-hot lam (which must give back adapter k) returns
a_k @ (b_1 + ... + b_K). `soup_params` refuses trees that look like LoRA adapters for this reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.soup.validation import check_lam

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def _lam_shape(lam: jax.Array, ndim: int) -> jax.Array:
  """`[K]` -> `[K, 1, ..., 1]` float32 with `ndim - 1` trailing ones."""
  return jnp.asarray(lam, jnp.float32).reshape((-1,) + (1,) * (ndim - 1))


def _looks_like_lora(node: Any) -> bool:
  if not isinstance(node, Mapping) or "a" not in node or "b" not in node:
    return False
  a_shape, b_shape = np.shape(node["a"]), np.shape(node["b"])
  return len(a_shape) >= 2 and len(b_shape) >= 2 and a_shape[-1] == b_shape[-2]


def _check_same_structure(ref_params: PyTree, basis_params: PyTree) -> tuple[list[Any], list[Any], Any, int]:
  """Checks that `basis_params` is `ref_params` with a leading K axis; returns flat leaves, treedef and K."""
  ref_flat, treedef = jax.tree_util.tree_flatten_with_path(ref_params)
  basis_flat, basis_treedef = jax.tree_util.tree_flatten_with_path(basis_params)
  ref_paths = [jax.tree_util.keystr(p) for p, _ in ref_flat]
  basis_paths = [jax.tree_util.keystr(p) for p, _ in basis_flat]
  if ref_paths != basis_paths or treedef != basis_treedef:
    for i in range(max(len(ref_paths), len(basis_paths))):
      ref_path = ref_paths[i] if i < len(ref_paths) else None
      basis_path = basis_paths[i] if i < len(basis_paths) else None
      if ref_path != basis_path:
        break
    else:  # Same paths, different node types (e.g. dict vs. FrozenDict, list vs. tuple).
      raise ValueError(f"ref_params and basis_params have the same leaf paths but different container types:\n"
                       f"  ref:   {treedef}\n  basis: {basis_treedef}")
    if ref_path is None:
      raise ValueError(f"basis_params has an extra leaf at {basis_path} that ref_params lacks.")
    if basis_path is None or ref_path not in basis_paths:
      raise ValueError(f"ref_params has a leaf at {ref_path} that basis_params lacks" +
                       (f" (basis_params has {basis_path} there)." if basis_path else "."))
    raise ValueError(f"basis_params has a leaf at {basis_path} that ref_params lacks "
                     f"(ref_params has {ref_path} there).")
  if not ref_flat:
    raise ValueError("ref_params has no leaves.")
  num_bases = None
  for path, (_, ref_leaf), (_, basis_leaf) in zip(ref_paths, ref_flat, basis_flat):
    ref_shape, basis_shape = np.shape(ref_leaf), np.shape(basis_leaf)
    if num_bases is None and len(basis_shape) >= 1:
      num_bases = basis_shape[0]
    if tuple(basis_shape) != (num_bases,) + tuple(ref_shape):
      raise ValueError(f"basis_params{path} has shape {tuple(basis_shape)}; expected [K, *ref shape] = "
                       f"{(num_bases,) + tuple(ref_shape)} (ref_params{path} has shape {tuple(ref_shape)}).")
    for which, leaf in (("ref_params", ref_leaf), ("basis_params", basis_leaf)):
      if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
        raise TypeError(f"{which}{path} has dtype {jnp.result_type(leaf)}; only floating-point leaves can be souped.")
  return [x for _, x in ref_flat], [x for _, x in basis_flat], treedef, num_bases


def soup_params(ref_params: PyTree, basis_params: PyTree, lam: jax.Array, *, lora_guard: bool = True) -> PyTree:
  """theta_ref + sum_k lam_k (theta_k - theta_ref), leaf by leaf.

  Vmap over users with `jax.vmap(soup_params, in_axes=(None, None, 0))` (lam: [U, K]) to get per-user params with a
  leading U axis.

  Args:
    ref_params: pytree of reference parameters, leaves `[*s]`.
    basis_params: the same pytree with a leading basis axis on every leaf, `[K, *s]`.
    lam: `[K]` mixing weights.
    lora_guard: raise if the tree contains LoRA-like `{'a', 'b'}` nodes with a rank-matching shape pair: merging
      such factors one by one is not a weighted sum of updates (use `soup_lora_dense` / `soup_lora_concat`).
      Set False only for trees whose 'a' / 'b' leaves are not LoRA factors.

  Returns:
    A pytree shaped like `ref_params`, each leaf in its original dtype (computed in float32).

  Raises:
    ValueError: mismatching structures (naming the first mismatching path), a leaf without the leading K axis,
      LoRA-looking nodes (see `lora_guard`) or an invalid `lam`.
    TypeError: a non-floating leaf.
  """
  if lora_guard:
    nodes = jax.tree_util.tree_flatten_with_path(ref_params, is_leaf=_looks_like_lora)[0]
    for path, node in nodes:
      if _looks_like_lora(node):
        raise ValueError(
            f"ref_params{jax.tree_util.keystr(path)} looks like a LoRA adapter ({{'a', 'b'}} with a.shape[-1] == "
            "b.shape[-2]). Souping a and b separately is not a weighted sum of the updates a @ b; use "
            "soup_lora_dense or soup_lora_concat (or pass lora_guard=False if these are not LoRA factors).")
  ref_leaves, basis_leaves, treedef, num_bases = _check_same_structure(ref_params, basis_params)
  check_lam(lam, num_bases, allow_batch=False)

  def merge(ref_leaf, basis_leaf):
    ref32 = jnp.asarray(ref_leaf, jnp.float32)
    delta = jnp.asarray(basis_leaf, jnp.float32) - ref32[None]
    merged = ref32 + jnp.sum(_lam_shape(lam, delta.ndim) * delta, axis=0)
    return merged.astype(jnp.result_type(ref_leaf))

  return jax.tree_util.tree_unflatten(treedef, [merge(r, b) for r, b in zip(ref_leaves, basis_leaves)])


# ----------------------------------------------------------------------------------------------------------------------
# LoRA.
# ----------------------------------------------------------------------------------------------------------------------


def _is_adapter(node: Any) -> bool:
  return isinstance(node, Mapping) and "a" in node and "b" in node


def _map_adapters(fn, tree: PyTree) -> PyTree:
  """Applies `fn(path_str, adapter)` to every `{'a', 'b'}` node of `tree` (which may itself be an adapter)."""

  def apply(path, node):
    if not _is_adapter(node):
      raise ValueError(f"Expected LoRA adapters {{'a': ..., 'b': ...}}, found a bare leaf at "
                       f"{jax.tree_util.keystr(path) or '<root>'}.")
    return fn(jax.tree_util.keystr(path) or "<root>", node)

  return jax.tree_util.tree_map_with_path(apply, tree, is_leaf=_is_adapter)


def _check_adapter(path: str, a: jax.Array, b: jax.Array, *, stacked: bool) -> None:
  a_shape, b_shape = np.shape(a), np.shape(b)
  min_ndim = 3 if stacked else 2
  want = "a: [K, ..., in, r], b: [K, ..., r, out]" if stacked else "a: [..., in, r], b: [..., r, out]"
  if len(a_shape) < min_ndim or len(a_shape) != len(b_shape):
    raise ValueError(f"adapter {path}: expected {want}, got a {tuple(a_shape)} and b {tuple(b_shape)}.")
  if a_shape[-1] != b_shape[-2] or a_shape[:-2] != b_shape[:-2]:
    raise ValueError(f"adapter {path}: a {tuple(a_shape)} and b {tuple(b_shape)} do not fit {want} "
                     "(rank or leading axes differ).")


def _check_scale(scale: Any) -> None:
  if not isinstance(scale, jax.core.Tracer) and (np.ndim(scale) != 0 or not np.isfinite(scale)):
    raise ValueError(f"scale must be a finite number (the adapters' alpha / r), got {scale!r}.")


def lora_delta(adapter: PyTree, scale: float, *, dtype: Optional[Any] = None) -> PyTree:
  """Full update Delta W = scale * a @ b of one adapter or of every adapter in a pytree.

  Args:
    adapter: `{'a': [..., in, r], 'b': [..., r, out]}`, or a pytree of such dicts.
    scale: the adapter's scale (e.g. PEFT's alpha / r).
    dtype: output dtype; default the promoted dtype of a and b. Computed in float32 at HIGHEST matmul precision.

  Returns:
    `[..., in, out]` per adapter (same pytree structure, adapters replaced by arrays).
  """

  _check_scale(scale)

  def delta(path, node):
    a, b = node["a"], node["b"]
    _check_adapter(path, a, b, stacked=False)
    out = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), precision=_HIGHEST) * scale
    return out.astype(dtype or jnp.result_type(a, b))

  return _map_adapters(delta, adapter)


def _num_bases(stacked: PyTree) -> int:
  sizes = {}

  def record(path, node):
    _check_adapter(path, node["a"], node["b"], stacked=True)
    sizes[path] = np.shape(node["a"])[0]
    return None

  _map_adapters(record, stacked)
  if not sizes:
    raise ValueError("No LoRA adapters {'a': ..., 'b': ...} found.")
  if len(set(sizes.values())) > 1:
    raise ValueError(f"Stacked adapters disagree on the number of bases K: {sizes}.")
  return next(iter(sizes.values()))


def soup_lora_concat(stacked: PyTree, lam: jax.Array) -> PyTree:
  """Exact rank-(K*r) adapter whose update is the lam-weighted sum of the K adapters' updates.

  a_cat = [a_1 | ... | a_K] along the rank axis and b_cat = [lam_1 b_1; ...; lam_K b_K] along the rank axis, so
  a_cat @ b_cat = sum_k lam_k a_k @ b_k exactly. Use it with the *same* `scale` as the original adapters: if your
  LoRA layer derives its scale as alpha / rank from the array shapes, pass the original scale explicitly (alpha / r,
  not alpha / (K*r)).

  Args:
    stacked: `{'a': [K, ..., in, r], 'b': [K, ..., r, out]}` or a pytree of such dicts (same K everywhere).
    lam: `[K]` mixing weights (vmap for per-user adapters).

  Returns:
    The same pytree of `{'a': [..., in, K*r], 'b': [..., K*r, out]}` in the input dtypes (b scaled in float32).
  """
  num_bases = _num_bases(stacked)
  check_lam(lam, num_bases, allow_batch=False)

  def concat(path, node):
    del path
    a, b = node["a"], node["b"]
    num_bases, rank = a.shape[0], a.shape[-1]
    # a: [K, ..., in, r] -> [..., in, K, r] -> [..., in, K*r]; index k*r + j holds a[k, ..., j].
    a_cat = jnp.moveaxis(jnp.asarray(a), 0, -2).reshape(a.shape[1:-1] + (num_bases * rank,))
    # b: [K, ..., r, out] scaled by lam_k -> [..., K, r, out] -> [..., K*r, out].
    b_scaled = (_lam_shape(lam, b.ndim) * jnp.asarray(b, jnp.float32)).astype(jnp.result_type(b))
    b_cat = jnp.moveaxis(b_scaled, 0, -3).reshape(b.shape[1:-2] + (num_bases * rank, b.shape[-1]))
    return {**node, "a": a_cat, "b": b_cat}

  return _map_adapters(concat, stacked)


def soup_lora_dense(stacked: PyTree, lam: jax.Array, scale: float, *, dtype: Optional[Any] = None) -> PyTree:
  """Dense merged update scale * sum_k lam_k a_k @ b_k of every stacked adapter.

  Computed as one matmul over the concatenated rank axis (`soup_lora_concat`), in float32 at HIGHEST precision.

  Args:
    stacked: `{'a': [K, ..., in, r], 'b': [K, ..., r, out]}` or a pytree of such dicts.
    lam: `[K]` mixing weights.
    scale: the adapters' scale.
    dtype: output dtype; default the promoted dtype of a and b.

  Returns:
    `[..., in, out]` per adapter (adapters replaced by arrays).
  """
  num_bases = _num_bases(stacked)
  check_lam(lam, num_bases, allow_batch=False)
  _check_scale(scale)

  def dense(path, node):
    del path
    a, b = node["a"], node["b"]
    a32 = jnp.asarray(a, jnp.float32)
    b32 = _lam_shape(lam, b.ndim) * jnp.asarray(b, jnp.float32)
    # Contract over (k, r) at once: sum_k a_k @ (lam_k b_k).
    out = jnp.einsum("k...ir,k...ro->...io", a32, b32, precision=_HIGHEST) * scale
    return out.astype(dtype or jnp.result_type(a, b))

  return _map_adapters(dense, stacked)
