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
