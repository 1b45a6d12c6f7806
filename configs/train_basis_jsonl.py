r"""Offline basis training on your own preference pairs (a JSON-lines file), on SmolLM2-135M, on CPU.

  python -m experiments.train_basis --config=configs/train_basis_jsonl.py --workdir=workdir/my_basis \
      --config.data.source=prefs.jsonl --config.basis.num_bases=3

Without --config.data.source it trains on the example that ships with the package (`spectral_soup/data/examples/
prefs.jsonl`: 24 hand-written pairs judged on "concise" or "friendly"), in about two minutes on 2 CPU cores.

The file's layouts and checks: `spectral_soup/data/jsonl.py` (`prompt` / `chosen` / `rejected` with an optional
`attribute`, or `prompt` / `response_a` / `response_b` with per-attribute `labels` or `scores_a` / `scores_b`). A bad
row is refused naming its line and field before anything is compiled. Bases 0..A-1 are the file's attributes in order
of first appearance (`basis.num_bases` must be at least A; more bases are seeded mixtures of the attributes, as for
the builder sources); their names travel into `basis.json` and `spectral_soup.load_basis(workdir).names`. Prompts are
held out by a hash of their text (`data.eval_fraction`). Serve the result with `spectral_soup.load_basis` or
`python -m spectral_soup.generate --workdir=workdir/my_basis --lam=...`.
"""

import os

from configs import train_basis_embedded
import spectral_soup.data

# 24 hand-written pairs (12 judged on "concise", 12 on "friendly") that ship with the package: the example to copy.
EXAMPLE = os.path.join(os.path.dirname(spectral_soup.data.__file__), "examples", "prefs.jsonl")


def get_config():
  config = train_basis_embedded.get_config()
  config.basis.num_bases = 2  # K: at least the file's attributes (the example's: concise, friendly).
  config.basis.vocab_support = 0  # Heads correct every token (a small file: the support would be its own tokens).
  config.basis.head_rank = 0
  config.basis.logit_bias = True

  d = config.data
  d.source = EXAMPLE  # A .jsonl file of preference pairs.
  d.attributes = ()  # The file's attributes to use, in order ("-name" negates one); empty: all of them.
  d.eval_fraction = 0.1  # Share of prompts held out (hash split; 0: none).
  d.weighting_alpha = 1.0  # Dirichlet concentration of the mixtures, when basis.num_bases exceeds the attributes.
  d.label_margin = 0.0  # With scores: a mixture's label is a tie within this margin.
  d.chat_template = True  # Prompts as one user turn of the tokenizer's chat template.
  d.num_train_pairs = 100_000  # At most this many training pairs are read.
  d.num_eval_pairs = 10_000  # At most this many held-out pairs are read.
  d.seed = 0  # The mixtures' Dirichlet weightings and which rows a limit keeps.
  for field in ("num_prompts", "max_new_tokens", "temperature", "top_p", "generation_batch_size", "cache_dir",
                "tie_margin"):
    del d[field]  # The embedded generator's settings do not apply.

  config.loss.kind = "dpo"
  config.train.batch_size = 8
  config.train.eval_batch_size = 1  # Small files hold out few pairs.
  config.train.feature_batch_size = 8
  config.train.num_steps = 100  # Updates: many epochs of the example's 24 pairs at batch 8; scale with the file.
  config.checkpoint.every_steps = 50
  config.mesh.num_devices = 1  # A CPU run; set -1 (every device) with batch sizes that divide among them.
  return config
