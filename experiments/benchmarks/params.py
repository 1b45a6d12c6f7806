r"""Per-user merged parameters for U users: vmapped `soup.parameters` vs a Python loop over PyTorch state dicts.

  python -m experiments.benchmarks.params [--users=128] [--bases=8] [--layers=4] [--embed=256] [--json=params.json]

K basis policies adapt the q / v projections of an L-layer model (q: [D, D], v: [D, D_kv]). Two workloads, each
producing every user's merged tensors (all U users' outputs are kept, as a server would hold them):

* `lora`: Delta W_user = scale * sum_k lam_k A_k B_k per projection and layer.
  - `ours/vmap(soup_lora_dense)`: `jax.jit(jax.vmap(soup_lora_dense, in_axes=(None, 0, None)))` on the stacked
    adapters {"a": [K, L, in, r], "b": [K, L, r, out]} (one einsum over the concatenated rank axis per target,
    so K * r multiply-adds per output element and user);
  - `ours/lora_delta once + vmap(soup_params)`: Delta W_k = scale * A_k B_k formed once (`lora_delta`), then every
    user's weighted sum by `soup_params` on zero references (K multiply-adds per output element and user);
  - `torch/loop sum_k w_k dW_k` (P-Soups style): per user, per tensor of the K state dicts of precomputed
    Delta W_k (named like PEFT's per-layer modules), `sum(w[k] * sd_k[name] for k)`;
  - `torch/loop tensordot`: the same with the K Delta W_k stacked per tensor, one `tensordot` per tensor;
  - `torch/loop factors`: per user, per tensor `(A_cat * (w (x) 1_r)) @ B_cat` (our algorithm, one user at a time).
* `full`: theta_user = theta_ref + sum_k lam_k (theta_k - theta_ref) for full-weight bases (Rewarded Soups).
  - `ours/vmap(soup_params)`: `jax.jit(jax.vmap(soup_params, in_axes=(None, None, 0)))`;
  - `torch/loop`: per user, per tensor `ref + sum_k w_k (theta_k - ref)` over K state dicts;
  - `torch/loop tensordot`: per user, per tensor `ref + tensordot(w, stacked - ref)`.
Rows of kind `reference` (a plain `jnp.einsum` over the basis axis, not a library function) show what the same merge
costs as one dot_general. Reports users/s and the max |difference| to ours. `speedup` = our fastest variant over the
fastest loop, for the `lora` workload (`speedups` holds both workloads).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from experiments.benchmarks import common

NAME = "params"
# PyTorch's OpenMP threads spin while they wait, which makes it many times slower whenever another process shares
# the cores (passive waiting costs nothing on an idle machine). Only effective before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=f"python -m experiments.benchmarks.{NAME}", description=__doc__.split("\n")[0])
  p.add_argument("--users", type=int, default=128, help="U: users whose merged parameters are built.")
  p.add_argument("--bases", type=int, default=8, help="K: basis policies.")
  p.add_argument("--layers", type=int, default=4, help="L: decoder layers adapted.")
  p.add_argument("--embed", type=int, default=256, help="D: residual width (q: [D, D]).")
  p.add_argument("--kv_dim", type=int, default=128, help="D_kv: key/value width (v: [D, D_kv]).")
  p.add_argument("--rank", type=int, default=8, help="r: LoRA rank.")
  p.add_argument("--workloads", default="lora,full", help="Which workloads to time.")
  p.add_argument("--min_time_s", type=float, default=1.0, help="Repeat each variant for at least this long.")
  p.add_argument("--torch_device", default="cpu", help="Device of the PyTorch loops (cpu, cuda).")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="Where to write the results (JSON).")
  return p.parse_args(argv)


def _check_users(users: int) -> None:
  if users < 1:
    raise ValueError(f"--users={users}: expected >= 1.")


def run(args: argparse.Namespace) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from spectral_soup.soup import parameters  # pylint: disable=g-import-not-at-top

  _check_users(args.users)
  torch.set_grad_enabled(False)
  rng = np.random.default_rng(args.seed)
  users, k, num_layers, r = args.users, args.bases, args.layers, args.rank
  shapes = {"q_proj": (args.embed, args.embed), "v_proj": (args.embed, args.kv_dim)}
  lam = rng.normal(size=(users, k)).astype(np.float32) / k
  device = torch.device(args.torch_device)
  to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
  lam_t = to_t(lam)
  scale = 2.0
  rows: List[Dict[str, Any]] = []
  workloads = [w for w in args.workloads.split(",") if w]
  mb_per_user = 4 * num_layers * sum(i * o for i, o in shapes.values()) / 2**20

  def add(workload, variant, kind, timing, max_diff):
    rows.append({
        "workload": workload,
        "variant": variant,
        "kind": kind,
        "users": users,
        "time_s": timing["median_s"],
        "users_per_s": users / timing["median_s"],
        "output_mb_per_s": users * mb_per_user / timing["median_s"],
        "max_abs_diff_vs_ours": max_diff,
        **common.timing_fields(timing)
    })

  def torch_time(fn):
    sync = (lambda out: (torch.cuda.synchronize(), out)[1]) if device.type == "cuda" else None
    return common.time_call(fn, repeats=2, warmup=1, min_time_s=args.min_time_s, sync=sync)

  if "lora" in workloads:
    # Stacked adapters (ours) and the same numbers as per-basis, per-layer PyTorch state dicts of Delta W_k.
    stacked = {
        name: {
            "a": (rng.normal(size=(k, num_layers, i, r)) / np.sqrt(i)).astype(np.float32),
            "b": (0.1 * rng.normal(size=(k, num_layers, r, o))).astype(np.float32)
        } for name, (i, o) in shapes.items()
    }
    dense_k = {name: scale * np.einsum("klir,klro->klio", ad["a"], ad["b"]) for name, ad in stacked.items()}
    tensor_names = [
        (f"model.layers.{l}.self_attn.{name}.delta_weight", name, l) for l in range(num_layers) for name in shapes
    ]
    state_dicts = [{full: to_t(dense_k[name][kk, l]) for full, name, l in tensor_names} for kk in range(k)]
    stacked_t = {full: torch.stack([sd[full] for sd in state_dicts]) for full, _, _ in tensor_names}
    factors_t = {
        full: (to_t(np.moveaxis(stacked[name]["a"][:, l], 0, -2).reshape(shapes[name][0], k * r)),
               to_t(stacked[name]["b"][:, l].reshape(k * r, -1))) for full, name, l in tensor_names
    }

    # Arrays enter the jitted functions as arguments, never as closed-over constants (see BENCHMARKS.md: jax 0.10.2
    # on CPU miscompiles a reduction over a large captured constant).
    stacked_j, lam_j = jax.tree.map(jnp.asarray, stacked), jnp.asarray(lam)
    ours_fn = jax.jit(jax.vmap(lambda st, lam_u: parameters.soup_lora_dense(st, lam_u, scale), in_axes=(None, 0)))
    timing = common.time_call(lambda: ours_fn(stacked_j, lam_j), min_time_s=args.min_time_s, sync=common.jax_sync)
    ours = {name: np.asarray(v) for name, v in ours_fn(stacked_j, lam_j).items()}  # [U, L, in, out]
    add("lora", "ours/vmap(soup_lora_dense)", "ours", timing, 0.0)

    # Ours, Delta W_k formed once (`lora_delta`), then every user's weighted sum (`soup_params` on zero refs).
    delta_fn = jax.jit(lambda st: parameters.lora_delta(st, scale))
    dense_j = common.jax_sync(delta_fn(stacked_j))
    zeros_j = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), dense_j)
    merge_fn = jax.jit(jax.vmap(parameters.soup_params, in_axes=(None, None, 0)))
    timing = common.time_call(lambda: merge_fn(zeros_j, dense_j, lam_j), min_time_s=args.min_time_s,
                              sync=common.jax_sync)
    merged = merge_fn(zeros_j, dense_j, lam_j)
    add("lora", "ours/lora_delta once + vmap(soup_params)", "ours", timing,
        max(float(np.max(np.abs(np.asarray(merged[name]) - ours[name]))) for name in shapes))

    # For scale: the same merge as one dot_general over the basis axis (not a library function).
    dot_fn = jax.jit(lambda dense, lam_: jax.tree.map(
        lambda x: jnp.einsum("uk,k...->u...", lam_, x, precision=jax.lax.Precision.HIGHEST), dense))
    timing = common.time_call(lambda: dot_fn(dense_j, lam_j), min_time_s=args.min_time_s, sync=common.jax_sync)
    merged = dot_fn(dense_j, lam_j)
    add("lora", "jax einsum('uk,k...') over Delta W_k", "reference", timing,
        max(float(np.max(np.abs(np.asarray(merged[name]) - ours[name]))) for name in shapes))
    del merged, dense_j

    def check(merged: List[Dict[str, Any]]) -> float:
      return max(
          float(np.max(np.abs(merged[u][full].cpu().numpy() - ours[name][u, l])))
          for u in (0, users - 1)
          for full, name, l in tensor_names)

    def loop_sum():
      return [{
          full: sum(float(lam[u, kk]) * state_dicts[kk][full] for kk in range(k)) for full, _, _ in tensor_names
      } for u in range(users)]

    def loop_tensordot():
      return [{
          full: torch.tensordot(lam_t[u], stacked_t[full], dims=1) for full, _, _ in tensor_names
      } for u in range(users)]

    def loop_factors():
      out = []
      for u in range(users):
        row_scale = lam_t[u].repeat_interleave(r) * scale
        out.append({full: (a * row_scale) @ b for full, (a, b) in factors_t.items()})
      return out

    for variant, fn in (("torch/loop sum_k w_k dW_k", loop_sum), ("torch/loop tensordot", loop_tensordot),
                        ("torch/loop factors", loop_factors)):
      add("lora", variant, "baseline", torch_time(fn), check(fn()))

  if "full" in workloads:
    ref = {
        name: (rng.normal(size=(num_layers, i, o)) / np.sqrt(i)).astype(np.float32) for name, (i, o) in shapes.items()
    }
    bases = {
        name: (ref[name][None] + 0.01 * rng.normal(size=(k, *ref[name].shape))).astype(np.float32) for name in shapes
    }
    ref_j, bases_j, lam_j = jax.tree.map(jnp.asarray, ref), jax.tree.map(jnp.asarray, bases), jnp.asarray(lam)
    ours_fn = jax.jit(jax.vmap(parameters.soup_params, in_axes=(None, None, 0)))
    timing = common.time_call(lambda: ours_fn(ref_j, bases_j, lam_j), min_time_s=args.min_time_s, sync=common.jax_sync)
    ours = {name: np.asarray(v) for name, v in ours_fn(ref_j, bases_j, lam_j).items()}
    add("full", "ours/vmap(soup_params)", "ours", timing, 0.0)
    dot_fn = jax.jit(lambda ref_, bases_, lam_: jax.tree.map(
        lambda r_, b_: r_[None] + jnp.einsum("uk,k...->u...", lam_, b_ - r_[None], precision="highest"), ref_, bases_))
    timing = common.time_call(lambda: dot_fn(ref_j, bases_j, lam_j), min_time_s=args.min_time_s, sync=common.jax_sync)
    merged = dot_fn(ref_j, bases_j, lam_j)
    add("full", "jax einsum('uk,k...') over theta_k - theta_ref", "reference", timing,
        max(float(np.max(np.abs(np.asarray(merged[name]) - ours[name]))) for name in shapes))
    del merged
    names = [(f"model.layers.{l}.self_attn.{name}.weight", name, l) for l in range(num_layers) for name in shapes]
    ref_sd = {full: to_t(ref[name][l]) for full, name, l in names}
    base_sds = [{full: to_t(bases[name][kk, l]) for full, name, l in names} for kk in range(k)]
    deltas_full = {full: torch.stack([sd[full] for sd in base_sds]) - ref_sd[full] for full, _, _ in names}

    def check_full(merged):
      return max(
          float(np.max(np.abs(merged[u][full].cpu().numpy() - ours[name][u, l])))
          for u in (0, users - 1)
          for full, name, l in names)

    def loop_full():
      return [{
          full: ref_sd[full] + sum(float(lam[u, kk]) * (base_sds[kk][full] - ref_sd[full])
                                   for kk in range(k))
          for full, _, _ in names
      }
              for u in range(users)]

    def loop_full_tensordot():
      return [{
          full: ref_sd[full] + torch.tensordot(lam_t[u], deltas_full[full], dims=1) for full, _, _ in names
      } for u in range(users)]

    for variant, fn in (("torch/loop", loop_full), ("torch/loop tensordot", loop_full_tensordot)):
      add("full", variant, "baseline", torch_time(fn), check_full(fn()))

  speedups = {}
  for workload in workloads:
    group = [r_ for r_ in rows if r_["workload"] == workload]
    best = max((r_ for r_ in group if r_["kind"] == "baseline"), key=lambda r_: r_["users_per_s"])
    ours_row = max((r_ for r_ in group if r_["kind"] == "ours"), key=lambda r_: r_["users_per_s"])
    for row in group:
      row["speedup_vs_strongest_baseline"] = row["users_per_s"] / best["users_per_s"]
    speedups[workload] = {
        "speedup": ours_row["users_per_s"] / best["users_per_s"],
        "ours": ours_row["variant"],
        "strongest_baseline": best["variant"]
    }
  headline = speedups.get("lora", next(iter(speedups.values())))
  config = {key: v for key, v in vars(args).items() if key != "json"}
  config["output_mb_per_user"] = mb_per_user
  return common.result(
      NAME, config, rows, headline["speedup"], strongest_baseline=headline["strongest_baseline"], speedups=speedups,
      command=f"python -m experiments.benchmarks.{NAME} --users={users} --bases={k} "
      f"--layers={num_layers} --embed={args.embed}")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args = parse_args(argv)
  out = run(args)
  common.print_table(
      out["rows"], [("workload", "workload", ""), ("variant", "variant", ""), ("users", "users", "d"),
                    ("time_s", "time s", ".4f"), ("users_per_s", "users/s", ",.0f"),
                    ("output_mb_per_s", "MB/s out", ",.0f"), ("speedup_vs_strongest_baseline", "vs best loop", ".2f"),
                    ("max_abs_diff_vs_ours", "max|diff|", ".1e")],
      title=f"params: U={args.users} users x K={args.bases} bases, L={args.layers} layers, q [{args.embed}, "
      f"{args.embed}] + v [{args.embed}, {args.kv_dim}], r={args.rank} "
      f"({out['config']['output_mb_per_user']:.2f} MB per user; load {out['machine'].get('load_avg_1m_5m_15m')})")
  print("speedups: " + "; ".join(
      f"{w}: {s['ours']} {s['speedup']:.2f}x over {s['strongest_baseline']}" for w, s in out["speedups"].items()))
  common.write_json(args.json, out)
  return out


if __name__ == "__main__":
  main()
