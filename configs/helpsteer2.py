r"""Offline basis training: HelpSteer2 rating pairs, Gemma 3 1B, K = 7 LoRA bases on signed attributes.

HelpSteer2 rates every response 0..4 on helpfulness, correctness, coherence, complexity and verbosity; the `pairs`
builder config pairs the responses of each prompt (upstream train / validation splits). More complexity or verbosity
is not better for every user, so both poles of those two are bases: the 7 attributes below are 7 one-hot bases
(basis k's label is the sign of the rating difference of attribute k; "-verbosity" prefers the less verbose
response). The backbone is `ultrafeedback_gemma3_1b`'s (a random Gemma 3 1B architecture unless `model.path` names a
local checkpoint); the tokenizer is read from `data.tokenizer`. Nothing is downloaded.

Launch (v5p-16: 8 chips on 2 hosts; the workdir must be one directory shared by both hosts):
  python -m launch.tpu --name=ss-hs2-1b --accelerator-type=v5p-16 --zone=$ZONE --project=$PROJECT \
      --config=configs/helpsteer2.py --workdir=/mnt/shared/helpsteer2_gemma3_1b \
      --copy=$DATA/helpsteer2:data/helpsteer2 --copy=$CKPT/gemma-3-1b-it:checkpoints/gemma-3-1b-it \
      -- --config.model.path=checkpoints/gemma-3-1b-it
Local smoke run: `python -m launch.local --config=configs/helpsteer2.py:local --workdir=workdir/hs2_local`.

Mesh: data 1 x fsdp 8 x model 1 (Gemma 3 1B has one KV head). Each update is 64 pairs = 8 micro-batches of 8.

Expected cost (estimates, not measured):
* FLOPs: a forward costs ~1.43 GFLOP per token plus 0.6 GFLOP per response token (the 262k-way output layer runs at
  response positions only); (7 + 1) x 2 rows of 256 + 256 tokens per pair and ~3 forwards per step: ~43 TFLOP per
  pair, 2.7 PFLOP per update, 8.2e17 FLOP for 300 updates (~2 epochs of HelpSteer2's ~10k training pairs). At an
  assumed 40% of v5p's 459 TFLOP/s bf16 peak on 8 chips: ~9 min, ~1.2 chip-hours.
* Memory per chip: the step keeps no sequence's logits (the output layer runs on 32 response positions at a time,
  rematerialized in the backward pass: `offline.features.pair_logprobs`): [16, 32, 262144] f32 logits = 0.5 GiB
  per chunk. Not analysed for this shape; the 1B UltraFeedback config's compile-time analysis (62 rows of 320
  tokens) gives 9.7 GiB of temporaries.
"""

import ml_collections

from configs import ultrafeedback_gemma3_1b

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity", "-complexity", "-verbosity")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """arg: "" (the full run) or "local" (the same pipeline, tiny model, one device)."""
  config = ultrafeedback_gemma3_1b.get_config()

  config.basis.num_bases = 7  # K: one basis per signed attribute.
  config.basis.lora_rank = 16  # Rank of each adapter.

  config.data.source = "helpsteer2"  # TFDS builder read by spectral_soup.offline.sources.
  config.data.manual_dir = "data/helpsteer2"  # train.jsonl.gz and validation.jsonl.gz of nvidia/HelpSteer2.
  config.data.builder_config = ml_collections.ConfigDict()  # Predefined builder config `base` and overrides.
  config.data.builder_config.base = "pairs"  # Pairs of responses to one prompt with per-attribute labels.
  config.data.train_split = "train"  # Upstream's training split.
  config.data.eval_split = "validation"  # Upstream's validation split (HelpSteer2 has no test split).
  config.data.attributes = ATTRIBUTES  # Label columns; "-name" negates an attribute.
  config.data.label_margin = 0.0  # |rating difference| <= this is a tie (0..4 scale).
  config.data.num_train_pairs = 100_000  # At most this many training pairs (all of HelpSteer2).
  config.data.num_eval_pairs = 512  # At most this many held-out pairs.
  config.data.prompt_len = 256  # Prompt tokens (multi-turn prompts keep their end).
  config.data.response_len = 256  # Response tokens.

  config.train.num_steps = 300  # Updates: ~2 epochs.
  config.train.batch_size = 64  # Pairs per update.
  config.train.grad_accum_steps = 8  # Micro-batches of 8 pairs: one per chip.
  config.train.feature_batch_size = 8  # (Unused by LoRA bases; a multiple of data x fsdp.)
  config.train.eval_batch_size = 8  # Pairs per evaluation call.
  config.train.eval_every_steps = 100  # Held-out evaluation interval.
  config.optim.warmup_steps = 30  # Linear warmup.

  config.mesh.data = 1  # No pure data parallelism.
  config.mesh.fsdp = -1  # All 8 chips.
  config.mesh.model = 1  # One KV head: no tensor parallelism.

  config.launch.accelerator_type = "v5p-16"  # The TPU slice the mesh and memory estimate are sized for.

  if arg == "local":
    ultrafeedback_gemma3_1b.local(config)
    config.basis.num_bases = 7  # The 7 signed attributes.
  elif arg:
    raise ValueError(f"Unknown config variant {arg!r}: expected '' or 'local'.")
  return config
