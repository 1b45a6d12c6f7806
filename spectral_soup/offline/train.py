r"""Offline phase: trains the K basis policies together in one sharded step (docs/METHOD.md section 3).

`train_and_evaluate(config, workdir)` is the whole job, in named steps: the run accepted (`_accept_run`: mesh, model,
sharding, pairs, an existing checkpoint's config (`resume.py`), the workdir's lock), the inputs placed
(`_device_inputs`), the update step (`steps.py`), the checkpoint restored or the state initialized
(`_restore_or_init`), the loop (`_run_steps`), the final evaluation. The policy and its parameters come from
`spectral_soup.models.build`, the pairs from `offline/pairs.py`.
Entry point: `python -m experiments.train_basis --config=... --workdir=...`.

* Train state `{"step", "params", "opt_state", "rng"}` holds only the trainable part of the policy (the heads,
  psi's projection if any, or the LoRA adapters); the frozen backbone is a separate argument of the step, never
  in the optimizer and never in a checkpoint (it is reloaded from `config.model`).
* Shapes come from `jax.eval_shape` before anything is allocated; the trainable parameters are created already
  sharded by `jax.jit(init, out_shardings=...)`; the backbone (a checkpoint, or a seeded host-side random init) is
  placed straight into its sharding.
* The update step is one `jax.jit` with in/out shardings, the state donated; gradient accumulation is a
  `lax.scan` over micro-batches inside it, normalized by the whole batch's label counts (so accumulating equals
  one large batch).
* Head bases can train on cached features (`config.train.cache_features`, see `features.py`): the frozen backbone
  runs once over the data before the loop (`feature_cache.py`) and a step only runs the heads. Logit-vector bases
  can start from their closed form (`basis.init="ridge"`, `ridge_init.py`).
* Checkpoints (Orbax, async, last N) hold the state and the data iterator's position; a restarted job resumes
  bitwise where the last checkpoint left off; SIGTERM (or a first Ctrl-C) saves a checkpoint and stops. A
  checkpoint written with other `resume.resume_fields` (another K, model shape, batch size, ...), on other pairs
  or on another backbone at the same path stops the run naming the difference.
* A step with a non-finite loss or gradient norm never updates the state; `config.train.nan_check` stops the run
  there, with the step's batch and the state it started from saved under `<workdir>/nonfinite/step_<n>/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from spectral_soup.data import jsonl
from spectral_soup.models import build
from spectral_soup.models import config as config_lib
from spectral_soup.models import hf_import
from spectral_soup.models.spectral import SpectralPolicy
from spectral_soup.offline import checkpoint as checkpoint_lib
from spectral_soup.offline import config_checks
from spectral_soup.offline import feature_cache
from spectral_soup.offline import features
from spectral_soup.offline import input_pipeline
from spectral_soup.offline import mesh as mesh_lib
from spectral_soup.offline import metrics as metrics_lib
from spectral_soup.offline import pairs as pairs_lib
from spectral_soup.offline import resume
from spectral_soup.offline import ridge_init
from spectral_soup.offline import sources
from spectral_soup.offline import steps
from spectral_soup.utils import errors
from spectral_soup.utils import files
from spectral_soup.utils import memory
from spectral_soup.utils import progress
from spectral_soup.utils import workdir_lock


@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns: the final state (device arrays) and the last metrics (host values)."""
  state: Dict[str, Any]
  step: int
  train_metrics: Dict[str, Any]
  eval_metrics: Dict[str, Any]
  preempted: bool
  timing: Dict[str, float]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       pairs: Optional[Tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]] = None,
                       loaded: Optional[Tuple[Any, Any]] = None) -> TrainResult:
  """Trains the K bases of `config` and writes checkpoints and metrics to `workdir`. Resumes if it can.

  pairs: (train, eval) pair arrays to use instead of `offline.pairs.load_pairs(config)` (e.g. with extra label columns);
  loaded: (model, backbone params) already loaded from `config.model.path`.
  """
  with contextlib.ExitStack() as stack:  # Holds the workdir's lock while the run lasts.
    return _train_and_evaluate(config, workdir, stack, pairs=pairs, loaded=loaded)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stack: contextlib.ExitStack, *, pairs,
                        loaded) -> TrainResult:
  # Nothing is written to `workdir` until the config, the model, the data, an existing checkpoint's config and the
  # workdir's lock have been checked: a rejected run leaves a workdir as it found it, and its errors are
  # `InputError`s (one line from the CLIs). config.json is written once the run is accepted.
  with errors.input_stage():
    config_checks.validate_config(config)
    if os.path.isdir(workdir):
      workdir_lock.check_free(workdir)  # Before the model loads: another live run holds it.
    timing = {}
    t_start = time.time()
    run, train_pairs, eval_pairs = _accept_run(config, workdir, stack, pairs=pairs, loaded=loaded)
  mesh = run.mesh
  support = None
  if config.basis.get("vocab_support", 0):
    support = features.select_support([train_pairs["response_a"], train_pairs["response_b"]],
                                      [train_pairs["response_a_mask"], train_pairs["response_b_mask"]],
                                      config.basis.vocab_support, run.model_cfg.vocab_size)

  with mesh_lib.use_mesh(mesh):
    if run.loaded_backbone is not None:
      backbone = build.place(build.unboxed(run.loaded_backbone), run.backbone_shardings)
    else:
      backbone = build.place(build.random_backbone(build.unboxed(run.abstract_backbone), run.model_cfg, config.seed),
                             run.backbone_shardings)
    train_pairs, eval_pairs, logit_bias = _device_inputs(config, workdir, run, backbone, train_pairs, eval_pairs,
                                                         support, timing)
    train_iter = input_pipeline.PairIterator(train_pairs, config.train.batch_size, seed=config.seed)
    accum = config.train.grad_accum_steps

    def to_micro_batches(host_batch):  # [b, ...] -> [A, b / A, ...] global arrays, micro-batches on axis 0.
      local = {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in host_batch.items()}
      return mesh_lib.shard_batch(local, mesh, batch_dim=1)

    batch_shardings = {k: mesh_lib.batch_sharding(mesh, v.ndim + 1, batch_dim=1) for k, v in train_pairs.items()}

    # ---- Update step: jitted with shardings; the state is donated.
    step_fn = jax.jit(
        functools.partial(steps.train_step, run.policy, run.tx, run.schedule, dict(config.loss),
                          support=support), in_shardings=(run.state_shardings, batch_shardings, run.backbone_shardings),
        out_shardings=(run.state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
    evaluate = _evaluator(config, run, backbone, eval_pairs, support)

    # ---- Checkpoint: resume from the newest good step, else initialize (sharded at creation).
    interval = config.checkpoint.every_steps or max(config.train.num_steps, 1)  # 0: only the last step.
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep,
                                       save_interval_steps=interval, async_save=config.checkpoint.async_save)
    restored, start_step, state = _restore_or_init(config, workdir, run, ckpt, train_iter, logit_bias)
    timing["setup_s"] = time.time() - t_start

    # ---- Loop.
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step, tensorboard=config.train.tensorboard)
    num_steps = config.train.num_steps
    state, step, train_metrics, preempted, t_first = _run_steps(
        config, workdir, state, start_step, step_fn=lambda s, batch: step_fn(s, to_micro_batches(batch), backbone),
        train_iter=train_iter, ckpt=ckpt, writer=writer, evaluate=evaluate, timing=timing, t_start=t_start, run=run)
    if num_steps == 0 and restored is None:  # No update: the checkpoint holds the closed-form initialization.
      ckpt.save(0, state, _data_state(config, train_iter, run), force=True)
    jax.block_until_ready(state)
    if t_first is not None and step > start_step + 1:
      timing["loop_step_s"] = (time.time() - t_first) / (step - start_step - 1)
    final_step = int(jax.device_get(state["step"]))
    final_eval = {}
    # The last checkpoint is committed before the final evaluation, which runs without the loop's SIGTERM handling:
    # a kill there loses only the evaluation (the last checkpoint was still being written, and the restart trained
    # the last interval again).
    ckpt.wait()
    if not preempted:
      final_eval = evaluate(state["params"])
      # Written once: a restart of a finished run evaluates again but finds the record; one killed during the
      # evaluation (its checkpoint final, its record missing) writes it now.
      if final_eval and not writer.has_record(final_step, "eval"):
        writer.write(final_step, final_eval, kind="eval")
    ckpt.close()
    writer.close()
  timing["total_s"] = time.time() - t_start
  return TrainResult(state=state, step=final_step, train_metrics=train_metrics, eval_metrics=final_eval,
                     preempted=preempted, timing=timing)


@dataclasses.dataclass
class _Run:
  """An accepted run's parts: the mesh, the policy and its optimizer, their shapes and shardings."""
  mesh: Any
  model_cfg: config_lib.TransformerConfig
  policy: SpectralPolicy
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  loaded_backbone: Any  # The checkpoint's backbone (host arrays), or None: a random backbone.
  abstract_trainable: Any  # Boxed with logical axes, like the two below.
  abstract_backbone: Any
  abstract_opt_state: Any
  params_shardings: Any
  state_shardings: Any
  backbone_shardings: Any
  pairs_fingerprint: str  # `pairs.fingerprint` of the run's training and evaluation pairs (saved with each step).
  backbone_fingerprint: Optional[str]  # `resume.weights_fingerprint` of a loaded backbone (None: a random one).


def _accept_run(config: ml_collections.ConfigDict, workdir: str, stack: contextlib.ExitStack, *, pairs,
                loaded) -> Tuple[_Run, Dict[str, np.ndarray], Dict[str, np.ndarray]]:
  """(run, train pairs, eval pairs): the mesh, the model and the pairs, checked against the config and an existing
  checkpoint; then takes the workdir's lock (held by `stack`). Nothing is allocated on the devices yet."""
  basis_init = config.basis.get("init", "zeros")
  # ---- Mesh.
  mesh = mesh_lib.mesh_from_config(config.mesh)
  logging.info("Mesh %s over %d devices (%d hosts).", dict(mesh.shape), mesh.size, jax.process_count())

  # ---- Model: abstract shapes first; nothing is allocated until the sharding is known.
  if loaded is not None:
    model, loaded_backbone = loaded
    model_cfg = model.config
  elif config.model.path:
    model, loaded_backbone = hf_import.from_pretrained(config.model.path, dtype=config.model.dtype,
                                                       weight_dtype=config.model.weight_dtype, remat=config.model.remat)
    model_cfg = model.config
  else:
    model_cfg, loaded_backbone = build.model_config(config), None
  length = config.data.prompt_len + config.data.response_len
  if config.data.prompt_len >= model_cfg.max_len:
    raise ValueError(
        f"config.data.prompt_len={config.data.prompt_len} is invalid: expected < max_len={model_cfg.max_len}"
        f", the longest sequence of the model at model.path={config.model.path!r} (a prompt and at least "
        "one response token).")
  if length > model_cfg.max_len:  # A checkpoint's own limit (a random backbone's is checked with the config).
    raise ValueError(
        f"config.data.response_len={config.data.response_len} is invalid: expected <= max_len - "
        f"data.prompt_len = {model_cfg.max_len - config.data.prompt_len}, where max_len={model_cfg.max_len} "
        f"is the longest sequence of the model at model.path={config.model.path!r} (its position "
        "table, or the length it was trained to).")
  policy = build.build_policy(model_cfg, config.basis)
  tx, schedule = steps.make_optimizer(config)
  dummy = jnp.zeros((1, 4), jnp.int32)
  abstract_params = jax.eval_shape(policy.init, jax.random.key(0), dummy)["params"]  # Boxed: logical axes.
  abstract_trainable, abstract_backbone = build.split_params(abstract_params)
  abstract_opt_state = jax.eval_shape(tx.init, abstract_trainable)
  _check_state_fits(config, (abstract_trainable, abstract_opt_state), mesh)

  # ---- Sharding: logical axis names -> mesh axes for the state, the backbone and the batches.
  params_shardings = mesh_lib.abstract_shardings(abstract_trainable, mesh)
  state_shardings = {
      "step": mesh_lib.replicated(mesh),
      "params": params_shardings,
      "opt_state": mesh_lib.abstract_shardings(abstract_opt_state, mesh),
      "rng": mesh_lib.replicated(mesh)
  }
  backbone_shardings = mesh_lib.abstract_shardings(abstract_backbone, mesh)

  # ---- Input: host arrays, checked (the frozen feature pass follows in `_device_inputs`).
  train_pairs, eval_pairs = pairs_lib.load_pairs(config) if pairs is None else (dict(pairs[0]), dict(pairs[1]))
  for split in (train_pairs, eval_pairs):
    if len(split["prompt"]):
      input_pipeline.check_pairs(split, policy.num_bases, need_ratings=config.loss.kind == "ratings" or
                                 basis_init == "ridge", vocab_size=model_cfg.vocab_size, max_len=model_cfg.max_len,
                                 rating_scale=config.loss.rating_scale if config.loss.kind == "ratings" else None)
  num_train = len(train_pairs["prompt"])
  if num_train < config.train.batch_size:  # Every source (the builders also check while they read).
    origin = f"of data.source={config.data.source!r}" if pairs is None else "given (pairs=)"
    raise ValueError(f"config.train.batch_size={config.train.batch_size} is invalid: the training pairs {origin} "
                     f"are {num_train}, fewer than one batch (use a smaller batch, or hold out fewer prompts).")
  if basis_init == "ridge":
    ridge_init.check_ridge_ratings(train_pairs)
  resume.check_existing_checkpoint(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  stack.enter_context(workdir_lock.hold(workdir))  # Until the run returns (or the process ends).
  run = _Run(mesh=mesh, model_cfg=model_cfg, policy=policy, tx=tx, schedule=schedule, loaded_backbone=loaded_backbone,
             abstract_trainable=abstract_trainable, abstract_backbone=abstract_backbone,
             abstract_opt_state=abstract_opt_state, params_shardings=params_shardings, state_shardings=state_shardings,
             backbone_shardings=backbone_shardings, pairs_fingerprint=pairs_lib.fingerprint(train_pairs, eval_pairs),
             backbone_fingerprint=None if loaded_backbone is None else resume.weights_fingerprint(loaded_backbone))
  return run, train_pairs, eval_pairs


def _check_state_fits(config: ml_collections.ConfigDict, abstract_state: Any, mesh: Any) -> None:
  """ValueError naming basis.num_bases (and the ranks) when the trainable state alone, split evenly over every
  device of the mesh, exceeds one device's memory: before anything is allocated (K = 10^12 bases used to fail
  deep inside an allocation, or to run for minutes first)."""
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state) if hasattr(x, "dtype"))
  limit = memory.memory_limit_bytes()
  if limit and total / mesh.size > limit:
    ranks = (f"basis.head_rank={config.basis.head_rank}"
             if config.basis.kind == "heads" else f"basis.lora_rank={config.basis.lora_rank}")
    if config.basis.kind == "heads" and config.basis.get("feature_dim", 0):
      ranks += f", basis.feature_dim={config.basis.feature_dim}"
    raise ValueError(f"config.basis.num_bases={config.basis.num_bases} is invalid: the bases and their optimizer "
                     f"state need {total / 2**30:.3g} GiB ({ranks}), {total / mesh.size / 2**30:.3g} GiB per device "
                     f"even split over all {mesh.size}, more than the {limit / 2**30:.3g} GiB one device holds.")


def _device_inputs(config: ml_collections.ConfigDict, workdir: str, run: _Run, backbone: Any,
                   train_pairs: Dict[str, np.ndarray], eval_pairs: Dict[str, np.ndarray], support: Optional[np.ndarray],
                   timing: Dict[str, float]):
  """(train pairs, padded eval pairs, ridge logit vectors or None): the frozen feature pass (cached heads), the
  closed-form initialization, and only the fields the step reads."""
  if config.train.cache_features:
    t0 = time.time()
    train_pairs, eval_pairs = feature_cache.add_cached_features(config, workdir, run.policy, run.mesh,
                                                                run.backbone_shardings, backbone, train_pairs,
                                                                eval_pairs, support)
    timing["feature_pass_s"] = time.time() - t0
    logging.info("Cached features of %d + %d pairs in %.1f s.", len(train_pairs["response_a"]),
                 len(eval_pairs["response_a"]), timing["feature_pass_s"])
  logit_bias = None
  if config.basis.get("init", "zeros") == "ridge":  # From the cached feature pass's reference probabilities.
    logit_bias = ridge_init.ridge_logit_bias(train_pairs, support, run.model_cfg.vocab_size, beta=config.loss.beta,
                                             rating_scale=config.loss.rating_scale, l2=config.basis.init_l2,
                                             features=config.basis.get("init_features", "pair_surprise"))
  # Only what the step reads goes to the devices.
  needed = {"labels"} if config.loss.kind == "dpo" else {"scores_a", "scores_b"}
  needed |= set(input_pipeline.TOKEN_FIELDS) if not config.train.cache_features else (
      {"response_a", "response_a_mask", "response_b", "response_b_mask"} | set(features.CACHED_FIELDS) |
      (set(features.SUPPORT_FIELDS) if support is not None else set()))
  train_pairs = {k: v for k, v in train_pairs.items() if k in needed}
  # Held-out accuracy counts the pairs' labels (ties masked) when they have them, whichever the loss.
  eval_pairs = {k: v for k, v in eval_pairs.items() if k in needed | {"labels"}}
  if len(eval_pairs["response_a"]):
    eval_pairs = steps.pad_eval_pairs(eval_pairs, config.train.eval_batch_size)
  return train_pairs, eval_pairs, logit_bias


def _evaluator(config: ml_collections.ConfigDict, run: _Run, backbone: Any, eval_pairs: Mapping[str, np.ndarray],
               support: Optional[np.ndarray]):
  """`evaluate(params) -> eval_metrics` over every held-out pair (`{}` without any), with a jitted `eval_step`."""
  mesh = run.mesh
  eval_fn = jax.jit(
      functools.partial(steps.eval_step, run.policy, dict(config.loss), support=support),
      in_shardings=(run.params_shardings, run.backbone_shardings, {
          k: mesh_lib.batch_sharding(mesh, v.ndim) for k, v in eval_pairs.items()
      }), out_shardings=mesh_lib.replicated(mesh))

  def evaluate(params):
    num_eval = len(eval_pairs["response_a"])
    if not num_eval:
      return {}
    size, sums = config.train.eval_batch_size, None
    per_host = size // jax.process_count()
    for start in range(0, num_eval, size):  # Every pair: the last batch is padded (`pad_eval_pairs`).
      lo = start + jax.process_index() * per_host
      batch = mesh_lib.shard_batch({k: v[lo:lo + per_host] for k, v in eval_pairs.items()}, mesh)
      out = eval_fn(params, backbone, batch)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    return jax.device_get(steps.eval_metrics(sums))

  return evaluate


def _restore_or_init(config: ml_collections.ConfigDict, workdir: str, run: _Run, ckpt: checkpoint_lib.Checkpointer,
                     train_iter: input_pipeline.PairIterator, logit_bias: Optional[np.ndarray]):
  """(restored or None, start step, state): the newest good checkpoint (`train_iter` seeks to its position), else
  the initial state, sharded at creation. Records the accepted run's config.json (and basis.json) in `workdir`."""
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      build.unboxed({
          "step": jax.ShapeDtypeStruct((), jnp.int32),
          "params": run.abstract_trainable,
          "opt_state": run.abstract_opt_state,
          "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)
      }), run.state_shardings)

  # Another config's checkpoint (other K, other shapes) raises here, naming the field, before anything is read.
  def check_data(step, data):
    with errors.input_stage():  # Another config or other pairs: the user's input (one line from the CLI).
      resume.check_resume(config, workdir, step, data, pairs_fingerprint=run.pairs_fingerprint,
                          backbone_fingerprint=run.backbone_fingerprint)

  restored = ckpt.restore_latest(abstract_state, check_data=check_data)
  if restored is not None:
    train_iter.set_state(restored[2]["iterator"])  # Before anything is written: a failed resume changes nothing.
  if jax.process_index() == 0:  # The run is accepted: record what it runs (atomically), its paths made absolute.
    files.write_text_atomic(os.path.join(workdir, "config.json"),
                            resume.with_absolute_paths(config).to_json_best_effort(indent=2))
    if config.data.source in sources.BUILDER_SOURCES or jsonl.is_jsonl(config.data.source):  # What basis k means.
      files.write_text_atomic(os.path.join(workdir, "basis.json"), json.dumps(sources.basis_metadata(config), indent=2))
  if restored is not None:
    start_step, state, data_state = restored
    logging.info("Resumed from step %d (iterator %s).", start_step, data_state["iterator"])
    return restored, start_step, state

  def init_state(key, logit_bias):
    params = build.init_trainable(run.policy, key)
    if logit_bias is not None:
      params["heads"]["c"] = logit_bias.astype(params["heads"]["c"].dtype)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": run.tx.init(params),
        "rng": jax.random.key_data(jax.random.fold_in(key, 1))
    }

  state = jax.jit(init_state, out_shardings=run.state_shardings)(jax.random.key(config.seed), logit_bias)
  return None, 0, state


def _run_steps(config: ml_collections.ConfigDict, workdir: str, state: Dict[str, Any], start_step: int, *, step_fn,
               train_iter: input_pipeline.PairIterator, ckpt: checkpoint_lib.Checkpointer,
               writer: metrics_lib.MetricsWriter, evaluate, timing: Dict[str, float], t_start: float, run: _Run):
  """The step loop from `start_step` to `config.train.num_steps`: logs, evaluations, checkpoints; stops after a
  checkpoint on SIGTERM (or a multi-host preemption) and raises on a non-finite step (`train.nan_check`).

  step_fn: (state, host batch) -> (state, metrics). Returns (state, last step, last logged train metrics,
  preempted, the time the first step ended or None).
  """
  num_steps = config.train.num_steps
  train_metrics, preempted = {}, False
  step, t_log, step_log, t_first = start_step, time.time(), start_step, None
  with _StopSignal() as stop:
    for step in progress.track(range(start_step + 1, num_steps + 1), desc="train", unit="step",
                               total=num_steps - start_step):
      host_batch = next(train_iter)
      state, metrics = step_fn(state, host_batch)
      finite = metrics.pop("finite")
      if t_first is None:  # The first step pays for the compile: time the rest from here.
        jax.block_until_ready(state)
        t_first = t_log = time.time()
        timing["first_step_s"] = t_first - t_start - timing["setup_s"]
        step_log = step
      log_now = step % config.train.log_every_steps == 0 or step == num_steps
      if (config.train.nan_check or log_now) and not bool(jax.device_get(finite)):
        ckpt.wait()  # The last good checkpoint is committed before the run stops.
        error = _nonfinite_error(workdir, step, state, host_batch, jax.device_get(metrics), ckpt.latest_step())
        ckpt.close()
        writer.close()
        raise error
      if log_now:
        train_metrics = jax.device_get(metrics)
        now = time.time()
        if step > step_log:  # Throughput since the last log (the compile excluded).
          steps_per_s = (step - step_log) / (now - t_log)
          train_metrics.update(steps_per_s=steps_per_s, examples_per_s=steps_per_s * config.train.batch_size)
        writer.write(step, train_metrics)
        t_log, step_log = now, step
      if config.train.eval_every_steps and step % config.train.eval_every_steps == 0 and step != num_steps:
        held_out = evaluate(state["params"])
        if held_out:  # Without held-out pairs there is nothing to record (it wrote empty "eval" records).
          writer.write(step, held_out, kind="eval")
      stop_now = stop.agreed() or (jax.process_count() > 1 and ckpt.manager.reached_preemption(step))
      data_state = _data_state(config, train_iter, run)
      ckpt.save(step, state, data_state, force=stop_now or step == num_steps)
      if stop_now:
        preempted = True
        logging.warning("Stopped at step %d after a checkpoint (preemption).", step)
        break
  return state, step, train_metrics, preempted, t_first


def _nonfinite_error(workdir: str, step: int, state: Any, host_batch: Mapping[str, np.ndarray],
                     metrics: Mapping[str, Any], last_checkpoint: Optional[int]) -> FloatingPointError:
  """Saves step `step`'s batch and the state it started from (the step did not apply its update) under
  `<workdir>/nonfinite/step_<step>/` and returns the error that stops the run."""
  directory = checkpoint_lib.save_debug_step(os.path.join(workdir, "nonfinite", f"step_{step}"), state, host_batch,
                                             metrics)
  loss = np.asarray(metrics["loss"])
  return FloatingPointError(
      f"Step {step}: non-finite training loss or gradient (total_loss={float(metrics['total_loss'])}, "
      f"grad_norm={float(metrics['grad_norm'])}, per-basis loss {loss.tolist()}); the update was not applied and "
      f"training stopped. The step's batch and the state before it are saved in {directory}; the last checkpoint is "
      f"step {last_checkpoint}. Check the data or lower config.optim.learning_rate.")


def _data_state(config: ml_collections.ConfigDict, train_iter: input_pipeline.PairIterator,
                run: _Run) -> Dict[str, Any]:
  """What each checkpoint saves beside the state: the iterator's position, the config values a resume must share
  (`resume.resume_fields`) and the fingerprints of the pairs and of a loaded backbone."""
  data = {
      "iterator": train_iter.get_state(),
      **resume.resume_fields(config), "pairs_fingerprint": run.pairs_fingerprint
  }
  if run.backbone_fingerprint is not None:
    data["backbone_fingerprint"] = run.backbone_fingerprint
  return data


class _StopSignal:
  """Records SIGTERM (preemption) and, in a one-process run, a first Ctrl-C (SIGINT), so the loop can checkpoint
  and stop at the next step boundary. A second Ctrl-C interrupts at once (KeyboardInterrupt), as Python's default."""

  def __init__(self):
    self.received = False
    self._previous = {}

  def __enter__(self):
    names = [signal.SIGTERM] + ([signal.SIGINT] if jax.process_count() == 1 else [])  # Other hosts would go on.
    for signum in names:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # Not the main thread: no signal handling.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self.received:
        raise KeyboardInterrupt
      logging.warning("Interrupted (Ctrl-C): saving a checkpoint after this step and stopping (Ctrl-C again: stop "
                      "at once).")
    else:
      logging.warning("SIGTERM received: saving a checkpoint after this step and stopping.")
    self.received = True

  def agreed(self) -> bool:
    """Whether to stop after this step: this process's signal, or with several processes any one's. Every process
    must stop at the same step (a SIGTERM reaching two hosts a second apart stopped one alone, in a forced save,
    while the other waited in the next step's collectives: both hung). One small all-gather per step."""
    if jax.process_count() == 1:
      return self.received
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.received))))

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
