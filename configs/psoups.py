r"""Offline basis training: P-SOUPS (RLPHF) preference poles, Gemma 3 1B, K = 6 LoRA bases, one per pole.

The six poles of Personalized Soups: elementary / knowledgeable (expertise), concise / informative
(informativeness), friendly / unfriendly (style), from the GPT-4-labelled reward-model pairs of the RLPHF data
archive (`data/rm_training/`). The pairs carry labels but no ratings, so the loss is DPO; a pair labels only the
poles it was annotated for. The backbone is `ultrafeedback_gemma3_1b`'s (a random Gemma 3 1B architecture unless
`model.path` names a local checkpoint); the tokenizer is read from `data.tokenizer`. Nothing is downloaded.

Launch (v5p-16: 8 chips on 2 hosts; the workdir must be one directory shared by both hosts):
  python -m launch.tpu --name=ss-psoups-1b --accelerator-type=v5p-16 --zone=$ZONE --project=$PROJECT \
      --config=configs/psoups.py --workdir=/mnt/shared/psoups_gemma3_1b \
      --copy=$DATA/rlphf:data/psoups --copy=$CKPT/gemma-3-1b-it:checkpoints/gemma-3-1b-it \
      -- --config.model.path=checkpoints/gemma-3-1b-it
Local smoke run: `python -m launch.local --config=configs/psoups.py:local --workdir=workdir/psoups_local`.

Mesh: data 1 x fsdp 8 x model 1 (Gemma 3 1B has one KV head). Each update is 64 pairs = 8 micro-batches of 8.

Expected cost (estimates, not measured):
* FLOPs: a forward costs ~1.43 GFLOP per token plus 0.6 GFLOP per response token (the 262k-way output layer runs at
  response positions only); (6 + 1) x 2 rows of 128 + 384 tokens per pair and ~3 forwards per step: ~40 TFLOP per
  pair, 2.6 PFLOP per update, 1.3e18 FLOP for 500 updates (32,000 pair visits; set `train.num_steps` from the built
  dataset's `num_pairs` metadata for a given number of epochs). At an assumed 40% of v5p's 459 TFLOP/s bf16 peak on
  8 chips: ~15 min, ~2 chip-hours.
* Memory per chip: the step keeps no sequence's logits (the output layer runs on 32 response positions at a time,
  rematerialized in the backward pass: `offline.features.pair_logprobs`): [14, 32, 262144] f32 logits = 0.4 GiB
  per chunk. Not analysed for this shape; the 1B UltraFeedback config's compile-time analysis (62 rows of 320
  tokens) gives 9.7 GiB of temporaries.
"""

import ml_collections

from configs import ultrafeedback_gemma3_1b


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """arg: "" (the full run) or "local" (the same pipeline, tiny model, one device)."""
  config = ultrafeedback_gemma3_1b.get_config()

  config.basis.num_bases = 6  # K: one basis per pole.
  config.basis.lora_rank = 16  # Rank of each adapter.

  config.data.source = "psoups"  # TFDS builder read by spectral_soup.offline.sources.
  config.data.manual_dir = "data/psoups"  # The unzipped RLPHF archive (holding data/rm_training/).
  config.data.builder_config = ml_collections.ConfigDict()  # Predefined builder config `base` and overrides.
  config.data.builder_config.base = "default"  # All pairs, 90 / 5 / 5 split by a hash of the prompt.
  config.data.train_split = "train"  # Split the bases train on.
  config.data.eval_split = "validation"  # Held-out split; "test" is left for the final evaluation.
  config.data.attributes = ()  # Label columns: () = the six poles in builder order.
  config.data.label_margin = 0.0  # Labels only: a pole's label is +1 / -1 / tie.
  config.data.num_train_pairs = 100_000  # At most this many training pairs.
  config.data.num_eval_pairs = 512  # At most this many held-out pairs.
  config.data.prompt_len = 128  # Prompt tokens (instructions are short).
  config.data.response_len = 384  # Response tokens.

  config.loss.kind = "dpo"  # Labels only: Bradley-Terry (the ratings loss has no ratings here).

  config.train.num_steps = 500  # Updates.
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
    config.basis.num_bases = 6  # The six poles.
  elif arg:
    raise ValueError(f"Unknown config variant {arg!r}: expected '' or 'local'.")
  return config
