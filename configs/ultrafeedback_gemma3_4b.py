r"""Offline basis training at paper scale: UltraFeedback fine-grained, Gemma 3 4B, K = 30 LoRA bases.

`ultrafeedback_gemma3_1b` with the Gemma 3 4B text architecture (34 layers, width 2560, 8 query / 4 KV heads of
256, MLP 10240, vocabulary 262,208 as in the released checkpoints; the random backbone keeps `gemma3()`'s
512-token sliding window and unscaled rotary, which do not change shapes or cost). Same data, bases and updates as
the 1B config, so the two runs differ only in the backbone (the paper's model-size comparison).

Launch (v5p-64: 32 chips on 8 hosts; the workdir must be one directory shared by all hosts):
  python -m launch.tpu --name=ss-uf-4b --accelerator-type=v5p-64 --zone=$ZONE --project=$PROJECT \
      --config=configs/ultrafeedback_gemma3_4b.py --workdir=/mnt/shared/uf_gemma3_4b \
      --copy=$DATA/ultrafeedback:data/ultrafeedback --copy=$CKPT/gemma-3-4b-it:checkpoints/gemma-3-4b-it \
      -- --config.model.path=checkpoints/gemma-3-4b-it

Mesh: data 1 x fsdp 8 x model 4. The model axis splits the 8 query / 4 KV heads, the MLP and the vocabulary (and
so the logits) 4 ways; fsdp splits the batch and the backbone. Each update is 64 pairs = 8 micro-batches of 8 (one
pair per group of 4 chips).

Expected cost (estimates, not measured):
* FLOPs: a forward costs ~6.47 GFLOP per token (2 x 3.21G layer parameters + attention) plus 1.34 GFLOP per
  response token (2 x 671M for the output layer, which runs at response positions only); 31 x 2 rows of 128 + 192
  tokens per pair and ~3 forwards per step: ~433 TFLOP per pair, 28 PFLOP per update, 2.1e19 FLOP for 750 updates.
  At an assumed 40% of v5p's 459 TFLOP/s bf16 peak on 32 chips: ~60 min, ~32 chip-hours.
* Memory per chip: the step keeps no sequence's logits (the output layer runs on 32 response positions at a time,
  rematerialized in the backward pass: `offline.features.pair_logprobs`), so the 262k vocabulary adds
  [62, 32, 262208 / 4] f32 logits = 0.5 GiB per chunk; the 30 adapters with their f32 Adam state are replicated
  (267M parameters, ~4.3 GiB). Not analysed for this shape; the 1B config's compile-time analysis (the same rows and
  lengths on a 1B backbone) gives 9.7 GiB of temporaries.
"""

import ml_collections

from configs import ultrafeedback_gemma3_1b


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """arg: "" (the paper-scale run) or "local" (the 1B config's smoke-test variant)."""
  config = ultrafeedback_gemma3_1b.get_config()
  config.model.vocab_size = 262_208  # Gemma 3 4B vocabulary.
  config.model.num_layers = 34  # Decoder blocks.
  config.model.embed_dim = 2_560  # Residual width.
  config.model.num_heads = 8  # Query heads.
  config.model.num_kv_heads = 4  # Key/value heads (grouped-query attention).
  config.model.head_dim = 256  # Width of one head.
  config.model.mlp_dim = 10_240  # MLP hidden width.
  config.model.max_len = 131_072  # Longest sequence of the architecture.

  config.basis.lora_rank = 16  # Rank of each adapter (8.9M parameters per basis).

  config.data.tokenizer = "checkpoints/gemma-3-4b-it"  # Local tokenizer or checkpoint directory ("": model.path).

  config.train.grad_accum_steps = 8  # Micro-batches of 8 pairs: one pair per data x fsdp shard.
  config.train.feature_batch_size = 8  # (Unused by LoRA bases; a multiple of data x fsdp.)
  config.train.eval_batch_size = 8  # Pairs per evaluation call.

  config.mesh.data = 1  # No pure data parallelism.
  config.mesh.fsdp = -1  # 32 / 4 = 8 shards of the batch and the backbone.
  config.mesh.model = 4  # Tensor parallel over heads, MLP and vocabulary (4 KV heads).

  config.launch.accelerator_type = "v5p-64"  # The TPU slice the mesh and memory estimate are sized for.

  if arg == "local":
    ultrafeedback_gemma3_1b.local(config)
  elif arg:
    raise ValueError(f"Unknown config variant {arg!r}: expected '' or 'local'.")
  return config
