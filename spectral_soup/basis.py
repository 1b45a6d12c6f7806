"""A trained basis as a researcher uses it: load it from a workdir, serve users' soups as text, read features.

    import spectral_soup as ss
    basis = ss.load_basis("workdir/demo")       # a basis-training run's workdir, or the main job's
    texts = basis.generate(["How do I sleep better?"], lam=[[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]])  # two users
    f = basis.features(prompts, responses)      # [N, K]: beta * (log pi_k(y|x) - log pi_ref(y|x))
    lam = ss.fit_lambda(f_a - f_b, prefs, l2=1.0, constraint="box", box=(0.0, 10.0))

`load_basis` reads the run's config, loads the backbone it was trained on (its checkpoint, or the seeded random
backbone of a config without one: nothing is initialized only to be thrown away) and the newest checkpoint of the
bases onto this process's first device. A main job's workdir holds the K attribute bases followed by one bespoke
head per held-out user; only the K bases are kept. The math of the soups: docs/METHOD.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spectral_soup.utils import errors
from spectral_soup.utils import files

Prompts = Union[str, Sequence[str]]


def basis_dir(workdir: str) -> str:
  """The directory holding `checkpoints/` and `config.json` of a basis training: `workdir` or `workdir/basis`."""
  for candidate in (workdir, os.path.join(workdir, "basis")):
    if os.path.isdir(os.path.join(candidate, "checkpoints")) and os.path.isfile(os.path.join(candidate, "config.json")):
      return candidate
  raise FileNotFoundError(f"no trained basis in {workdir}: expected checkpoints/ and config.json there or in "
                          f"{os.path.join(workdir, 'basis')} (a basis-training run or the main job's workdir).")


# Fields of a run's config.json that reading its basis needs (`model.*` shape fields only for a random backbone).
_RUN_FIELDS = ("seed", "model.path", "model.dtype", "model.weight_dtype", "basis.kind", "basis.num_bases",
               "basis.head_rank", "basis.feature_dim", "basis.lora_rank", "basis.lora_targets", "loss.beta", "data")
_RANDOM_BACKBONE_FIELDS = tuple(f"model.{name}" for name in ("family", "vocab_size", "num_layers", "embed_dim",
                                                             "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                                                             "max_len", "remat"))


def _field(tree: Any, name: str) -> Any:
  for part in name.split("."):
    if not isinstance(tree, (dict, ml_collections.ConfigDict)) or part not in tree:
      raise KeyError(name)
    tree = tree[part]
  return tree


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the basis in `workdir` was trained with. Raises ValueError naming `config.json` and the first
  field that reading the basis needs and the file lacks."""
  path = os.path.join(basis_dir(workdir), "config.json")
  raw = files.read_json_object(path, "the training run's config")
  fields = _RUN_FIELDS + (
      () if not isinstance(raw.get("model"), dict) or raw["model"].get("path") else _RANDOM_BACKBONE_FIELDS)
  for name in fields:
    try:
      _field(raw, name)
    except KeyError:
      raise ValueError(f"{path} has no field {name!r}: expected the config that the training run wrote there "
                       "(was the file edited or replaced?).") from None
  for name in fields:  # Of the wrong type, they failed later as bare TypeErrors naming neither file nor field.
    value, expected = _field(raw, name), _RUN_FIELD_TYPES.get(name.split(".")[-1])
    if expected is not None and not expected[1](value):
      raise ValueError(f"{path}: {name}={value!r}: expected {expected[0]} (the config that the training run wrote "
                       "there; was the file edited?).")
  return ml_collections.ConfigDict(raw)


_is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)


def _is_float_dtype(value: Any) -> bool:
  try:
    return isinstance(value, str) and jnp.issubdtype(jnp.dtype(value), jnp.floating)
  except TypeError:
    return False


# The types of the fields that `run_config` reads (by the field's last name).
_RUN_FIELD_TYPES = {
    **{
        name: ("an integer >= 0", lambda v: _is_int(v) and v >= 0) for name in ("head_rank", "feature_dim", "lora_rank")
    },
    **{
        name: ("an integer >= 1", lambda v: _is_int(v) and v >= 1) for name in ("num_bases", "vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "max_len")
    },
    "dtype": ("a float dtype name ('float32', 'bfloat16', ...)", _is_float_dtype),
    "weight_dtype": ("a float dtype name ('float32', 'bfloat16', ...)", _is_float_dtype),
    "kind": ("'heads' or 'lora'", lambda v: v in ("heads", "lora")),
}


def basis_names(workdir: str, config: ml_collections.ConfigDict) -> Tuple[str, ...]:
  """What each basis prefers, K names: `basis.json`'s attributes and weightings (builder sources), the data's
  attribute columns (embedded data), or the synthetic data's markers (basis k prefers marker token k + 1)."""
  meta_path = os.path.join(basis_dir(workdir), "basis.json")
  if os.path.isfile(meta_path):
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      attributes, weightings = list(meta["attributes"]), [np.asarray(w, np.float64) for w in meta["weightings"]]
      if any(w.shape != (len(attributes),) for w in weightings):
        raise ValueError(f"each weighting must have one weight per attribute ({len(attributes)})")
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{meta_path} is not a readable basis description (JSON with 'attributes' and "
                       f"'weightings', written by the training run): {type(e).__name__}: {e}") from None
    names = []
    for weights in weightings:
      if np.count_nonzero(weights) == 1:
        names.append(attributes[int(np.flatnonzero(weights)[0])])
      else:
        names.append(" + ".join(f"{w:.2f} {a}" for w, a in zip(weights, attributes) if w))
    return tuple(names)
  if "attributes" in config.data:
    return tuple(config.data.attributes)
  return tuple(f"marker {k + 1}" for k in range(config.basis.num_bases))


def load_backbone(config: ml_collections.ConfigDict) -> Tuple[Any, Any, Optional[Any]]:
  """(model, backbone params, tokenizer) of `config.model`: its checkpoint, or the seeded random backbone that
  `offline.train.train_and_evaluate` draws when `config.model.path` is empty (tokenizer: `config.data.tokenizer`
  if set, else None)."""
  from spectral_soup import models  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import build  # pylint: disable=g-import-not-at-top
  tokenizer_path = config.data.get("tokenizer", "") or config.model.path
  # A backbone or tokenizer that does not load is the user's input (one `error:` line from the CLIs); a relative
  # path (recorded by an older run) is named as such: it resolves against this process's directory.
  relative = [
      f"{field}={path!r}" for field, path in (("model.path", config.model.path), ("data.tokenizer",
                                                                                  config.data.get("tokenizer", "")))
      if path and ":" not in path and not os.path.isabs(path)
  ]
  try:
    with errors.input_stage():
      tokenizer = models.tokenizer_from_pretrained(tokenizer_path) if tokenizer_path else None
      if config.model.path:
        model, backbone = models.from_pretrained(config.model.path, dtype=config.model.dtype,
                                                 weight_dtype=config.model.weight_dtype)
  except errors.InputError as e:
    if not relative:
      raise
    raise errors.InputError(f"{e} ({', '.join(relative)} in the run's config is relative: it was "
                            f"resolved against the current directory {os.getcwd()})") from e
  if config.model.path:
    return model, build.unboxed(backbone), tokenizer
  model = models.Transformer(build.model_config(config))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, build.random_backbone(build.unboxed(shapes), model.config, config.seed), tokenizer


@dataclasses.dataclass
class Basis:
  """K trained bases on one backbone, ready to serve.

  Attributes:
    policy: the `SpectralPolicy` (K bases).
    params: its parameters, a plain dict: {"features": {"backbone": ...}, "heads" or "lora": ...}.
    tokenizer: the backbone's tokenizer (None for a random backbone without one: use token ids and
      `soup.serving.generate` then).
    names: K names, what each basis prefers.
    config: the config that trained them (`basis.num_bases` = K).
    step: the checkpoint's training step.
    directory: the run directory whose `checkpoints/` it was read from (`load_basis`), or None.
  """
  policy: Any
  params: Any
  tokenizer: Optional[Any]
  names: Tuple[str, ...]
  config: ml_collections.ConfigDict
  step: int
  directory: Optional[str] = None

  @property
  def num_bases(self) -> int:
    return self.policy.num_bases

  @property
  def beta(self) -> float:
    """The KL strength the bases were trained at: features are beta * log-ratios."""
    return float(self.config.loss.beta)

  def _need_tokenizer(self, what: str):
    if self.tokenizer is None:
      raise ValueError(f"Basis.{what} needs a tokenizer, and this basis's backbone has none (config.model.path is "
                       "empty: a random backbone). Serve token ids with spectral_soup.soup.serving.generate.")
    return self.tokenizer

  def encode_prompts(self, prompts: Sequence[str], *, chat_template: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Prompts -> (tokens int32[N, P], mask bool[N, P]), left-padded to the longest; each prompt one user turn of
    the tokenizer's chat template (if it has one and `chat_template`)."""
    from spectral_soup.offline import sources  # pylint: disable=g-import-not-at-top
    from spectral_soup.soup import decoding  # pylint: disable=g-import-not-at-top
    tokenizer = self._need_tokenizer("encode_prompts")
    prompts = _texts("prompts", prompts)
    if not isinstance(chat_template, (bool, np.bool_)):
      raise ValueError(f"chat_template={chat_template!r}: expected True or False.")
    encoded = sources.encode_prompts(tokenizer, prompts, chat_template)
    for i, ids in enumerate(encoded):
      if not ids:
        raise ValueError(f"prompts[{i}] encodes to no tokens: expected a non-empty prompt.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return decoding.pad_prompts(encoded, len(encoded), max(len(ids) for ids in encoded), pad)

  def generate(self, prompts: Prompts, lam: Any, *, mode: str = "explicit", max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, max_proposals: int = 32,
               chat_template: bool = True,
               return_ended: bool = False) -> Union[List[str], Tuple[List[str], List[bool]]]:
    """Responses of U users' soups, as text, in one compiled decoding loop.

    Args:
      prompts: one prompt (every user answers it) or U prompts (one per user row).
      lam: [K] (one soup for every prompt) or [U, K] (user u's weights; row u answers prompts[u], or the single
        prompt). lam = 0 is the reference; a one-hot lam is one basis.
      mode: "explicit" (logit-space soup), "params" (parameter soup), "implicit" (rejection sampling from the
        reference: exact samples of the explicit soup at `temperature` > 0, without top_k / top_p) or "naive" (K +
        1 separate passes per token; the slow reference).
      max_new_tokens: response length cap; a response ends earlier at the tokenizer's end-of-sequence token.
      temperature, top_k, top_p: 0 is greedy; see `soup.decoding.SamplingConfig`.
      seed: the sampling stream. Row u draws from stream (seed, u): the same rows in the same positions give the
        same text, while a row's sample changes with its position in the batch (and, in implicit mode, with the
        number of rows), not with the other rows' content.
      max_proposals: implicit mode's proposals per token before falling back to the explicit soup.
      chat_template: wrap each prompt as a user turn of the tokenizer's chat template. The text is then tokenized
        with the tokenizer's special tokens recognized, as transformers' `apply_chat_template(tokenize=True)` does: a
        prompt holding a control token's text (SmolLM2's "<|im_end|>") gets that token, and can close its own turn.
        Strip such strings from untrusted text first.
      return_ended: also return, per row, whether its response ended with the end-of-sequence token (False: cut at
        `max_new_tokens`), for `features(..., ended=)`.

    Returns:
      U response texts (special tokens removed, leading and trailing whitespace stripped); with `return_ended`,
      (texts, ended).
    """
    from spectral_soup.soup import decoding  # pylint: disable=g-import-not-at-top
    from spectral_soup.soup import serving  # pylint: disable=g-import-not-at-top
    from spectral_soup.soup import validation  # pylint: disable=g-import-not-at-top
    tokenizer = self._need_tokenizer("generate")
    prompts = [prompts] if isinstance(prompts, str) else _texts("prompts", prompts)
    if not isinstance(return_ended, (bool, np.bool_)):
      raise ValueError(f"return_ended={return_ended!r}: expected True or False.")
    lam = _lam_rows(lam, self.num_bases, len(prompts), self.names)
    if len(prompts) == 1:
      prompts = prompts * lam.shape[0]
    sampling = decoding.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    validation.check_seed("seed", seed)
    tokens, mask = self.encode_prompts(prompts, chat_template=chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out, aux = serving.generate(self.policy, self.params, lam, tokens, mask, mode=mode, max_new_tokens=max_new_tokens,
                                sampling=sampling, key=jax.random.key(seed), eos_id=tokenizer.eos_token_id, pad_id=pad,
                                max_proposals=max_proposals)
    out, lengths = np.asarray(out), np.asarray(aux["lengths"])
    texts = [tokenizer.decode(out[u, :lengths[u]].tolist(), skip_special_tokens=True).strip() for u in range(len(out))]
    if return_ended:
      return texts, [bool(done) for done in np.asarray(aux["done"])]
    return texts

  def features(self, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 16,
               max_response_tokens: Optional[int] = None, chat_template: bool = True,
               ended: Union[bool, Sequence[bool]] = True) -> np.ndarray:
    """The bases' implicit rewards of N (prompt, response) pairs: f32[N, K], f_k = beta * (log pi_k(y|x) -
    log pi_ref(y|x)), the features `fit_lambda` consumes (as differences f(x, y_a) - f(x, y_b)).

    A response that ended is scored with the end-of-sequence token appended, as the bases were trained on finished
    responses; `ended` says which did: True (every response: text datasets hold finished responses), False, or
    one bool per response (`generate(..., return_ended=True)` gives them: a response cut at `max_new_tokens` has
    no end-of-sequence term, as in the embedded data's pairs and the decoded responses' features). Each response
    is then cut to `max_response_tokens` tokens if given. Pairs are scored `batch_size` at a time (one compile).

    Texts are tokenized here: the features of `generate`'s texts are those of their re-tokenization, which can
    differ from the sampled tokens (`generate` strips whitespace and special tokens, and a text has its canonical
    tokenization, not necessarily the sampled one), and special-token strings inside a text are read as special
    tokens. For the exact features of sampled token ids, score them with `soup.serving.sequence_logprobs` and
    `serving.implicit_rewards` (as the main job does).
    """
    from spectral_soup.soup import serving  # pylint: disable=g-import-not-at-top
    tokenizer = self._need_tokenizer("features")
    prompts, responses = _texts("prompts", prompts), _texts("responses", responses, allow_empty=True)
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses: expected one response per prompt.")
    from spectral_soup.soup import validation  # pylint: disable=g-import-not-at-top
    batch_size = min(validation.check_int("batch_size", batch_size, 1), len(prompts))  # No batch wider than N.
    if max_response_tokens is not None:
      max_response_tokens = validation.check_int("max_response_tokens", max_response_tokens, 0)
    prompt, prompt_mask = self.encode_prompts(prompts, chat_template=chat_template)
    ended = _ended_flags(ended, len(responses))
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids = [
        list(r) + (eos if done else [])
        for r, done in zip(tokenizer(list(responses), add_special_tokens=False)["input_ids"], ended)
    ]
    if max_response_tokens is not None:
      ids = [r[:max_response_tokens] for r in ids]
    width = max(1, max(len(r) for r in ids))
    validation.check_length(prompt.shape[1] + width, self.policy.config.max_len,
                            f"the longest prompt ({prompt.shape[1]} tokens) + the longest response ({width} tokens)",
                            "pass max_response_tokens= to cut the responses, or shorten the prompts")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    response = np.full((len(ids), width), pad, np.int32)
    response_mask = np.zeros((len(ids), width), bool)
    for i, r in enumerate(ids):
      response[i, :len(r)], response_mask[i, :len(r)] = r, True
    out = []
    for lo in range(0, len(ids), batch_size):
      rows = np.arange(lo, lo + batch_size) % len(ids)  # The last batch wraps around (one shape, one compile).
      logp = serving.sequence_logprobs(self.policy, self.params, prompt[rows], prompt_mask[rows], response[rows],
                                       response_mask[rows])
      out.append(np.asarray(serving.implicit_rewards(logp, self.beta))[:min(batch_size, len(ids) - lo)])
    return np.concatenate(out).astype(np.float32)


def load_basis(workdir: str) -> Basis:
  """The newest readable checkpoint of the bases trained in `workdir` (head or LoRA bases), on their backbone.

  `workdir` is a basis-training run's (`experiments.train_basis`) or the main job's (`experiments.main`, whose
  `basis/` holds the K attribute bases followed by one bespoke head per user: only the K bases are kept). The arrays
  are read onto this process's first device, whatever mesh wrote them. A newest step that cannot be read (a run
  killed while writing it, damaged files) is skipped with a warning, as training does, but left in place.
  """
  from spectral_soup.models import build  # pylint: disable=g-import-not-at-top
  if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
    raise ValueError(f"load_basis: workdir={workdir!r}: expected the path of a training run's (or the main job's) "
                     "workdir.")
  workdir = os.path.expanduser(os.fspath(workdir))
  with errors.input_stage():  # No step, no readable step, a config.json that no longer fits: the user's files.
    trainable, names, config, step = restore_bases(workdir)
  model, backbone, tokenizer = load_backbone(config)
  policy = build.build_policy(model.config, config.basis)
  want = jax.eval_shape(lambda: build.init_trainable(policy, jax.random.key(0)))
  shapes = lambda tree: {
      jax.tree_util.keystr(path): tuple(np.shape(x)) for path, x in jax.tree_util.tree_leaves_with_path(tree)
  }
  got, want = shapes(trainable), shapes(want)
  if got != want:
    name = next(n for n in sorted(set(got) | set(want)) if got.get(n) != want.get(n))
    raise errors.InputError(f"checkpoint step {step} in {basis_dir(workdir)} does not fit the bases its config.json "
                            f"describes on this backbone: {name} has shape {got.get(name, 'none')} in the checkpoint, "
                            f"{want.get(name, 'none')} for the config (was config.json or the backbone at "
                            f"model.path={config.model.path!r} changed after training?).")
  params = build.merge_params(trainable, backbone)
  return Basis(policy=policy, params=params, tokenizer=tokenizer, names=names, config=config, step=step,
               directory=os.path.abspath(basis_dir(workdir)))


def restore_bases(workdir: str) -> Tuple[Any, Tuple[str, ...], ml_collections.ConfigDict, int]:
  """(trainable params of the K bases, their names, the training config with basis.num_bases = K, step): the newest
  readable checkpoint in `workdir`, without the backbone (see `load_basis`).

  Raises ValueError if config.json disagrees with what the checkpoint was written with (`offline.resume`'s fields:
  K, the basis kind and ranks, the backbone) or if no step can be read; an unreadable newer step is skipped with a
  warning naming it (nothing on disk is changed: a reader must not move a live run's files).
  """
  from spectral_soup.offline import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import resume  # pylint: disable=g-import-not-at-top
  directory = basis_dir(workdir)
  config = run_config(workdir)
  names = basis_names(workdir, config)
  num_bases = len(names)
  if num_bases > config.basis.num_bases:
    raise ValueError(f"{directory}: {num_bases} basis names for basis.num_bases={config.basis.num_bases}.")
  checkpoints = os.path.join(directory, "checkpoints")
  state, step = None, None
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  # A live training retires its oldest steps as it saves (checkpoint.max_to_keep): a step listed here can be gone
  # when it is read. Such steps are not failures; the steps are listed again (a few times) to find the newer ones.
  for _ in range(_LIVE_RUN_RELISTS):
    checkpointer = checkpoint_lib.Checkpointer(checkpoints, remove_partial_steps=False)
    failures, retired = [], False
    try:
      steps = sorted(checkpointer.all_steps(), reverse=True)
      if not steps:
        raise FileNotFoundError(f"no checkpoint step in {checkpoints} (did the training run finish a step?).")
      for step in steps:
        try:
          data = checkpointer.read_data(step)
        except Exception as e:  # pylint: disable=broad-except  (any read failure: an unusable step)
          retired |= not os.path.isdir(os.path.join(checkpoints, str(step)))
          failures.append((step, e))
          continue
        _check_saved_fields(directory, config, step, data, _describing_fields(config, resume.resume_fields(config)))
        try:
          abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                  checkpointer.manager.item_metadata(step)["state"])
          state, _ = checkpointer.restore(step, abstract)
        except Exception as e:  # pylint: disable=broad-except
          retired |= not os.path.isdir(os.path.join(checkpoints, str(step)))
          failures.append((step, e))
          continue
        break
    finally:
      checkpointer.close()
    if state is not None or not retired:
      break
  if state is None:
    raise ValueError(f"no readable checkpoint step in {checkpoints}: " +
                     "; ".join(f"step {s}: {type(e).__name__}: {errors.summary(e, 200)}" for s, e in failures) +
                     (" (a live training retired the steps listed as they were read: try again)" if retired else ""))
  failures = [(s, e) for s, e in failures if os.path.isdir(os.path.join(checkpoints, str(s)))]
  for bad, error in failures:
    logging.warning("Checkpoint step %d in %s/checkpoints is corrupt or incomplete (%s: %s); loading step %d.", bad,
                    directory,
                    type(error).__name__, errors.summary(error), step)
  trainable = jax.device_get(state["params"])
  if num_bases < config.basis.num_bases:  # The main job's bespoke heads follow the K bases: keep the bases.
    if config.basis.kind != "heads" or os.path.realpath(directory) == os.path.realpath(workdir):
      # Only the main job's basis/ holds heads beyond its named bases; in a basis training's own workdir, dropping
      # the unnamed ones silently served fewer bases than it trained (basis.json edited or from another run).
      parent = os.path.dirname(os.path.realpath(directory))
      if (config.basis.kind == "heads" and os.path.basename(os.path.realpath(directory)) == "basis" and
          os.path.isfile(os.path.join(parent, "config.json"))):
        raise ValueError(f"{directory}: {config.basis.num_bases} heads bases for the {num_bases} attributes "
                         f"({', '.join(names)}): this is the main job's basis/ folder, whose heads after the bases are "
                         f"its users' bespoke heads; load the main job's workdir instead: load_basis({parent!r}).")
      raise ValueError(f"{directory}: {config.basis.num_bases} {config.basis.kind} bases for {num_bases} names "
                       f"({', '.join(names)}) in its basis.json: expected one name per basis (was basis.json "
                       "edited or replaced?).")
    trainable["heads"] = {name: np.asarray(value)[:num_bases] for name, value in trainable["heads"].items()}
    config.basis.num_bases = num_bases
  return trainable, names, config, int(step)


# How many times `restore_bases` lists the steps of a live training whose listed steps were retired as it read them.
_LIVE_RUN_RELISTS = 5


def _describing_fields(config: ml_collections.ConfigDict, fields: dict) -> dict:
  """The checkpoint's resume fields that say what its arrays are: not the data order (`train.batch_size`), not where
  the backbone's checkpoint lies (`model.path`: a moved checkpoint is fine; the arrays' shapes are checked once it
  loads), not the training data (`data.*`: the bases' names come from basis.json; a moved data file is fine),
  and the seed only where it draws the random backbone."""
  skip = {"train.batch_size", "model.path"} | ({"seed"} if config.model.path else set())
  return {name: value for name, value in fields.items() if name not in skip and not name.startswith("data.")}


def _check_saved_fields(directory: str, config: ml_collections.ConfigDict, step: int, saved: dict,
                        fields: dict) -> None:
  """Raises ValueError naming the first field whose value in config.json differs from the one checkpoint `step`
  was written with (fields an older checkpoint did not record are not compared)."""
  for name, value in fields.items():
    if name in saved and saved[name] != value:
      raise ValueError(f"{directory}/config.json says {name}={value!r}, but checkpoint step {step} was written with "
                       f"{saved[name]!r}: config.json no longer describes these bases (was it edited or replaced "
                       "after training?).")


def _texts(name: str, texts: Any, allow_empty: bool = False) -> List[str]:
  if isinstance(texts, (bytes, bytearray)):
    raise ValueError(f"{name} is {type(texts).__name__}: expected a string or a list of strings (decode the bytes "
                     "first, e.g. .decode('utf-8')).")
  if isinstance(texts, str) or not isinstance(texts, Sequence):
    raise ValueError(f"{name} must be a list of strings, got {type(texts).__name__}.")
  texts = list(texts)
  if not texts:
    raise ValueError(f"{name} is empty: expected at least one string.")
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"{name}[{i}] is a {type(text).__name__}: expected a string.")
    if not allow_empty and not text.strip():
      raise ValueError(f"{name}[{i}] is empty: expected text.")
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise ValueError(f"{name}[{i}] is not valid text: {e.reason} at character {e.start} (a lone surrogate "
                       f"{text[e.start]!r}?).") from None
  return texts


def _ended_flags(ended: Any, num: int) -> List[bool]:
  """`features`' ended: a bool for every response, or one bool per response -> [num] bools."""
  if isinstance(ended, (bool, np.bool_)):
    return [bool(ended)] * num
  if isinstance(ended, (str, bytes)) or not isinstance(ended, (Sequence, np.ndarray)):
    raise ValueError(f"ended is {type(ended).__name__}: expected True, False or one bool per response.")
  ended = list(ended)
  if len(ended) != num:
    raise ValueError(f"ended has {len(ended)} entries for {num} responses: expected one per response.")
  for i, done in enumerate(ended):
    if not isinstance(done, (bool, np.bool_)):
      raise ValueError(f"ended[{i}] is {done!r}: expected True or False.")
  return [bool(done) for done in ended]


def _lam_rows(lam: Any, num_bases: int, num_prompts: int, names: Sequence[str], *,
              one_user: bool = False) -> np.ndarray:
  """lam [K] or [U, K] -> f32[U, K] for `num_prompts` prompts (1: shared by every user row); `one_user`: [K] only
  (`export_hf`)."""
  shapes = f"[K={num_bases}]" if one_user else f"[K={num_bases}] or [U, {num_bases}]"
  try:
    given = np.asarray(lam)
    lam = np.asarray(lam, np.float64)  # Checked in float64 (1e39 is finite there), served in float32.
  except (TypeError, ValueError):
    raise ValueError(f"lam must be numbers of shape {shapes}, got {lam!r}.") from None
  # Strings ("0.5") and bools would be converted silently; ml_dtypes floats (bfloat16: kind "V") are numbers, as
  # `serving.generate` takes them.
  if given.dtype.kind not in "iuf" and not (given.dtype.kind == "V" and jnp.issubdtype(given.dtype, jnp.floating)):
    raise ValueError(f"lam must be numbers of shape {shapes}, got {given.dtype} values {given.ravel()[:4].tolist()}.")
  if lam.ndim not in ((1,) if one_user else (1, 2)) or lam.shape[-1] != num_bases:
    raise ValueError(f"lam has shape {lam.shape}: expected {shapes}, one weight per basis ({', '.join(names)}).")
  if lam.ndim == 2 and lam.shape[0] == 0:
    raise ValueError(f"lam has shape {lam.shape}: expected at least one user row of {num_bases} weights.")
  if not np.all(np.isfinite(lam)):
    index = tuple(int(i) for i in np.argwhere(~np.isfinite(lam))[0])
    raise ValueError(f"lam[{', '.join(map(str, index))}] is {lam[index]}: expected finite weights.")
  if lam.ndim == 1:
    lam = np.broadcast_to(lam, (num_prompts, num_bases))
  if num_prompts != 1 and lam.shape[0] != num_prompts:
    raise ValueError(f"lam has {lam.shape[0]} user rows for {num_prompts} prompts: expected one prompt, or one per "
                     "row.")
  from spectral_soup.soup import validation  # pylint: disable=g-import-not-at-top
  validation.check_weight_range(lam)
  return np.ascontiguousarray(lam, dtype=np.float32)
