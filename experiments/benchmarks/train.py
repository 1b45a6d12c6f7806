r"""Basis training throughput: K bases in one step on the shared backbone vs K separate models, sharded vs not.

  python -m experiments.benchmarks.train [--bases=8] [--kinds=heads,lora] [--devices=8] [--json=train.json]

A small random Llama backbone (`--layers`, `--embed`, ... ; configs/train_basis_tiny.py shows every field) and
synthetic preference pairs; every variant runs `spectral_soup.offline.train.train_step` (jitted, state donated):
* `<kind>/shared K`: one `SpectralPolicy` with K bases; one step updates all K bases (head bases: the backbone runs
  once for the batch and the K heads share it; LoRA bases: the reference and the K adapters run as one
  (K+1) x 2B-row batch);
* `<kind>/separate K x 1`: K single-basis policies (each with its own parameters and optimizer state, trained on
  its own label column), i.e. K separate models, one step each (K steps per update of all K bases);
* `<kind>/shared K, sharded D`: the shared step on a mesh of D fake CPU devices (a subprocess with
  XLA_FLAGS=--xla_force_host_platform_device_count=D; data-parallel by default, `--mesh=data,fsdp,model`), with
  the parameters, optimizer state, backbone and batch placed as `train_and_evaluate` places them.
Throughput is basis-tokens/s: K bases x B pairs x 2 responses x (prompt + response) tokens per update of all K
bases, over the wall time of that update. `speedup` = heads shared over heads separate.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Any, Dict, List, Optional, Sequence


from experiments.benchmarks import common

NAME = "train"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=f"python -m experiments.benchmarks.{NAME}", description=__doc__.split("\n")[0])
  p.add_argument("--bases", type=int, default=8, help="K: bases trained.")
  p.add_argument("--kinds", default="heads,lora", help="Basis kinds to time (heads: full forward, no cache).")
  p.add_argument("--layers", type=int, default=4, help="Decoder layers of the random backbone.")
  p.add_argument("--embed", type=int, default=128, help="Residual width.")
  p.add_argument("--heads", type=int, default=4, help="Query heads (key/value heads: half).")
  p.add_argument("--head_dim", type=int, default=32, help="Width of one attention head.")
  p.add_argument("--mlp", type=int, default=384, help="MLP hidden width.")
  p.add_argument("--vocab", type=int, default=1_024, help="Vocabulary.")
  p.add_argument("--prompt_len", type=int, default=32, help="Prompt tokens per pair.")
  p.add_argument("--response_len", type=int, default=32, help="Tokens per response.")
  p.add_argument("--batch", type=int, default=8, help="B: pairs per step (a multiple of the data-parallel devices).")
  p.add_argument("--steps", type=int, default=3, help="Timed updates per variant (after a compile update).")
  p.add_argument("--devices", type=int, default=8, help="Fake CPU devices of the sharded variant (0: skip it).")
  p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,model axes of the sharded variant's mesh.")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)  # Internal: run the sharded variant, print JSON.
  p.add_argument("--json", default=None, help="Where to write the results (JSON).")
  return p.parse_args(argv)


def make_config(args: argparse.Namespace, kind: str, num_bases: int):
  from configs import train_basis_tiny  # pylint: disable=g-import-not-at-top
  config = train_basis_tiny.get_config()
  config.update_from_flattened_dict({
      "model.num_layers": args.layers, "model.embed_dim": args.embed, "model.num_heads": args.heads,
      "model.num_kv_heads": max(1, args.heads // 2), "model.head_dim": args.head_dim, "model.mlp_dim": args.mlp,
      "model.vocab_size": args.vocab, "model.max_len": args.prompt_len + args.response_len,
      "data.prompt_len": args.prompt_len, "data.response_len": args.response_len,
      "data.num_train_pairs": args.batch, "data.num_eval_pairs": 0, "train.batch_size": args.batch,
      "train.cache_features": False, "basis.kind": kind, "basis.num_bases": num_bases, "basis.head_rank": 8,
      "basis.lora_rank": 4})
  return config


def build(args: argparse.Namespace, kind: str, num_bases: int, labels_column: Optional[int] = None, mesh=None):
  """(step_fn, state, batch, backbone) for one policy; on `mesh` placed and jitted as `train_and_evaluate` does."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import features, input_pipeline, train  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  # The data always has K label columns (the same pairs for every variant); a single-basis model takes one.
  config = make_config(args, kind, args.bases)
  pairs, _ = train.load_pairs(config)
  config = make_config(args, kind, num_bases)
  if labels_column is not None:
    pairs["labels"] = pairs["labels"][:, labels_column:labels_column + 1]
  pairs = {k: v for k, v in pairs.items() if k in input_pipeline.TOKEN_FIELDS + ("labels",)}
  policy = train.build_policy(train.model_config(config), config.basis)
  tx, schedule = train.make_optimizer(config)
  abstract = jax.eval_shape(policy.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  abstract_trainable, abstract_backbone = features.split_params(abstract)
  backbone_host = train.random_backbone(train.unboxed(abstract_backbone), policy.config, 0)
  step = functools.partial(train.train_step, policy, tx, schedule, dict(config.loss))

  def init_state(key):
    params = train.init_trainable(policy, key)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jnp.zeros((2,), jnp.uint32)}

  if mesh is None:
    backbone = jax.tree.map(jnp.asarray, backbone_host)
    state = jax.jit(init_state)(jax.random.key(labels_column or 0))
    batch = {k: jnp.asarray(v)[None] for k, v in pairs.items()}  # One micro-batch: [1, B, ...].
    return jax.jit(step, donate_argnums=(0,)), state, batch, backbone

  abstract_opt_state = jax.eval_shape(tx.init, abstract_trainable)
  state_shardings = {"step": mesh_lib.replicated(mesh),
                     "params": mesh_lib.abstract_shardings(abstract_trainable, mesh),
                     "opt_state": mesh_lib.abstract_shardings(abstract_opt_state, mesh),
                     "rng": mesh_lib.replicated(mesh)}
  backbone_shardings = mesh_lib.abstract_shardings(abstract_backbone, mesh)
  with mesh_lib.use_mesh(mesh):
    backbone = train.place(backbone_host, backbone_shardings)
    state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.key(0))
    batch = mesh_lib.shard_batch({k: v[None] for k, v in pairs.items()}, mesh, batch_dim=1)
    batch_shardings = {k: v.sharding for k, v in batch.items()}
    step_fn = jax.jit(step, in_shardings=(state_shardings, batch_shardings, backbone_shardings),
                      out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
  return step_fn, state, batch, backbone


def time_updates(models, steps: int, mesh=None) -> Dict[str, float]:
  """Median wall time of one update of every model in `models` ([(step_fn, state, batch, backbone)], in turn)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  states = [m[1] for m in models]

  def update_all():
    metrics = None
    for i, (step_fn, _, batch, backbone) in enumerate(models):
      states[i], metrics = step_fn(states[i], batch, backbone)
    return states, metrics

  with (mesh_lib.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
    timing = common.time_call(update_all, repeats=steps, sync=jax.block_until_ready)
  if any(int(jax.device_get(s["step"])) != steps + 1 for s in states):  # One compile update + the timed ones.
    raise AssertionError("a model missed an update")
  return timing


def tokens_per_update(args: argparse.Namespace) -> int:
  return args.bases * args.batch * 2 * (args.prompt_len + args.response_len)


def row(args, kind, variant, timing, devices=1, models=1):
  tokens = tokens_per_update(args)
  return {"kind": kind, "variant": variant, "devices": devices, "models": models,
          "update_ms": 1e3 * timing["median_s"], "compile_s": timing["first_s"],
          "basis_tokens_per_s": tokens / timing["median_s"]}


def run_sharded_child(args: argparse.Namespace) -> Dict[str, Any]:
  """Inside the subprocess: the shared step of every kind on a mesh of all (fake) devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  data, fsdp, model = (int(x) for x in args.mesh.split(","))
  mesh = mesh_lib.make_mesh(data, fsdp, model)
  rows = []
  for kind in [k for k in args.kinds.split(",") if k]:
    built = build(args, kind, args.bases, mesh=mesh)
    timing = time_updates([built], args.steps, mesh=mesh)
    rows.append(row(args, kind, f"{kind}/shared K={args.bases}, sharded {jax.device_count()} "
                                f"(mesh {dict(mesh.shape)})", timing, devices=jax.device_count()))
  return {"rows": rows}


def run(args: argparse.Namespace) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  k = args.bases
  rows: List[Dict[str, Any]] = []
  for kind in [x for x in args.kinds.split(",") if x]:
    shared = build(args, kind, k)
    rows.append(row(args, kind, f"{kind}/shared K={k}", time_updates([shared], args.steps)))
    del shared
    separate = []
    for column in range(k):
      step_fn, state, batch, backbone = build(args, kind, 1, labels_column=column)
      if separate:  # One compiled step serves every single-basis model (same shapes).
        step_fn = separate[0][0]
      separate.append((step_fn, state, batch, backbone))
    rows.append(row(args, kind, f"{kind}/separate {k} x 1", time_updates(separate, args.steps), models=k))
    del separate
  if args.devices:
    child = common.run_child(f"experiments.benchmarks.{NAME}",
                             [f"--{key}={value}" for key, value in vars(args).items()
                              if key not in ("json", "child") and value is not None] + ["--child=sharded"],
                             env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}",
                                  "JAX_PLATFORMS": "cpu"})
    rows += child["rows"]
  for r in rows:
    base = next(x for x in rows if x["kind"] == r["kind"] and x["variant"].startswith(f"{r['kind']}/separate"))
    r["vs_separate"] = r["basis_tokens_per_s"] / base["basis_tokens_per_s"]
    unsharded = next(x for x in rows if x["kind"] == r["kind"] and x["variant"] == f"{r['kind']}/shared K={k}")
    r["vs_unsharded_shared"] = r["basis_tokens_per_s"] / unsharded["basis_tokens_per_s"]
  speedups = {r["kind"]: r["vs_separate"] for r in rows if r["variant"] == f"{r['kind']}/shared K={k}"}
  headline = speedups.get("heads", next(iter(speedups.values()), None))
  config = {key: v for key, v in vars(args).items() if key not in ("json", "child")}
  config["tokens_per_update"] = tokens_per_update(args)
  config["device"] = jax.devices()[0].device_kind
  targets = {f"{kind}: shared >= 0.5 K x separate": s >= 0.5 * k for kind, s in speedups.items()}
  return common.result(NAME, config, rows, headline, speedups=speedups, targets=targets,
                       command=f"python -m experiments.benchmarks.{NAME} --bases={k} --kinds={args.kinds} "
                               f"--devices={args.devices}")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args = parse_args(argv)
  if args.child == "sharded":
    out = run_sharded_child(args)
    print(json.dumps(out))
    return out
  out = run(args)
  common.print_table(out["rows"], [
      ("variant", "variant", ""), ("models", "models", "d"), ("devices", "devices", "d"),
      ("update_ms", "ms / update of K", ",.1f"), ("basis_tokens_per_s", "basis-tokens/s", ",.0f"),
      ("vs_separate", "vs separate", ".2f"), ("vs_unsharded_shared", "vs unsharded", ".2f"),
      ("compile_s", "compile s", ".1f")],
      title=f"train: K={args.bases} bases, L={args.layers} D={args.embed} V={args.vocab}, B={args.batch} pairs x "
            f"({args.prompt_len}+{args.response_len}) tokens ({out['config']['device']}, "
            f"load {out['machine'].get('load_avg_1m_5m_15m')})")
  print("shared over separate: " + ", ".join(f"{kind} {s:.2f}x" for kind, s in out["speedups"].items())
        + f" (target >= {0.5 * args.bases:.1f}x); targets: {out['targets']}")
  common.write_json(args.json, out)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
