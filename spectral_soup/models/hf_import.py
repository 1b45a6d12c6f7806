"""Import Hugging Face (transformers) checkpoints and GGUF files into `Transformer` parameters.

Supported families: GPT-2 (`gpt2`), Llama (`llama`, and `mistral`, which is Llama with a sliding window on every
layer) and Gemma 3 (`gemma3_text`, and the text half of the multimodal `gemma3`).

    model, params = from_pretrained("/path/to/hf_dir")       # config.json + *.safetensors (sharded or not)
    model, params = from_pretrained("/path/to/model.gguf")   # through spectral_soup.models.gguf_import
    logits, aux = model.apply({"params": params}, tokens)

The conversion is one table per family, `_table(config)`, mapping each of our parameter paths to an HF tensor name
(relative to the checkpoint's prefix, `{i}` = layer index), the HF shape it must have, and a small transform to our
layout (transpose a `[out, in]` Linear, split heads, slice GPT-2's fused `c_attn`). Per-layer tensors are stacked
on a leading `layers` axis (the stack is an `nn.scan`). Nothing is ever unpickled: checkpoints must be safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  Registers bfloat16 with numpy, so safetensors can return bf16 numpy arrays.
import numpy as np

from spectral_soup.utils import errors
from spectral_soup.utils import files as _files
from spectral_soup.utils import malloc as _malloc
from spectral_soup.models.config import TransformerConfig
from spectral_soup.models.hf_config import config_from_hf  # Re-exported.
from spectral_soup.models.transformer import Transformer

logger = logging.getLogger(__name__)

# Prefixes under which a checkpoint may store the base model (tried in order; "" = bare base model).
_BODY_PREFIXES = ("", "model.", "transformer.", "model.language_model.", "language_model.model.", "language_model.")
_LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# ---------------------------------------------------------------------------------------------------------------
# State dict conversion.


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One of our parameters: path (per-layer ones without the `layers` axis), HF name, HF shape, transform."""
  path: Tuple[str, ...]
  hf_name: str  # Relative to the body prefix ("{i}" = layer index); "lm_head.weight" is looked up separately.
  hf_shape: Tuple[int, ...]
  transform: Callable[[np.ndarray], np.ndarray]

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_name

  def inverse(self, w: np.ndarray) -> np.ndarray:
    """Our array -> the HF tensor (`export_table`'s entries: identity or `_linear`'s transpose)."""
    w = np.asarray(w)
    return w if self.transform is _same else w.reshape(self.hf_shape[1], self.hf_shape[0]).T


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _linear(in_shape: Sequence[int], out_shape: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
  """torch nn.Linear weight [prod(out), prod(in)] -> our kernel [*in, *out]."""
  return lambda w: w.T.reshape(*in_shape, *out_shape)


def _conv1d(in_shape: Sequence[int], out_shape: Sequence[int],
            cols: Optional[slice] = None) -> Callable[[np.ndarray], np.ndarray]:
  """GPT-2 Conv1D weight [prod(in), n_out] (optionally a column slice) -> our kernel [*in, *out]."""
  return lambda w: w[:, cols or slice(None)].reshape(*in_shape, *out_shape)


def _bias(out_shape: Sequence[int], part: Optional[slice] = None) -> Callable[[np.ndarray], np.ndarray]:
  return lambda b: b[part or slice(None)].reshape(*out_shape)


def _table(cfg: TransformerConfig) -> List[_Entry]:
  """Our parameter path -> HF name, HF shape and transform, for cfg.family."""
  d, h, kv, hd, m, v = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  e = lambda path, name, shape, fn=_same: _Entry(tuple(path.split("/")), name, tuple(shape), fn)
  if cfg.family == "gpt2":
    qkv = lambda j: slice(j * d, (j + 1) * d)
    table = [e("embed/embedding", "wte.weight", (v, d)), e("pos_embed/embedding", "wpe.weight", (cfg.max_len, d))]
    for ours, theirs in (("pre_attn_norm", "ln_1"), ("pre_mlp_norm", "ln_2")):
      table += [
          e(f"layers/{ours}/scale", f"h.{{i}}.{theirs}.weight", (d,)),
          e(f"layers/{ours}/bias", f"h.{{i}}.{theirs}.bias", (d,))
      ]
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
      table += [
          e(f"layers/attn/{name}/kernel", "h.{i}.attn.c_attn.weight", (d, 3 * d), _conv1d((d,), (h, hd), qkv(j))),
          e(f"layers/attn/{name}/bias", "h.{i}.attn.c_attn.bias", (3 * d,), _bias((h, hd), qkv(j)))
      ]
    table += [
        e("layers/attn/o_proj/kernel", "h.{i}.attn.c_proj.weight", (d, d), _conv1d((h, hd), (d,))),
        e("layers/attn/o_proj/bias", "h.{i}.attn.c_proj.bias", (d,)),
        e("layers/mlp/up_proj/kernel", "h.{i}.mlp.c_fc.weight", (d, m)),
        e("layers/mlp/up_proj/bias", "h.{i}.mlp.c_fc.bias", (m,)),
        e("layers/mlp/down_proj/kernel", "h.{i}.mlp.c_proj.weight", (m, d)),
        e("layers/mlp/down_proj/bias", "h.{i}.mlp.c_proj.bias", (d,)),
        e("final_norm/scale", "ln_f.weight", (d,)),
        e("final_norm/bias", "ln_f.bias", (d,)),
    ]
  elif cfg.family in ("llama", "gemma3"):
    table = [
        e("embed/embedding", "embed_tokens.weight", (v, d)),
        e("layers/pre_attn_norm/scale", "layers.{i}.input_layernorm.weight", (d,)),
        e("layers/attn/q_proj/kernel", "layers.{i}.self_attn.q_proj.weight", (h * hd, d), _linear((d,), (h, hd))),
        e("layers/attn/k_proj/kernel", "layers.{i}.self_attn.k_proj.weight", (kv * hd, d), _linear((d,), (kv, hd))),
        e("layers/attn/v_proj/kernel", "layers.{i}.self_attn.v_proj.weight", (kv * hd, d), _linear((d,), (kv, hd))),
        e("layers/attn/o_proj/kernel", "layers.{i}.self_attn.o_proj.weight", (d, h * hd), _linear((h, hd), (d,))),
        e("layers/mlp/gate_proj/kernel", "layers.{i}.mlp.gate_proj.weight", (m, d), _linear((d,), (m,))),
        e("layers/mlp/up_proj/kernel", "layers.{i}.mlp.up_proj.weight", (m, d), _linear((d,), (m,))),
        e("layers/mlp/down_proj/kernel", "layers.{i}.mlp.down_proj.weight", (d, m), _linear((m,), (d,))),
        e("final_norm/scale", "norm.weight", (d,)),
    ]
    if cfg.family == "llama":
      table.append(e("layers/pre_mlp_norm/scale", "layers.{i}.post_attention_layernorm.weight", (d,)))
    else:
      table += [
          e("layers/attn/q_norm/scale", "layers.{i}.self_attn.q_norm.weight", (hd,)),
          e("layers/attn/k_norm/scale", "layers.{i}.self_attn.k_norm.weight", (hd,)),
          e("layers/post_attn_norm/scale", "layers.{i}.post_attention_layernorm.weight", (d,)),
          e("layers/pre_mlp_norm/scale", "layers.{i}.pre_feedforward_layernorm.weight", (d,)),
          e("layers/post_mlp_norm/scale", "layers.{i}.post_feedforward_layernorm.weight", (d,)),
      ]
  else:
    raise ValueError(f"No HF import table for family {cfg.family!r}.")
  if not cfg.tie_embeddings:
    table.append(e("lm_head/kernel", "lm_head.weight", (v, d), _linear((d,), (v,))))
  return table


def export_table(cfg: TransformerConfig, *, tie_embeddings: bool) -> List[_Entry]:
  """The import table of a Llama or Gemma 3 config (with `tie_embeddings` as given), for writing our arrays back under
  HF names (`_Entry.inverse`): the inverse of `params_from_state_dict`. GPT-2 (fused q/k/v) is not exported."""
  if cfg.family not in ("llama", "gemma3"):
    raise ValueError(f"No HF export table for family {cfg.family!r} (Llama and Gemma 3 only).")
  return _table(dataclasses.replace(cfg, tie_embeddings=tie_embeddings))


def _ignorable(cfg: TransformerConfig, name: str) -> bool:
  """Tensors that carry no parameters of ours and are dropped silently."""
  if name.endswith("inv_freq"):  # Rotary caches.
    return True
  if cfg.family == "gpt2" and re.search(r"\.attn\.(bias|masked_bias)$", name):  # Causal-mask buffers.
    return True
  if cfg.family == "gemma3" and re.match(r"^(model\.)?(vision_tower|multi_modal_projector)\.", name):
    return True
  return False


def _to_numpy(x: Any) -> np.ndarray:
  """numpy view of a numpy / jax / torch array (torch bf16 goes through float32) without importing torch."""
  if hasattr(x, "detach"):  # torch.Tensor
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.float()
    return x.numpy()
  return np.asarray(x)


def _path_str(path: Tuple[str, ...], layer: Optional[int] = None) -> str:
  s = "/".join(path)
  return s if layer is None else f"{s} (layer {layer})"


def _find_prefix(keys: Sequence[str], anchor: str, source: str) -> str:
  key_set = set(keys)
  for prefix in _BODY_PREFIXES:
    if prefix + anchor in key_set:
      return prefix
  raise ValueError(f"{source}: missing tensor {anchor!r} (tried prefixes {[p for p in _BODY_PREFIXES if p]} and none); "
                   f"the checkpoint has {len(key_set)} tensors, e.g. {sorted(key_set)[:5]}.")


def untie_if_distinct(config: TransformerConfig, state_dict: Mapping[str, Any], source: str) -> TransformerConfig:
  """`config` untied when it ties the output projection to the embedding but the checkpoint holds an output
  projection (lm_head) of other values: transformers then keeps the checkpoint's own lm_head, and so does this (with
  a warning); else `config` unchanged."""
  if not config.tie_embeddings:
    return config
  keys = list(state_dict.keys())
  key_set = set(keys)
  lm_head = next((n for n in _LM_HEAD_NAMES if n in key_set), None)
  if lm_head is None:
    return config
  embed_name = _table(config)[0].hf_name  # The embedding, first in every family's table.
  embed = _find_prefix(keys, embed_name, source) + embed_name
  if embed not in key_set:
    return config  # `params_from_state_dict` names the missing tensor.
  head, table = _to_numpy(state_dict[lm_head]), _to_numpy(state_dict[embed])
  if head.shape == table.shape and np.array_equal(head, table):
    return config
  logger.warning(
      "%s: the config ties the output projection to the embedding (tie_word_embeddings), but tensor %r holds other "
      "values: it is loaded untied, with that tensor as the output projection, as transformers does.", source, lm_head)
  return dataclasses.replace(config, tie_embeddings=False)


def params_from_state_dict(config: TransformerConfig, state_dict: Mapping[str, Any], *,
                           source: str = "<state dict>") -> Dict[str, Any]:
  """Our parameter tree (plain nested dict of jax arrays in config.weight_dtype) from an HF state dict.

  state_dict: HF PyTorch names and layouts -> arrays (numpy, jax or torch; any float dtype), optionally under a
  `model.` / `transformer.` / `model.language_model.` / `language_model.model.` prefix. `source` names the file in
  error messages (a shape error from a sharded checkpoint names the shard). Missing tensors and shape mismatches
  raise ValueError; unexpected tensors are logged as a warning.
  """
  keys = list(state_dict.keys())
  table = _table(config)
  prefix = _find_prefix(keys, table[0].hf_name, source)
  key_set = set(keys)
  lm_head = next((n for n in _LM_HEAD_NAMES if n in key_set), "lm_head.weight")
  wdtype = jnp.dtype(config.weight_dtype)
  used = set()

  def full_name(entry: _Entry, layer: Optional[int]) -> str:
    if entry.hf_name == "lm_head.weight":
      return lm_head
    return prefix + (entry.hf_name.format(i=layer) if layer is not None else entry.hf_name)

  def fetch(entry: _Entry, layer: Optional[int]) -> np.ndarray:
    name = full_name(entry, layer)
    if name not in key_set:
      raise ValueError(f"{source}: missing tensor {name!r} (needed for parameter {_path_str(entry.path, layer)}).")
    w = _to_numpy(state_dict[name])
    used.add(name)
    file = state_dict.file_of(name) if isinstance(state_dict, _SafetensorsStateDict) else source
    if not (np.issubdtype(w.dtype, np.floating) or w.dtype == jnp.bfloat16):  # Before its shape: packed weights.
      raise ValueError(f"{file}: tensor {name!r} has dtype {w.dtype}: expected float32, float16 or bfloat16 weights "
                       "(quantized checkpoints are not supported; dequantize them first).")
    if tuple(w.shape) != entry.hf_shape:
      raise ValueError(f"{file}: tensor {name!r} has shape {tuple(w.shape)}, expected {entry.hf_shape} for parameter "
                       f"{_path_str(entry.path, layer)} of this {config.family} config.")
    out = np.asarray(entry.transform(w)).astype(wdtype, copy=False)
    if not np.isfinite(out).all():
      raise ValueError(f"{file}: tensor {name!r} holds {int(np.size(out) - np.isfinite(out).sum())} non-finite "
                       f"values (NaN or inf{' after the cast to ' + wdtype.name if w.dtype != wdtype else ''}): "
                       "expected finite weights; the checkpoint is damaged.")
    return out

  flat = {}
  for entry in table:
    if entry.per_layer:
      flat[entry.path] = np.stack([fetch(entry, i) for i in range(config.num_layers)], axis=0)
    else:
      flat[entry.path] = fetch(entry, None)

  # Sanity check of the table against the model definition (an error here is a bug in this module).
  expected = {
      tuple(k.key for k in p): tuple(
          x.shape) for p, x in jax.tree_util.tree_flatten_with_path(nn.unbox(_abstract_params(config)))[0]
  }
  got = {k: tuple(x.shape) for k, x in flat.items()}
  if expected != got:
    raise AssertionError(f"hf_import table for {config.family} disagrees with the model: expected {expected}, "
                         f"built {got}.")

  unused = [n for n in keys if n not in used and not _ignorable(config, n)]
  extra_layers = sorted(
      {int(m.group(1)) for m in map(re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.").search, unused) if m})
  if extra_layers and extra_layers[-1] >= config.num_layers:
    raise ValueError(f"{source}: the checkpoint holds layers up to {extra_layers[-1]}, but its config has "
                     f"{config.num_layers} (num_hidden_layers / n_layer): expected a config.json that matches the "
                     "weights.")
  if config.tie_embeddings and lm_head in unused:
    unused.remove(lm_head)
    if not np.array_equal(_to_numpy(state_dict[lm_head]).astype(wdtype), flat[("embed", "embedding")]):
      logger.warning(
          "%s: the config ties the output projection to the embedding, but tensor %r differs from it; it is "
          "ignored here (`from_pretrained` loads such a checkpoint untied, as transformers does: "
          "`untie_if_distinct`).", source, lm_head)
  if unused:
    shown = ", ".join(unused[:20]) + (f", ... ({len(unused) - 20} more)" if len(unused) > 20 else "")
    logger.warning("%s: %d tensors were not used by the %s model: %s", source, len(unused), config.family, shown)

  params: Dict[str, Any] = {}
  for path, value in flat.items():
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = jnp.asarray(value)
  return params


def _abstract_params(config: TransformerConfig) -> Any:
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: Transformer(config).init(jax.random.key(0), t), tokens)["params"]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files.


def _safe_open(path: Path) -> Any:
  """`safetensors.safe_open(path)`; a file it cannot parse (truncated, not safetensors) raises ValueError naming it."""
  from safetensors import safe_open
  try:
    return safe_open(str(path), framework="numpy")
  except Exception as e:  # SafetensorError("Error while deserializing header: ...") does not name the file.
    raise ValueError(f"{path}: not a readable safetensors file ({os.path.getsize(path)} bytes); it is probably "
                     f"truncated or corrupt ({type(e).__name__}: {e}).") from e


class _SafetensorsStateDict(Mapping):
  """Read-only, lazy {tensor name: numpy array} over one or more safetensors files."""

  def __init__(self, files: Mapping[str, Path]):  # tensor name -> file holding it
    self._files = dict(files)
    self._handles: Dict[Path, Any] = {}
    self._names: Dict[Path, set] = {}  # The tensors each open file holds.

  @classmethod
  def from_files(cls, paths: Sequence[Path]) -> "_SafetensorsStateDict":
    files = {}
    for path in paths:
      with _safe_open(path) as f:
        for name in f.keys():
          if name in files:
            raise ValueError(f"tensor {name!r} is in both {files[name]} and {path}: expected each tensor in one "
                             "safetensors file (or an index, model.safetensors.index.json, naming its shard).")
          files[name] = path
    return cls(files)

  def __getitem__(self, name: str) -> np.ndarray:
    path = self._files[name]
    if path not in self._handles:
      self._handles[path] = _safe_open(path)
      self._names[path] = set(self._handles[path].keys())
    if name not in self._names[path]:  # Only an index can map a tensor to a file that lacks it.
      raise ValueError(f"{path.parent / 'model.safetensors.index.json'} maps tensor {name!r} to {path.name}, which "
                       f"does not hold it (it holds {len(self._names[path])} others): the index names the wrong shard.")
    try:
      return self._handles[path].get_tensor(name)
    except Exception as e:  # The reader's own errors name neither the file nor the tensor.
      try:
        stored = self._handles[path].get_slice(name).get_dtype()  # From the header: e.g. "F8_E4M3".
      except Exception:  # pylint: disable=broad-except  (a damaged header: reported as such below)
        stored = None
      if stored and stored not in ("F64", "F32", "F16", "BF16"):  # A valid file of a dtype numpy cannot hold.
        raise ValueError(f"{path}: tensor {name!r} has dtype {stored}: expected float32, float16 or bfloat16 "
                         "weights (quantized checkpoints are not supported; dequantize them first).") from None
      raise ValueError(f"{path}: tensor {name!r} could not be read; the file is probably truncated or corrupt "
                       f"({type(e).__name__}: {e}).") from e

  def file_of(self, name: str) -> str:
    return str(self._files[name])

  def __iter__(self) -> Iterator[str]:
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)


def _weight_map(index: Path) -> Dict[str, Path]:
  """{tensor name: shard path} of a `model.safetensors.index.json`; ValueError naming the index and entry."""
  try:
    data = json.loads(index.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{index}: not a readable safetensors index (JSON): {e}") from None
  weight_map = data.get("weight_map") if isinstance(data, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index}: no 'weight_map' in the safetensors index (expected an object {{tensor: shard file}}).")
  for name, shard in weight_map.items():
    if not isinstance(shard, str) or not shard or os.path.isabs(shard) or ".." in Path(shard).parts:
      raise ValueError(
          f"{index}: weight_map[{name!r}] = {shard!r}: expected the file name of a shard in {index.parent}.")
  return {name: index.parent / shard for name, shard in weight_map.items()}


def _safetensors_files(path: Path) -> List[Path]:
  """The safetensors weight files of an HF checkpoint directory; clear errors for anything else."""
  single, index = path / "model.safetensors", path / "model.safetensors.index.json"
  if single.is_file():  # transformers' order: the single file first, then the index.
    if index.is_file():
      logger.warning(
          "%s holds both model.safetensors and model.safetensors.index.json: model.safetensors is loaded "
          "(as transformers does), the index and its shards are not.", path)
    return [single]
  if index.is_file():
    shards = sorted(set(_weight_map(index).values()))
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
      raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}.")
    return shards
  others = sorted(path.glob("*.safetensors"))
  if others:
    return others
  pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
  if pickled:
    raise ValueError(
        f"{path}: found only pickled PyTorch weights {pickled}; safetensors is required (model.safetensors or "
        f"model.safetensors.index.json). Pickled checkpoints are never loaded; convert them with "
        f"`model.save_pretrained(dir, safe_serialization=True)` in a trusted environment.")
  raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json in this directory.")


# Architecture fields a checkpoint's config.json must state (transformers would fill a missing one with its class
# default, e.g. Llama-7B's width, and the weights would then be blamed for the mismatch).
_REQUIRED_HF_FIELDS = {
    "gpt2": ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"),
    "llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    "mistral": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    "gemma3_text":
        ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim"),
}
# Not listed: a multimodal `gemma3` checkpoint's text_config, which real checkpoints write with only the fields that
# differ from transformers' defaults (Gemma 3 4B's own sizes), so that the defaults are the architecture there.


def _read_hf_config(path: Path) -> Any:
  """The transformers config of a checkpoint's `config.json`; ValueError naming the file and the field for a
  missing architecture field, a field of the wrong type, or a file that is not a config."""
  raw = _files.read_json_object(str(path), "a transformers config")
  for field in ("quantization_config", "quantization"):  # transformers' quantizers; MLX's packed weights.
    if raw.get(field):
      method = raw[field].get("quant_method", raw[field].get("bits")) if isinstance(raw[field], dict) else None
      raise ValueError(f"{path}: {field}{f' ({method})' if method is not None else ''}: a quantized checkpoint: "
                       "expected float32, float16 or bfloat16 weights (dequantize it first, e.g. load it in "
                       "transformers and save_pretrained the dequantized model).")
  model_type = raw.get("model_type")
  for field in _REQUIRED_HF_FIELDS.get(model_type, ()):
    if field not in raw:
      raise ValueError(f"{path}: no {field!r}: expected the {model_type} architecture's {field} (an integer).")
    value = raw[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{path}: {field}={value!r}: expected an integer >= 1.")
  import transformers  # pylint: disable=g-import-not-at-top  (lazy: heavy import)
  try:
    return transformers.AutoConfig.from_pretrained(str(path.parent), local_files_only=True)
  except Exception as e:  # pylint: disable=broad-except  (transformers' validation errors name neither file nor field)
    raise ValueError(
        f"{path}: transformers cannot read this config ({type(e).__name__}: {errors.summary(e)}).") from None


# Overrides that change no parameter's shape (a shape error with any other override may be the override's).
_SHAPELESS_OVERRIDES = ("dtype", "weight_dtype", "remat")


@contextlib.contextmanager
def _naming_overrides(overrides: Mapping[str, Any]):
  """Re-raises a checkpoint's shape or layer-count error with the overrides that may have caused it: a GPT-2
  checkpoint loaded with `max_len=16` (32 positions) read 'tensor wpe.weight has shape (32, 48), expected (16, 48)',
  blaming the file."""
  shaping = {k: v for k, v in overrides.items() if k not in _SHAPELESS_OVERRIDES}
  try:
    yield
  except ValueError as e:
    if not shaping or not any(what in str(e) for what in ("has shape", "holds layers", "missing tensor")):
      raise
    given = ", ".join(f"{k}={v!r}" for k, v in shaping.items())
    raise ValueError(f"{e} (the config was overridden with {given}: expected the checkpoint's own sizes there)") from e


def load_hf_checkpoint(path: str | os.PathLike, **config_overrides) -> Tuple[TransformerConfig, Dict[str, Any]]:
  """(config, params) of a local HF checkpoint directory: config.json + (sharded) safetensors weights."""
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"HF checkpoint directory {str(path)!r} does not exist.")
  files = _safetensors_files(path)
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path}: no config.json in this checkpoint directory.")
  try:
    config = config_from_hf(_read_hf_config(path / "config.json"), **config_overrides)
  except (TypeError, ValueError) as e:
    message = str(e)
    raise ValueError(message if str(path) in message else f"{path / 'config.json'}: {message}") from None
  index = path / "model.safetensors.index.json"
  # A sharded checkpoint's tensors are read from the shard its index names (not whichever shard holds a copy).
  sharded = index.is_file() and not (path / "model.safetensors").is_file()  # `_safetensors_files`' order.
  state_dict = _SafetensorsStateDict(_weight_map(index)) if sharded else _SafetensorsStateDict.from_files(files)
  # A tensor the index does not list is the index's fault, even when the tensors it lists sit in one shard.
  source = str(index) if sharded else str(files[0]) if len(files) == 1 else str(path)
  config = untie_if_distinct(config, state_dict, source)
  with _naming_overrides(config_overrides):
    return config, params_from_state_dict(config, state_dict, source=source)


EMBEDDED_PREFIX = "embedded:"


def _resolve(path: str | os.PathLike, what: str) -> Path:
  if isinstance(path, str) and path.startswith(EMBEDDED_PREFIX):
    from spectral_soup.models import embedded
    name = path[len(EMBEDDED_PREFIX):]
    if name not in embedded.EMBEDDED_MODELS:
      raise ValueError(f"{what}: unknown embedded model {path!r}; known: "
                       f"{[EMBEDDED_PREFIX + n for n in sorted(embedded.EMBEDDED_MODELS)]}.")
    path = embedded.EMBEDDED_MODELS[name]()
  p = Path(path)
  if not p.exists():
    raise FileNotFoundError(f"{what}: {str(p)!r} does not exist.")
  if not p.is_dir() and p.suffix.lower() != ".gguf":
    raise ValueError(f"{what}: {str(p)!r} is neither a Hugging Face checkpoint directory (config.json + "
                     f"*.safetensors) nor a .gguf file.")
  return p


def config_from_pretrained(path: str | os.PathLike, **config_overrides) -> TransformerConfig:
  """The architecture `from_pretrained(path, **config_overrides)` builds (for an HF directory, its config.json; for
  a .gguf file, its metadata), with no weight read: e.g. the positions it holds (`max_len`) before a long load.

  Whether the input and output embeddings are tied is known only from the weights (`untie_if_distinct`): the
  result states the config's own setting. Raises as `from_pretrained` does for a missing path or a config it refuses.
  """
  p = _resolve(path, "config_from_pretrained")
  if p.is_dir():
    if not (p / "config.json").is_file():
      raise FileNotFoundError(f"{p}: no config.json in this checkpoint directory.")
    try:
      return config_from_hf(_read_hf_config(p / "config.json"), **config_overrides)
    except (TypeError, ValueError) as e:
      message = str(e)
      raise ValueError(message if str(p) in message else f"{p / 'config.json'}: {message}") from None
  from spectral_soup.models import gguf_import  # Lazy: optional dependency path.
  return config_from_hf(gguf_import.read_gguf_config(str(p)), **config_overrides)


def from_pretrained(path: str | os.PathLike, *, dtype: Any = None, weight_dtype: Any = None,
                    **config_overrides) -> Tuple[Transformer, Dict[str, Any]]:
  """(Transformer, params) from an HF checkpoint directory, a .gguf file or "embedded:smollm2".

  dtype / weight_dtype: compute and storage dtypes (default: the TransformerConfig defaults, float32);
  config_overrides: any other TransformerConfig field (e.g. max_len=2048).
  """
  p = _resolve(path, "from_pretrained")
  overrides = dict(config_overrides)
  if dtype is not None:
    overrides["dtype"] = dtype
  if weight_dtype is not None:
    overrides["weight_dtype"] = weight_dtype
  if p.is_dir():
    config, params = load_hf_checkpoint(p, **overrides)
  else:
    from spectral_soup.models import gguf_import  # Lazy: optional dependency path.
    hf_config, state_dict = gguf_import.read_gguf(str(p))
    config = untie_if_distinct(config_from_hf(hf_config, **overrides), state_dict, str(p))
    with _naming_overrides(overrides):
      params = params_from_state_dict(config, state_dict, source=str(p))
    del state_dict
  # The checkpoint's conversion buffers are garbage now; the package's malloc settings would keep them resident.
  gc.collect()
  _malloc.release_free_memory()
  return Transformer(config), params


def check_vocab(tokenizer: Any, vocab_size: int, source: str) -> None:
  """Raises ValueError if `tokenizer` can produce ids that a model with `vocab_size` embeddings does not have.

  A model may have more embeddings than the tokenizer has tokens (padded vocabularies); never fewer: the extra
  ids would index past the embedding table, which JAX clamps silently instead of failing.
  """
  size = len(tokenizer)
  if size > vocab_size:
    raise ValueError(f"{source}: the tokenizer has {size} tokens but the model's vocab_size is {vocab_size}: token "
                     f"ids {vocab_size}..{size - 1} have no embedding. The tokenizer and the weights come from "
                     f"different models.")


def _config_vocab_size(directory: Path) -> Optional[int]:
  """vocab_size from an HF checkpoint's config.json (or its text_config), None if it does not say."""
  try:
    raw = json.loads((directory / "config.json").read_text())
  except (OSError, ValueError):
    return None
  size = raw.get("vocab_size", (raw.get("text_config") or {}).get("vocab_size"))
  return int(size) if isinstance(size, int) else None


def _check_has_vocabulary(tokenizer: Any, directory: Path) -> None:
  """Refuses a tokenizer whose vocabulary holds nothing but its special and added tokens: transformers builds one
  from a `tokenizer_config.json` whose vocabulary files are missing (a partial copy), and it encodes every text to
  nothing (or to its unknown token)."""
  special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
  vocabulary = tokenizer.get_vocab()
  if all(token in special for token in vocabulary):
    probe = "Hello world"
    raise ValueError(
        f"{directory}: the tokenizer loaded from this directory holds only its {len(vocabulary)} special tokens "
        f"{sorted(vocabulary)[:8]} and encodes {probe!r} as {tokenizer(probe, add_special_tokens=False)['input_ids']}: "
        "its vocabulary is missing; expected tokenizer.json, or a slow tokenizer's vocabulary files "
        "(tokenizer.model, or vocab.json and merges.txt) beside tokenizer_config.json.")


def tokenizer_from_pretrained(path: str | os.PathLike):
  """The tokenizer of an HF checkpoint directory (local files only) or of a .gguf file.

  For a directory, the tokenizer is checked against the vocab_size of its config.json (`check_vocab`).
  """
  p = _resolve(path, "tokenizer_from_pretrained")
  if p.is_dir():
    import transformers
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
      if (p / name).is_file():
        try:
          json.loads((p / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
          raise ValueError(
              f"{p / name}: not readable JSON ({e}); the tokenizer file is damaged or truncated.") from None
    try:
      tokenizer = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # pylint: disable=broad-except  (transformers' messages do not name the directory)
      raise ValueError(
          f"{p}: no tokenizer could be loaded from this directory ({type(e).__name__}: {errors.summary(e)}); "
          "expected a Hugging Face tokenizer (tokenizer.json, or the files of a slow tokenizer).") from None
    _check_has_vocabulary(tokenizer, p)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
      try:
        import jinja2  # pylint: disable=g-import-not-at-top
        jinja2.Environment().parse(template)
      except ImportError:
        pass
      except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{p}: the tokenizer's chat template does not parse (line {e.lineno}: {e.message}).") from None
    vocab_size = _config_vocab_size(p)
    if vocab_size is not None:
      check_vocab(tokenizer, vocab_size, str(p))
    return tokenizer
  from spectral_soup.models import gguf_import
  return gguf_import.tokenizer_from_gguf(str(p))
