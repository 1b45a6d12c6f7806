"""The basis trainer's config check: every field of a training config, before anything compiles.

`validate_config(config)` raises a ValueError naming the first bad field (`config.FIELD=value is invalid: expected
...`); `offline.train.train_and_evaluate`, the main job and the tools call it first.
"""

from __future__ import annotations

import os

from typing import Optional

import jax
import ml_collections

from spectral_soup.data import jsonl
from spectral_soup.models import build
from spectral_soup.models import config as config_lib
from spectral_soup.models import embedded
from spectral_soup.models.spectral import ATTN_TARGETS, BASIS_KINDS, MLP_TARGETS
from spectral_soup.offline import mesh as mesh_lib
from spectral_soup.offline import ridge_init
from spectral_soup.offline import sources
from spectral_soup.offline import steps
from spectral_soup.utils import config_check
from spectral_soup.utils import files

BASIS_INITS = ("zeros", "ridge")
MAX_BETA = 1e4
MAX_LEARNING_RATE = 1e3
DTYPES = ("float32", "bfloat16")


def check_embedded_attributes(config: ml_collections.ConfigDict) -> None:
  """ValueError naming `data.attributes` unless it lists the embedded data's attribute names, each once (a repeated
  or unknown name failed in the reward suite after the data was read, naming no field)."""
  from spectral_soup.data import rewards  # pylint: disable=g-import-not-at-top  (the scorers load lazily too)
  attributes = config.data.get("attributes", ())
  config_check.field_checker(config)(
      isinstance(attributes, (tuple, list)) and len(attributes) >= 1 and set(attributes) <= set(rewards.ATTRIBUTES) and
      len(set(attributes)) == len(attributes), "data.attributes",
      f"names among {', '.join(sorted(rewards.ATTRIBUTES))}, each once (one reward per attribute)")


def validate_config(config: ml_collections.ConfigDict, num_devices: Optional[int] = None,
                    num_hosts: Optional[int] = None) -> None:
  """Raises ValueError naming the first invalid field (`config.train.batch_size=...`). `num_devices` / `num_hosts`:
  the machine the job will run on (a launcher's plan; None: this process's devices and hosts)."""
  need = config_check.field_checker(config)
  config_check.check_finite(config)  # NaN / inf in any float field, before any relation between fields.

  c = config
  # Each field's own range before the relations that use it (a negative step count is named as itself).
  need(c.train.num_steps >= 0, "train.num_steps", ">= 0")
  need(c.train.num_steps >= 1 or c.basis.get("init", "zeros") == "ridge", "train.num_steps",
       ">= 1 (0 only with basis.init='ridge': the bases are then their closed-form initialization)")
  need(c.train.batch_size >= 1, "train.batch_size", ">= 1")
  need(c.model.family in config_lib.FAMILIES, "model.family", f"one of {config_lib.FAMILIES}")
  need(c.model.dtype in DTYPES, "model.dtype", f"one of {DTYPES}")
  need(c.model.weight_dtype in DTYPES, "model.weight_dtype", f"one of {DTYPES}")
  need(c.basis.kind in BASIS_KINDS, "basis.kind", f"one of {BASIS_KINDS}")
  need(c.basis.num_bases >= 1, "basis.num_bases", ">= 1")
  need(c.basis.head_rank >= 1 or (c.basis.head_rank == 0 and c.basis.get("logit_bias", False)), "basis.head_rank",
       ">= 1 (or 0 with basis.logit_bias=True)")
  need(c.basis.feature_dim >= 0, "basis.feature_dim", ">= 0 (0: no projection)")
  # Head-basis options: a LoRA basis ignored them, while config.json recorded them as if they applied.
  need(c.basis.kind == "heads" or not c.basis.get("logit_bias", False), "basis.logit_bias",
       "False unless basis.kind='heads' (a logit vector per head basis)")
  need(c.basis.kind == "heads" or not c.basis.feature_dim, "basis.feature_dim",
       "0 unless basis.kind='heads' (a projection of the head bases' features)")
  need(c.basis.get("init", "zeros") in BASIS_INITS, "basis.init", f"one of {BASIS_INITS}")
  if c.basis.get("init", "zeros") == "ridge":
    need(
        c.basis.kind == "heads" and c.basis.get("logit_bias", False) and c.basis.get("vocab_support", 0) > 0,
        "basis.init", "'zeros' unless basis.kind='heads' with basis.logit_bias=True and basis.vocab_support > 0 "
        "('ridge' fits the logit vectors on the support's cached reference probabilities)")
    need(c.basis.get("init_l2", 0.0) > 0, "basis.init_l2", "> 0")
    need(
        c.basis.get("init_features", "pair_surprise") in ridge_init.RIDGE_FEATURES, "basis.init_features",
        " or ".join(map(repr, ridge_init.RIDGE_FEATURES)))
  need(c.basis.lora_rank >= 1, "basis.lora_rank", ">= 1")
  need(
      len(c.basis.lora_targets) > 0 and set(c.basis.lora_targets) <= set(ATTN_TARGETS + MLP_TARGETS) and
      len(set(c.basis.lora_targets)) == len(c.basis.lora_targets), "basis.lora_targets",
      f"some of {ATTN_TARGETS + MLP_TARGETS}, each once")
  model_path = c.model.get("path", "")
  embedded_names = " or ".join(repr("embedded:" + n) for n in embedded.EMBEDDED_MODELS)
  if isinstance(model_path, str) and model_path.startswith("embedded:"):
    need(
        model_path[len("embedded:"):] in embedded.EMBEDDED_MODELS, "model.path", f"{embedded_names} (the models "
        "that ship in packages), a checkpoint directory or .gguf file, or '' (a random backbone)")
  elif num_devices is None:  # On the job's own machine (a launcher checks configs away from its files).
    need(not model_path or isinstance(model_path, str) and os.path.exists(os.path.expanduser(model_path)), "model.path",
         f"a checkpoint directory or .gguf file that exists, {embedded_names}, or '' (a random "
         "backbone)")
  need(c.data.prompt_len >= 1, "data.prompt_len", ">= 1")
  need(c.data.response_len >= 1, "data.response_len", ">= 1")
  if not c.model.path:  # The random backbone's architecture (a checkpoint brings its own).
    try:
      build.model_config(c)
    except ValueError as e:
      raise ValueError(str(e).replace("TransformerConfig.", "config.model.")) from None
    need(c.data.prompt_len < c.model.max_len, "data.prompt_len",
         f"< model.max_len = {c.model.max_len} (a prompt and at least one response token fit the model)")
    need(
        c.data.prompt_len + c.data.response_len <= c.model.max_len, "data.response_len",
        f"<= model.max_len - data.prompt_len = {c.model.max_len} - {c.data.prompt_len} = "
        f"{c.model.max_len - c.data.prompt_len} (or a lower data.prompt_len)")
  tokenizer = c.data.get("tokenizer", "")
  # A random backbone's run on synthetic pairs reads no tokenizer, so one that is not there failed only when the
  # trained bases were served (load_basis); other runs read it first, failing with the loader's name, not the
  # field's. A launcher checks configs away from the job's files.
  synthetic = not c.model.path and c.data.source == "synthetic"
  need((not synthetic and num_devices is not None) or not tokenizer or not isinstance(tokenizer, str) or
       tokenizer.startswith("embedded:") or os.path.exists(os.path.expanduser(tokenizer)), "data.tokenizer",
       "a local tokenizer (or checkpoint) directory or .gguf file that exists, an 'embedded:' name, or '' for "
       "model.path's own")
  named_file = isinstance(c.data.source, str) and os.path.isfile(c.data.source)
  need(c.data.source in ("synthetic", "embedded") + sources.BUILDER_SOURCES or jsonl.is_jsonl(c.data.source),
       "data.source", (f"a JSON-lines file named .jsonl (this file is named {os.path.basename(c.data.source)!r}; "
                       "a compressed file: decompress it first)") if named_file else
       (f"one of {('synthetic', 'embedded') + sources.BUILDER_SOURCES}, a .jsonl file of pairs or a datasets "
        "directory (save_to_disk)"))
  if c.data.source in sources.BUILDER_SOURCES or jsonl.is_jsonl(c.data.source):
    sources.validate_config(c)
  if c.data.source == "embedded":
    need(bool(c.model.path), "model.path", "a checkpoint (the embedded data is tokenized with its tokenizer)")
    check_embedded_attributes(c)
    need(0.0 < c.data.eval_fraction < 1.0, "data.eval_fraction", "in (0, 1)")
    # How the embedded data is sampled (used when it is generated instead of read from the shipped copy).
    need(c.data.max_new_tokens >= 1, "data.max_new_tokens", ">= 1")
    need(c.data.generation_batch_size >= 1, "data.generation_batch_size", ">= 1")
    need(c.data.temperature >= 0, "data.temperature", ">= 0 (0: greedy)")
    need(0.0 < c.data.top_p <= 1.0, "data.top_p", "in (0, 1] (1: off)")
    need(c.data.tie_margin >= 0, "data.tie_margin", ">= 0 (standard deviations)")
  need(c.data.num_train_pairs >= c.train.batch_size, "data.num_train_pairs",
       f">= train.batch_size={c.train.batch_size}")
  need(c.data.num_eval_pairs >= 0, "data.num_eval_pairs", ">= 0")
  need(c.data.get("seed", 0) >= 0, "data.seed", ">= 0")
  need(0 <= c.get("seed", 0) <= 2**63 - 1, "seed", "an integer in [0, 2**63 - 1] (jax.random.key's 64-bit seed)")
  need(c.loss.kind in steps.LOSS_KINDS, "loss.kind", f"one of {steps.LOSS_KINDS}")
  # Upper bounds keep beta x log-ratio and the updates inside float32 (1e30 failed after compiling, blamed on the
  # learning rate).
  need(0 < c.loss.beta <= MAX_BETA, "loss.beta", f"in (0, {MAX_BETA:g}]")
  need(0.0 <= c.loss.label_smoothing < 0.5, "loss.label_smoothing", "in [0, 0.5)")
  need(c.loss.rating_scale > 0, "loss.rating_scale", "> 0")
  need(0 <= c.optim.learning_rate <= MAX_LEARNING_RATE, "optim.learning_rate", f"in [0, {MAX_LEARNING_RATE:g}]")
  need(0 <= c.optim.warmup_steps and (c.optim.warmup_steps <= c.train.num_steps or c.train.num_steps == 0),
       "optim.warmup_steps", f"in [0, train.num_steps={c.train.num_steps}]")
  need(0.0 <= c.optim.end_lr_fraction <= 1.0, "optim.end_lr_fraction", "in [0, 1]")
  # Decoupled decay multiplies each update by 1 - lr x weight_decay: beyond 1 / lr it flips the weights' sign every
  # step (1e4 trained to a FloatingPointError, 1e3 to below-chance accuracy).
  decay_limit = 1 / c.optim.learning_rate if c.optim.learning_rate else float("inf")
  need(0 <= c.optim.weight_decay < decay_limit, "optim.weight_decay",
       f">= 0 and below 1 / optim.learning_rate = {decay_limit:g}")
  need(c.optim.grad_clip >= 0, "optim.grad_clip", ">= 0 (0: off)")
  need(0 <= c.optim.b1 < 1, "optim.b1", "in [0, 1)")
  need(0 <= c.optim.b2 < 1, "optim.b2", "in [0, 1)")
  need(c.train.grad_accum_steps >= 1 and c.train.batch_size % c.train.grad_accum_steps == 0, "train.grad_accum_steps",
       f"a divisor of train.batch_size={c.train.batch_size}")
  need(not c.train.cache_features or c.basis.kind == "heads", "train.cache_features",
       "False for basis.kind='lora' (cached features serve head bases only)")
  need(c.basis.get("vocab_support", 0) >= 0, "basis.vocab_support", ">= 0 (0: the whole vocabulary)")
  need(not c.basis.get("vocab_support", 0) or c.train.cache_features, "basis.vocab_support",
       "0 unless train.cache_features=True (the support's reference probabilities are cached features)")
  features_dir = c.train.get("features_dir", "")
  if features_dir:
    problem = files.directory_problem(features_dir)
    need(problem is None, "train.features_dir", f"a directory this user can write or create ({problem})")
  need(c.train.log_every_steps >= 1, "train.log_every_steps", ">= 1")
  need(isinstance(c.train.nan_check, bool), "train.nan_check", "True or False")
  need(c.train.eval_every_steps >= 0, "train.eval_every_steps", ">= 0 (0: only at the end)")
  need(c.checkpoint.every_steps >= 0, "checkpoint.every_steps", ">= 0 (0: only at the end)")
  need(c.checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep", ">= 1")

  # The mesh and what it must split.
  devices = jax.device_count() if num_devices is None else num_devices
  if c.mesh.num_devices != -1:
    need(0 < c.mesh.num_devices <= devices, "mesh.num_devices", f"-1 or 1..{devices}")
    all_devices, devices = devices, c.mesh.num_devices
  data, fsdp, model = mesh_lib.resolve_mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.model, devices)
  shards = data * fsdp
  micro = c.train.batch_size // c.train.grad_accum_steps
  need(
      micro % shards == 0, "train.batch_size",
      f"a multiple of grad_accum_steps x data x fsdp = {c.train.grad_accum_steps} x {data} x {fsdp} "
      f"(each micro-batch of {micro} pairs is split over {shards} devices)")
  hosts = jax.process_count() if num_hosts is None else num_hosts
  need(micro % hosts == 0, "train.batch_size", f"divisible over {hosts} hosts")
  # Each host reads its own 1/hosts of every batch: that needs every host to hold its own batch shards, i.e. the
  # model axis inside one host (hosts along the model axis would hold the same rows, and the batch would not fit).
  need(
      shards % hosts == 0, "mesh.model",
      f"an axis within one host: data x fsdp = {data} x {fsdp} = {shards} is not a multiple of the {hosts} hosts "
      f"(model={model} spans hosts); use a model axis of at most {max(devices // hosts, 1)} devices and a larger "
      f"data or fsdp axis")
  if c.mesh.num_devices != -1:  # `mesh.make_mesh` refuses a subset of a multi-host job's devices on the hosts.
    need(hosts == 1 or c.mesh.num_devices == all_devices, "mesh.num_devices",
         f"-1 (or {all_devices}): a job of {hosts} hosts uses every device")
  for field in ("feature_batch_size", "eval_batch_size"):
    size = c.train[field]
    need(size >= 1 and size % shards == 0, f"train.{field}", f"a positive multiple of data x fsdp = {shards}")
  need(c.data.num_eval_pairs == 0 or c.data.num_eval_pairs >= c.train.eval_batch_size, "data.num_eval_pairs",
       f"0 or >= train.eval_batch_size={c.train.eval_batch_size}")


# ----------------------------------------------------------------------------------------------------------------
# The job.
