"""What the Colab notebooks of this folder share: a basis config that trains in minutes, the backbone it sits on
(SmolLM2, or the tiny config's seeded random LM), the embedded preference data, and trained heads read back from a
workdir.

A workdir is a basis-training run's (`experiments.train_basis`, or `train.train_and_evaluate` called from a
notebook: `<workdir>/checkpoints`, `<workdir>/config.json`) or the main job's (`experiments.main`:
`<workdir>/basis/...`, whose heads are the K attribute bases followed by one bespoke head per held-out user; only the
K bases are kept).

    config = common.quick_basis_config(tiny=False)            # or common.run_config(workdir)
    model, backbone, tokenizer = common.load_backbone(config)
    train.train_and_evaluate(config, workdir, loaded=(model, backbone))
    basis = common.restore_basis(workdir, model, backbone)   # policy, params, attributes, config, step
    tokens, aux = serving.generate(basis.policy, basis.params, lam, prompt, prompt_mask, mode="explicit")
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spectral_soup import models
from spectral_soup.offline import checkpoint as checkpoint_lib
from spectral_soup.offline import features
from spectral_soup.offline import train


@dataclasses.dataclass
class Basis:
  """K trained basis heads on a backbone, ready for `soup.serving`."""
  policy: Any  # SpectralPolicy with K heads.
  params: Any  # Its parameters: the backbone and the K heads.
  attributes: Tuple[str, ...]  # What each basis prefers (the data's label columns).
  config: ml_collections.ConfigDict  # The config that trained them (basis.num_bases = K).
  step: int  # The checkpoint's training step.


def load_backbone(config: ml_collections.ConfigDict) -> Tuple[Any, Any, Optional[Any]]:
  """(model, backbone params, tokenizer) of `config.model`: its checkpoint, or the seeded random backbone that
  `train.train_and_evaluate` draws when `config.model.path` is empty (tokenizer None)."""
  if config.model.path:
    model, backbone = models.from_pretrained(config.model.path, dtype=config.model.dtype,
                                             weight_dtype=config.model.weight_dtype)
    return model, backbone, models.tokenizer_from_pretrained(config.model.path)
  model = models.Transformer(train.model_config(config))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, train.random_backbone(train.unboxed(shapes), model.config, config.seed), None


def quick_basis_config(tiny: bool, num_prompts: int = 96, num_steps: int = 150) -> ml_collections.ConfigDict:
  """A basis that trains in minutes on a CPU: `configs/train_basis_embedded.py` (SmolLM2, one head per attribute)
  on `num_prompts` generated pairs for `num_steps` updates, or with `tiny` `configs/train_basis_tiny.py` (a 2-layer
  random LM, synthetic marker-token pairs, 100 updates: seconds; `num_prompts` and `num_steps` do not apply)."""
  from configs import train_basis_embedded  # pylint: disable=g-import-not-at-top
  from configs import train_basis_tiny  # pylint: disable=g-import-not-at-top
  if tiny:
    config = train_basis_tiny.get_config()
    config.update_from_flattened_dict({
        "train.num_steps": 100, "data.num_train_pairs": 512, "data.num_eval_pairs": 64, "optim.warmup_steps": 10})
  else:
    config = train_basis_embedded.get_config()
    config.update_from_flattened_dict({
        "data.num_prompts": num_prompts,  # Pairs to generate (about a quarter are held out).
        "data.max_new_tokens": 32, "data.response_len": 33,  # Shorter responses: a faster feature pass.
        "train.num_steps": num_steps, "train.batch_size": 16, "optim.warmup_steps": 10,
        "train.feature_batch_size": 16})
  config.update_from_flattened_dict({"train.tensorboard": False, "checkpoint.every_steps": 0})
  return config


def embedded_data(config: ml_collections.ConfigDict, tokenizer: Any) -> Tuple[list, dict]:
  """(pairs, arrays) of `config.data`'s embedded preference data (generated on first use, then cached), tokenized
  as `train` tokenizes it: arrays["prompt"] are the chat-formatted prompts, arrays["scores_a"] the raw scores."""
  from spectral_soup.data import embedded  # pylint: disable=g-import-not-at-top
  d = config.data
  pairs, _ = embedded.load_pairs(embedded.generate_for_config(config))
  arrays = embedded.tokenize_pairs(pairs, tokenizer, prompt_len=d.prompt_len, response_len=d.response_len,
                                   tie_margin=d.tie_margin)
  return pairs, arrays


def attribute_names(config: ml_collections.ConfigDict) -> Tuple[str, ...]:
  """The data's label columns (the synthetic data's basis k prefers marker token k + 1)."""
  if "attributes" in config.data:
    return tuple(config.data.attributes)
  return tuple(f"marker {k + 1}" for k in range(config.basis.num_bases))


def basis_dir(workdir: str) -> str:
  """The directory holding `checkpoints/` and `config.json` of the basis training inside `workdir`."""
  for candidate in (workdir, os.path.join(workdir, "basis")):
    if os.path.isdir(os.path.join(candidate, "checkpoints")) and os.path.isfile(os.path.join(candidate,
                                                                                             "config.json")):
      return candidate
  raise FileNotFoundError(f"no trained basis in {workdir}: expected checkpoints/ and config.json there or in "
                          f"{os.path.join(workdir, 'basis')} (a basis-training run or the main job's workdir).")


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the basis in `workdir` was trained with."""
  with open(os.path.join(basis_dir(workdir), "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_basis(workdir: str, model: Any, backbone: Any) -> Basis:
  """The newest checkpoint's trainable parameters in `workdir`, on `backbone` (from `load_backbone(run_config)`).

  The arrays are read onto this process's first device, whatever mesh wrote them.
  """
  directory = basis_dir(workdir)
  config = run_config(workdir)
  attributes = attribute_names(config)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(directory, "checkpoints"), remove_partial_steps=False)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint step in {directory}/checkpoints.")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            checkpointer.manager.item_metadata(step)["state"])
    state, _ = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  trainable = jax.device_get(state["params"])
  num_bases = len(attributes)
  if config.basis.kind != "heads":
    raise ValueError(f"{directory} holds {config.basis.kind} bases; the notebooks serve head bases.")
  # The main job trains the K attribute bases and then one bespoke head per user: keep the bases.
  trainable["heads"] = {name: np.asarray(value)[:num_bases] for name, value in trainable["heads"].items()}
  config.basis.num_bases = num_bases
  policy = train.build_policy(model.config, config.basis)
  params = features.merge_params(trainable, train.unboxed(backbone))
  return Basis(policy=policy, params=params, attributes=attributes, config=config, step=int(step))
