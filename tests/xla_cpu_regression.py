r"""Standalone check of XLA CPU's YNN fusions on the computations of a souped decode (not collected by pytest).

  python tests/xla_cpu_regression.py [--probes=minimal,mix,lora,decode] [--users=8,32] [--steps=4]
                                     [--model=random|smollm2]

Runs each probe twice, in fresh processes: with XLA's defaults (`SPECTRAL_SOUP_XLA_DEFAULTS=1`: YNN fusions on)
and with the package's setting (`--xla_cpu_experimental_ynn_fusion_type=dot`: YNN for plain dots only), and
compares with float64 NumPy:

0. `minimal` (seconds; `--probes=minimal` runs it alone): the smallest program found that shows the
   miscompilation, plain jax.numpy (no flax, nothing from the package):

     x = f32[3, 2, 16385], c = f32[3]
     y = jax.jit(lambda x, c: (c[:, None, None] * x).sum(0))(x, c)     # f32[2, 16385]

   One YNN fusion (broadcast + multiply + reduce-sum over axis 0). With the fusions on, y[1] comes back equal to
   the true y[0] (max abs error ~13 on N(0, 1) data); with them off it is exact to float32 rounding. The same op at
   the naive decode's prompt shape, the K + 1 log-probs [9, U, T = 8, 49,152] weighted by c: [9, U] (broadcast over
   T and V; `explicit.weighted_logp_sum`), is the second row: every position t >= 1 gets position 0's value.
   Observed on an AVX-512 AMD EPYC (Zen 5, 2 cores) with jaxlib 0.10.2, for x: [N, A, M] summed over N with c
   broadcast over A and M: over N = 3, A in {1, 2, 3, 4, 6, 8, 12, 16, 32}, M in 2,048..65,536 it was wrong
   exactly when 2 <= A <= 8 and A * M > 32,768, and at A = 2, M = 32,768 exactly when N >= 3. Right at the
   failing shapes: a weight broadcast over the last axis only (c: [N, A, 1]), and (at [3, 2, 2, 32,768]) max
   instead of sum, add instead of multiply, and the einsum form (a dot). Flag values that avoid it:
   `--xla_cpu_experimental_ynn_fusion_type=` (all off), `=-reduce`, `=dot` (the package's setting),
   `=individual_dot`; still wrong with `=-dot`, `=-eltwise`, `=-individual_dot`, `=reduce`, `=eltwise`.
   (The LoRA test failures are a different fusion type: `-individual_dot` clears them, `-reduce` does not.)
   jax/jaxlib 0.10.1, 0.10.0, 0.9.2 and 0.9.0 on the same machine emit no YNN fusion for either row by default
   and are exact; forced with `=eltwise` they emit one and still compute it right: a jaxlib 0.10.2 regression.
   The same `minimal` group runs `broadcast_dot`: the heads' product [B, F] x [K, F, R] -> [K, B, R] (an einsum,
   one dot_general) of rows gathered from a single row (a broadcast: many rows continuing one prompt). Under the
   package's setting (`=dot`) this plain dot is wrong too at B >= 32 (every row but the first: NaN or ~1e30; right
   at B <= 16, with a materialized operand, and as a 2-D dot); `raw_wrong_rows` reports it and is not counted as
   a mismatch, because the package never hands such an operand to a dot: the decoding engine materializes the
   gathered rows (`jax.lax.optimization_barrier`), which `materialized_max_abs_err` checks.
1. `mix`: `soup.explicit.soup_logits_batched` alone, jitted, on random [K + 1, U, 49,152] logits (no position
   axis, so the `minimal` pattern does not arise: clean either way).
2. `lora`: one projection with a LoRA update, x W + (x A) B, [U * 16, 576] x [576, 576], rank 8.
3. `decode`: greedy decoding of SmolLM2-135M (30 layers, D = 576, V = 49,152; the
   embedded GGUF, the default, or 4 random layers with `--model=random`) with K = 8 head bases, in the explicit, parameter and naive modes
   (the same distribution for head bases), each checked teacher-forced against `tests/numpy_reference.py`.

On machines where the fusions miscompute (an AVX-512 AMD EPYC with jaxlib 0.10.2), the "defaults" column shows
token disagreements; the "package" column must be clean everywhere. Exit status 1 if the package's setting
mismatches. Each process prints one JSON line; the parent prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 8
PROBES = ("minimal", "mix", "lora", "decode")

# The minimal program, as `probe_minimal` runs it (x: [N, A, M], c: [N], summed over N).
MINIMAL_SHAPE = (3, 2, 16385)
# The same reduction at the naive decode's prompt step: [K + 1, U, T, V] log-probs, c: [K + 1, U].
PROMPT_SHAPE = (K + 1, 8, 8, 49_152)


def probe_minimal(shape=MINIMAL_SHAPE) -> dict:
  """sum_n c[n, ...] * x[n], jitted, vs float64; c has x's leading axes but one or more fewer (broadcast)."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  if len(shape) == 3:
    c = rng.normal(size=shape[:1]).astype(np.float32)
    fn = lambda x, c: (c[:, None, None] * x).sum(0)
  else:  # [N, U, T, V] with per-(n, u) weights, as `explicit.weighted_logp_sum` mixes the K + 1 log-probs.
    c = rng.normal(size=shape[:2]).astype(np.float32)
    fn = lambda x, c: (c[:, :, None, None] * x).sum(0)
  compiled = jax.jit(fn).lower(x, c).compile()
  got = np.asarray(compiled(x, c), np.float64)
  want = np.einsum("n...,n...->...", np.float64(c).reshape(c.shape + (1,) * (x.ndim - c.ndim)), np.float64(x))
  # The failure's signature: along axis -2, every index >= 1 holds the true value at index 0.
  rest, first = np.moveaxis(got, -2, 0)[1:], np.moveaxis(want, -2, 0)[:1]
  copies = np.abs(rest - first).max(-1) < 1e-4
  return {
      "max_abs_err": float(np.abs(got - want).max()),
      "copies_of_index_0": float(copies.mean()),
      "ynn_fusions": float(compiled.as_text().count('"__ynn_fusion"'))
  }


def probe_broadcast_dot(rows: int = 128) -> dict:
  """[B, F] rows gathered from one row (a broadcast), times [K, F, R] heads: raw, and materialized as the engine
  does, vs float64."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  psi, heads = rng.normal(size=(1, 32)).astype(np.float32), rng.normal(size=(3, 32, 4)).astype(np.float32)
  index = np.zeros(rows, np.int32)
  want = np.einsum("bf,kfr->kbr", np.float64(psi[index]), np.float64(heads))

  def run(materialize):

    def fn(psi, heads, index):
      x = jnp.take(psi, index, axis=0, mode="clip")
      return jnp.einsum("bf,kfr->kbr", jax.lax.optimization_barrier(x) if materialize else x, heads)

    got = np.asarray(jax.jit(fn)(psi, heads, index), np.float64)
    return got, ~(np.abs(got - want) <= 1e-3).all(axis=(0, 2))

  _, raw_wrong = run(False)
  got, _ = run(True)
  return {"raw_wrong_rows": float(raw_wrong.sum()), "materialized_max_abs_err": float(np.abs(got - want).max())}


def probe_mix(users: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from spectral_soup.soup.explicit import soup_logits_batched  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(users)
  ref = rng.normal(size=(users, 49_152)).astype(np.float32) * 3
  basis = ref[None] + rng.normal(size=(K, users, 49_152)).astype(np.float32)
  lam = rng.dirichlet(np.ones(K + 1), users)[:, 1:].astype(np.float32)
  got = np.asarray(jax.jit(soup_logits_batched)(ref, basis, lam), np.float64)

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  lp = log_softmax(np.concatenate([ref[None], basis]).astype(np.float64))
  coeffs = np.concatenate([1 - lam.sum(-1, keepdims=True), lam], -1).T.astype(np.float64)
  want = log_softmax(np.sum(coeffs[..., None] * lp, 0))
  return {
      "max_abs_err": float(np.abs(got - want).max()),
      "argmax_match": float(np.mean(got.argmax(-1) == want.argmax(-1)))
  }


def probe_lora(users: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(users)
  x = rng.normal(size=(users * 16, 576)).astype(np.float32)
  w = (rng.normal(size=(576, 576)) / 24).astype(np.float32)
  a = (rng.normal(size=(576, 8)) / 24).astype(np.float32)
  b = (0.5 * rng.normal(size=(8, 576))).astype(np.float32)
  got = np.asarray(jax.jit(lambda x, w, a, b: x @ w + (x @ a) @ b)(x, w, a, b), np.float64)
  x, w, a, b = (np.float64(t) for t in (x, w, a, b))
  want = x @ w + (x @ a) @ b
  return {"max_abs_err": float(np.abs(got - want).max()), "argmax_match": 1.0}


def probe_decode(users: int, steps: int, model: str) -> dict:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import config as config_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.models.spectral import SpectralPolicy  # pylint: disable=g-import-not-at-top
  from spectral_soup.soup import serving  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from tests import numpy_reference  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top

  if model == "smollm2":
    from spectral_soup.models import embedded, gguf_import, hf_import  # pylint: disable=g-import-not-at-top
    hf_config, state = gguf_import.read_gguf(embedded.smollm2_gguf_path())
    cfg = hf_import.config_from_hf(hf_config.to_dict())
    backbone = hf_import.params_from_state_dict(cfg, state)
  else:  # A deep random model is chaotic (log-probs move by 0.1 under float32 rounding): keep it shallow.
    cfg = config_lib.llama(num_layers=4)
    backbone = None
  policy = SpectralPolicy(cfg, num_bases=K, basis_kind="heads", head_rank=8)
  shapes = nn.meta.unbox(jax.eval_shape(policy.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  params = tiny.random_params(shapes, seed=0)
  if backbone is None:  # Well-conditioned random weights (std 1 / sqrt(fan_in)), as in test_decode_reference.
    params["features"]["backbone"] = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.5 * x if jax.tree_util.keystr(p).endswith("['kernel']") else x, params["features"]["backbone"])
  else:
    params["features"]["backbone"] = backbone
  rng = np.random.default_rng(users)
  d, v = cfg.embed_dim, cfg.vocab_size
  params["heads"] = {
      "a": jnp.asarray(rng.normal(size=(K, d, 8)) / np.sqrt(d), jnp.float32),
      "b": jnp.asarray(0.3 * rng.normal(size=(K, 8, v)), jnp.float32)
  }
  prompt = rng.integers(10, v, (users, 8)).astype(np.int32)
  lam = rng.dirichlet(np.ones(K + 1), users)[:, 1:].astype(np.float32)
  mask = np.ones(prompt.shape, bool)
  out = {}
  for mode in ("explicit", "params", "naive"):
    tokens, aux = serving.generate(policy, params, lam, prompt, mask, mode=mode, max_new_tokens=steps)
    tokens, logprobs = np.asarray(tokens), np.asarray(aux["logprobs"])
    check = numpy_reference.check_decode(cfg, params, prompt, lam, tokens, logprobs, steps)
    out[mode] = tokens
    out[f"{mode}_argmax_ok"] = float(check["argmax_ok"].mean())
    out[f"{mode}_max_logprob_err"] = float(check["logprob_err"].max())
  out["params_vs_explicit"] = float(np.mean(out["params"] == out["explicit"]))
  out["naive_vs_explicit"] = float(np.mean(out["naive"] == out["explicit"]))
  for mode in ("explicit", "params", "naive"):
    out.pop(mode)
  return out


def child(args) -> None:
  import spectral_soup  # pylint: disable=g-import-not-at-top,unused-import
  import jax  # pylint: disable=g-import-not-at-top
  result = {
      "jax": jax.__version__,
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      "package_setting": spectral_soup.XLA_CPU_SAFE
  }
  if "minimal" in args.probes:
    result["minimal " + "x".join(map(str, MINIMAL_SHAPE))] = probe_minimal(MINIMAL_SHAPE)
    result["minimal " + "x".join(map(str, PROMPT_SHAPE))] = probe_minimal(PROMPT_SHAPE)
    result["broadcast_dot B=128"] = probe_broadcast_dot(128)
  for users in args.users:
    if "mix" in args.probes:
      result[f"mix U={users}"] = probe_mix(users)
    if "lora" in args.probes:
      result[f"lora U={users}"] = probe_lora(users)
    if "decode" in args.probes:
      result[f"decode U={users}"] = probe_decode(users, args.steps, args.model)
  print(json.dumps(result))


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--probes", default=",".join(PROBES),
                 help=f"Comma-separated subset of {','.join(PROBES)}; 'minimal' alone takes seconds.")
  p.add_argument("--users", default="8,32")
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--model", default="smollm2", choices=("random", "smollm2"),
                 help="smollm2: the embedded GGUF's weights (well conditioned); random: a random 4-layer model.")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  args.users = [int(u) for u in args.users.split(",")]
  args.probes = [name for name in args.probes.split(",") if name]
  unknown = sorted(set(args.probes) - set(PROBES))
  if unknown or not args.probes:
    p.error(f"--probes: expected a subset of {','.join(PROBES)}, got {unknown or 'nothing'}")
  if args.child:
    child(args)
    return 0
  results = {}
  for name, env in (("defaults", {"SPECTRAL_SOUP_XLA_DEFAULTS": "1"}), ("package", {})):
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    full_env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        os.path.abspath(__file__), "--child", f"--probes={','.join(args.probes)}",
        f"--users={','.join(map(str, args.users))}", f"--steps={args.steps}", f"--model={args.model}"
    ]
    proc = subprocess.run(cmd, env=full_env, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode:
      print(proc.stderr[-3000:])
      return 2
    results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"jax {results['package']['jax']}; CPU: {_cpu_name()}")
  print(f"{'probe':<24} {'metric':<26} {'XLA defaults':>14} {'package':>14}")
  failed = False
  for probe, metrics in results["package"].items():
    if not isinstance(metrics, dict):
      continue
    for metric, value in metrics.items():
      default = results["defaults"][probe][metric]
      print(f"{probe:<24} {metric:<26} {default:>14.6g} {value:>14.6g}")
      if ("err" in metric and value > 1e-3) or (("match" in metric or "ok" in metric or "_vs_" in metric) and
                                                value < 0.99):
        failed = True
  print("package setting:", "MISMATCH" if failed else "clean")
  return 1 if failed else 0


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().splitlines()
    name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
    return f"{name}, AVX-512: {'yes' if any(f.startswith('avx512') for f in flags) else 'no'}"
  except OSError:
    return "?"


if __name__ == "__main__":
  sys.exit(main())
