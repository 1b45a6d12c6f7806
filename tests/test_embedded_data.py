"""The embedded preference data: prompts, labels, splits and tokenization (generation itself runs in the jobs)."""

import numpy as np
import pytest

from configs import train_basis_embedded
from spectral_soup.data import embedded
from spectral_soup.offline import train


def test_chitchat_questions_are_real_distinct_and_seeded():
  a = embedded.chitchat_questions(50, seed=0)
  assert a == embedded.chitchat_questions(50, seed=0)
  assert a != embedded.chitchat_questions(50, seed=1)
  assert len(set(a)) == 50 and all(q.endswith("?") and len(q.split()) >= 4 for q in a)
  with pytest.raises(ValueError, match="num_prompts"):
    embedded.chitchat_questions(10_000_000, seed=0)


def test_pair_labels_with_ties():
  a = np.array([[1.0, 0.0], [0.0, 0.0], [0.5, 2.0]], np.float32)
  b = np.array([[0.0, 0.0], [1.0, 0.01], [0.5, 0.0]], np.float32)
  labels = embedded.pair_labels(a, b, tie_margin=0.1)
  np.testing.assert_array_equal(labels, [[1, -1], [0, -1], [-1, 1]])


def test_split_is_a_deterministic_function_of_the_prompt():
  prompts = [f"question {i}?" for i in range(400)]
  splits = [embedded.split_of(p, 0.25) for p in prompts]
  assert splits == [embedded.split_of(p, 0.25) for p in prompts]
  assert 0.15 < splits.count("eval") / 400 < 0.35


def test_tokenize_pairs_formats_prompts_and_marks_ended_responses():
  from spectral_soup import models
  tokenizer = models.tokenizer_from_pretrained("embedded:smollm2")
  pairs = [{"prompt": "How are you?", "response_a": "Fine, thanks!", "response_b": "I am well.",
            "scores_a": [1.0, 0.2], "scores_b": [0.0, 0.9], "ended_a": True, "ended_b": False}]
  arrays = embedded.tokenize_pairs(pairs, tokenizer, prompt_len=64, response_len=8)
  assert arrays["prompt"].shape == (1, 64) and arrays["prompt_mask"][0, -1]
  prompt_text = tokenizer.decode(arrays["prompt"][0][arrays["prompt_mask"][0]])
  assert "<|im_start|>user\nHow are you?<|im_end|>" in prompt_text and prompt_text.endswith("assistant\n")
  a = arrays["response_a"][0][arrays["response_a_mask"][0]].tolist()
  b = arrays["response_b"][0][arrays["response_b_mask"][0]].tolist()
  assert a[-1] == tokenizer.eos_token_id and b[-1] != tokenizer.eos_token_id
  np.testing.assert_array_equal(arrays["labels"], [[1, 0]])


def test_embedded_training_config_validates_and_names_bad_fields():
  config = train_basis_embedded.get_config()
  train.validate_config(config)
  config.model.path = ""
  with pytest.raises(ValueError, match="model.path"):
    train.validate_config(config)
  config = train_basis_embedded.get_config()
  config.data.eval_fraction = 1.5
  with pytest.raises(ValueError, match="data.eval_fraction"):
    train.validate_config(config)


def test_embedded_pairs_carry_ratings_standardized_on_the_training_split(monkeypatch):
  """loss.kind="ratings" trains on the attribute scores: z-scored with the training responses' statistics."""
  rng = np.random.default_rng(0)
  pairs = [{"prompt": f"What is question number {i}?", "response_a": "Yes.", "response_b": "No, never.",
            "scores_a": (rng.normal(size=5) * 10 + 3).tolist(), "scores_b": (rng.normal(size=5) * 10 + 3).tolist(),
            "ended_a": True, "ended_b": False} for i in range(40)]
  monkeypatch.setattr(embedded, "generate", lambda settings, root: "unused")
  monkeypatch.setattr(embedded, "load_pairs", lambda directory: (pairs, {}))
  config = train_basis_embedded.get_config()
  config.data.eval_fraction = 0.3
  train_split, eval_split = train._embedded_pairs(config)
  assert len(train_split["scores_a"]) + len(eval_split["scores_a"]) == 40 and len(eval_split["scores_a"]) > 0
  both = np.concatenate([train_split["scores_a"], train_split["scores_b"]])
  np.testing.assert_allclose(both.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(both.std(0), 1.0, atol=1e-4)
  raw = np.asarray([p["scores_a"] for p in pairs])
  is_eval = np.asarray([embedded.split_of(p["prompt"], 0.3) == "eval" for p in pairs])
  # Same order, same affine map per attribute on both splits.
  ratio = (eval_split["scores_a"] - train_split["scores_a"][:1]) / (raw[is_eval] - raw[~is_eval][:1])
  np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:1], ratio.shape), rtol=1e-4)
