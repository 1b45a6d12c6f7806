r"""Basis training throughput: K bases in one step on the shared backbone vs K separate models, sharded vs not.

  python -m experiments.benchmarks.train [--bases=8] [--kinds=heads,lora] [--devices=8] [--json=train.json]

A small random Llama backbone (`--layers`, `--embed`, ... ; configs/train_basis_tiny.py shows every field) and
synthetic preference pairs; every variant runs `spectral_soup.offline.steps.train_step` (jitted, state donated):
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

`--preset=gemma3_1b`: the paper-size step instead: `configs/ultrafeedback_gemma3_1b.py`'s model, basis and optimizer
(Gemma 3 1B architecture with random weights, bf16 compute, f32 adapters and Adam state, rematerialized blocks;
K = 30 LoRA bases of rank 16 on q/k/v/o, or heads), its mesh (fsdp over all local devices) and placement, on
synthetic pairs of 128 + 192 tokens, one pair per device by default (the config's micro-batch per chip). Each
kind runs in its own process (`shared K, mesh ...` rows): update time, tokens/s (2 B (prompt + response) tokens
per update), model FLOPs per update (`model_flops`: every matmul of the forward and backward passes the method
needs, rematerialization not counted), MFU against the chip's dense bf16 peak (`--peak_tflops`, or the vendor's
figure for known chips), the share of a measured bf16 matmul's rate, and the device's peak memory.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

from experiments.benchmarks import common

NAME = "train"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=f"python -m experiments.benchmarks.{NAME}", description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="", choices=("",) + tuple(PRESETS),
                 help="gemma3_1b: the paper-size step (see above); the size flags below then override the preset.")
  p.add_argument("--bases", type=int, default=None, help="K: bases trained (default 8; preset: its K).")
  p.add_argument("--kinds", default="heads,lora", help="Basis kinds to time (heads: full forward, no cache).")
  p.add_argument("--layers", type=int, default=None, help="Decoder layers of the random backbone (default 4).")
  p.add_argument("--embed", type=int, default=None, help="Residual width (default 128).")
  p.add_argument("--heads", type=int, default=None, help="Query heads (default 4; key/value heads: half).")
  p.add_argument("--head_dim", type=int, default=None, help="Width of one attention head (default 32).")
  p.add_argument("--mlp", type=int, default=None, help="MLP hidden width (default 384).")
  p.add_argument("--vocab", type=int, default=None, help="Vocabulary (default 1,024).")
  p.add_argument("--prompt_len", type=int, default=None, help="Prompt tokens per pair (default 32; preset 128).")
  p.add_argument("--response_len", type=int, default=None, help="Tokens per response (default 32; preset 192).")
  p.add_argument("--batch", type=int, default=None,
                 help="B: pairs per step, a multiple of the data-parallel devices (default 8; preset: 1 per device).")
  p.add_argument("--steps", type=int, default=3, help="Timed updates per variant (after a compile update).")
  p.add_argument("--devices", type=int, default=8, help="Fake CPU devices of the sharded variant (0: skip it).")
  p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,model axes of the sharded variant's mesh.")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="The chip's dense bf16 peak for MFU (0: the vendor's figure for known chips, else no MFU).")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)  # Internal: run the sharded variant, print JSON.
  p.add_argument("--json", default=None, help="Where to write the results (JSON).")
  return resolve(p.parse_args(argv))


# Paper-size presets: the config module whose model, basis, loss, optimizer and mesh the step uses.
PRESETS = {"gemma3_1b": "configs.ultrafeedback_gemma3_1b"}
DEFAULTS = {
    "bases": 8,
    "layers": 4,
    "embed": 128,
    "heads": 4,
    "head_dim": 32,
    "mlp": 384,
    "vocab": 1_024,
    "prompt_len": 32,
    "response_len": 32,
    "batch": 8
}
# Dense bf16 peak TFLOP/s per chip (vendors' datasheets), by a substring of jax's device_kind.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v6": 918.0,
    "TPU v4": 275.0
}


def preset_config(name: str):
  return importlib.import_module(PRESETS[name]).get_config()


def resolve(args: argparse.Namespace) -> argparse.Namespace:
  """Fills the size flags left unset: from the preset's config, else from DEFAULTS."""
  if args.preset:
    m = preset_config(args.preset).model
    fill = {
        "bases": preset_config(args.preset).basis.num_bases,
        "layers": m.num_layers,
        "embed": m.embed_dim,
        "heads": m.num_heads,
        "head_dim": m.head_dim,
        "mlp": m.mlp_dim,
        "vocab": m.vocab_size,
        "prompt_len": 128,
        "response_len": 192,
        "batch": 0
    }  # batch 0: one pair per device (set in the child).
  else:
    fill = DEFAULTS
  for key, value in fill.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  for key in DEFAULTS:
    if getattr(args, key) < (0 if key == "batch" and args.preset else 1):
      raise SystemExit(f"--{key}={getattr(args, key)}: expected a positive integer.")
  return args


def make_config(args: argparse.Namespace, kind: str, num_bases: int):
  if args.preset:
    config = preset_config(args.preset)
    kv_heads = config.model.num_kv_heads if args.heads == config.model.num_heads else max(1, args.heads // 2)
  else:
    from configs import train_basis_tiny  # pylint: disable=g-import-not-at-top
    config = train_basis_tiny.get_config()
    kv_heads = max(1, args.heads // 2)
  config.update_from_flattened_dict({
      "model.path": "",
      "model.num_layers": args.layers,
      "model.embed_dim": args.embed,
      "model.num_heads": args.heads,
      "model.num_kv_heads": kv_heads,
      "model.head_dim": args.head_dim,
      "model.mlp_dim": args.mlp,
      "model.vocab_size": args.vocab,
      "model.max_len": args.prompt_len + args.response_len,
      "data.source": "synthetic",
      "data.prompt_len": args.prompt_len,
      "data.response_len": args.response_len,
      "data.num_train_pairs": args.batch,
      "data.num_eval_pairs": 0,
      "train.batch_size": args.batch,
      "train.grad_accum_steps": 1,
      "train.cache_features": False,
      "basis.kind": kind,
      "basis.num_bases": num_bases,
      "basis.head_rank": 8
  })
  if not args.preset:
    config.basis.lora_rank = 4
  return config


def build(args: argparse.Namespace, kind: str, num_bases: int, labels_column: Optional[int] = None, mesh=None):
  """(step_fn, state, batch, backbone) for one policy; on `mesh` placed and jitted as `train_and_evaluate` does."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import build as build_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import input_pipeline, steps  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import pairs as pairs_lib  # pylint: disable=g-import-not-at-top

  # The data always has K label columns (the same pairs for every variant); a single-basis model takes one.
  config = make_config(args, kind, args.bases)
  pairs, _ = pairs_lib.load_pairs(config)
  config = make_config(args, kind, num_bases)
  if labels_column is not None:
    pairs["labels"] = pairs["labels"][:, labels_column:labels_column + 1]
  pairs = {k: v for k, v in pairs.items() if k in input_pipeline.TOKEN_FIELDS + ("labels",)}
  policy = build_lib.build_policy(build_lib.model_config(config), config.basis)
  tx, schedule = steps.make_optimizer(config)
  abstract = jax.eval_shape(policy.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  abstract_trainable, abstract_backbone = build_lib.split_params(abstract)
  if args.preset and mesh is not None:  # A billion parameters: drawn on the devices, already sharded.
    backbone_host = None
  else:
    backbone_host = build_lib.random_backbone(build_lib.unboxed(abstract_backbone), policy.config, 0)
  step = functools.partial(steps.train_step, policy, tx, schedule, dict(config.loss))

  def init_state(key):
    params = build_lib.init_trainable(policy, key)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jnp.zeros((2,), jnp.uint32)
    }

  if mesh is None:
    backbone = jax.tree.map(jnp.asarray, backbone_host)
    state = jax.jit(init_state)(jax.random.key(labels_column or 0))
    batch = {k: jnp.asarray(v)[None] for k, v in pairs.items()}  # One micro-batch: [1, B, ...].
    return jax.jit(step, donate_argnums=(0,)), state, batch, backbone

  abstract_opt_state = jax.eval_shape(tx.init, abstract_trainable)
  state_shardings = {
      "step": mesh_lib.replicated(mesh),
      "params": mesh_lib.abstract_shardings(abstract_trainable, mesh),
      "opt_state": mesh_lib.abstract_shardings(abstract_opt_state, mesh),
      "rng": mesh_lib.replicated(mesh)
  }
  backbone_shardings = mesh_lib.abstract_shardings(abstract_backbone, mesh)
  with mesh_lib.use_mesh(mesh):
    if backbone_host is None:
      draw = functools.partial(device_random_backbone, build_lib.unboxed(abstract_backbone), policy.config)
      backbone = jax.jit(draw, out_shardings=backbone_shardings)(jax.random.key(0))
    else:
      backbone = build_lib.place(backbone_host, backbone_shardings)
    state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.key(0))
    batch = mesh_lib.shard_batch({k: v[None] for k, v in pairs.items()}, mesh, batch_dim=1)
    batch_shardings = {k: v.sharding for k, v in batch.items()}
    step_fn = jax.jit(step, in_shardings=(state_shardings, batch_shardings, backbone_shardings),
                      out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
  return step_fn, state, batch, backbone


def device_random_backbone(abstract_backbone: Any, model_cfg, key) -> Any:
  """`build.random_backbone`'s distribution (`build.backbone_leaf_rule`) drawn with jax: jit it with the backbone's
  shardings. The host's NumPy draw of a billion parameters takes tens of seconds; this takes milliseconds on an
  accelerator."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import build as build_lib  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_backbone)
  keys = jax.random.split(key, len(leaves))

  def draw(path, leaf, k):
    constant, n_in = build_lib.backbone_leaf_rule(path, model_cfg)
    if constant is not None:
      return jnp.full(leaf.shape, constant, leaf.dtype)
    return (jax.random.normal(k, leaf.shape, jnp.float32) / jnp.sqrt(n_in)).astype(leaf.dtype)

  return jax.tree_util.tree_unflatten(treedef, [draw(path, leaf, k) for (path, leaf), k in zip(leaves, keys)])


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
  return {
      "kind": kind,
      "variant": variant,
      "devices": devices,
      "models": models,
      "update_ms": 1e3 * timing["median_s"],
      "compile_s": timing["first_s"],
      "basis_tokens_per_s": tokens / timing["median_s"],
      **common.timing_fields(timing)
  }


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
    rows.append(
        row(args, kind, f"{kind}/shared K={args.bases}, sharded {jax.device_count()} "
            f"(mesh {dict(mesh.shape)})", timing, devices=jax.device_count()))
  return {"rows": rows}


def model_flops(config, args: argparse.Namespace, kind: str) -> float:
  """Matmul FLOPs of one update of all K bases (the method's; rematerialization not counted).

  Per token, a forward of the backbone costs 2 x its layers' matmul parameters plus attention's 4 H d_head T
  (scores and values over the full T-long sequence, as the step computes them); per response token, the output
  layer's 2 V D (the step runs it at response positions only: `offline.features.pair_logprobs`). Heads:
  one frozen forward plus, per basis, the head's forward and backward (6 x its D r + r V parameters). LoRA: the
  reference's forward plus, per basis, a forward and a backward to the activations (the frozen weights get no
  gradient: 2 forwards' worth) and the adapters' 6 x r (in + out) per target and layer.
  """
  from spectral_soup.models import build as build_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import spectral  # pylint: disable=g-import-not-at-top
  cfg = build_lib.model_config(config)
  d, h, kv, hd, m, v = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  seq = args.prompt_len + args.response_len
  tokens = 2 * args.batch * seq
  layer = 2 * (d * hd * (h + 2 * kv) + h * hd * d + d * m * (3 if cfg.gated_mlp else 2)) + 4 * h * hd * seq
  response_tokens = 2 * args.batch * args.response_len
  forward = tokens * cfg.num_layers * layer + response_tokens * 2 * v * d
  k = args.bases
  if kind == "heads":
    r = config.basis.head_rank
    return forward + response_tokens * k * 6 * (d * r + r * v)
  shapes = spectral.lora_shapes(cfg, tuple(config.basis.lora_targets))
  adapters = 6 * config.basis.lora_rank * sum(i + o for i, o in shapes.values()) * cfg.num_layers
  return forward * (1 + 2 * k) + tokens * k * adapters


def bf16_matmul_tflops(n: int) -> float:
  """Best of 5 [n, n] @ [n, n] bf16 matmuls (f32 accumulation) on the default device, in TFLOP/s."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  timing = common.time_call(lambda: jax.jit(jnp.matmul)(a, b), repeats=5, sync=jax.block_until_ready)
  return 2 * n**3 / timing["min_s"] / 1e12


def run_preset_child(args: argparse.Namespace) -> Dict[str, Any]:
  """Inside its own process: the preset's sharded step of one basis kind, as `train_and_evaluate` places it."""
  import jax  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  (kind,) = [k for k in args.kinds.split(",") if k]
  args.batch = args.batch or jax.device_count()  # One pair per device: the preset's micro-batch per chip.
  config = make_config(args, kind, args.bases)
  mesh = mesh_lib.mesh_from_config(config.mesh)
  built = build(args, kind, args.bases, mesh=mesh)
  timing = time_updates([built], args.steps, mesh=mesh)
  del built
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  out = row(args, kind, f"{kind}/shared K={args.bases}, mesh {dict(mesh.shape)}", timing, devices=jax.device_count())
  out.update(
      preset=args.preset, batch=args.batch, device_kind=device.device_kind, backend=jax.default_backend(),
      tokens_per_s=2 * args.batch * (args.prompt_len + args.response_len) / timing["median_s"], model_flops=model_flops(
          config, args,
          kind), peak_memory_gib=(stats["peak_bytes_in_use"] /
                                  2**30 if "peak_bytes_in_use" in stats else common.process_peak_mb() / 1024),
      memory_measure="device peak_bytes_in_use" if "peak_bytes_in_use" in stats else "process peak RSS",
      dtype=config.model.dtype, weight_dtype=config.model.weight_dtype, remat=bool(config.model.remat),
      lora_rank=config.basis.lora_rank, lora_targets=list(config.basis.lora_targets), head_rank=config.basis.head_rank)
  out["achieved_tflops"] = out["model_flops"] / timing["median_s"] / 1e12 / jax.device_count()
  peak = args.peak_tflops or next((v for name, v in PEAK_BF16_TFLOPS.items() if name in device.device_kind), 0.0)
  out["peak_tflops"] = peak or None
  out["mfu"] = out["achieved_tflops"] / peak if peak else None
  out["matmul_bf16_tflops"] = bf16_matmul_tflops(8_192 if jax.default_backend() != "cpu" else 512)
  out["of_measured_matmul"] = out["achieved_tflops"] / out["matmul_bf16_tflops"]
  return out


def run_preset(args: argparse.Namespace) -> Dict[str, Any]:
  """Each kind's paper-size step in its own process (a clean device memory peak per kind)."""
  rows = []
  for kind in [k for k in args.kinds.split(",") if k]:
    child_args = [
        f"--{key}={value}" for key, value in vars(args).items()
        if key not in ("json", "child", "kinds") and value is not None
    ]
    row_or_error = common.run_child(f"experiments.benchmarks.{NAME}",
                                    child_args + [f"--kinds={kind}", "--child=preset"])
    if row_or_error.get("error"):  # One kind failing (out of memory, say) does not hide the other's row.
      print(f"train --preset={args.preset}: the {kind} step failed: {row_or_error['error']}", flush=True)
    rows.append(row_or_error)
  config = {key: v for key, v in vars(args).items() if key not in ("json", "child")}
  config["device"] = next((r["device_kind"] for r in rows if "device_kind" in r), None)
  mfu = {r["kind"]: r.get("mfu") for r in rows}
  failed = [r["kind"] for r in rows if r.get("error")]
  return common.result(NAME, config, rows, None, mfu=mfu, failed=failed,
                       command=f"python -m experiments.benchmarks.{NAME} --preset={args.preset} --kinds={args.kinds}")


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
    child = common.run_child(
        f"experiments.benchmarks.{NAME}",
        [f"--{key}={value}" for key, value in vars(args).items() if key not in ("json", "child") and value is not None
        ] + ["--child=sharded"], env={
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}",
            "JAX_PLATFORMS": "cpu"
        })
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
  return common.result(
      NAME, config, rows, headline, speedups=speedups, targets=targets,
      command=f"python -m experiments.benchmarks.{NAME} --bases={k} --kinds={args.kinds} "
      f"--devices={args.devices} --steps={args.steps}")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args = parse_args(argv)
  if args.child == "sharded":
    out = run_sharded_child(args)
    print(json.dumps(out))
    return out
  if args.child == "preset":
    try:
      out = run_preset_child(args)
    except Exception as e:  # pylint: disable=broad-except  # Out of device memory, say: a row that says so.
      out = {
          "kind": args.kinds,
          "variant": f"{args.kinds}/shared K={args.bases}",
          "error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
      }
    print(json.dumps(out))
    return out
  if args.preset:
    out = run_preset(args)
    common.print_table(
        out["rows"], [("variant", "variant", ""), ("batch", "pairs", "d"), ("update_ms", "ms / update", ",.1f"),
                      ("tokens_per_s", "tokens/s", ",.0f"), ("basis_tokens_per_s", "basis-tokens/s", ",.0f"),
                      ("model_flops", "model FLOP / update", ".3g"), ("achieved_tflops", "TFLOP/s per device", ",.1f"),
                      ("mfu", "MFU", ".1%"), ("of_measured_matmul", "of bf16 matmul", ".1%"),
                      ("peak_memory_gib", "peak GiB", ",.1f"), ("compile_s", "compile s", ".1f")],
        title=f"train --preset={args.preset}: K={args.bases}, L={args.layers} D={args.embed} V={args.vocab}, "
        f"({args.prompt_len}+{args.response_len}) tokens per response ({out['config']['device']}, "
        f"load {out['machine'].get('load_avg_1m_5m_15m')})")
    common.write_json(args.json, out)
    return out
  out = run(args)
  common.print_table(
      out["rows"], [("variant", "variant", ""), ("models", "models", "d"), ("devices", "devices", "d"),
                    ("update_ms", "ms / update of K", ",.1f"), ("basis_tokens_per_s", "basis-tokens/s", ",.0f"),
                    ("vs_separate", "vs separate", ".2f"), ("vs_unsharded_shared", "vs unsharded", ".2f"),
                    ("compile_s", "compile s", ".1f")],
      title=f"train: K={args.bases} bases, L={args.layers} D={args.embed} V={args.vocab}, B={args.batch} pairs x "
      f"({args.prompt_len}+{args.response_len}) tokens ({out['config']['device']}, "
      f"load {out['machine'].get('load_avg_1m_5m_15m')})")
  print("shared over separate: " + ", ".join(f"{kind} {s:.2f}x" for kind, s in out["speedups"].items()) +
        f" (target >= {0.5 * args.bases:.1f}x); targets: {out['targets']}")
  common.write_json(args.json, out)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
