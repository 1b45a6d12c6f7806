r"""Offline basis training at paper scale: UltraFeedback fine-grained, Gemma 3 1B, K = 30 LoRA bases.

The four UltraFeedback attributes (instruction following, honesty, truthfulness, helpfulness) on the conflicting
subset (pairs whose attributes disagree, capped at the paper's 23,614 training pairs). K = 30 > 4: bases 0..3 are the
attributes, bases 4..29 fixed Dirichlet(1) weightings of them, drawn from `data.seed` (`spectral_soup.offline.sources`;
basis k's label is the Bradley-Terry label of w_k . (ratings_a - ratings_b)). The backbone is a random Gemma 3 1B
architecture (26 layers, width 1152, 4 query / 1 KV heads of 256, MLP 6912, vocabulary 262,144) unless
`model.path` names a local Hugging Face checkpoint directory; the tokenizer is read from `data.tokenizer`. Nothing
is downloaded: the UltraFeedback JSON-lines files and the checkpoint are copied to every worker by the launcher.

Launch (v5p-32: 16 chips on 4 hosts; the workdir must be one directory shared by all hosts, e.g. a mounted bucket):
  python -m launch.tpu --name=ss-uf-1b --accelerator-type=v5p-32 --zone=$ZONE --project=$PROJECT \
      --config=configs/ultrafeedback_gemma3_1b.py --workdir=/mnt/shared/uf_gemma3_1b \
      --copy=$DATA/ultrafeedback:data/ultrafeedback --copy=$CKPT/gemma-3-1b-it:checkpoints/gemma-3-1b-it \
      -- --config.model.path=checkpoints/gemma-3-1b-it
Local smoke run of the same pipeline (2 narrow layers, K = 6, 20 steps, one device; the same data/ultrafeedback and
tokenizer directories under the repository root):
  python -m launch.local --config=configs/ultrafeedback_gemma3_1b.py:local --workdir=workdir/uf_local

Mesh: data 1 x fsdp 16 x model 1. The model axis stays 1: Gemma 3 1B has a single KV head, and the `kv_heads`
logical axis maps to `model`. Each update is 64 pairs = 4 micro-batches of 16 (one pair per chip).

Expected cost (estimates, not measured):
* FLOPs: a forward costs ~1.4 GFLOP per token plus 0.6 GFLOP per response token (2 x 698M layer parameters +
  attention, and 2 x 302M for the 262k-way output layer, which runs at response positions only). LoRA bases run the
  reference and the 30 adapters as 31 x 2 rows of 320 tokens per pair, and a step costs ~3 forwards (forward, backward
  to the activations, rematerialized forward; the frozen backbone gets no weight gradient): ~105 TFLOP per pair, 6.7
  PFLOP per update, 5.0e18 FLOP for 750 updates. At an assumed 40% of v5p's 459 TFLOP/s bf16 peak on 16 chips: ~30
  min, ~8 chip-hours (the f32 log-softmax over 262k logits is memory-bound, so expect less than 40%).
* Memory per chip: the step keeps no sequence's logits: the forward stops at the final hidden states and the
  262k-way output layer runs on 32 response positions at a time, rematerialized in the backward pass
  (`offline.features.pair_logprobs`). XLA's compile-time analysis of this step (26 layers, K = 30, one pair of
  128 + 192 tokens, on CPU) gives 9.7 GiB of temporaries plus 4.7 GiB of arguments (the f32 backbone, the adapters
  and their Adam state); holding the whole sequences' f32 logits, as the step did before, needed 66.5 GiB of
  temporaries (and ran out of memory on a 141 GB H200: BENCHMARKS.md section 5). Estimate for a v5p chip (95 GiB):
  room for several pairs per chip, not measured on a TPU.
"""

import ml_collections

from configs import train_basis_tiny


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """arg: "" (the paper-scale run) or "local" (the same pipeline, tiny model, one device)."""
  config = train_basis_tiny.get_config()
  config.seed = 0  # PRNG seed of the bases' initialization and of the training data order.

  config.model.path = ""  # Local HF checkpoint directory (e.g. checkpoints/gemma-3-1b-it); "": random init below.
  config.model.family = "gemma3"  # Gemma 3: sandwich norms, QK-norm, GeGLU, 5 local : 1 global layers.
  config.model.vocab_size = 262_144  # Gemma 3 1B vocabulary.
  config.model.num_layers = 26  # Decoder blocks.
  config.model.embed_dim = 1_152  # Residual width.
  config.model.num_heads = 4  # Query heads.
  config.model.num_kv_heads = 1  # Key/value heads (multi-query attention).
  config.model.head_dim = 256  # Width of one head.
  config.model.mlp_dim = 6_912  # MLP hidden width.
  config.model.max_len = 32_768  # Longest sequence of the architecture (rotary: no position table).
  config.model.dtype = "bfloat16"  # Compute dtype.
  config.model.weight_dtype = "float32"  # Storage: the adapters and their Adam state stay in f32 (bf16 loses updates).
  config.model.remat = True  # Rematerialize each block in the backward pass (31 x 2 rows per pair).

  config.basis.kind = "lora"  # LoRA adapters on the attention projections (the paper's parameterization).
  config.basis.num_bases = 30  # K: 4 attributes + 26 attribute weightings.
  config.basis.lora_rank = 16  # Rank of each adapter (3.0M parameters per basis).
  config.basis.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # Projections the adapters change.

  config.data.source = "ultrafeedback"  # TFDS builder read by spectral_soup.offline.sources.
  config.data.data_dir = "data/tfds"  # TFDS directory the dataset is built into and read from ("": TFDS default).
  config.data.manual_dir = "data/ultrafeedback"  # Upstream JSON-lines files ("": <data_dir>/downloads/manual).
  config.data.builder_config = ml_collections.ConfigDict()  # Predefined builder config `base` and overrides.
  config.data.builder_config.base = "conflicting"  # Only pairs whose attributes disagree (the paper's subset).
  config.data.train_split = "train"  # Split the bases train on (a hash split by prompt: 90 / 5 / 5).
  config.data.eval_split = "validation"  # Held-out split ("": none); "test" is left for the final evaluation.
  config.data.tokenizer = "checkpoints/gemma-3-1b-it"  # Local tokenizer or checkpoint directory ("": model.path).
  config.data.chat_template = True  # Prompts as one user turn of the tokenizer's chat template.
  config.data.attributes = ()  # Label columns: () = the builder's four attributes; "-name" negates one.
  config.data.weighting_alpha = 1.0  # Dirichlet concentration of the weightings (1: uniform on the simplex).
  config.data.label_margin = 0.0  # |w_k . (ratings_a - ratings_b)| <= this is a tie (rating units, 1..5 scale).
  config.data.num_train_pairs = 23_614  # At most this many training pairs (a seeded subset beyond that).
  config.data.num_eval_pairs = 1_024  # At most this many held-out pairs.
  config.data.prompt_len = 128  # Prompt tokens (chat-formatted, the end kept).
  config.data.response_len = 192  # Response tokens (+ end of sequence; longer responses are cut).
  config.data.seed = 0  # Seed of the basis weightings and of the pair subsets.

  config.loss.kind = "dpo"  # Bradley-Terry on each basis's labels.
  config.loss.beta = 0.1  # KL strength of the implicit reward beta * (log pi_k - log pi_ref).
  config.loss.label_smoothing = 0.0  # Probability that a preference label is flipped.

  config.optim.learning_rate = 1e-4  # Peak AdamW learning rate of the adapters.
  config.optim.warmup_steps = 50  # Linear warmup.
  config.optim.end_lr_fraction = 0.1  # Cosine decay to 10% of the peak.
  config.optim.weight_decay = 0.0  # No decay on the adapters.
  config.optim.grad_clip = 1.0  # Global gradient-norm clipping.
  config.optim.b1 = 0.9  # Adam first-moment decay.
  config.optim.b2 = 0.99  # Adam second-moment decay.

  config.train.num_steps = 750  # Updates: ~2 epochs of 23,614 pairs.
  config.train.batch_size = 64  # Pairs per update (all hosts together).
  config.train.grad_accum_steps = 4  # Micro-batches of 16 pairs: one pair per chip.
  config.train.cache_features = False  # LoRA bases run the whole model every step.
  config.train.feature_batch_size = 16  # (Unused by LoRA bases; a multiple of data x fsdp.)
  config.train.eval_batch_size = 16  # Pairs per evaluation call (one per chip).
  config.train.log_every_steps = 10  # Train metrics every this many steps.
  config.train.eval_every_steps = 250  # Held-out evaluation every this many steps.
  config.train.tensorboard = True  # Also write TensorBoard scalars.

  config.mesh.data = 1  # Pure data parallelism: none (fsdp splits the batch too).
  config.mesh.fsdp = -1  # All 16 chips: batch and backbone sharded (ZeRO-3 style).
  config.mesh.model = 1  # No tensor parallelism (one KV head).
  config.mesh.num_devices = -1  # Every device of every host.

  config.checkpoint.every_steps = 100  # Checkpoint interval.
  config.checkpoint.max_to_keep = 3  # Newest checkpoints kept.
  # Write checkpoints in the background (a crash then also loses the steps taken while the newest one was being
  # written; False: at most the last interval).
  config.checkpoint.async_save = True

  config.launch = ml_collections.ConfigDict()
  config.launch.accelerator_type = "v5p-32"  # The TPU slice the mesh and memory estimate are sized for.

  if arg == "local":
    local(config)
  elif arg:
    raise ValueError(f"Unknown config variant {arg!r}: expected '' or 'local'.")
  return config


def local(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same pipeline at smoke-test size on one device (the vocabulary stays: the tokenizer's ids need it)."""
  config.model.num_layers = 2  # Decoder blocks.
  config.model.embed_dim = 64  # Residual width.
  config.model.num_heads = 4  # Query heads.
  config.model.num_kv_heads = 1  # Key/value heads.
  config.model.head_dim = 16  # Width of one head.
  config.model.mlp_dim = 128  # MLP hidden width.
  config.model.dtype = "float32"  # Compute dtype (CPU).
  config.model.weight_dtype = "float32"  # Storage dtype.
  config.basis.num_bases = 6  # The 4 attributes + 2 weightings.
  config.basis.lora_rank = 2  # Adapter rank.
  config.data.num_train_pairs = 64  # Training pairs.
  config.data.num_eval_pairs = 8  # Held-out pairs.
  config.data.prompt_len = 32  # Prompt tokens.
  config.data.response_len = 32  # Response tokens.
  config.train.num_steps = 20  # Updates.
  config.train.batch_size = 2  # Pairs per update.
  config.train.grad_accum_steps = 2  # One pair per micro-batch.
  config.train.feature_batch_size = 2  # (Unused by LoRA bases.)
  config.train.eval_batch_size = 2  # Pairs per evaluation call.
  config.train.log_every_steps = 5  # Metrics interval.
  config.train.eval_every_steps = 0  # Evaluate at the end only.
  config.optim.warmup_steps = 2  # Warmup.
  config.mesh.data = 1  # One device.
  config.mesh.fsdp = 1  # One device.
  config.mesh.model = 1  # One device.
  config.mesh.num_devices = 1  # Only the first device (a machine may have more).
  config.checkpoint.every_steps = 10  # Checkpoint interval.
  config.launch.accelerator_type = ""  # Local: no TPU slice.
  return config
