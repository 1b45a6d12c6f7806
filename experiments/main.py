r"""The main job: runs a config end to end and writes everything to --workdir.

  python -m experiments.main --config=configs/demo.py --workdir=workdir/demo [--config.FIELD=VALUE ...]

Phases (each titled in the log): config check, model, prompts, decoding, results.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from spectral_soup.utils import config_check

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for everything the run writes.")
flags.mark_flags_as_required(["config", "workdir"])


def validate_config(config) -> None:
  """Fails fast, naming the field, before anything expensive runs."""
  need = config_check.field_checker(config)

  need(isinstance(config.model.path, str) and config.model.path, "model.path", "a non-empty path")
  need(config.model.dtype in ("float32", "bfloat16"), "model.dtype", "'float32' or 'bfloat16'")
  need(config.model.weight_dtype in ("float32", "bfloat16"), "model.weight_dtype", "'float32' or 'bfloat16'")
  need(config.generate.max_new_tokens > 0, "generate.max_new_tokens", "> 0")
  need(config.generate.temperature >= 0, "generate.temperature", ">= 0")
  need(config.generate.top_k >= 0, "generate.top_k", ">= 0")
  need(0 < config.generate.top_p <= 1, "generate.top_p", "in (0, 1]")
  need(config.generate.batch_size > 0, "generate.batch_size", "> 0")
  need(len(config.prompts) > 0, "prompts", "at least one prompt")
  for i, prompt in enumerate(config.prompts):
    if not isinstance(prompt, str) or not prompt.strip():
      raise ValueError(f"config.prompts[{i}]={prompt!r} is invalid: expected a non-empty string.")


def main(argv) -> None:
  del argv
  # Imported here so that `--help` and config errors do not pay for JAX start-up.
  import jax
  import numpy as np

  from spectral_soup import models
  from spectral_soup.soup import decoding
  from spectral_soup.utils import progress

  config = _CONFIG.value
  workdir = _WORKDIR.value

  # ---- Config check.
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  logging.info("JAX devices: %s", jax.devices())

  # ---- Model.
  t0 = time.time()
  model, params = models.from_pretrained(config.model.path, dtype=config.model.dtype,
                                         weight_dtype=config.model.weight_dtype)
  tokenizer = models.tokenizer_from_pretrained(config.model.path)
  load_s = time.time() - t0
  print(f"Loaded {config.model.path}: {model.config.family}, {model.config.num_layers} layers, "
        f"{model.config.num_params() / 1e6:.1f}M parameters ({load_s:.1f} s).")

  # ---- Prompts: chat-formatted, tokenized, left-padded into batches.
  messages = []
  for prompt in config.prompts:
    chat = [{"role": "system", "content": config.generate.system_prompt}] if config.generate.system_prompt else []
    messages.append(chat + [{"role": "user", "content": prompt}])
  texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
  encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  prompt_len = max(len(e) for e in encoded)
  eos_id = tokenizer.eos_token_id
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

  # ---- Decoding: one compiled loop per batch shape.
  sampling = decoding.SamplingConfig(config.generate.temperature, config.generate.top_k, config.generate.top_p)
  logits_fn = decoding.model_logits_fn(model)
  batch_size = config.generate.batch_size
  max_new = config.generate.max_new_tokens
  key = jax.random.key(config.seed)
  responses, new_tokens = [], 0
  t0 = time.time()
  for start in progress.track(range(0, len(encoded), batch_size), desc="decoding", unit="batch"):
    chunk = encoded[start:start + batch_size]
    tokens, mask = decoding.pad_prompts(chunk, batch_size, prompt_len, pad_id)
    cache = models.init_cache(model.config, batch_size, prompt_len + max_new)
    key, sub = jax.random.split(key)
    out, aux = decoding.decode(logits_fn, params, tokens, mask, cache, sub, max_new_tokens=max_new,
                               sampling=sampling, eos_id=eos_id, pad_id=pad_id)
    out, lengths = np.asarray(out), np.asarray(aux["lengths"])
    for i in range(len(chunk)):
      ids = out[i, :lengths[i]].tolist()
      new_tokens += len(ids)
      responses.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
  decode_s = time.time() - t0

  # ---- Results.
  results = {
      "model": config.model.path,
      "num_params": model.config.num_params(),
      "load_seconds": load_s,
      "decode_seconds": decode_s,
      "new_tokens": new_tokens,
      "tokens_per_second": new_tokens / decode_s,
      "generations": [{"prompt": p, "response": r} for p, r in zip(config.prompts, responses)],
  }
  with open(os.path.join(workdir, "generations.json"), "w") as f:
    json.dump(results, f, indent=2)
  print()
  for prompt, response in zip(config.prompts, responses):
    print(f"> {prompt}\n  {response}\n")
  print(f"{new_tokens} tokens in {decode_s:.1f} s ({new_tokens / decode_s:.1f} tokens/s, compile included). "
        f"Wrote {os.path.join(workdir, 'generations.json')}.")


if __name__ == "__main__":
  app.run(main)
