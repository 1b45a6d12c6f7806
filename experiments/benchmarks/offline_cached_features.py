r"""Head-basis training step: cached features vs the full forward (and the LoRA step for scale).

  python -m experiments.benchmarks.offline_cached_features [--models=tiny,small] [--out=cached_features.json]

For each model shape (random weights), times the jitted train step of `spectral_soup.offline.steps` on one device:
* `heads/full`:   the backbone forward over [prompt; response] for both responses, then the K heads;
* `heads/cached`: only the output layer and the K heads on cached h(s) (`offline/features.py`);
* `lora/full`:    the (K+1) x 2B-row LoRA forward and backward (the paper's parameterization, for comparison);
and the one-off cost of the frozen feature pass per pair. Prints a table and writes JSON. Not a test.
"""

from __future__ import annotations

import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from configs import train_basis_tiny
from spectral_soup.models import build
from spectral_soup.offline import features
from spectral_soup.offline import input_pipeline
from spectral_soup.offline import pairs as pairs_lib
from spectral_soup.offline import steps as steps_lib

_MODELS = flags.DEFINE_list("models", ["tiny", "small"], "Model shapes to time (see MODELS).")
_OUT = flags.DEFINE_string("out", "cached_features.json", "Where to write the results.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant (after one compile step).")

# config.model / config.data overrides per shape.
MODELS = {
    "tiny": {},  # configs/train_basis_tiny.py: 2 layers, D=32, V=64, prompt 8 + response 16.
    "small": {
        "model.num_layers": 8,
        "model.embed_dim": 256,
        "model.num_heads": 8,
        "model.num_kv_heads": 4,
        "model.head_dim": 32,
        "model.mlp_dim": 768,
        "model.vocab_size": 2_048,
        "model.max_len": 256,
        "data.prompt_len": 64,
        "data.response_len": 64,
        "basis.head_rank": 8,
        "train.batch_size": 8
    },
}


def _time_steps(step_fn, state, batch, backbone, steps):
  state, metrics = step_fn(state, batch, backbone)  # Compile.
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch, backbone)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench(name, overrides, steps):
  config = train_basis_tiny.get_config()
  config.update_from_flattened_dict({**overrides, "data.num_train_pairs": config.train.batch_size})
  rows = []
  for kind, cached in (("heads", False), ("heads", True), ("lora", False)):
    config.basis.kind = kind
    policy = build.build_policy(build.model_config(config), config.basis)
    tx, schedule = steps_lib.make_optimizer(config)
    abstract = jax.eval_shape(policy.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    _, abstract_backbone = build.split_params(abstract)
    backbone = jax.tree.map(jnp.asarray, build.random_backbone(build.unboxed(abstract_backbone), policy.config, 0))
    params = jax.jit(functools.partial(build.init_trainable, policy))(jax.random.key(0))
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jnp.zeros((2,), jnp.uint32)
    }
    pairs, _ = pairs_lib.load_pairs(config)
    pairs = {k: v[:config.train.batch_size] for k, v in pairs.items()}
    feature_s = None
    if cached:
      feature_fn = jax.jit(functools.partial(features.pair_features, policy))
      tokens = {f: pairs[f] for f in input_pipeline.TOKEN_FIELDS}
      jax.block_until_ready(feature_fn(backbone, tokens))
      t0 = time.perf_counter()
      feats = jax.block_until_ready(feature_fn(backbone, tokens))
      feature_s = (time.perf_counter() - t0) / config.train.batch_size
      pairs = {
          **{
              k: v for k, v in pairs.items() if not k.startswith("prompt")
          },
          **{
              k: np.asarray(v) for k, v in feats.items()
          }
      }
    batch = {k: jnp.asarray(v)[None] for k, v in pairs.items()}  # One micro-batch: [1, B, ...].
    step_fn = jax.jit(functools.partial(steps_lib.train_step, policy, tx, schedule, dict(config.loss)),
                      donate_argnums=(0,))
    step_s = _time_steps(step_fn, state, batch, backbone, steps)
    rows.append({
        "model": name,
        "variant": f"{kind}/{'cached' if cached else 'full'}",
        "layers": config.model.num_layers,
        "embed": config.model.embed_dim,
        "vocab": config.model.vocab_size,
        "tokens": config.data.prompt_len + config.data.response_len,
        "batch_pairs": config.train.batch_size,
        "step_ms": 1e3 * step_s,
        "feature_pass_ms_per_pair": None if feature_s is None else 1e3 * feature_s
    })
  full = rows[0]["step_ms"]
  for row in rows:
    row["speedup_vs_heads_full"] = full / row["step_ms"]
  return rows


def main(argv):
  del argv
  rows = []
  for name in _MODELS.value:
    rows += bench(name, MODELS[name], _STEPS.value)
  header = f"{'model':<6} {'variant':<13} {'L':>3} {'D':>5} {'V':>6} {'T':>4} {'B':>3} {'step ms':>9} {'speed-up':>9}"
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})\n{header}")
  for r in rows:
    print(f"{r['model']:<6} {r['variant']:<13} {r['layers']:>3} {r['embed']:>5} {r['vocab']:>6} {r['tokens']:>4} "
          f"{r['batch_pairs']:>3} {r['step_ms']:>9.2f} {r['speedup_vs_heads_full']:>8.2f}x")
  for r in rows:
    if r["feature_pass_ms_per_pair"] is not None:
      print(f"{r['model']}: feature pass {r['feature_pass_ms_per_pair']:.3f} ms/pair (once per dataset).")
  with open(_OUT.value, "w") as f:
    json.dump({"device": str(jax.devices()[0]), "rows": rows}, f, indent=2)
  print(f"Wrote {_OUT.value}.")


if __name__ == "__main__":
  app.run(main)
