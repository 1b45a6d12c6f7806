"""Reading llama.cpp GGUF checkpoints into Hugging Face names, layouts and tokenizers.

A GGUF file holds the model's hyper-parameters as metadata (llama.cpp key names), its tensors (llama.cpp names,
often block-quantized) and its tokenizer (vocabulary, merges, special ids and chat template as metadata). This
module turns one into what a Hugging Face PyTorch checkpoint would give:

  config, state = read_gguf(path)         # transformers.LlamaConfig, {"model.embed_tokens.weight": [V, D], ...}
  tokenizer = tokenizer_from_gguf(path)   # transformers.PreTrainedTokenizerFast

Every tensor is dequantized to float32 numpy (`gguf.quants.dequantize`), with PyTorch's `[out, in]` layout for
linear weights. GGUF lists dimensions innermost first (`ne[0]` is the input width), i.e. reversed with respect to
numpy, and llama.cpp's converter permutes the rows of the query and key projections for its rotary layout (it
rotates adjacent pairs `(2i, 2i + 1)` where Hugging Face rotates `(i, i + head_dim / 2)`); both are undone here,
exactly as `transformers.modeling_gguf_pytorch_utils.LlamaTensorProcessor` does.

The file is memory mapped; only the tensors' dequantized copies live in memory.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gguf
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers
import transformers

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TOKENIZER_MODELS = ("gpt2",)

# GGML token types (`tokenizer.ggml.token_type`).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4

# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) for byte-level BPE, by how text is split before BPE.
# GPT-2's regex, as `tokenizers`' ByteLevel(use_regex=True) applies it. "default" (and a missing key, older files)
# is treated the same way, as transformers does.
_GPT2_SPLIT_PRE = ("default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion")
# Each digit on its own first, then GPT-2's regex (llama.cpp: "\p{N}" then the GPT-2 regex; Hugging Face:
# Sequence[Digits(individual_digits=True), ByteLevel]). SmolLM / SmolLM2 and StarCoder use this.
_DIGITS_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")

# llama.cpp tensor names -> Hugging Face Llama names (`blk.{i}.` <-> `model.layers.{i}.`).
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_MISSING = object()

# ----------------------------------------------------------------------------------------------------------------------
# Opening and metadata.
# ----------------------------------------------------------------------------------------------------------------------


class _MappedReader(gguf.GGUFReader):
  """`gguf.GGUFReader` that parses through a plain-ndarray view of its memory map.

  The reader slices its `np.memmap` a few times per metadata value, i.e. ~250k times for a 49k-token vocabulary with
  its merges, and `np.memmap.__getitem__` / `__array_finalize__` make that ~3x slower than slicing an ndarray. The
  view shares the same mapping (nothing is read eagerly) and the parsing code is the package's own.
  """

  @property
  def data(self) -> np.ndarray:
    return self.__dict__["_mapped_data"]

  @data.setter
  def data(self, value: np.ndarray) -> None:
    self.__dict__["_mapped_data"] = value.view(np.ndarray) if isinstance(value, np.memmap) else value


def _check_file(path: str | os.PathLike) -> str:
  """`path` as a string, after checking that it exists and starts with the GGUF magic."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file not found: {path!r}")
  if os.path.isdir(path):
    raise IsADirectoryError(f"Expected a GGUF file, got a directory: {path!r}")
  with open(path, "rb") as f:
    head = f.read(len(GGUF_MAGIC))
  if head != GGUF_MAGIC:
    if len(head) < len(GGUF_MAGIC):
      raise ValueError(f"{path!r} is not a GGUF file: it is {len(head)} bytes long, too short to hold the "
                       f"{len(GGUF_MAGIC)}-byte magic {GGUF_MAGIC!r}")
    raise ValueError(f"{path!r} is not a GGUF file: expected the magic bytes {GGUF_MAGIC!r} at offset 0, found "
                     f"{head!r}")
  return path


def _open(path: str | os.PathLike) -> Tuple[str, gguf.GGUFReader]:
  """Checks and memory maps `path`; every parsing failure becomes a `ValueError` naming the file."""
  path = _check_file(path)
  size = os.path.getsize(path)
  try:
    reader = _MappedReader(path)
  except Exception as e:  # The gguf reader fails with whatever numpy raises on short or garbled input.
    raise ValueError(
        f"{path!r} starts like a GGUF file but could not be parsed; it is probably truncated or corrupt (expected a "
        f"GGUF v2/v3 header, metadata, tensor table and all tensor data within its {size} bytes): "
        f"{type(e).__name__}: {e}") from e
  for tensor in reader.tensors:
    end = int(tensor.data_offset) + int(tensor.n_bytes)
    if end > size:
      raise ValueError(f"{path!r} is truncated: tensor {tensor.name!r} needs bytes [{tensor.data_offset}, {end}) but "
                       f"the file is {size} bytes long")
  return path, reader


def _field(path: str, reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
  """Metadata value `key` as plain python (`int`, `float`, `bool`, `str` or a list of them)."""
  field = reader.fields.get(key)
  if field is None:
    if default is _MISSING:
      raise ValueError(f"{path!r}: required GGUF metadata key {key!r} is missing")
    return default
  try:
    return field.contents()
  except Exception as e:
    raise ValueError(f"{path!r}: GGUF metadata key {key!r} could not be decoded: {type(e).__name__}: {e}") from e


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """A memory-mapped `gguf.GGUFReader` of `path` (metadata parsed, tensors not read), after the checks below.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: not a GGUF file (bad magic), or truncated / corrupt.
  """
  return _open(path)[1]


def gguf_metadata(path: str | os.PathLike) -> Dict[str, Any]:
  """All metadata of a GGUF file as plain python values, keyed by GGUF key (`"llama.block_count"`, ...).

  Includes the reader's pseudo keys `GGUF.version`, `GGUF.tensor_count` and `GGUF.kv_count`. Arrays (e.g.
  `tokenizer.ggml.tokens`) become lists.
  """
  path, reader = _open(path)
  return {key: _field(path, reader, key) for key in reader.fields}


# ----------------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------------


def _scalar_int(path: str, key: str, value: Any, minimum: int = 1) -> int:
  """`value` of metadata `key` as an int >= minimum; ValueError naming the file and key otherwise."""
  if isinstance(value, list):  # Some files state per-layer values; Llama needs one.
    if not value or any(v != value[0] for v in value):
      raise ValueError(f"{path!r}: metadata {key!r} varies across layers ({value}); Llama needs a single value")
    value = value[0]
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() or
      value < minimum):
    raise ValueError(f"{path!r}: metadata {key!r} = {value!r}: expected an integer >= {minimum}")
  return int(value)


def _scalar_float(path: str, key: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
    raise ValueError(f"{path!r}: metadata {key!r} = {value!r}: expected a finite number > 0")
  return float(value)


def _rope_parameters(path: str, reader: gguf.GGUFReader, arch: str, tensor_names: Sequence[str]) -> Dict[str, Any]:
  """`rope_parameters` of the transformers config from `{arch}.rope.*`."""
  if "rope_freqs.weight" in tensor_names:
    raise ValueError(f"{path!r}: the tensor 'rope_freqs.weight' (llama3-style rotary frequency scaling) is not "
                     f"supported")
  theta = _scalar_float(path, f"{arch}.rope.freq_base", _field(path, reader, f"{arch}.rope.freq_base", 10_000.0))
  kind = _field(path, reader, f"{arch}.rope.scaling.type", None)
  factor = _field(path, reader, f"{arch}.rope.scaling.factor", None)
  legacy_linear = _field(path, reader, f"{arch}.rope.scale_linear", None)  # Older files.
  if factor is not None:
    factor = _scalar_float(path, f"{arch}.rope.scaling.factor", factor)
  if legacy_linear is not None:
    legacy_linear = _scalar_float(path, f"{arch}.rope.scale_linear", legacy_linear)
  if kind is None and legacy_linear is not None and legacy_linear != 1.0:
    kind, factor = "linear", legacy_linear
  if kind in (None, "none"):
    return {"rope_type": "default", "rope_theta": theta}
  if kind in ("linear", "yarn") and factor is None:
    raise ValueError(f"{path!r}: metadata {f'{arch}.rope.scaling.factor'!r} is missing: expected the scaling factor "
                     f"of {f'{arch}.rope.scaling.type'!r} = {kind!r}")
  if kind == "linear":
    return {"rope_type": "linear", "rope_theta": theta, "factor": float(factor)}
  if kind == "yarn":
    original = _field(path, reader, f"{arch}.rope.scaling.original_context_length")
    return {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": float(factor),
        "original_max_position_embeddings": int(original)
    }
  raise ValueError(f"{path!r}: unsupported rotary scaling {f'{arch}.rope.scaling.type'!r} = {kind!r} (supported: "
                   f"none, linear, yarn)")


def _llama_config(path: str, reader: gguf.GGUFReader, tensor_names: Sequence[str]) -> transformers.LlamaConfig:
  """The `transformers.LlamaConfig` that the metadata (and the set of tensor names) describes."""
  arch = "llama"
  get = lambda key, default=_MISSING: _field(path, reader, f"{arch}.{key}", default)  # noqa: E731
  num = lambda key, default=_MISSING, minimum=1: _scalar_int(path, f"{arch}.{key}", get(key, default), minimum)
  hidden = num("embedding_length")
  heads = num("attention.head_count")
  kv_heads = num("attention.head_count_kv", heads)
  mlp = num("feed_forward_length")
  head_dim = num("attention.key_length", 0, 0) or num("rope.dimension_count", 0, 0) or hidden // heads
  value_dim = num("attention.value_length", head_dim)
  rope_dim = num("rope.dimension_count", head_dim)
  if value_dim != head_dim:
    raise ValueError(f"{path!r}: key width {head_dim} != value width {value_dim}; Llama needs them equal")
  if rope_dim != head_dim or head_dim % 2:
    raise ValueError(f"{path!r}: rotary width {rope_dim} must equal the (even) head width {head_dim}; partial "
                     f"rotary embeddings are not supported")
  if heads % kv_heads:
    raise ValueError(f"{path!r}: {heads} query heads are not a multiple of {kv_heads} key/value heads")

  vocab = get("vocab_size", None)
  if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  if vocab is None:
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
      raise ValueError(f"{path!r}: cannot tell the vocabulary size (no {arch}.vocab_size, no tokenizer, no "
                       f"'token_embd.weight')")
    vocab = int(embed.shape[1])  # GGUF order: [D, V].

  token_id = lambda name: _field(path, reader, f"tokenizer.ggml.{name}_token_id", None)  # noqa: E731
  names = set(tensor_names)
  return transformers.LlamaConfig(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=mlp,
      num_hidden_layers=num("block_count"),
      num_attention_heads=heads,
      num_key_value_heads=kv_heads,
      head_dim=head_dim,
      hidden_act="silu",
      max_position_embeddings=num("context_length"),
      rms_norm_eps=_scalar_float(path, f"{arch}.attention.layer_norm_rms_epsilon",
                                 get("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_parameters=_rope_parameters(path, reader, arch, tensor_names),
      attention_bias="blk.0.attn_q.bias" in names,
      mlp_bias="blk.0.ffn_up.bias" in names,
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=token_id("bos"),
      eos_token_id=token_id("eos"),
      pad_token_id=token_id("padding"),
      architectures=["LlamaForCausalLM"],
  )


def _expected_shapes(config: transformers.LlamaConfig) -> Dict[str, Tuple[int, ...]]:
  """Hugging Face name -> PyTorch shape of every tensor the config implies, in state-dict order."""
  v, d, f = config.vocab_size, config.hidden_size, config.intermediate_size
  q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
  shapes = {"model.embed_tokens.weight": (v, d)}
  for i in range(config.num_hidden_layers):
    p = f"model.layers.{i}."
    layer = {
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
    }
    if config.attention_bias:
      layer.update({
          "self_attn.q_proj.bias": (q,),
          "self_attn.k_proj.bias": (kv,),
          "self_attn.v_proj.bias": (kv,),
          "self_attn.o_proj.bias": (d,)
      })
    layer.update({"mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)})
    if config.mlp_bias:
      layer.update({"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (d,)})
    layer.update({"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)})
    shapes.update({p + k: s for k, s in layer.items()})
  shapes["model.norm.weight"] = (d,)
  if not config.tie_word_embeddings:
    shapes["lm_head.weight"] = (v, d)
  return shapes


# ----------------------------------------------------------------------------------------------------------------------
# Tensors.
# ----------------------------------------------------------------------------------------------------------------------


def _hf_name(gguf_name: str) -> Optional[str]:
  if gguf_name in _GLOBAL_TENSORS:
    return _GLOBAL_TENSORS[gguf_name]
  match = _BLOCK_RE.match(gguf_name)
  if match and match.group(2) in _LAYER_TENSORS:
    return f"model.layers.{int(match.group(1))}.{_LAYER_TENSORS[match.group(2)]}"
  return None


def unpermute_rotary_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's row permutation of a query/key projection (weight `[H * hd, in]` or bias `[H * hd]`).

  llama.cpp stores each head's rows interleaved (`[r_0, r_{hd/2}, r_1, r_{hd/2+1}, ...]`) so that rotary pairs are
  adjacent; Hugging Face keeps the halves apart. Same as transformers' `LlamaTensorProcessor._reverse_permute_weights`
  (with `num_heads` the key/value head count for keys).
  """
  half = w.shape[0] // num_heads // 2
  return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Stored as plain numpy floats: read directly (the gguf package's `dequantize` has no F64).
_PLAIN_FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F64)


def _readable(qtype: Any) -> bool:
  """Whether `_dequantize` can read a tensor of GGML type `qtype` (the installed gguf package's types)."""
  return qtype in _PLAIN_FLOAT_TYPES or qtype in getattr(gguf.quants, "_type_traits", {})


def _dequantize(path: str, tensor: Any, shape: Tuple[int, ...]) -> np.ndarray:
  """float32 numpy copy of a GGUF tensor, reshaped to the (numpy-order) `shape`."""
  qtype = tensor.tensor_type
  try:
    if qtype in _PLAIN_FLOAT_TYPES:
      out = np.array(tensor.data, dtype=np.float32)  # A copy: detached from the mapping, native byte order.
    else:
      out = np.asarray(gguf.quants.dequantize(tensor.data, qtype), dtype=np.float32)
    return out.reshape(shape)
  except NotImplementedError as e:
    raise ValueError(f"{path!r}: tensor {tensor.name!r} has GGML type {qtype.name}, which the installed gguf "
                     f"package cannot dequantize: {e}") from e
  except Exception as e:
    raise ValueError(f"{path!r}: could not dequantize tensor {tensor.name!r} (GGML type {qtype.name}, shape {shape}):"
                     f" {type(e).__name__}: {e}") from e


def _checked_config(path: str, reader: gguf.GGUFReader) -> transformers.LlamaConfig:
  """The file's architecture as a transformers config, refused (ValueError naming the file) where the model cannot
  run it (another architecture, yarn rotary scaling, ...): no tensor is read."""
  arch = _field(path, reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"{path!r}: GGUF architecture {arch!r} is not supported (supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)})")
  config = _llama_config(path, reader, [t.name for t in reader.tensors])
  from spectral_soup.models.hf_config import config_from_hf  # pylint: disable=g-import-not-at-top
  try:
    config_from_hf(config)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path!r}: {e}") from None
  return config


def read_gguf_config(path: str | os.PathLike) -> transformers.LlamaConfig:
  """The architecture of a GGUF checkpoint (what `read_gguf` returns first), from its metadata alone: no tensor is
  read or dequantized. Raises as `read_gguf` does for the file and its metadata."""
  path, reader = _open(path)
  return _checked_config(path, reader)


def read_gguf(path: str | os.PathLike,
              max_workers: Optional[int] = None) -> Tuple[transformers.PretrainedConfig, Dict[str, np.ndarray]]:
  """Reads a GGUF checkpoint as a Hugging Face config and float32 state dict.

  Args:
    path: the `.gguf` file (a single file, not a split shard).
    max_workers: threads used to dequantize (numpy releases the GIL); default: up to 8, one per CPU.

  Returns:
    `(config, state)`: a `transformers.LlamaConfig` and `{hf_name: float32 array}` with exactly the names and shapes
    of `LlamaForCausalLM.state_dict()`: `model.embed_tokens.weight [V, D]`, per layer i
    `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight [out, in]`, `mlp.{gate,up,down}_proj.weight [out, in]`,
    `input_layernorm.weight [D]`, `post_attention_layernorm.weight [D]` (and projection biases if the file has them),
    `model.norm.weight [D]`, and `lm_head.weight [V, D]` only when the file has its own output matrix
    (`config.tie_word_embeddings` is False exactly then).

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: not a GGUF file, truncated or corrupt, an unsupported architecture, missing metadata, or tensors
      that are missing, unexpected or shaped differently from what the metadata implies.
  """
  path, reader = _open(path)
  config = _checked_config(path, reader)
  arch = _field(path, reader, "general.architecture")
  expected = _expected_shapes(config)

  jobs = []  # (hf_name, reader tensor, numpy shape)
  unexpected = []
  for tensor in reader.tensors:
    hf_name = _hf_name(tensor.name)
    if hf_name is None or hf_name not in expected:
      unexpected.append(tensor.name)
      continue
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dimensions innermost first.
    if shape != expected[hf_name]:
      raise ValueError(f"{path!r}: tensor {tensor.name!r} ({hf_name}) has shape {shape} (GGUF order "
                       f"{list(tensor.shape.tolist())}) but the metadata implies {expected[hf_name]}")
    if not _readable(tensor.tensor_type):  # Before any tensor is dequantized (the biggest go first: minutes).
      raise ValueError(f"{path!r}: tensor {tensor.name!r} has GGML type {tensor.tensor_type.name}, which the "
                       "installed gguf package cannot dequantize: expected F32, F16, F64, BF16 or a quantized type "
                       "it reads (Q4_0, Q8_0, Q4_K, ...)")
    jobs.append((hf_name, tensor, shape))
  if unexpected:
    raise ValueError(f"{path!r}: unexpected tensors for a {config.num_hidden_layers}-layer {arch} model: "
                     f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
  missing = sorted(set(expected) - {name for name, _, _ in jobs})
  if missing:
    raise ValueError(f"{path!r}: tensors missing for a {config.num_hidden_layers}-layer {arch} model: "
                     f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")

  def load(job):
    hf_name, tensor, shape = job
    w = _dequantize(path, tensor, shape)
    if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
      w = unpermute_rotary_rows(w, config.num_attention_heads)
    elif hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
      w = unpermute_rotary_rows(w, config.num_key_value_heads)
    return hf_name, w

  workers = max_workers or min(8, os.cpu_count() or 1)
  # Biggest first, for an even spread over the threads.
  jobs.sort(key=lambda job: -int(job[1].n_bytes))
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    loaded = dict(pool.map(load, jobs))
  return config, {name: loaded[name] for name in expected}


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------------------------------------------------


def _byte_level_pre_tokenizer(path: str, pre: str) -> pre_tokenizers.PreTokenizer:
  if pre in _GPT2_SPLIT_PRE:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  if pre in _DIGITS_SPLIT_PRE:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
  try:  # transformers' table of llama.cpp split regexes (llama3, qwen2, ...), where it has one.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
  except ImportError:
    GGUF_PRE_TOKENIZER_SPLITS = {}  # pylint: disable=invalid-name
  split = GGUF_PRE_TOKENIZER_SPLITS.get(pre)
  if split is None:
    supported = sorted(set(_GPT2_SPLIT_PRE + _DIGITS_SPLIT_PRE) | set(GGUF_PRE_TOKENIZER_SPLITS))
    raise ValueError(f"{path!r}: unsupported pre-tokenizer 'tokenizer.ggml.pre' = {pre!r} (supported: "
                     f"{', '.join(supported)})")
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
  ])


def tokenizer_from_gguf(path: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
  """Rebuilds the tokenizer stored in a GGUF file's metadata (byte-level BPE, `tokenizer.ggml.model == "gpt2"`).

  Uses `tokenizer.ggml.{tokens, token_type, merges, pre, bos/eos/unknown/padding_token_id, add_bos_token,
  add_eos_token}` and `tokenizer.chat_template`. Control tokens (e.g. `<|im_start|>`) become special added tokens,
  user-defined ones plain added tokens, so that both are matched whole in text.

  Raises:
    FileNotFoundError / ValueError: as `read_gguf`, or for a tokenizer model other than byte-level BPE.
  """
  path, reader = _open(path)
  get = lambda key, default=_MISSING: _field(path, reader, f"tokenizer.{key}", default)  # noqa: E731
  kind = get("ggml.model")
  if kind not in SUPPORTED_TOKENIZER_MODELS:
    raise ValueError(f"{path!r}: tokenizer model 'tokenizer.ggml.model' = {kind!r} is not supported (supported: "
                     f"{', '.join(SUPPORTED_TOKENIZER_MODELS)}, i.e. byte-level BPE)")
  tokens: List[str] = get("ggml.tokens")
  types: List[int] = get("ggml.token_type", None) or [_TOKEN_NORMAL] * len(tokens)
  merges: List[str] = get("ggml.merges")
  if len(types) != len(tokens):
    raise ValueError(f"{path!r}: {len(types)} token types for {len(tokens)} tokens")

  # Byte-level vocabularies spell every byte as a printable character; respell any normal token that does not.
  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  spelling = _bytes_to_unicode()
  vocab = {}
  for index, (token, token_type) in enumerate(zip(tokens, types)):
    if token_type == _TOKEN_NORMAL and not set(token) <= alphabet:
      token = "".join(spelling[b] for b in token.encode("utf-8"))
    vocab.setdefault(token, index)
  pairs = []
  for rank, merge in enumerate(merges):
    parts = merge.split(" ")
    if len(parts) != 2:
      raise ValueError(f"{path!r}: merge {rank} {merge!r} is not two space-separated tokens")
    missing = [part for part in parts if part not in vocab]
    if missing:  # The tokenizers library raises a bare Exception naming neither the file nor the merge.
      raise ValueError(f"{path!r}: merge {rank} {merge!r} names {missing[0]!r}, which is not in the vocabulary "
                       "(tokenizer.ggml.tokens): expected merges of vocabulary tokens")
    pairs.append((parts[0], parts[1]))

  backend = tokenizers.Tokenizer(
      models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False, byte_fallback=False))
  backend.pre_tokenizer = _byte_level_pre_tokenizer(path, get("ggml.pre", "default"))
  backend.decoder = decoders.ByteLevel()
  added = [
      tokenizers.AddedToken(token, special=token_type in (_TOKEN_CONTROL, _TOKEN_UNKNOWN), normalized=False)
      for token, token_type in zip(tokens, types)
      if token_type in (_TOKEN_CONTROL, _TOKEN_UNKNOWN, _TOKEN_USER_DEFINED)
  ]
  backend.add_special_tokens([t for t in added if t.special])
  backend.add_tokens([t for t in added if not t.special])

  def special(name: str) -> Optional[str]:
    index = get(f"ggml.{name}_token_id", None)
    if index is None:
      return None
    if not 0 <= int(index) < len(tokens):
      raise ValueError(f"{path!r}: 'tokenizer.ggml.{name}_token_id' = {index} is outside the {len(tokens)}-token "
                       f"vocabulary")
    return tokens[int(index)]

  context = _field(path, reader, f"{_field(path, reader, 'general.architecture', '')}.context_length", None)
  kwargs = dict(
      bos_token=special("bos"),
      eos_token=special("eos"),
      unk_token=special("unknown"),
      pad_token=special("padding"),
      add_bos_token=bool(get("ggml.add_bos_token", False)),
      add_eos_token=bool(get("ggml.add_eos_token", False)),
      clean_up_tokenization_spaces=False,
  )
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  chat_template = get("chat_template", None)
  if chat_template is not None:
    kwargs["chat_template"] = chat_template
  if context is not None:
    kwargs["model_max_length"] = int(context)
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
  if len(tokenizer) != len(tokens):
    raise ValueError(f"{path!r}: the rebuilt tokenizer has {len(tokenizer)} tokens, the file lists {len(tokens)}")
  return tokenizer


def _bytes_to_unicode() -> Dict[int, str]:
  """GPT-2's byte -> printable character table (as in `transformers.convert_slow_tokenizer.bytes_to_unicode`)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
  printable += list(range(ord("®"), ord("ÿ") + 1))
  chars = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, chars)))
