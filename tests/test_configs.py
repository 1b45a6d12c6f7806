"""Every config in configs/ (and its variants) validates for the devices it is sized for, and its model, bases and
optimizer state build and shard on that mesh: shapes from `jax.eval_shape` only, nothing is allocated."""

from __future__ import annotations

import glob
import importlib
import inspect
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from launch import tpu
from spectral_soup.models import build
from spectral_soup.offline import mesh as mesh_lib
from spectral_soup.offline import steps
from spectral_soup.offline import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not p.endswith("__init__.py"))
DEFAULT_DEVICES = 8  # Configs without a TPU slice: the fake CPU devices of the tests (conftest.py).
# Step temporaries per byte of one micro-batch's f32 logits [rows, P + R, V / model] (CPU compiles of the LoRA step
# measured 3.1-3.4x); a config's declared slice must hold that in each device's memory.
LOGITS_TEMPORARY_FACTOR = 3.5


def _variants():
  for path in CONFIG_FILES:
    module = importlib.import_module(path[:-3].replace("/", "."))
    yield path, module, ""
    if inspect.signature(module.get_config).parameters:
      yield path, module, "local"


VARIANTS = list(_variants())
IDS = [f"{path}:{arg}" if arg else path for path, _, arg in VARIANTS]


def _num_devices(config) -> int:
  accelerator = config.get("launch", {}).get("accelerator_type", "")
  if accelerator:
    return tpu.slice_of(accelerator).devices
  return config.mesh.num_devices if config.mesh.num_devices != -1 else DEFAULT_DEVICES


def _boxed_leaves(tree):
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_box)
          if is_box(leaf)]


def test_every_config_file_is_covered():
  assert {
      "configs/ultrafeedback_gemma3_1b.py", "configs/ultrafeedback_gemma3_4b.py", "configs/helpsteer2.py",
      "configs/psoups.py", "configs/train_basis_tiny.py", "configs/demo.py"
  } <= set(CONFIG_FILES)


@pytest.mark.parametrize("path, module, arg", VARIANTS, ids=IDS)
def test_config_validates_and_shards(path, module, arg):
  config = module.get_config(arg) if arg else module.get_config()
  if "generate" in config:  # A main-job config (experiments.main).
    from experiments import main  # pylint: disable=g-import-not-at-top
    main.validate_config(config)
    return

  devices = _num_devices(config)
  config_checks.validate_config(config, num_devices=devices)
  if config.model.path:  # The architecture comes from the checkpoint: nothing more to check without it.
    return

  # ---- Shapes: the policy, its trainable part (the K bases) and the optimizer state, abstractly.
  policy = build.build_policy(build.model_config(config), config.basis)
  abstract = jax.eval_shape(policy.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  trainable, backbone = build.split_params(abstract)
  opt_state = jax.eval_shape(steps.make_optimizer(config)[0].init, trainable)
  k = config.basis.num_bases
  with_basis = [(name, leaf) for name, leaf in _boxed_leaves(trainable) if "basis" in leaf.names]
  assert with_basis, f"{path}: no trainable parameter has a basis axis"
  for name, leaf in with_basis:
    assert leaf.names[0] == "basis" and leaf.value.shape[0] == k, (name, leaf.names, leaf.value.shape)
  if config.basis.kind == "lora":
    assert len(with_basis) == len(_boxed_leaves(trainable)) == 2 * len(config.basis.lora_targets)
  num_params = sum(math.prod(leaf.value.shape) for _, leaf in _boxed_leaves(backbone))
  assert num_params == build.model_config(config).num_params()

  # ---- Sharding: every mesh axis that a logical axis maps to divides that dimension (params and Adam state).
  used = config.mesh.num_devices if config.mesh.num_devices != -1 else devices
  sizes = dict(
      zip(mesh_lib.MESH_AXES, mesh_lib.resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.model, used)))
  for tree_name, tree in (("trainable", trainable), ("backbone", backbone), ("opt_state", opt_state)):
    for name, leaf in _boxed_leaves(tree):
      spec = nn.logical_to_mesh_axes(leaf.names, mesh_lib.LOGICAL_RULES)
      for dim, axes in zip(leaf.value.shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        split = math.prod(sizes[a] for a in axes)
        assert dim % split == 0, f"{path}: {tree_name}{name} {leaf.names}={leaf.value.shape}: {axes} splits {split}"

  # ---- The declared TPU slice: the docstring's launch command names it, and one micro-batch's logits fit.
  accelerator = config.get("launch", {}).get("accelerator_type", "")
  if accelerator:
    assert re.search(rf"--config={re.escape(path)}\b", module.__doc__), f"{path}: launch command names another file"
    assert re.search(rf"--accelerator-type={re.escape(accelerator)}\b", module.__doc__), path
    pairs_per_shard = config.train.batch_size // config.train.grad_accum_steps // (sizes["data"] * sizes["fsdp"])
    rows = (k + 1) * 2 * pairs_per_shard
    length = config.data.prompt_len + config.data.response_len
    logits_gib = 4 * rows * length * config.model.vocab_size / sizes["model"] / 2**30
    hbm = tpu.slice_of(accelerator).hbm_gib
    assert LOGITS_TEMPORARY_FACTOR * logits_gib < hbm, f"{path}: ~{logits_gib:.1f} GiB of logits per device"
