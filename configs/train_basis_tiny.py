r"""Offline basis training, tiny: a 2-layer random LM and K = 3 head bases on synthetic preference pairs.

Used by tests/test_offline.py and as the local variant of every train_basis config: same fields, small numbers.
Basis k should learn to prefer responses that contain marker token k + 1 more often (`synthetic_pairs`). The
markers are ids, not text: in the shipped char tokenizer ids 1-3 are <eos>, <bos> and <unk>, and ids past its 51
tokens decode to nothing, so `load_basis(W).generate(...)` of these bases shows the machinery, not readable styles
(bases 0 and 1 alone end their responses at once).

Launch (restarting the same command resumes from the last checkpoint):
  python -m experiments.train_basis --config=configs/train_basis_tiny.py --workdir=workdir/train_basis_tiny
Override any field, e.g. `--config.basis.kind=lora --config.train.cache_features=False --config.mesh.model=2`.
Measured cost on 2 CPU cores, one device: 17 s wall (imports ~4 s, feature pass + compiles ~9 s, 300 steps ~3 s);
held-out accuracy per basis 0.905 / 0.869 / 0.895. With 8 fake devices (the tests' setting): ~35 s.
"""

import os

import ml_collections

import spectral_soup.data

CHAR_TOKENIZER = os.path.join(os.path.dirname(spectral_soup.data.__file__), "examples", "char_tokenizer")


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # PRNG seed of the bases' initialization and of the training data order.

  config.model = ml_collections.ConfigDict()
  config.model.path = ""  # Backbone checkpoint (HF dir, .gguf, "embedded:smollm2"); "": random init below.
  config.model.family = "llama"  # Architecture family of the random backbone ("llama", "gemma3", "gpt2").
  config.model.vocab_size = 64  # Random backbone's vocabulary (tokens 1..K: synthetic markers, 0: padding).
  config.model.num_layers = 2  # Random backbone's decoder blocks (model.path brings its own shape).
  config.model.embed_dim = 32  # Random backbone's residual width (= psi's width F without a projection).
  config.model.num_heads = 4  # Random backbone's query heads.
  config.model.num_kv_heads = 2  # Random backbone's key/value heads.
  config.model.head_dim = 8  # Random backbone's width of one head.
  config.model.mlp_dim = 64  # Random backbone's MLP hidden width.
  config.model.max_len = 128  # Random backbone's longest sequence (prompt + response).
  config.model.dtype = "float32"  # Compute dtype: "float32" or "bfloat16" (parameters stay in weight_dtype).
  config.model.weight_dtype = "float32"  # Parameter storage dtype.
  config.model.remat = False  # Rematerialize decoder blocks in the backward pass (LoRA bases on long sequences).

  config.basis = ml_collections.ConfigDict()
  config.basis.kind = "heads"  # "heads" (low-rank logit heads on psi, exact merging) or "lora" (the paper's).
  config.basis.num_bases = 3  # K: one basis per label column of the data.
  config.basis.head_rank = 4  # Rank r of each head's correction psi A_k B_k.
  config.basis.logit_bias = False  # Heads also get a context-free logit vector c_k (head_rank 0: only that).
  config.basis.feature_dim = 0  # Learned projection width of psi (0: psi = the final hidden state).
  config.basis.lora_rank = 2  # Rank of each LoRA adapter.
  config.basis.lora_targets = ("q_proj", "v_proj")  # Projections that LoRA bases adapt.
  config.basis.vocab_support = 0  # Heads correct only the S most frequent response tokens (0: all V; needs cached
  #   features; makes a cached step O(K r S) per token instead of O(D V), exact for the restricted heads).
  # Initial logit vectors c_k: "zeros" (every basis starts as the reference) or "ridge" (needs logit_bias, a
  # vocab_support and ratings: c_k = rating_scale / beta x a ridge regression of basis k's ratings, the linearized
  # ratings loss solved in closed form; steps refine it). What it regresses, `init_features`: "pair_surprise" (each
  # pair's rating difference on its token-surprise difference, sum_t onehot(y_t) - p_ref(.|s_t)), "surprise" (each
  # response's rating on its surprise) or "counts" (each response's rating on its token counts: a bag-of-words
  # reward model); `offline.ridge_init.ridge_logit_bias`.
  config.basis.init = "zeros"
  config.basis.init_features = "pair_surprise"
  config.basis.init_l2 = 10.0  # Ridge penalty of the "ridge" initialization.

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"  # "synthetic": marker-token pairs from `input_pipeline.synthetic_pairs`.
  config.data.num_train_pairs = 2_048  # Training pairs.
  config.data.num_eval_pairs = 256  # Held-out pairs for evaluation.
  config.data.prompt_len = 8  # Prompt tokens (padded).
  config.data.response_len = 16  # Response tokens (padded).
  config.data.seed = 1  # Seed of the synthetic data (independent of config.seed).
  # Tokenizer for serving text (spectral_soup.load_basis(...).generate): the shipped 51-token character tokenizer
  # (lowercase letters, digits, punctuation, chat specials); a local directory, or "": model.path's.
  config.data.tokenizer = CHAR_TOKENIZER

  config.loss = ml_collections.ConfigDict()
  config.loss.kind = "dpo"  # "dpo" (Bradley-Terry on labels) or "ratings" (MSE on rating differences).
  config.loss.beta = 1.0  # KL strength: implicit reward = beta * (log pi_k - log pi_ref) (LMs: ~0.1).
  config.loss.label_smoothing = 0.0  # Probability that a preference label is flipped (dpo).
  config.loss.rating_scale = 1.0  # Reward units per rating unit (ratings).

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 0.03  # Peak learning rate of AdamW.
  config.optim.warmup_steps = 20  # Linear warmup from 0 to the peak.
  config.optim.end_lr_fraction = 0.1  # Cosine decay ends at this fraction of the peak.
  config.optim.weight_decay = 0.0  # Decoupled weight decay of AdamW.
  config.optim.grad_clip = 1.0  # Global gradient-norm clipping (0: off).
  config.optim.b1 = 0.9  # Adam first-moment decay.
  config.optim.b2 = 0.99  # Adam second-moment decay.

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 300  # Optimizer updates.
  config.train.batch_size = 32  # Pairs per update (all hosts together).
  config.train.grad_accum_steps = 1  # Micro-batches per update (batch_size / grad_accum_steps pairs each).
  config.train.cache_features = True  # Heads: run the frozen backbone once ahead of training (see features.py).
  config.train.feature_batch_size = 256  # Pairs per call of the frozen feature pass.
  config.train.features_dir = ""  # Where cached features are kept, keyed by a hash of their inputs ("": workdir).
  config.train.eval_batch_size = 64  # Pairs per evaluation call.
  config.train.log_every_steps = 50  # Train metrics (JSON lines, TensorBoard) every this many steps.
  config.train.eval_every_steps = 0  # Held-out evaluation every this many steps (0: only at the end).
  config.train.tensorboard = True  # Also write TensorBoard scalars (needs tensorboardX; metrics.jsonl always).
  config.train.nan_check = True  # Stop at a non-finite loss / gradient norm (such a step never updates), saving
  #   its batch and state under <workdir>/nonfinite/; one host sync per step (False: checked at log steps only).

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Data-parallel axis size (-1: the devices left by the other axes).
  config.mesh.fsdp = 1  # Data-parallel axis that also shards parameters and optimizer state.
  config.mesh.model = 1  # Tensor-parallel axis (heads, MLP, vocabulary).
  config.mesh.num_devices = -1  # Use the first N devices (-1: all; single-host only).

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 50  # Save the train state every this many steps (and at the end).
  config.checkpoint.max_to_keep = 3  # Newest checkpoints kept.
  # Write checkpoints in a background thread (a crash then also loses the steps taken while the newest one was being
  # written; False: at most the last interval).
  config.checkpoint.async_save = True
  return config
