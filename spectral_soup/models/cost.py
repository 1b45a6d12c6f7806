"""What a decoder's forward pass must cost, and the floor that implies on a machine.

A decode loop's floor is set by its matmuls and by the bytes it must move: each step multiplies every row by every
weight matrix (2 FLOPs per weight per row), attends over the filled cache (4 FLOPs per head dimension per cached
position per layer) and reads every weight once; the machine does matmuls at some rate and moves bytes at some
bandwidth (`machine_rates` measures both with jax on the default device). `DecodeMeter` accumulates a decode
phase's work and wall time and reports its share of that floor, the figure `experiments/main.py` writes per phase
into `results.json` and `experiments/benchmarks/decode.py` reports per variant.

Everything here counts the method's work (row-steps that emit a token, prompts prefilled once, each over its own
tokens), not the work an implementation happens to do: time spent on finished rows, padding rows, padding columns
of shorter prompts or recomputation counts against the share. Sliding-window layers (Gemma 3's local layers) attend
over at most their window; caches are counted at the compute dtype's size, weights at the storage dtype's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Dict, Iterator, Optional

import numpy as np

from spectral_soup.models.config import TransformerConfig


def matmul_params(cfg: TransformerConfig) -> int:
  """Weights every token multiplies through: the blocks' projections and the output layer (tied or not)."""
  d, h, hkv, hd, m = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = d * h * hd * 2 + d * hkv * hd * 2 + (3 if cfg.gated_mlp else 2) * d * m
  return cfg.num_layers * per_layer + d * cfg.vocab_size


def weight_bytes(cfg: TransformerConfig, bytes_per_weight: int = 4) -> int:
  """Bytes of the weights a forward pass reads (the embedding table once more when it is not tied)."""
  untied = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.embed_dim
  return bytes_per_weight * (matmul_params(cfg) + untied)


def cache_bytes_per_token(cfg: TransformerConfig, bytes_per_value: int = 4) -> int:
  """Key and value cache bytes one position holds over all layers."""
  return bytes_per_value * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim


def decode_memory_bytes(cfg: TransformerConfig, rows: int, max_len: int, caches_per_row: int = 1) -> int:
  """A lower bound on the memory a decode loop holds: the weights, the KV cache of `rows` rows with `max_len`
  slots each (`caches_per_row` of them: 1 where all bases share one pass), and one float32 [rows, vocab] logits."""
  cache = cache_bytes_per_token(cfg, np.dtype(cfg.dtype).itemsize) * rows * caches_per_row * max_len
  return weight_bytes(cfg, np.dtype(cfg.weight_dtype).itemsize) + cache + 4 * rows * cfg.vocab_size


def _local_layers(cfg: TransformerConfig) -> int:
  """How many layers attend over a sliding window only."""
  if not cfg.sliding_window or cfg.layer_is_local is None:
    return 0
  return sum(cfg.layer_is_local)


def _attended(cfg: TransformerConfig, context: Any) -> Any:
  """Positions attended, summed over the layers, by a position with `context` cached positions."""
  local = _local_layers(cfg)
  return (cfg.num_layers - local) * context + local * np.minimum(context, cfg.sliding_window or 0)


def token_flops(cfg: TransformerConfig, context: Any, output_layer: bool = True) -> Any:
  """FLOPs of one row's forward pass at one position attending over `context` cached positions (a local layer:
  over at most its window)."""
  weights = matmul_params(cfg) - (0 if output_layer else cfg.embed_dim * cfg.vocab_size)
  return 2.0 * weights + 4.0 * cfg.num_heads * cfg.head_dim * _attended(cfg, context)


def prefill_flops(cfg: TransformerConfig, prompts: int, prompt_len: Any) -> float:
  """FLOPs of a prefill: every prompt position through the blocks (causal attention: half the square, a local
  layer at most its window per position), the output layer at each prompt's last position only. `prompt_len`: one
  length for every prompt, or each prompt's own ([prompts]: the tokens it holds, padding left out)."""
  lengths = np.broadcast_to(np.asarray(prompt_len, np.float64), (prompts,))
  weights = matmul_params(cfg) - cfg.embed_dim * cfg.vocab_size
  window = cfg.sliding_window or 0
  # Mean positions a causal position attends over: l / 2 in a global layer, in a local one l / 2 up to the window,
  # then W - W^2 / (2 l).
  local_mean = np.where(lengths <= window, lengths / 2, window - window**2 / (2 * np.maximum(lengths, 1)))
  local = _local_layers(cfg)
  attended = (cfg.num_layers - local) * lengths / 2 + local * local_mean
  blocks = np.sum(lengths * (2.0 * weights + 4.0 * cfg.num_heads * cfg.head_dim * attended))
  return float(blocks + prompts * 2.0 * cfg.embed_dim * cfg.vocab_size)


def machine_rates(matmul_size: int = 2_048, copy_mb: int = 256, repeats: int = 5) -> Dict[str, float]:
  """The machine's floor, measured with jax on the default device (best of `repeats`, after a warmup call).

  * matmul rate: a [n, n] @ [n, n] float32 matmul at default precision (2 n^3 FLOPs);
  * memory bandwidth: x <- x * a + b over a `copy_mb` MiB float32 array (reads and writes it; the buffer is
    donated, so the output reuses it instead of page-faulting a fresh one each call).
  Returns {"matmul_flops_per_s", "bandwidth_bytes_per_s", "matmul_size", "copy_mb"}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def best(fn):
    jax.block_until_ready(fn())
    times = []
    for _ in range(max(1, repeats)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    return min(times)

  n = matmul_size
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)  # Default precision: what the models' float32 matmuls use (TF32 on recent GPUs).
  t_mm = best(lambda: mm(a, b))
  copy = jax.jit(lambda x: x * 1.0001 + 1.0, donate_argnums=0)
  state = {"x": jnp.ones((copy_mb * 2**20 // 4,), jnp.float32)}

  def step():
    state["x"] = copy(state["x"])
    return state["x"]

  t_copy = best(step)
  return {
      "matmul_flops_per_s": 2 * n**3 / t_mm,
      "bandwidth_bytes_per_s": 2 * copy_mb * 2**20 / t_copy,
      "matmul_size": n,
      "copy_mb": copy_mb
  }


@dataclasses.dataclass
class CompileTime:
  seconds: float = 0.0


@contextlib.contextmanager
def compile_time() -> Iterator[CompileTime]:
  """Seconds jax spends tracing, lowering and compiling inside the block (from jax's monitoring events), so a
  timed call can leave its compilation out: `with compile_time() as c: ...; run_s = wall - c.seconds`."""
  from jax import monitoring  # pylint: disable=g-import-not-at-top
  total = CompileTime()

  def listener(event: str, duration: float, **_) -> None:
    if event.startswith("/jax/core/compile/"):
      total.seconds += duration

  monitoring.register_event_duration_secs_listener(listener)
  try:
    yield total
  finally:
    monitoring.unregister_event_duration_listener(listener)


@dataclasses.dataclass
class DecodeMeter:
  """A decode phase's work and wall time: prefills, then chunks of `rows` decoded together.

  `extra_flops_per_row` adds per row-step work beyond the backbone (e.g. basis heads). `add_prefill` and
  `add_chunk` record what was run and its wall time less any compilation inside it (`compile_time`), which is
  kept apart as `compile_s`; `summary(rates)` compares the method's work with the time it took.
  """
  cfg: TransformerConfig
  extra_flops_per_row: float = 0.0
  bytes_per_weight: Optional[int] = None  # None: the config's weight_dtype's size.
  prefill_s: float = 0.0
  decode_s: float = 0.0
  compile_s: float = 0.0
  prefills: int = 0
  prefill_flop: float = 0.0
  prefill_bytes: float = 0.0
  chunks: int = 0
  rows: int = 0
  row_steps: int = 0
  tokens: int = 0
  # Per chunk: (FLOPs, bytes) its tokens need; the floor takes the larger time of the two chunk by chunk.
  chunk_work: list = dataclasses.field(default_factory=list)

  def _weight_bytes(self) -> int:
    size = self.bytes_per_weight or np.dtype(self.cfg.weight_dtype).itemsize
    return weight_bytes(self.cfg, size)

  def _cache_bytes_per_token(self) -> int:
    return cache_bytes_per_token(self.cfg, np.dtype(self.cfg.dtype).itemsize)

  def add_prefill(self, prompts: int, prompt_len: Any, seconds: float, compile_s: float = 0.0) -> None:
    """`prompts` prefilled in `seconds`, `compile_s` of which compiled (0 seconds: timed within the chunk that
    follows). `prompt_len`: the tokens of every prompt, or of each ([prompts], padding left out: a padded batch
    prefills its longest prompt's width for every row, which is the implementation's cost, not the method's)."""
    self.prefills += prompts
    self.prefill_s += max(seconds - compile_s, 0.0)
    self.compile_s += compile_s
    self.prefill_flop += prefill_flops(self.cfg, prompts, prompt_len)
    tokens = float(np.sum(np.broadcast_to(np.asarray(prompt_len, np.float64), (prompts,))))
    self.prefill_bytes += self._weight_bytes() + tokens * self._cache_bytes_per_token()

  def add_chunk(self, rows: int, steps: int, tokens: int, prompt_len: float, seconds: float,
                compile_s: float = 0.0) -> None:
    """`rows` decoded together for `steps` steps, emitting `tokens` wanted tokens, in `seconds` (`compile_s` of
    them compiling). `prompt_len`: the rows' prompt tokens (their mean, padding left out).

    The floor of a chunk is its `tokens` at a full batch of `rows`: per token, the larger of its FLOPs over the
    matmul rate and 1 / rows of a step's bytes (weights once, each row's cache) over the bandwidth.
    """
    self.chunks += 1
    self.rows += rows
    self.row_steps += rows * steps
    self.tokens += tokens
    self.decode_s += max(seconds - compile_s, 0.0)
    self.compile_s += compile_s
    context = prompt_len + steps / 2.0
    flop = tokens * (token_flops(self.cfg, context) + self.extra_flops_per_row)
    step_bytes = self._weight_bytes() + rows * context * self._cache_bytes_per_token()
    self.chunk_work.append((flop, tokens * step_bytes / max(rows, 1)))

  def summary(self, rates: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """Work, time and (with `rates`) the floor: {"tokens", "row_steps", "busy_fraction", "prefill_s",
    "decode_s", "tokens_per_s", "gflop", "floor_s", "share_of_floor", ...}."""
    seconds = self.prefill_s + self.decode_s
    gflop = (self.prefill_flop + sum(f for f, _ in self.chunk_work)) / 1e9
    out = {
        "prompts_prefilled": self.prefills,
        "chunks": self.chunks,
        "rows": self.rows,
        "row_steps": self.row_steps,
        "tokens": self.tokens,
        "busy_fraction": self.tokens / self.row_steps if self.row_steps else None,
        "prefill_s": self.prefill_s,
        "decode_s": self.decode_s,
        "compile_s": self.compile_s,
        "tokens_per_s": self.tokens / seconds if seconds > 0 else None,
        "gflop": gflop,
        "achieved_gflop_per_s": gflop / seconds if seconds > 0 else None
    }
    if rates:
      flops, bw = rates["matmul_flops_per_s"], rates["bandwidth_bytes_per_s"]
      floor = max(self.prefill_flop / flops, self.prefill_bytes / bw)
      floor += sum(max(f / flops, b / bw) for f, b in self.chunk_work)
      out["floor_s"] = floor
      out["share_of_floor"] = floor / seconds if seconds > 0 else None
    return out
