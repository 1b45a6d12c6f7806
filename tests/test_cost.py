"""The decode cost model and meter (`spectral_soup/models/cost.py`) against independent counts."""

import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from spectral_soup.models import cost
from spectral_soup.models import transformer


def _model(**overrides):
  cfg = tiny.tiny_config(**overrides)
  model = transformer.Transformer(cfg)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  return cfg, model, tiny.random_params(shapes)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"gated_mlp": False, "mlp_dim": 40}])
def test_matmul_params_count_the_models_weight_matrices(overrides):
  cfg, _, params = _model(**overrides)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  # Weight matrices (layer-stacked: [L, in, out]); norm scales are [L, D] vectors per layer.
  matrices = sum(x.size for path, x in leaves if x.ndim >= 2 and "scale" not in jax.tree_util.keystr(path))
  # Every weight matrix is multiplied through per token; an untied embedding table is read, not multiplied.
  untied = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.embed_dim
  assert cost.matmul_params(cfg) == matrices - untied
  assert cost.weight_bytes(cfg) == 4 * matrices
  assert cost.cache_bytes_per_token(cfg) == 4 * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim


def test_token_flops_match_xlas_count_of_a_cached_decode_step():
  cfg, model, params = _model(num_layers=1)  # XLA counts a loop's body once: one layer, one trip of the scan.
  batch, slots = 4, 32
  cache = transformer.init_cache(cfg, batch, slots)
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c)[0])
  analysis = step.lower(params, jnp.ones((batch, 1), jnp.int32), cache).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  # The cached step attends over every slot (masked), so XLA counts the whole cache as context; it also counts
  # norms, softmax and rotary, a few percent on top of the matmuls.
  expected = batch * cost.token_flops(cfg, slots)
  assert expected <= analysis["flops"] <= 1.15 * expected


def test_decode_meter_floor_and_share():
  cfg = tiny.tiny_config()
  meter = cost.DecodeMeter(cfg, extra_flops_per_row=1000.0)
  meter.add_prefill(3, 8, 0.5, compile_s=0.25)
  meter.add_chunk(4, 5, 18, 8, 2.0, compile_s=1.0)  # 4 rows x 5 steps, 18 tokens wanted.
  meter.add_chunk(4, 3, 12, 8, 1.0)
  rates = {"matmul_flops_per_s": 1e9, "bandwidth_bytes_per_s": 1e6}
  out = meter.summary(rates)
  assert (out["prompts_prefilled"], out["chunks"], out["rows"], out["row_steps"], out["tokens"]) == (3, 2, 8, 32, 30)
  assert out["busy_fraction"] == pytest.approx(30 / 32)
  assert (out["prefill_s"], out["decode_s"], out["compile_s"]) == pytest.approx((0.25, 2.0, 1.25))
  assert out["tokens_per_s"] == pytest.approx(30 / 2.25)

  def chunk_floor(rows, steps, tokens):
    context = 8 + steps / 2
    flops = tokens * (cost.token_flops(cfg, context) + 1000.0) / 1e9
    step_bytes = cost.weight_bytes(cfg) + rows * context * cost.cache_bytes_per_token(cfg)
    return max(flops, tokens * step_bytes / rows / 1e6)

  prefill = max(
      cost.prefill_flops(cfg, 3, 8) / 1e9, (cost.weight_bytes(cfg) + 24 * cost.cache_bytes_per_token(cfg)) / 1e6)
  floor = prefill + chunk_floor(4, 5, 18) + chunk_floor(4, 3, 12)
  assert out["floor_s"] == pytest.approx(floor) and out["share_of_floor"] == pytest.approx(floor / 2.25)
  assert "floor_s" not in meter.summary()  # No rates, no floor.


def test_padding_windows_and_dtypes_are_counted_as_the_method_needs_them():
  """A padded batch's prefill billed every prompt at the longest's width (the embedded data's sampling: 57 tokens
  against a mean of 33.6, its GFLOP/s 1.33x too high); local layers attended beyond their window; a bfloat16
  cache was counted at 4 bytes per value."""
  cfg = tiny.tiny_config()
  lengths = np.array([3, 8, 5])
  assert cost.prefill_flops(cfg, 3, lengths) == pytest.approx(sum(cost.prefill_flops(cfg, 1, n) for n in lengths))
  assert cost.prefill_flops(cfg, 3, lengths) < cost.prefill_flops(cfg, 3, 8)
  meter = cost.DecodeMeter(cfg)
  meter.add_prefill(3, lengths, 1.0)
  assert meter.prefill_bytes == cost.weight_bytes(cfg) + 16 * cost.cache_bytes_per_token(cfg)
  # Gemma 3's local layers attend over at most the window (here 4 of 6 layers, window 16).
  local = dataclasses.replace(cfg, num_layers=6, sliding_window=16, layer_is_local=(True,) * 4 + (False,) * 2)
  per_position = 4.0 * cfg.num_heads * cfg.head_dim
  assert cost.token_flops(local, 100) - cost.token_flops(local, 0) == pytest.approx(per_position * (4 * 16 + 2 * 100))
  assert cost.token_flops(local, 10) - cost.token_flops(local, 0) == pytest.approx(per_position * 6 * 10)
  # A bfloat16 model: its cache at 2 bytes per value, its weights at their storage dtype's size.
  half = dataclasses.replace(cfg, dtype="bfloat16", weight_dtype="bfloat16")
  meter = cost.DecodeMeter(half)
  meter.add_prefill(1, 8, 1.0)
  assert meter.prefill_bytes == cost.weight_bytes(half, 2) + 8 * cost.cache_bytes_per_token(half, 2)


def test_compile_time_counts_compilation_only():
  f = jax.jit(lambda x: jnp.tanh(x) @ x.T + 3.0)
  x = jnp.ones((16, 16))
  with cost.compile_time() as first:
    f(x).block_until_ready()
  with cost.compile_time() as again:
    f(x).block_until_ready()
  assert first.seconds > 0 and again.seconds == 0


def test_machine_rates_are_positive():
  rates = cost.machine_rates(matmul_size=128, copy_mb=4, repeats=2)
  assert rates["matmul_flops_per_s"] > 1e6 and rates["bandwidth_bytes_per_s"] > 1e6
  assert (rates["matmul_size"], rates["copy_mb"]) == (128, 4)
