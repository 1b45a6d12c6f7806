"""Tiny, randomly initialized transformers models for tests (built locally; nothing is downloaded).

    model = build_hf_model("gemma3")                 # torch model in eval mode, deterministic weights
    path = save_hf_model(model, tmp_path / "g")      # config.json + model.safetensors
    path = save_tiny_checkpoint("llama", tmp_path / "l", max_shard_size="20KB")  # sharded

Weights are drawn with a larger std than HF's default init (and every 1-D parameter, i.e. norms and biases, is
randomized, token embeddings shrunk), so attention patterns, rotary phases and norm placement all visibly change
the logits and greedy decoding does not degenerate into repeating one token: a conversion bug cannot hide behind
near-uniform attention, all-ones norms or trivially equal generations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Everything is local; never reach for the hub.

FAMILIES = ("gpt2", "llama", "gemma3")  # Parity-tested in full; "mistral" is also buildable.
VOCAB = {"gpt2": 128, "llama": 160, "gemma3": 192, "mistral": 96}


def tiny_hf_config(family: str, **overrides) -> Any:
  """A tiny transformers config of `family` (FAMILIES or "mistral"), eager attention, no eos token."""
  import transformers

  common: Dict[str, Any] = dict(initializer_range=0.15, eos_token_id=None, bos_token_id=None, pad_token_id=0)
  if family == "gpt2":
    kw = dict(vocab_size=VOCAB[family], n_positions=64, n_embd=64, n_layer=2, n_head=4, activation_function="gelu_new",
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cls = transformers.GPT2Config
  elif family == "llama":
    kw = dict(vocab_size=VOCAB[family], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
              tie_word_embeddings=False, rope_parameters={
                  "rope_type": "default",
                  "rope_theta": 500.0
              })
    cls = transformers.LlamaConfig
  elif family == "mistral":  # Llama with a sliding window on every layer.
    kw = dict(vocab_size=VOCAB[family], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=4,
              tie_word_embeddings=False, rope_parameters={
                  "rope_type": "default",
                  "rope_theta": 500.0
              })
    cls = transformers.MistralConfig
  elif family == "gemma3":
    kw = dict(
        vocab_size=VOCAB[family], hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=4,
        query_pre_attn_scalar=24, final_logit_softcapping=6.0, rope_parameters={
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": 100.0
            },
            "full_attention": {
                "rope_type": "linear",
                "rope_theta": 1000.0,
                "factor": 2.0
            }
        }, tie_word_embeddings=True)
    cls = transformers.Gemma3TextConfig
  else:
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
  kw.update(common)
  kw.update(overrides)
  config = cls(**kw)
  config._attn_implementation = "eager"
  return config


def tiny_gemma3_multimodal_config(**text_overrides) -> Any:
  """A tiny `Gemma3Config` (Gemma3ForConditionalGeneration): tiny_hf_config("gemma3") + a 1-layer SigLIP tower."""
  import transformers

  text = tiny_hf_config("gemma3", **text_overrides)
  config = transformers.Gemma3Config(
      text_config=text.to_dict(), mm_tokens_per_image=4,
      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                         patch_size=4))
  config._attn_implementation = "eager"
  return config


def build_hf_model(family: str, seed: int = 0, **config_overrides) -> Any:
  """A tiny randomly initialized `*ForCausalLM` (eval mode, float32, eager attention)."""
  import torch
  import transformers

  config = tiny_hf_config(family, **config_overrides)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:  # Norm scales / offsets and biases: make them non-trivial.
        p.add_(0.2 * torch.randn_like(p))
    # Smaller token embeddings, so the residual stream is not dominated by the input token: otherwise tied
    # models greedily repeat their last token and decoding tests would compare degenerate sequences.
    model.get_input_embeddings().weight.mul_(0.3)
  return model.float().eval()


def save_hf_model(model: Any, path: str | Path, **save_kwargs) -> Path:
  """save_pretrained into `path` (safetensors); returns the directory."""
  path = Path(path)
  model.save_pretrained(str(path), **save_kwargs)
  return path


def save_tiny_checkpoint(family: str, path: str | Path, seed: int = 0, **save_kwargs) -> Path:
  """Builds and saves a tiny checkpoint of `family`; returns the directory."""
  return save_hf_model(build_hf_model(family, seed), path, **save_kwargs)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ("<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>", "<|end|>")


def byte_tokenizer(path):
  """A byte-level tokenizer (specials, then the 256 bytes; no merges) with a chat template, saved to `path`."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  vocab = {s: i for i, s in enumerate(SPECIALS)}
  for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
    vocab[ch] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(list(SPECIALS))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                              bos_token="<bos>", chat_template=CHAT_TEMPLATE)
  fast.save_pretrained(str(path))
  return str(path)
