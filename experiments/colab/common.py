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
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from spectral_soup import basis as basis_lib
from spectral_soup import models
from spectral_soup.models import build
from spectral_soup.offline import pairs as pairs_lib


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
  model = models.Transformer(build.model_config(config))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, build.random_backbone(build.unboxed(shapes), model.config, config.seed), None


def quick_basis_config(tiny: bool, num_prompts: int = 96, num_steps: int = 150) -> ml_collections.ConfigDict:
  """A basis that trains in minutes on a CPU: `configs/train_basis_embedded.py` (SmolLM2, one head per attribute)
  on `num_prompts` generated pairs for `num_steps` updates, or with `tiny` `configs/train_basis_tiny.py` (a 2-layer
  random LM, synthetic marker-token pairs, 100 updates: seconds; `num_prompts` and `num_steps` do not apply)."""
  from configs import train_basis_embedded  # pylint: disable=g-import-not-at-top
  from configs import train_basis_tiny  # pylint: disable=g-import-not-at-top
  if tiny:
    config = train_basis_tiny.get_config()
    config.update_from_flattened_dict({
        "train.num_steps": 100,
        "data.num_train_pairs": 512,
        "data.num_eval_pairs": 64,
        "optim.warmup_steps": 10
    })
  else:
    config = train_basis_embedded.get_config()
    config.update_from_flattened_dict({
        "data.num_prompts": num_prompts,  # Pairs to generate (about a quarter are held out).
        "data.max_new_tokens": 32,
        "data.response_len": 33,  # Shorter responses: a faster feature pass.
        "train.num_steps": num_steps,
        "train.batch_size": 16,
        "optim.warmup_steps": min(10, num_steps),  # The warm-up fits in the shortest runs too.
        "train.feature_batch_size": 16
    })
  config.update_from_flattened_dict({"train.tensorboard": False, "checkpoint.every_steps": 0})
  return config


def embedded_data(config: ml_collections.ConfigDict, tokenizer: Any) -> Tuple[list, dict]:
  """(pairs, arrays) of `config.data`'s embedded preference data (generated on first use, then cached), tokenized
  as the trainer tokenizes it (`offline.pairs.embedded_data`): arrays["prompt"] are the chat-formatted prompts,
  arrays["scores_a"] the raw scores."""
  data = pairs_lib.embedded_data(config, tokenizer)
  return data.pairs, data.arrays


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the basis in `workdir` was trained with."""
  return basis_lib.run_config(workdir)


def restore_basis(workdir: str, model: Any, backbone: Any, tiny: Optional[bool] = None) -> Basis:
  """The newest checkpoint's head bases in `workdir` (`spectral_soup.basis.restore_bases`), on `backbone` (from
  `load_backbone(run_config)`). `tiny`: the notebook's TINY switch, checked against the basis (`check_basis`)."""
  trainable, names, config, step = basis_lib.restore_bases(workdir)
  if config.basis.kind != "heads":
    raise ValueError(f"{basis_lib.basis_dir(workdir)} holds {config.basis.kind} bases; the notebooks serve head "
                     "bases.")
  if tiny is not None:
    check_basis(config, tiny, workdir)
  policy = build.build_policy(model.config, config.basis)
  params = build.merge_params(trainable, build.unboxed(backbone))
  return Basis(policy=policy, params=params, attributes=names, config=config, step=step)


def check_basis(config: ml_collections.ConfigDict, tiny: bool, workdir: str = "BASIS_WORKDIR") -> None:
  """ValueError unless the basis `config` trained is one the notebook's `TINY` branch serves: TINY a random
  backbone with synthetic marker pairs, otherwise a checkpoint backbone on the embedded data (whose attribute
  rewards score the responses). The wrong branch failed deep inside a later cell (a None tokenizer, a missing
  `data.num_prompts`) or, TINY on a SmolLM2 basis, fed synthetic token ids to SmolLM2 as prompts."""
  random_backbone = not config.model.get("path")
  if tiny and not random_backbone:
    raise ValueError(f"{workdir} holds a basis on the backbone {config.model.path!r}; TINY = True serves a basis of "
                     "configs/train_basis_tiny.py (a random backbone): set TINY = False.")
  if not tiny and random_backbone:
    raise ValueError(f"{workdir} holds a basis on a random backbone (configs/train_basis_tiny.py): set TINY = True.")
  if not tiny and config.data.get("source") != "embedded":
    raise ValueError(f"{workdir} holds a basis trained on data.source={config.data.get('source')!r}; the notebook "
                     "scores responses with the embedded data's attribute rewards: serve this basis with "
                     "spectral_soup.load_basis (or python -m spectral_soup.generate) instead.")


def user_lams(users: Any, attributes: Tuple[str, ...]) -> Any:
  """[U, K] weights of users given as {name: {attribute: weight}} over the basis's `attributes` (0 for an attribute
  a user leaves out). A name the basis does not have is refused: it was read as 0, and that user silently became
  the reference."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  for name, weights in users.items():
    unknown = sorted(set(weights) - set(attributes))
    if unknown:
      raise ValueError(f"user {name!r} names {unknown}, which this basis does not have (its attributes: "
                       f"{', '.join(attributes)}).")
  return np.array([[weights.get(a, 0.0) for a in attributes] for weights in users.values()], np.float32)
