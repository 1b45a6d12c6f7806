"""Bad input fails fast with a message that names the culprit: config fields, mixing weights, prompts, vocabularies,
dataset rows, pair arrays and truncated checkpoint files."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import train_basis_tiny
from spectral_soup.data import builders
from spectral_soup.models import hf_import
from spectral_soup.offline import feature_cache
from spectral_soup.offline import features
from spectral_soup.offline import input_pipeline
from spectral_soup.offline import config_checks
from spectral_soup.soup import decoding
from spectral_soup.soup import serving
from spectral_soup.utils import cli
from tests import tiny
from tests.reliability.harness import REPO

# Subprocesses find the repository first, then whatever this process finds (a --target install, say).
PYTHONPATH = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")

K, U = 3, 4

# ----------------------------------------------------------------------------------------------------------------
# Config fields.


def test_mistyped_config_fields_on_the_command_line_are_named(tmp_path):
  """Through the real entry point; all fail while parsing flags, before JAX is even imported: one line
  `error: ...` naming the flag or file (with absl's or ml_collections' "did you mean"), exit status 2."""
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  (tmp_path / "noget.py").write_text("x = 1\n")
  tiny = "--config=configs/train_basis_tiny.py"
  cases = {
      "num_step": ([tiny, "--config.train.num_step=5"], '--config.train.num_step: \'num_step\' is not a config field; '
                   'did you mean "num_steps"?'),
      "trian": ([tiny, "--config.trian.num_steps=5"], 'did you mean "train"?'),
      "ten": ([tiny, "--config.train.num_steps=ten"], "flag --config.train.num_steps=ten: expected an integer"),
      # Python's "invalid literal for int() with base 10" and "could not convert string to float" before.
      "1e3": ([tiny, "--config.train.num_steps=1e3"], "num_steps=1e3: expected an integer, got '1e3'"),
      "abc": ([tiny, "--config.optim.learning_rate=abc"], "learning_rate=abc: expected a number, got 'abc'"),
      "maybe": ([tiny, "--config.train.nan_check=maybe"], "nan_check=maybe: expected true or false, got 'maybe'"),
      "missing": ([f"--config={tmp_path / 'nope.py'}"], "nope.py does not exist"),
      # A name no field resembles (ml_collections gives no "did you mean"): it blamed the config file's loading.
      "nosuch": ([tiny, "--config.nosuch=1"], "--config.nosuch: 'nosuch' is not a config field."),
      # The flag given twice: the last one counts, and the message named the first (which exists).
      "repeated": ([tiny, f"--config={tmp_path / 'nope.py'}"], "nope.py does not exist"),
      "syntax": ([f"--config={tmp_path / 'syntax.py'}"], "syntax.py, line 1"),
      "noget": ([f"--config={tmp_path / 'noget.py'}"], "has no get_config()"),
  }
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=PYTHONPATH)
  procs = {
      name:
          subprocess.Popen([sys.executable, "-m", "experiments.train_basis", *argv, f"--workdir={workdir}"], cwd=REPO,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for name, (argv, _) in cases.items()
  }
  for name, (_, expected) in cases.items():
    _, err = procs[name].communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert procs[name].returncode == 2, (name, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (name, err[-2000:])
  assert not workdir.exists()


def test_cli_input_errors_are_one_line_with_exit_status_2(tmp_path):
  """A bad field or workdir: `error: ...` as the last line, status 2, no traceback (`--verbosity=1` keeps it)."""
  (tmp_path / "a_file").write_text("not a directory")
  cases = {
      "field": (["--config.loss.beta=0.0"], "error: config.loss.beta=0.0 is invalid: expected"),
      "workdir": ([f"--workdir={tmp_path / 'a_file'}"], "is a file: expected a directory"),
      "verbose": (["--config.loss.beta=0.0", "--verbosity=1"], "Traceback"),
  }
  env = dict(os.environ, PYTHONPATH=PYTHONPATH)
  procs = {}
  for name, (flags, _) in cases.items():
    argv = ["--config=configs/train_basis_tiny.py", f"--workdir={tmp_path / name}", *flags]
    procs[name] = subprocess.Popen([sys.executable, "-m", "experiments.train_basis", *argv], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for name, (_, expected) in cases.items():
    _, err = procs[name].communicate(timeout=180)
    if name == "verbose":
      assert procs[name].returncode != 0 and expected in err, err[-2000:]
      continue
    lines = [line for line in err.splitlines() if line.strip()]
    assert procs[name].returncode == 2, err[-2000:]
    assert lines[-1].startswith("error: ") and expected in lines[-1], err[-2000:]
    assert "Traceback" not in err
  assert sorted(os.listdir(tmp_path)) == ["a_file"]  # Nothing was written anywhere.


def test_a_workdir_left_out_is_named_as_missing():
  """`train_basis` without --workdir said '--workdir is empty' (it was not given at all)."""
  from spectral_soup.utils import cli  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"^--workdir is missing: expected --workdir=DIR"):
    cli.check_workdir(None)
  with pytest.raises(ValueError, match=r"^--workdir is empty"):
    cli.check_workdir("")


@pytest.mark.skipif(not os.path.isdir("/proc/self") or not os.path.isdir("/sys/kernel"), reason="Linux only")
def test_a_workdir_on_a_pseudo_filesystem_is_named_before_anything_runs(tmp_path):
  """/proc and /sys accept no new directory, whatever os.access says (as root it says yes): the run failed later
  with a bare `[Errno 2] No such file or directory: '/proc/x'`, naming no flag."""
  for workdir in ("/proc/spectral_soup_run", "/sys/kernel/spectral_soup_run/sub"):
    with pytest.raises(ValueError, match=rf"--workdir={workdir}: no directory can be created in /(proc|sys/kernel) "):
      cli.check_workdir(workdir)
  assert cli.check_workdir(str(tmp_path / "new" / "run")) is None and os.listdir(tmp_path) == []  # Nothing left.
  (tmp_path / "run").mkdir()
  assert cli.check_workdir(str(tmp_path / "run")) is None and os.listdir(tmp_path / "run") == []


@pytest.mark.parametrize(
    "flat, field",
    [  # `field`: the start of the message, after "config.".
        ({
            "basis.num_bases": 0
        }, "basis.num_bases"),
        ({
            "basis.head_rank": 0
        }, "basis.head_rank"),
        ({
            "loss.beta": 0.0
        }, "loss.beta"),
        ({
            "loss.label_smoothing": 0.5
        }, "loss.label_smoothing"),
        ({
            "optim.warmup_steps": 400
        }, "optim.warmup_steps"),  # More than train.num_steps = 300.
        ({
            "optim.b2": 1.0
        }, "optim.b2"),
        ({
            "checkpoint.max_to_keep": 0
        }, "checkpoint.max_to_keep"),
        ({
            "checkpoint.every_steps": -1
        }, "checkpoint.every_steps"),
        ({
            "train.eval_batch_size": 12
        }, "train.eval_batch_size"),  # Not a multiple of 8 devices.
        ({
            "data.response_len": 125
        }, "data.response_len"),  # prompt 8 + 125 > model.max_len 128.
        ({
            "data.prompt_len": 128
        }, "data.prompt_len"),  # No room for a response: it blamed data.response_len, which was not changed.
        ({
            "data.num_train_pairs": 16
        }, "data.num_train_pairs"),  # Fewer than one batch of 32.
        ({
            "data.source": "web"
        }, "data.source"),
        ({
            "model.dtype": "float16"
        }, "model.dtype"),
        ({
            "model.num_heads": 3
        }, r"model.num_kv_heads=2 is invalid: expected a divisor of num_heads=3"),
        ({
            "optim.learning_rate": float("inf")
        }, r"optim.learning_rate=inf is invalid: expected a finite number"),
        ({
            "loss.beta": float("nan")
        }, r"loss.beta=nan is invalid: expected a finite number"),
        ({
            "train.num_steps": -5
        }, r"train.num_steps=-5 is invalid: expected >= 0"),  # Not optim.warmup_steps.
        ({
            "train.batch_size": 0
        }, r"train.batch_size=0 is invalid: expected >= 1"),  # Not data.num_train_pairs.
        ({
            "model.vocab_size": 10**12
        }, r"model.vocab_size=1000000000000 is invalid: expected an integer of at most 2\*\*31 - 1"),
        ({
            "data.num_train_pairs": 10**12
        }, r"data.num_train_pairs=1000000000000 is invalid"),
        ({
            "loss.beta": 1e30
        }, r"loss.beta=1e\+30 is invalid: expected in \(0, 10000\]"),
        ({
            "optim.learning_rate": 1e30
        }, r"optim.learning_rate=1e\+30 is invalid: expected in \[0, 1000\]"),
        ({
            "basis.kind": "lora",
            "basis.logit_bias": True
        }, r"basis.logit_bias=True is invalid: expected False unless basis.kind='heads'"),
        ({
            "basis.kind": "lora",
            "basis.feature_dim": 8
        }, r"basis.feature_dim=8 is invalid: expected 0 unless basis.kind='heads'"),
        ({
            "optim.weight_decay": 1e4
        }, r"optim.weight_decay=10000.0 is invalid: expected >= 0 and below 1 / optim.learning_rate"),
        ({
            "basis.kind": "lora",
            "basis.lora_targets": ("q_proj", "q_proj")
        }, r"basis.lora_targets=\('q_proj', 'q_proj'\) is invalid: expected .*, each once"),
        ({
            "model.path": "/nonexistent/checkpoint"
        }, r"model.path='/nonexistent/checkpoint' is invalid: expected a checkpoint directory or .gguf file that "),
    ])
def test_out_of_range_config_values_are_named(flat, field):
  config = train_basis_tiny.get_config()
  config.update_from_flattened_dict(flat)
  with pytest.raises(ValueError, match=rf"config\.{field}"):
    config_checks.validate_config(config)


def test_embedded_training_attributes_are_checked_with_the_config():
  """A repeated or unknown attribute failed in the reward suite after the data was read, naming no field."""
  from configs import train_basis_embedded  # pylint: disable=g-import-not-at-top
  for attributes in (("verbosity", "verbosity"), ("verbosity", "wit"), ()):
    config = train_basis_embedded.get_config()
    config.data.attributes = attributes
    config.basis.num_bases = max(1, len(attributes))
    with pytest.raises(ValueError, match=r"config\.data\.attributes=.* is invalid: expected names among .*, each once"):
      config_checks.validate_config(config)


def test_a_features_dir_that_is_a_file_is_named(tmp_path):
  (tmp_path / "a_file").write_text("x")
  for path, why in ((tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "sub", "is a file, so the directory")):
    config = train_basis_tiny.get_config()
    config.train.features_dir = str(path)
    with pytest.raises(
        ValueError, match=rf"config\.train\.features_dir=.* is invalid: expected a directory this user "
        rf"can write or create \(.*{why}"):
      config_checks.validate_config(config)


def test_bases_that_cannot_fit_one_device_are_refused_before_anything_is_allocated():
  from spectral_soup.offline import train  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import memory  # pylint: disable=g-import-not-at-top
  config = train_basis_tiny.get_config()
  config.basis.num_bases = 10**8
  limit = memory.memory_limit_bytes()
  state = [jax.ShapeDtypeStruct((10**8, limit // 10**8 + 1), np.float32)]  # 4x one device's memory in all.
  with pytest.raises(
      ValueError, match=r"config\.basis\.num_bases=100000000 is invalid: the bases and their optimizer "
      r"state need .* GiB \(basis\.head_rank=.*\), .* GiB per device even split over all 2, more than the "
      r".* GiB one device holds"):
    train._check_state_fits(config, state, type("Mesh", (), {"size": 2})())
  train._check_state_fits(config, state, type("Mesh", (), {"size": 8})())  # Half a device each: fits.


def test_config_field_types_are_enforced():
  config = train_basis_tiny.get_config()
  with pytest.raises(TypeError, match="nan_check"):  # ConfigDict keeps each field's type.
    config.train.nan_check = "yes"
  with pytest.raises(TypeError, match="num_bases"):
    config.basis.num_bases = 2.5


# ----------------------------------------------------------------------------------------------------------------
# Mixing weights and prompts at serving time: checked before anything compiles.


@pytest.fixture(scope="module")
def heads_policy():
  return tiny.tiny_policy("heads", num_bases=K)


PROMPT = np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13], [0, 0, 0, 14]], np.int32)
MASK = PROMPT != 0


@pytest.mark.parametrize("lam, message", [
    (np.ones(K + 1), r"lam has 4 weights but there are 3 bases"),
    (np.ones((U, K - 1)), r"lam has 2 weights but there are 3 bases"),
    (np.ones((U + 1, K)), r"lam has 5 rows but the batch has 4 rows"),
    (np.ones((2, U, K)), r"lam must have shape \[K\] or \[B, K\] with K=3"),
    (np.where(np.eye(U, K) > 0, np.nan, 0.2), r"lam\[0, 0\] is NaN"),
    (np.array([0.2, np.inf, 0.1]), r"lam\[1\] is inf"),
    (np.array(["a", "b", "c"]), r"lam must hold real numbers"),
])
def test_bad_lam_is_named(heads_policy, lam, message):
  policy, params = heads_policy
  with pytest.raises(ValueError, match=message):
    serving.generate(policy, params, lam, PROMPT, MASK, max_new_tokens=2)


def test_empty_and_overlong_prompts_are_named(heads_policy):
  policy, params = heads_policy
  with pytest.raises(ValueError, match="prompt 1 has 0 tokens: expected 1 to 4"):
    decoding.pad_prompts([[1, 2], []], batch_size=2, length=4)
  with pytest.raises(ValueError, match="prompt 0 has 5 tokens: expected 1 to 4"):
    decoding.pad_prompts([[1, 2, 3, 4, 5]], batch_size=2, length=4)
  with pytest.raises(ValueError, match="3 prompts do not fit a batch of 2"):
    decoding.pad_prompts([[1], [2], [3]], batch_size=2, length=4)
  empty = MASK.copy()
  empty[2] = False
  with pytest.raises(ValueError, match="prompt row 2 is empty"):
    serving.generate(policy, params, np.ones(K) / K, PROMPT, empty, max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    serving.generate(policy, params, np.ones(K) / K, PROMPT, MASK, max_new_tokens=0)


@pytest.mark.parametrize("kwargs, message", [
    ({
        "max_new_tokens": 2.5
    }, r"max_new_tokens=2.5: expected an integer >= 1"),
    ({
        "max_new_tokens": True
    }, r"max_new_tokens=True: expected an integer >= 1"),
    ({
        "mode": "implicit",
        "max_proposals": 0
    }, r"max_proposals=0: expected an integer >= 1"),
    ({
        "sampling": {
            "temperature": float("nan")
        }
    }, r"temperature=nan: expected a finite number >= 0"),
    ({
        "sampling": {
            "temperature": float("inf")
        }
    }, r"temperature=inf: expected a finite number >= 0"),
    ({
        "sampling": {
            "temperature": "0.7"
        }
    }, r"temperature='0.7': expected a finite number >= 0"),
    ({
        "sampling": {
            "top_k": 2.5
        }
    }, r"top_k=2.5: expected an integer >= 0"),
    ({
        "sampling": {
            "top_p": float("nan")
        }
    }, r"top_p=nan: expected a number in \(0, 1\]"),
])
def test_bad_decoding_arguments_are_named(heads_policy, kwargs, message):
  policy, params = heads_policy
  kwargs = {"max_new_tokens": 2, **kwargs}
  with pytest.raises(ValueError, match=message):
    if "sampling" in kwargs:
      kwargs["sampling"] = decoding.SamplingConfig(**kwargs["sampling"])
    serving.generate(policy, params, np.ones(K) / K, PROMPT, MASK, **kwargs)


def test_prompt_longer_than_the_position_table_is_named():
  policy, params = tiny.tiny_policy("heads", num_bases=K, family="gpt2")  # Learned positions: max_len = 128.
  prompt = np.ones((2, 120), np.int32)
  with pytest.raises(ValueError, match=r"prompt length 120 \+ max_new_tokens=16 = 136 positions exceed the "
                     r"model's max_len=128"):
    serving.generate(policy, params, np.ones(K) / K, prompt, prompt > 0, max_new_tokens=16)


def test_prompt_longer_than_a_rotary_model_is_named(heads_policy):
  policy, params = heads_policy  # Llama (rotary): max_len = 128 too.
  prompt = np.ones((2, 120), np.int32)
  with pytest.raises(ValueError, match=r"prompt length 120 \+ max_new_tokens=16 = 136 positions exceed the "
                     r"model's max_len=128"):
    serving.generate(policy, params, np.ones(K) / K, prompt, prompt > 0, max_new_tokens=16)
  with pytest.raises(ValueError, match=r"prompt length 120 \+ response length 9 = 129 positions exceed"):
    serving.sequence_logprobs(policy, params, prompt, prompt > 0, np.ones((2, 9), np.int32), np.ones((2, 9), bool))


def test_token_ids_outside_the_vocabulary_are_named(heads_policy):
  policy, params = heads_policy
  bad = PROMPT.copy()
  bad[1, 2] = tiny.VOCAB  # One past the embedding table.
  with pytest.raises(ValueError, match=r"prompt\[1, 2\] = 64 is not a token id of this model: expected 0 <= id < "
                     r"vocab_size=64"):
    serving.generate(policy, params, np.ones(K) / K, bad, MASK, max_new_tokens=2)
  response = np.array([[1, 2], [3, -1], [4, 5], [6, 7]], np.int32)
  with pytest.raises(ValueError, match=r"response\[1, 1\] = -1 is not a token id"):
    serving.sequence_logprobs(policy, params, PROMPT, MASK, response, np.ones((U, 2), bool))
  # Padding positions may hold anything: they are never read.
  out = serving.sequence_logprobs(policy, params, PROMPT, MASK, response, response >= 0)
  assert np.all(np.isfinite(np.asarray(out["basis"])))


def test_sequence_logprobs_checks_lam_before_jit(heads_policy):
  policy, params = heads_policy
  response = np.ones((U, 2), np.int32)
  with pytest.raises(ValueError, match=r"lam\[1, 0\] is NaN"):
    serving.sequence_logprobs(policy, params, PROMPT, MASK, response, response > 0,
                              lam=np.array([[0.1, 0.2, 0.1], [np.nan, 0.2, 0.1]] * 2))
  with pytest.raises(
      ValueError, match=r"response must be int\[B, T\] with a response_mask of the same shape; got "
      r"\(4, 2\) and \(4, 1\)"):
    serving.sequence_logprobs(policy, params, PROMPT, MASK, response, response[:, :1] > 0)
  with pytest.raises(ValueError, match="response has 3 rows for 4 prompt rows: expected one response per prompt row"):
    serving.sequence_logprobs(policy, params, PROMPT, MASK, response[:3], response[:3] > 0)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer vs model vocabulary.


def _tokenizer_dir(path, num_tokens, vocab_size):
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, num_tokens)}}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(str(path))
  (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab_size}))
  return path


def test_tokenizer_larger_than_the_model_vocabulary_is_named(tmp_path):
  bad = _tokenizer_dir(tmp_path / "bad", num_tokens=40, vocab_size=32)
  with pytest.raises(
      ValueError, match=r"bad: the tokenizer has 40 tokens but the model's vocab_size is 32: token "
      r"ids 32\.\.39 have no embedding"):
    hf_import.tokenizer_from_pretrained(bad)
  padded = _tokenizer_dir(tmp_path / "padded", num_tokens=40, vocab_size=48)  # A padded embedding table is fine.
  assert len(hf_import.tokenizer_from_pretrained(padded)) == 40


def test_pairs_tokenized_for_another_model_are_named():
  pairs = input_pipeline.synthetic_pairs(8, num_bases=K, vocab_size=100, prompt_len=4, response_len=6, seed=0)
  row = int(np.flatnonzero((np.where(pairs["response_b_mask"], pairs["response_b"], 0) >= 64).any(1))[0])
  pairs["prompt"] %= 64
  pairs["response_a"] %= 64
  with pytest.raises(ValueError, match=rf"'response_b' row {row} holds token id \d+, but the model's vocab_size "
                     rf"is 64"):
    input_pipeline.check_pairs(pairs, K, vocab_size=64)
  pairs["response_b"] %= 64
  assert input_pipeline.check_pairs(pairs, K, vocab_size=64) == 8


@pytest.mark.parametrize("axes, names, shape, message", [
    ((1, 1, 2), ("layers", "embed", "kv_heads", "kv"), (2, 32, 1, 8),
     r"config\.mesh\.model=2 is invalid: it would split dimension 2 of \['w'\] \(shape \(2, 32, 1, 8\), logical axis "
     r"'kv_heads'\) of size 1 into 2 parts"),
    ((1, 1, 4), ("vocab", "embed"), (50257, 32), r"config\.mesh\.model=4 is invalid: .* 'vocab'\) of size 50257"),
    ((1, 8, 1), ("basis", "features", "head_rank"), (3, 12, 4), r"config\.mesh\.fsdp=8 is invalid: .* 'features'"),
])
def test_a_mesh_axis_that_does_not_divide_what_it_splits_is_named(axes, names, shape, message):
  """Multi-query attention with a model axis, GPT-2's odd vocabulary, a feature width: an IndivisibleError from
  inside jit (after the feature pass for the heads) before."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(*axes, num_devices=math.prod(axes))
  tree = {"w": nn.Partitioned(jax.ShapeDtypeStruct(shape, np.float32), names)}
  with pytest.raises(ValueError, match=message):
    mesh_lib.abstract_shardings(tree, mesh)
  mesh_lib.abstract_shardings({"w": nn.Partitioned(jax.ShapeDtypeStruct((8, 8, 8, 8)[:len(shape)], np.float32), names)},
                              mesh)


def test_fewer_training_pairs_than_one_batch_are_named_before_the_workdir_is_made(tmp_path):
  """Any source (the embedded data's split said "22 examples cannot fill one batch of 32" after the feature pass)."""
  from spectral_soup.offline import train  # pylint: disable=g-import-not-at-top
  config = train_basis_tiny.get_config()
  config.basis.num_bases, config.model.vocab_size = K, 64
  pairs = input_pipeline.synthetic_pairs(8, num_bases=K, vocab_size=64, prompt_len=8, response_len=16, seed=0)
  empty = {k: v[:0] for k, v in pairs.items()}
  with pytest.raises(
      ValueError, match=r"config\.train\.batch_size=32 is invalid: the training pairs given \(pairs=\) are 8, "
      r"fewer than one batch"):
    train.train_and_evaluate(config, str(tmp_path / "run"), pairs=(pairs, empty))
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------
# Malformed pair arrays (what training reads) and malformed source rows (what the builders read).


def test_pairs_longer_than_the_models_positions_are_named_before_compiling(tmp_path):
  """Pairs given to training (pairs=) were not checked against model.max_len: GPT-2's position table gave NaN
  losses blamed on the learning rate, a RoPE model trained silently past its declared context."""
  from spectral_soup.offline import train  # pylint: disable=g-import-not-at-top
  config = train_basis_tiny.get_config()
  config.basis.num_bases, config.model.vocab_size, config.model.max_len = K, 64, 32
  pairs = input_pipeline.synthetic_pairs(64, num_bases=K, vocab_size=64, prompt_len=8, response_len=40, seed=0)
  with pytest.raises(
      ValueError, match=r"'prompt' \(8 tokens wide\) \+ 'response_a'/'response_b' \(40\) = 48 "
      r"positions, beyond the model's max_len=32"):
    train.train_and_evaluate(config, str(tmp_path / "run"), pairs=(pairs, {k: v[:0] for k, v in pairs.items()}))
  assert not (tmp_path / "run").exists()
  assert input_pipeline.check_pairs(pairs, K, max_len=48) == 64


def _pairs():
  return input_pipeline.synthetic_pairs(8, num_bases=K, vocab_size=64, prompt_len=4, response_len=6, seed=0)


def _set(field, row, value):

  def damage(pairs):
    pairs[field] = pairs[field].copy()
    pairs[field][row] = value
    return pairs

  return damage


@pytest.mark.parametrize("damage, message", [
    (lambda p: {
        k: v for k, v in p.items() if k != "response_b_mask"
    }, r"lack fields \['response_b_mask'\]"),
    (lambda p: {
        **p, "labels": p["labels"][:5]
    }, r"'labels' has 5 rows; 'prompt' has 8"),
    (lambda p: {
        **p, "labels": p["labels"][:, :2]
    }, r"'labels' has shape \(8, 2\): expected \[N, 3\]"),
    (lambda p: {
        **p, "prompt_mask": p["prompt_mask"][:, :3]
    }, r"prompt_mask has shape \(8, 3\); prompt has \(8, 4\)"),
    (lambda p: {
        **p, "response_a": p["response_a"].astype(np.float32)
    }, r"'response_a' holds float32 values"),
    (lambda p: {
        **p, "response_b": p["response_b"][:, :4],
        "response_b_mask": p["response_b_mask"][:, :4]
    }, r"'response_b' is 4 tokens wide, 'response_a' 6: both responses are \[N, R\] with one R"),
    (_set("response_b_mask", 3, False), r"'response_b' is empty in row 3"),
    (_set("prompt_mask", 6, False), r"'prompt' is empty in row 6"),
    (_set("response_a", 2, -5), r"'response_a' row 2 holds the negative token id -5"),
    (_set("labels", 4, 2), r"'labels' row 4 holds 2: labels are 1"),
    (_set("scores_a", 1, np.inf), r"'scores_a' row 1 holds inf: scores must be finite"),
])
def test_malformed_pair_arrays_are_named(damage, message):
  with pytest.raises(ValueError, match=message):
    input_pipeline.check_pairs(damage(_pairs()), K, need_ratings=True)
  # NaN marks a missing score: accepted.
  assert input_pipeline.check_pairs(_set("scores_a", 1, np.nan)(_pairs()), K, need_ratings=True) == 8


def test_rating_differences_the_ratings_loss_would_overflow_are_named():
  # The ratings loss squares rating_scale * (a - b) in float32: 1e25-sized ratings (valid float32) overflow it.
  big = _set("scores_a", 5, 1e25)(_pairs())
  assert input_pipeline.check_pairs(big, K, need_ratings=True) == 8  # Without a loss scale: only the format.
  with pytest.raises(ValueError, match=r"Pair row 5, basis 0: loss.rating_scale \* \(scores_a - scores_b\) = 1 \*"):
    input_pipeline.check_pairs(big, K, need_ratings=True, rating_scale=1.0)
  with pytest.raises(ValueError, match=r"Pair row 1, basis 0: .* beyond \+-1e\+15"):
    input_pipeline.check_pairs(_set("scores_a", 1, 10.0)(_pairs()), K, need_ratings=True, rating_scale=1e15)
  # Missing ratings (NaN) and ordinary ones pass.
  assert input_pipeline.check_pairs(_set("scores_a", 1, np.nan)(_pairs()), K, need_ratings=True, rating_scale=1.0) == 8


def _write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _rated(prompt, response, score=3):
  return {
      "prompt": prompt,
      "response": response,
      "helpfulness": score,
      "correctness": score,
      "coherence": score,
      "complexity": score,
      "verbosity": score
  }


def _completion(response, rating="3"):
  return {
      "model": "m",
      "response": response,
      "annotations": {
          a: {
              "Rating": rating
          } for a in ("instruction_following", "honesty", "truthfulness", "helpfulness")
      }
  }


def _ultrafeedback(bad):
  good = {"source": "s", "instruction": "Plan a trip.", "completions": [_completion("r0"), _completion("r1", "4")]}
  return "ultrafeedback", {"ultrafeedback/part.jsonl": [good, bad]}


BAD_ROWS = {  # (builder, files {name: rows}) with the bad row second in the first file.
    "helpsteer2/missing_field": ("helpsteer2", {"train.jsonl": [_rated("p", "a"), {"prompt": "p", "response": "b"}],
                                                "validation.jsonl": [_rated("v", "a")]}, "helpfulness"),
    "helpsteer2/wrong_type": ("helpsteer2", {"train.jsonl": [_rated("p", "a"), _rated("p", "b", score="3")],
                                             "validation.jsonl": [_rated("v", "a")]}, "helpfulness"),
    "helpsteer2/nan_rating": ("helpsteer2", {"train.jsonl": [_rated("p", "a"), json.dumps(_rated("p", "b", 1))
                                                             .replace('"coherence": 1', '"coherence": NaN')],
                                             "validation.jsonl": [_rated("v", "a")]}, "coherence"),
    "helpsteer2/empty_response": ("helpsteer2", {"train.jsonl": [_rated("p", "a"), _rated("p", " ")],
                                                 "validation.jsonl": [_rated("v", "a")]}, "response"),
    "psoups/empty_response": ("psoups", {"data/rm_training/P1A.jsonl": [
        {"user_input": "q", "completion_a": "x", "completion_b": "y"},
        {"user_input": "q", "completion_a": "", "completion_b": "y"}]}, "completion_a"),
    "ultrafeedback/empty_response": (*_ultrafeedback(
        {"instruction": "Say hi.", "completions": [_completion("hi"), _completion("")]}), "completions[1].response"),
    "ultrafeedback/nan_rating": (*_ultrafeedback(
        {"instruction": "Say hi.", "completions": [_completion("hi"), _completion("yo", "NaN")]}),
                                 "completions[1].annotations.instruction_following.Rating"),
    "ultrafeedback/missing_field": (*_ultrafeedback({"instruction": "Say hi."}), "completions"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_malformed_source_rows_name_file_row_and_field(tmp_path, case):
  name, files, field = BAD_ROWS[case]
  for file_name, rows in files.items():
    _write_jsonl(tmp_path / "manual" / file_name, rows)
  first = next(iter(files))
  with pytest.raises(builders.MalformedRowError) as info:
    builders.load_source(name, tmp_path / "tfds", manual_dir=tmp_path / "manual")
  assert (info.value.row, info.value.field) == (2, field), str(info.value)
  assert info.value.path.endswith(os.path.basename(first)) and f"'{field}'" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# Truncated checkpoint files: a clear error naming the file, never a raw struct / numpy / Rust error.


def _full_gguf(path):
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.arange(16 * 8, dtype=np.float32).reshape(16, 8))
  writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path.read_bytes()


def _llama_dir(path):
  path.mkdir()
  (path / "config.json").write_text(
      json.dumps({
          "model_type": "llama",
          "vocab_size": 16,
          "hidden_size": 8,
          "intermediate_size": 16,
          "num_hidden_layers": 1,
          "num_attention_heads": 2,
          "num_key_value_heads": 1,
          "head_dim": 4,
          "max_position_embeddings": 32,
          "tie_word_embeddings": False
      }))
  save_file({
      "model.embed_tokens.weight": np.ones((16, 8), np.float32),
      "model.norm.weight": np.ones(8, np.float32)
  }, str(path / "model.safetensors"))
  return (path / "model.safetensors").read_bytes()


@pytest.mark.parametrize("keep", [6, 0.5, -16])  # Inside the header, the middle, the last tensor's bytes.
def test_truncated_gguf_names_the_file(tmp_path, keep):
  data = _full_gguf(tmp_path / "full.gguf")
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
  with pytest.raises(ValueError, match=r"cut\.gguf.*(truncated|too short|corrupt)") as info:
    hf_import.from_pretrained(cut)
  assert info.type is ValueError


@pytest.mark.parametrize("keep", [4, 40, 0.5, -8])
def test_truncated_safetensors_names_the_file(tmp_path, keep):
  data = _llama_dir(tmp_path / "model")
  cut = data[:int(len(data) * keep) if isinstance(keep, float) else keep]
  (tmp_path / "model" / "model.safetensors").write_bytes(cut)
  with pytest.raises(
      ValueError, match=rf"model\.safetensors: not a readable safetensors file \({len(cut)} bytes\); "
      r"it is probably truncated or corrupt") as info:
    hf_import.from_pretrained(tmp_path / "model")
  assert info.type is ValueError


def test_the_features_cache_key_covers_the_backbone(tmp_path):
  """A shared train.features_dir: another random backbone's architecture, or a checkpoint replaced at the same
  path, is another cache file (a 4-layer run reused a 2-layer run's features)."""
  pairs = input_pipeline.synthetic_pairs(4, num_bases=2, vocab_size=64, prompt_len=4, response_len=4, seed=0)
  key = lambda config: feature_cache.features_path(config, str(tmp_path), pairs, pairs, None)
  config = train_basis_tiny.get_config()
  first = key(config)
  assert key(train_basis_tiny.get_config()) == first  # The same inputs: the same file.
  for field, value in (("num_layers", 4), ("mlp_dim", 128), ("vocab_size", 80), ("dtype", "bfloat16")):
    other = train_basis_tiny.get_config()
    other.model[field] = value
    assert key(other) != first, field
  other = train_basis_tiny.get_config()
  other.seed += 1
  assert key(other) != first
  model = tmp_path / "model"
  model.mkdir()
  (model / "model.safetensors").write_bytes(b"1")
  config.model.path = str(model)
  before = key(config)
  (model / "model.safetensors").write_bytes(b"22")
  changed = key(config)
  assert changed != before
  # Another checkpoint copied over it keeping size and modification time (`cp -p`): another key too.
  stat = os.stat(model / "model.safetensors")
  (model / "model.safetensors").write_bytes(b"33")
  os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert key(config) not in (before, changed)
  # The same files reached through another path: the contents decide, not the modification time.
  twin = tmp_path / "twin"
  shutil.copytree(model, twin)
  config.model.path = str(twin)
  same_files = key(config)
  os.utime(twin / "model.safetensors", ns=(1, 1))
  assert key(config) == same_files


def test_the_features_cache_key_covers_the_code_that_computes_them(tmp_path, monkeypatch):
  """Features cached by another version of the model code (an upgrade that fixes attention, say) were reused."""
  names = [os.path.basename(path) for path in feature_cache.code_files()]
  assert {"transformer.py", "spectral.py", "features.py"} <= set(names), names
  copies = []
  for path in feature_cache.code_files():
    copies.append(str(tmp_path / f"{len(copies)}-{os.path.basename(path)}"))
    shutil.copyfile(path, copies[-1])
  digest = feature_cache.source_digest(copies)
  assert digest == feature_cache.source_digest(copies)  # Deterministic.
  with open(copies[names.index("transformer.py")], "a") as f:
    f.write("# another version\n")
  changed = feature_cache.source_digest(copies)
  assert changed != digest
  pairs = input_pipeline.synthetic_pairs(4, num_bases=2, vocab_size=64, prompt_len=4, response_len=4, seed=0)
  config = train_basis_tiny.get_config()
  before = feature_cache.features_path(config, str(tmp_path), pairs, pairs, None)
  monkeypatch.setattr(feature_cache, "code_digest", lambda: changed)
  assert feature_cache.features_path(config, str(tmp_path), pairs, pairs, None) != before


def test_a_data_tokenizer_that_is_not_the_checkpoints_own_is_refused(tmp_path):
  """The tiny config's character tokenizer with a real model.path: ids the model reads as other tokens."""
  from spectral_soup.offline import sources  # pylint: disable=g-import-not-at-top
  from tests import hf_fixtures  # pylint: disable=g-import-not-at-top
  config = train_basis_tiny.get_config()  # data.tokenizer: the 51-token character tokenizer.
  config.model.path = hf_fixtures.byte_tokenizer(tmp_path / "model")  # A checkpoint directory with its tokenizer.
  with pytest.raises(
      ValueError, match=r"config\.data\.tokenizer='.*char_tokenizer' is invalid: it is not the tokenizer "
      r"of config\.model\.path='.*model' \(51 tokens, .* so its ids would mean other tokens"):
    sources.load_tokenizer(config)
  config.data.tokenizer = hf_fixtures.byte_tokenizer(tmp_path / "copy")  # The same tokenizer elsewhere: fine.
  assert len(sources.load_tokenizer(config)) == len(hf_import.tokenizer_from_pretrained(config.model.path))
  config.data.tokenizer = ""
  assert sources.load_tokenizer(config) is not None


def test_runs_record_their_paths_absolute_and_a_relative_one_is_named_when_it_does_not_load(tmp_path, monkeypatch):
  """A relative model.path was recorded as typed and resolved against the serving process's directory: from
  another directory holding a checkpoint of the same name, the bases were served on that other backbone."""
  from spectral_soup import basis as basis_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import resume  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import errors  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "synthetic").write_text("")  # A file named like a source: the source stays a name.
  config = train_basis_tiny.get_config()
  config.model.path = "ckpt"
  recorded = resume.with_absolute_paths(config)  # What config.json holds.
  assert recorded.model.path == str(tmp_path / "ckpt") and config.model.path == "ckpt"
  assert recorded.data.source == "synthetic"  # Not a path: unchanged.
  saved = resume.resume_fields(config)  # What a checkpoint records: the path from here.
  assert saved["model.path"] == str(tmp_path / "ckpt")
  resume.check_resume(config, "W", 0, resume.resume_fields(recorded))  # The same path, relative or absolute.
  (tmp_path / "elsewhere" / "ckpt").mkdir(parents=True)
  monkeypatch.chdir(tmp_path / "elsewhere")  # Another directory, holding another checkpoint of the same name.
  with pytest.raises(ValueError,
                     match=r"config\.model\.path='.*elsewhere/ckpt' differs from '.*/ckpt' in the checkpoint"):
    resume.check_resume(config, "W", 0, saved)
  (tmp_path / "elsewhere" / "ckpt").rmdir()  # An older run's relative path, served from another directory.
  with pytest.raises(
      errors.InputError, match=r"'ckpt' does not exist\. \(model\.path='ckpt' in the run's config is "
      r"relative: it was resolved against the current directory .*elsewhere\)"):
    basis_lib.load_backbone(config)


def test_unreadable_features_cache_is_moved_aside_and_recomputed(tmp_path, caplog):
  """A truncated or garbage features-*.npz (a crash mid-write of an older version, a full disk) never crash-loops."""
  path = tmp_path / "features-abc.npz"
  for damage in (b"not a zip file at all", b"PK\x03\x04truncated"):
    path.write_bytes(damage)
    with caplog.at_level("WARNING"):
      assert feature_cache.load_features(str(path)) is None
    assert not path.exists() and (tmp_path / "features-abc.npz.unreadable").exists()
    assert "features-abc.npz are unreadable" in caplog.text
  np.savez(path, **{"train/hidden": np.ones(3), "eval/hidden": np.zeros(2)})
  good = feature_cache.load_features(str(path))
  np.testing.assert_array_equal(good["train"]["hidden"], np.ones(3))
  # A readable file that does not fit the pairs (other row counts, a missing field) is unreadable too: it was merged.
  fields = {
      f"{split}/{name}": np.ones((n, 2)) for split, n in (("train", 3), ("eval", 2)) for name in features.CACHED_FIELDS
  }
  np.savez(path, **fields)
  assert feature_cache.load_features(str(path), {"train": 3, "eval": 2}) is not None
  caplog.clear()
  with caplog.at_level("WARNING"):
    assert feature_cache.load_features(str(path), {"train": 6, "eval": 2}) is None
  assert "its train" in caplog.text and "has 3 rows for 6 pairs" in caplog.text
  np.savez(path, **{k: v for k, v in fields.items() if k != f"eval/{features.CACHED_FIELDS[0]}"})
  assert feature_cache.load_features(str(path), {"train": 3, "eval": 2}) is None


def test_the_features_cache_key_frames_the_tokens_and_names_the_embedded_weights(tmp_path, monkeypatch):
  """The same token bytes in another shape were the same key (unrelated features reused); int32 and int64 support
  ids were two keys; the embedded model's GGUF file was not hashed (an upgraded package reused stale features); the
  XLA flags and the jax version, which change CPU numerics, were not in the key."""
  pairs = input_pipeline.synthetic_pairs(4, num_bases=2, vocab_size=64, prompt_len=4, response_len=4, seed=0)
  config = train_basis_tiny.get_config()
  key = lambda p, support=None: feature_cache.features_path(config, str(tmp_path), p, p, support)
  reshaped = {
      name: np.ascontiguousarray(v).reshape(v.shape[0] * 2, -1) if name in input_pipeline.TOKEN_FIELDS else v
      for name, v in pairs.items()
  }
  assert key(reshaped) != key(pairs)
  assert key(pairs, np.arange(5, dtype=np.int32)) == key(pairs, np.arange(5, dtype=np.int64))
  before = key(pairs)
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false")
  assert key(pairs) != before
  from spectral_soup.models import embedded as embedded_model  # pylint: disable=g-import-not-at-top
  gguf = tmp_path / "weights.gguf"
  gguf.write_bytes(b"one")
  monkeypatch.setitem(embedded_model.EMBEDDED_MODELS, "smollm2", lambda: str(gguf))
  config.model.path = "embedded:smollm2"
  first = key(pairs)
  gguf.write_bytes(b"two")
  assert key(pairs) != first
  assert any(path.endswith("reductions.py") for path in feature_cache.code_files())


# ----------------------------------------------------------------------------------------------------------------
# Errors after the config check, and a workdir that a live run holds.


def test_cli_model_path_errors_are_one_line_with_exit_status_2(tmp_path):
  """A model path that does not load is found inside the run (`train_and_evaluate`): still one line, status 2,
  and the workdir is not created."""
  (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
  from tests import hf_fixtures  # pylint: disable=g-import-not-at-top
  short = tmp_path / "short"  # A checkpoint whose position table is shorter than a prompt + a response (8 + 16).
  hf_fixtures.save_hf_model(hf_fixtures.build_hf_model("gpt2", vocab_size=512, n_positions=20), short)
  hf_fixtures.byte_tokenizer(short)
  cases = {
      "missing": (tmp_path / "nope.gguf", "nope.gguf"),
      "garbage": (tmp_path / "garbage.gguf", "garbage.gguf"),
      "short": (short, "config.data.response_len=16 is invalid: expected <= max_len - data.prompt_len = 12")
  }
  env = dict(os.environ, PYTHONPATH=PYTHONPATH)
  procs = {
      name:
          subprocess.Popen([
              sys.executable, "-m", "experiments.train_basis", "--config=configs/train_basis_tiny.py",
              f"--config.model.path={path}", f"--workdir={tmp_path / ('run_' + name)}"
          ], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for name, (path, _) in cases.items()
  }
  for name, (_, expected) in cases.items():
    _, err = procs[name].communicate(timeout=180)
    lines = [line for line in err.splitlines() if line.strip()]
    assert procs[name].returncode == 2, err[-2000:]
    assert lines[-1].startswith("error: ") and expected in lines[-1], err[-2000:]
    assert "Traceback" not in err
  assert sorted(os.listdir(tmp_path)) == ["garbage.gguf", "short"]


_HOLDER = """
import sys, time
from spectral_soup.utils import workdir_lock
with workdir_lock.hold(sys.argv[1], primary=True):
  print("held", flush=True)
  time.sleep(600)
"""


def test_a_live_run_holds_its_workdir_and_a_killed_one_does_not(tmp_path):
  from spectral_soup.utils import errors  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=PYTHONPATH), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    before = sorted(os.listdir(workdir))
    with pytest.raises(errors.InputError, match=rf"in use by a live run \(process {holder.pid}\)"):
      workdir_lock.check_free(str(workdir), primary=True)
    with pytest.raises(errors.InputError, match="in use by a live run"):
      with workdir_lock.hold(str(workdir), primary=True):
        pass
    # Through the CLI: refused in one line before anything loads; the workdir is as it was.
    proc = subprocess.run([
        sys.executable, "-m", "experiments.train_basis", "--config=configs/train_basis_tiny.py", f"--workdir={workdir}"
    ], cwd=REPO, env=dict(os.environ, PYTHONPATH=PYTHONPATH), capture_output=True, text=True, timeout=180)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "in use by a live run" in lines[-1], proc.stderr[-2000:]
    assert sorted(os.listdir(workdir)) == before
  finally:
    holder.kill()  # SIGKILL: the kernel drops the lock with the process.
    holder.wait()
  workdir_lock.check_free(str(workdir), primary=True)
  with workdir_lock.hold(str(workdir), primary=True):
    assert (workdir / workdir_lock.LOCK_NAME).read_text().strip() == str(os.getpid())


def test_a_stale_lock_on_nfs_is_probed_with_a_writable_descriptor(tmp_path, monkeypatch):
  """NFS grants an exclusive flock only on a file open for writing (EBADF otherwise): every restart of a workdir
  holding a .lock failed with `[Errno 9] Bad file descriptor`. Emulated: flock refuses read-only descriptors."""
  import errno  # pylint: disable=g-import-not-at-top
  import fcntl  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import workdir_lock  # pylint: disable=g-import-not-at-top
  real = fcntl.flock

  def nfs_flock(fd, operation):
    if operation & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
      raise OSError(errno.EBADF, "Bad file descriptor")
    return real(fd, operation)

  monkeypatch.setattr(fcntl, "flock", nfs_flock)
  (tmp_path / workdir_lock.LOCK_NAME).write_text("12345\n")  # Left by a killed run.
  workdir_lock.check_free(str(tmp_path), primary=True)
  with workdir_lock.hold(str(tmp_path), primary=True):
    pass


def test_an_atomic_write_keeps_the_replaced_files_permissions_and_progress_reads_its_switch(tmp_path, monkeypatch):
  """A private (0600) file became 0644 when rewritten; SPECTRAL_SOUP_PROGRESS=false / off / no turned bars on."""
  from spectral_soup.utils import files as files_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import progress  # pylint: disable=g-import-not-at-top
  path = tmp_path / "secret.json"
  path.write_text("{}")
  os.chmod(path, 0o600)
  files_lib.write_text_atomic(str(path), '{"a": 1}')
  assert path.read_text() == '{"a": 1}' and os.stat(path).st_mode & 0o777 == 0o600
  for value, disabled in (("0", True), ("false", True), ("Off", True), ("no", True), ("", True), ("1", False), ("yes",
                                                                                                                False)):
    monkeypatch.setenv("SPECTRAL_SOUP_PROGRESS", value)
    assert progress.track(range(2), desc="x").disable == disabled, value


def test_an_atomic_write_through_a_link_replaces_its_target_and_threads_do_not_collide(tmp_path):
  """A symbolic link was replaced by a file (its target kept the old text); two threads writing one path shared one
  temporary name, so one's rename took the other's file away (FileNotFoundError)."""
  import threading  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import files as files_lib  # pylint: disable=g-import-not-at-top
  target, link = tmp_path / "real.json", tmp_path / "link.json"
  target.write_text("old")
  link.symlink_to(target)
  files_lib.write_text_atomic(str(link), "new")
  assert link.is_symlink() and target.read_text() == "new"
  errors = []

  def write(i):
    try:
      for _ in range(30):
        files_lib.write_text_atomic(str(tmp_path / "shared.json"), str(i) * 1000)
    except OSError as e:  # pragma: no cover  (the failure this test looks for)
      errors.append(e)

  threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and (tmp_path / "shared.json").read_text() in {str(i) * 1000 for i in range(4)}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json", "shared.json"]


def test_a_lock_path_that_is_a_directory_is_refused_before_any_work(tmp_path):
  """It was a bare `[Errno 21] Is a directory` once the run was accepted, after the main job's data phase."""
  from spectral_soup.utils import errors  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import workdir_lock  # pylint: disable=g-import-not-at-top
  (tmp_path / workdir_lock.LOCK_NAME).mkdir()
  with pytest.raises(errors.InputError, match=r"\.lock is a directory: expected the run's lock file"):
    workdir_lock.check_free(str(tmp_path), primary=True)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint directories whose weights or config cannot be the model they claim to be.


def _edit_checkpoint(path, case):
  """A tiny Llama checkpoint in `path`, then damaged as `case` says."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from tests import hf_fixtures  # pylint: disable=g-import-not-at-top
  hf_fixtures.save_tiny_checkpoint("llama", path)
  weights = path / "model.safetensors"
  tensors = load_file(str(weights))
  config = json.loads((path / "config.json").read_text())
  name = "model.layers.1.mlp.up_proj.weight"
  if case == "nan":
    tensors[name] = tensors[name].copy()
    tensors[name][3, 5] = np.nan
  elif case == "int8":
    tensors[name] = np.zeros(tensors[name].shape, np.int8)
  elif case == "extra_layer":
    config["num_hidden_layers"] = 1
  elif case == "no_width":
    del config["hidden_size"]
  elif case == "string_layers":
    config["num_hidden_layers"] = "2"
  elif case == "heads_not_dividing":
    config["num_attention_heads"] = 5
    config.pop("head_dim", None)
  elif case == "duplicate":  # The same tensors in two loose files (no model.safetensors, no index).
    save_file(tensors, str(path / "copy.safetensors"), metadata={"format": "pt"})
    weights = path / "part.safetensors"
    (path / "model.safetensors").unlink()
  elif case in ("index_null", "index_list"):  # A sharded checkpoint (a model.safetensors beside it would win).
    index = json.dumps({"weight_map": {name: None}}) if case == "index_null" else "[1, 2]"
    (path / "model.safetensors.index.json").write_text(index)
    weights = path / "model-00001-of-00001.safetensors"
    (path / "model.safetensors").unlink()
  save_file(tensors, str(weights), metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "case, message",
    [
        ("nan", r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' holds 1 non-finite values"),
        ("int8", r"tensor 'model.layers.1.mlp.up_proj.weight' has dtype int8: expected float32, float16 or bfloat16"),
        ("extra_layer", r"the checkpoint holds layers up to 1, but its config has 1 \(num_hidden_layers"),
        ("no_width", r"config.json: no 'hidden_size': expected the llama architecture's hidden_size"),
        ("string_layers", r"config.json: num_hidden_layers='2': expected an integer >= 1"),
        # transformers puts the reason on the line after "...validator 'validate_architecture':", which was cut off.
        ("heads_not_dividing", r"config.json: transformers cannot read this config \(.*validate_architecture.: .*The "
         r"hidden size \(\d+\) is not a multiple of the number of attention heads \(5\)"),
        ("duplicate", r"tensor '.*' is in both .*\.safetensors and .*\.safetensors"),
        ("index_null", r"model.safetensors.index.json: weight_map\['model.layers.1.mlp.up_proj.weight'\] = None: "
         "expected the file name of a shard"),
        ("index_list", r"model.safetensors.index.json: no 'weight_map' in the safetensors index"),
    ])
def test_a_checkpoint_that_is_not_the_model_it_claims_is_named_at_load(tmp_path, case, message):
  _edit_checkpoint(tmp_path / "model", case)
  with pytest.raises(ValueError, match=message) as info:
    hf_import.from_pretrained(tmp_path / "model")
  assert info.type is ValueError


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated", r"tokenizer.json: not readable JSON .*; the tokenizer file is damaged or truncated"),
        ("template", r"the tokenizer's chat template does not parse \(line 1: "),
        ("none", r"no tokenizer could be loaded from this directory"),
        # tokenizer_config.json naming a class, its vocabulary files missing (a partial copy): transformers built a
        # tokenizer of its special tokens alone, which encoded every text as [].
        ("no_vocabulary",
         r"tok: the tokenizer loaded from this directory holds only its 3 special tokens .* and encodes "
         r"'Hello world' as \[\]: its vocabulary is missing"),
    ])
def test_a_tokenizer_directory_that_does_not_load_is_named(tmp_path, case, message):
  from tests import hf_fixtures  # pylint: disable=g-import-not-at-top
  path = tmp_path / "tok"
  path.mkdir()
  if case == "no_vocabulary":
    (path / "tokenizer_config.json").write_text(
        json.dumps({
            "tokenizer_class": "LlamaTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>"
        }))
  elif case != "none":
    hf_fixtures.byte_tokenizer(path)
  if case == "truncated":
    data = (path / "tokenizer.json").read_text()
    (path / "tokenizer.json").write_text(data[:len(data) // 2])
  elif case == "template":
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in path.glob("chat_template.*"):
      extra.unlink()
  with pytest.raises(ValueError, match=message):
    hf_import.tokenizer_from_pretrained(path)


def test_a_sharded_checkpoint_reads_each_tensor_from_the_shard_its_index_names(tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from tests import hf_fixtures  # pylint: disable=g-import-not-at-top
  ref, sharded = tmp_path / "ref", tmp_path / "sharded"
  hf_fixtures.save_tiny_checkpoint("llama", ref)
  hf_fixtures.save_tiny_checkpoint("llama", sharded)
  tensors = load_file(str(sharded / "model.safetensors"))
  (sharded / "model.safetensors").unlink()
  names = sorted(tensors)
  first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
  shard = {name: first if i < len(names) // 2 else second for i, name in enumerate(names)}
  stale = names[0]  # Indexed in the first shard; a zeroed copy also sits in the second, which sorts last.
  for file in (first, second):
    part = {name: tensors[name] for name in names if shard[name] == file}
    if file == second:
      part[stale] = np.zeros_like(tensors[stale])
    save_file(part, str(sharded / file), metadata={"format": "pt"})
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shard}))
  _, want = hf_import.load_hf_checkpoint(ref)
  _, got = hf_import.load_hf_checkpoint(sharded)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
