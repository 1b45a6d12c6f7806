"""The device mesh and the one table of logical-to-mesh sharding rules (MaxText style).

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism whose parameters and optimizer state are
sharded too: ZeRO-3 style), `model` (tensor parallelism over heads, MLP width and vocabulary). Every parameter and
key activation of the models carries logical axis names (`spectral_soup.models.layers`); `LOGICAL_RULES` maps them
to mesh axes. A rule's mesh axis is used at most once per array: the first matching rule wins, later ones leave
the dimension unsharded (e.g. activations `[batch, length, embed]` shard batch over data x fsdp, so embed stays
whole, while the parameter `embedding [vocab, embed]` shards embed over fsdp).

    mesh = make_mesh(data=-1, fsdp=1, model=2)           # -1: whatever is left of jax.devices()
    shardings = logical_shardings(nn.get_partition_spec(abstract_params), mesh)
    with use_mesh(mesh):                                  # activates the mesh and the rules for tracing
      ...
    batch = shard_batch(host_batch, mesh)                 # this host's rows -> one global array per field
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # Mesh axes that split a batch.

# Logical axis -> mesh axis (or axes, or None: replicated). Order is priority.
LOGICAL_RULES: Tuple[Tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),  # Examples: data parallel over data x fsdp.
    ("length", None),  # Sequence positions: never split (no sequence parallelism).
    ("embed", "fsdp"),  # Residual width: FSDP-shards every [.., embed, ..] weight.
    ("heads", "model"),  # Query heads: tensor parallel attention.
    ("kv_heads", "model"),  # Key/value heads (a model axis larger than kv_heads needs padding: avoid it).
    ("kv", None),  # Width of one head.
    ("mlp", "model"),  # MLP hidden width: tensor parallel MLP.
    ("vocab", "model"),  # Vocabulary: embedding rows, logits and basis-head outputs.
    ("layers", None),  # The scanned layer stack.
    ("basis", None),  # The K bases: replicated (K is small; their vocab axis is split instead).
    ("features", "fsdp"),  # Width F of psi in the basis heads' A: [K, F, r].
    ("head_rank", None),  # Rank r of the basis heads.
    ("lora_rank", None),  # Rank of the LoRA adapters.
)


def resolve_mesh_shape(data: int, fsdp: int, model: int, num_devices: int,
                       field_prefix: str = "mesh") -> Tuple[int, int, int]:
  """Fills in the one -1 axis so that data * fsdp * model == num_devices.

  Raises ValueError naming the offending field (`{field_prefix}.data` etc.) when the sizes cannot tile the
  devices.
  """
  sizes = {"data": data, "fsdp": fsdp, "model": model}
  for name, size in sizes.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"config.{field_prefix}.{name}={size!r} is invalid: expected a positive integer or -1.")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"config.{field_prefix}.{free[1]}=-1 is invalid: at most one mesh axis may be -1 "
                     f"(also {free[0]}).")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if num_devices % fixed:
    named = [n for n, s in sizes.items() if s not in (-1, 1)]
    worst = next((n for n in named if num_devices % sizes[n]), named[-1])
    raise ValueError(f"config.{field_prefix}.{worst}={sizes[worst]} is invalid: the mesh "
                     f"{data} x {fsdp} x {model} (data x fsdp x model) does not divide the {num_devices} devices.")
  if free:
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    largest = max((n for n in sizes), key=lambda n: sizes[n])
    raise ValueError(f"config.{field_prefix}.{largest}={sizes[largest]} is invalid: the mesh "
                     f"{data} x {fsdp} x {model} uses {fixed} of the {num_devices} devices; set one axis to -1 "
                     f"or set {field_prefix}.num_devices.")
  return sizes["data"], sizes["fsdp"], sizes["model"]


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1, *, num_devices: int = -1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp, model) mesh over `devices` (default: all of `jax.devices()`, every host's).

  num_devices: use only the first N devices (-1: all); a subset is only possible in a single-process job.
  Axis types are Auto (jax 0.10's `jax.make_mesh` defaults to Explicit axes, which Flax modules do not support).
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices != -1:
    if not 0 < num_devices <= len(devices):
      raise ValueError(f"config.mesh.num_devices={num_devices} is invalid: expected -1 or 1..{len(devices)}.")
    if num_devices < len(devices) and jax.process_count() > 1:
      raise ValueError(f"config.mesh.num_devices={num_devices} is invalid: a multi-host job uses every device.")
    devices = devices[:num_devices]
  shape = resolve_mesh_shape(data, fsdp, model, len(devices))
  try:  # Topology-aware device order (TPU ICI rings); falls back to plain order elsewhere.
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(mesh_config: Mapping[str, Any]) -> Mesh:
  """make_mesh from a config block with fields data, fsdp, model, num_devices."""
  return make_mesh(mesh_config["data"], mesh_config["fsdp"], mesh_config["model"],
                   num_devices=mesh_config.get("num_devices", -1))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[Tuple[str, Any]] = LOGICAL_RULES) -> Iterator[Mesh]:
  """Activates `mesh` and the logical rules, so models' logical constraints take effect while tracing."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    yield mesh


def logical_shardings(logical_specs: Any, mesh: Mesh, rules: Sequence[Tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """A tree of logical PartitionSpecs (e.g. from `nn.get_partition_spec`) -> the same tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, tuple(rules))


def abstract_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[Tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """Shardings of a `jax.eval_shape` output whose leaves are boxed with logical names (unboxed leaves: replicated).

  Raises ValueError naming the mesh axis (`config.mesh.<axis>`), the array and its logical axis when an axis does
  not divide a dimension it would split (a model axis of 2 over one KV head, an odd vocabulary, a feature width):
  before anything is placed, instead of an IndivisibleError from inside jit.
  """
  logical = nn.get_partition_spec(abstract_boxed)
  shardings = logical_shardings(logical, mesh, rules)
  leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract_boxed))
  specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  names = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), sharding, name in zip(leaves, specs, names):
    for dim, (size, axes) in enumerate(zip(getattr(leaf, "shape", ()), sharding.spec)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        what = name[dim] if isinstance(name, P) and dim < len(name) else None
        fields = " x ".join(f"config.mesh.{a}={mesh.shape[a]}" for a in axes)
        raise ValueError(f"{fields} is invalid: it would split dimension {dim} of {jax.tree_util.keystr(path)} "
                         f"(shape {tuple(leaf.shape)}, logical axis {what!r}) of size {size} into {ways} parts; "
                         f"expected a mesh axis that divides every {what!r} size (or 1).")
  return shardings


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec(ndim: int, batch_dim: int = 0) -> P:
  """PartitionSpec splitting dimension `batch_dim` of an ndim-array over the batch axes."""
  return P(*([None] * batch_dim + [BATCH_AXES] + [None] * (ndim - batch_dim - 1)))


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(ndim, batch_dim))


def num_batch_shards(mesh: Mesh) -> int:
  """How many ways a batch is split (data x fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, batch_dim: int = 0) -> dict:
  """This host's rows of a batch -> global arrays split over the batch axes along `batch_dim`.

  Every host passes its own consecutive share (`process_index`-th of `process_count`) of the global batch.
  """
  out = {}
  for name, value in local_batch.items():
    value = np.asarray(value)
    global_shape = list(value.shape)
    global_shape[batch_dim] *= jax.process_count()
    out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim, batch_dim), value,
                                                       tuple(global_shape))
  return out
