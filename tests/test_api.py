"""The researcher's API (`import spectral_soup as ss`): a basis trained by the CLI is loaded, serves two users' soups
as text in one call, yields the features lambda is fitted on, and is served by `python -m spectral_soup.generate`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spectral_soup as ss
from spectral_soup import basis as basis_lib
from spectral_soup.soup import decoding
from spectral_soup.soup import serving
from spectral_soup.models.transformer import init_cache
import hf_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60
PROMPTS = ["hello there", "what is up?"]


def _env():
  env = dict(os.environ, SPECTRAL_SOUP_PROGRESS="0", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))  # Also where it is not installed.
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)  # One CPU device: the CLI as a user runs it.
  return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """The tiny config's K = 3 head bases (random 2-layer backbone, synthetic pairs: basis k prefers token k + 1),
  trained by the CLI, with a byte-level tokenizer so that they serve text."""
  root = tmp_path_factory.mktemp("api")
  tokenizer = hf_fixtures.byte_tokenizer(root / "tokenizer")
  workdir = str(root / "run")
  result = subprocess.run([
      sys.executable, "-m", "experiments.train_basis", "--config=configs/train_basis_tiny.py", f"--workdir={workdir}",
      "--config.model.vocab_size=512", f"--config.data.tokenizer={tokenizer}", f"--config.train.num_steps={STEPS}",
      "--config.train.tensorboard=False"
  ], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def basis(workdir):
  return ss.load_basis(workdir)


def test_load_basis_reads_the_trained_bases(basis, workdir):
  assert isinstance(basis, ss.Basis)
  assert basis.num_bases == 3 and basis.names == ("marker 1", "marker 2", "marker 3")
  assert basis.step == STEPS and basis.beta == 1.0
  assert basis.tokenizer is not None and basis.tokenizer.eos_token_id == 1
  leaves = [type(x).__name__ for x in jax.tree.leaves(basis.params)]
  assert all(name in ("ndarray", "ArrayImpl") for name in leaves), set(leaves)  # Plain arrays, no boxes.
  assert np.abs(np.asarray(basis.params["heads"]["b"])).max() > 0  # Trained, not the zero initialization.
  with open(os.path.join(workdir, "training_curves.png"), "rb") as f:  # The CLI plots its metrics.
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_generate_serves_two_users_in_one_call(basis):
  lam = np.array([[0.0, 0.0, 0.0], [0.0, 3.0, 0.0]], np.float32)
  both = basis.generate(PROMPTS[0], lam, max_new_tokens=12)
  assert len(both) == 2 and all(isinstance(t, str) for t in both)
  # One call for two users equals one call per user.
  assert both == [basis.generate([PROMPTS[0]], lam[u], max_new_tokens=12)[0] for u in range(2)]
  # lam = 0 is the reference: the backbone's own greedy decode of the chat-formatted prompt.
  model, backbone, tokenizer = basis_lib.load_backbone(basis.config)
  tokens, mask = basis.encode_prompts([PROMPTS[0]])
  assert tokenizer.decode(tokens[0][mask[0]].tolist()) == f"<|user|>{PROMPTS[0]}<|end|><|assistant|>"
  out, aux = decoding.decode(decoding.model_logits_fn(model), backbone, tokens, mask,
                             init_cache(model.config, 1, tokens.shape[1] + 12), jax.random.key(0), max_new_tokens=12,
                             eos_id=tokenizer.eos_token_id)
  ids = np.asarray(out)[0, :int(aux["lengths"][0])].tolist()
  assert both[0] == tokenizer.decode(ids, skip_special_tokens=True).strip()
  # The parameter soup of head bases is the explicit soup; every mode runs.
  assert basis.generate(PROMPTS[0], lam, max_new_tokens=12, mode="params") == both
  # A bfloat16 lam is numbers, as serving.generate takes it (it was refused as "got bfloat16 values").
  assert basis.generate(PROMPTS[0], jnp.asarray(lam, jnp.bfloat16), max_new_tokens=12) == both
  sampled = basis.generate(PROMPTS, [0.2, 0.5, 0.3], max_new_tokens=8, temperature=1.0, seed=3, mode="implicit")
  assert len(sampled) == 2
  # Which responses ended with the end-of-sequence token (basis 0 prefers it: token 1) and which were cut at
  # max_new_tokens (the reference's, `ids` above).
  texts, ended = basis.generate(PROMPTS[0], [[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]], max_new_tokens=12, return_ended=True)
  assert texts[0] == both[0] and ids[-1] != tokenizer.eos_token_id and len(ids) == 12 and ended == [False, True]


def test_features_are_the_bases_implicit_rewards(basis):
  """Basis k prefers marker token k + 1 (token 2 is <bos>): a response of markers scores higher on its basis."""
  f = basis.features(PROMPTS * 2, ["<bos><bos><bos><bos>", "abc", "<|user|><|user|><|user|>", "abc"])
  assert f.shape == (4, 3) and f.dtype == np.float32 and np.isfinite(f).all()
  assert f[0, 1] > f[1, 1] + 1.0 and f[2, 2] > f[3, 2] + 1.0
  # Batching does not change a row; a response cut to zero tokens has zero features.
  np.testing.assert_allclose(basis.features(PROMPTS[1:], ["abc"], batch_size=1)[0], f[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(basis.features(PROMPTS[:1], ["abc"], max_response_tokens=0), 0.0, atol=1e-6)
  # A response that did not end (cut at max_new_tokens) has no end-of-sequence term: "abc" scored as tokens alone.
  cut = basis.features(PROMPTS[1:] * 2, ["abc", "abc"], ended=[False, True])
  np.testing.assert_allclose(cut[1], f[1], rtol=1e-5, atol=1e-5)
  model, backbone, tokenizer = basis_lib.load_backbone(basis.config)
  prompt, prompt_mask = basis.encode_prompts(PROMPTS[1:])
  response = np.asarray([tokenizer("abc", add_special_tokens=False)["input_ids"]], np.int32)
  logp = serving.sequence_logprobs(basis.policy, basis.params, prompt, prompt_mask, response,
                                   np.ones_like(response, bool))
  np.testing.assert_allclose(cut[0], np.asarray(serving.implicit_rewards(logp, basis.beta))[0], rtol=1e-5, atol=1e-5)
  assert np.abs(cut[0] - cut[1]).max() > 1e-3
  np.testing.assert_array_equal(basis.features(PROMPTS[1:], ["abc"], ended=False), cut[:1])
  for bad, message in (([True], r"ended has 1 entries for 2 responses"), ("yes", r"ended is str"),
                       ([1, 0], r"ended\[0\] is 1: expected True or False")):
    with pytest.raises(ValueError, match=message):
      basis.features(PROMPTS, ["a", "b"], ended=bad)


def test_a_users_lambda_fitted_from_comparisons_prefers_their_basis(basis):
  """20 comparisons by a user whose reward is basis 2's implicit reward: the fitted lambda weighs basis 2 most."""
  rng = np.random.default_rng(0)
  chars = ["a", "b", "c", "<|user|>", "<bos>"]
  responses = ["".join(rng.choice(chars, size=6)) for _ in range(40)]
  f = basis.features(["hi"] * 40, responses)
  delta = f[:20] - f[20:]
  prefs = (delta[:, 2] > 0).astype(np.float32)
  assert 0 < prefs.sum() < 20
  lam = np.asarray(ss.fit_lambda(delta, prefs, l2=1.0, constraint="box", box=(0.0, 10.0)))
  assert lam.shape == (3,) and int(np.argmax(lam)) == 2 and lam[2] > 2 * max(lam[0], lam[1]), lam


def test_bad_inputs_name_what_was_expected(basis, tmp_path):
  with pytest.raises(ValueError, match=r"lam has shape \(2,\): expected \[K=3\].*marker 1, marker 2, marker 3"):
    basis.generate(PROMPTS, [1.0, 0.0])
  with pytest.raises(ValueError, match="lam has 3 user rows for 2 prompts"):
    basis.generate(PROMPTS, np.eye(3))
  with pytest.raises(ValueError, match=r"lam has shape \(0, 3\): expected at least one user row"):
    basis.generate(PROMPTS[0], np.zeros((0, 3)))
  with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
    basis.generate(["hi", " "], [0.0, 0.0, 0.0])
  with pytest.raises(ValueError, match=r"lam\[1\] is nan: expected finite weights"):  # It said "lam row 0".
    basis.generate(PROMPTS[0], [0.0, np.nan, 0.0])
  with pytest.raises(ValueError, match=r"lam\[1, 2\] is inf: expected finite weights"):
    basis.generate(PROMPTS, [[0.0, 0.0, 0.0], [0.0, 0.0, np.inf]])
  with pytest.raises(ValueError, match="2 prompts for 1 responses"):
    basis.features(PROMPTS, ["x"])
  with pytest.raises(ValueError, match=r"seed='1': expected an integer"):
    basis.generate(PROMPTS, [0.0, 0.0, 0.0], seed="1")
  with pytest.raises(ValueError, match=r"temperature=nan: expected a finite number >= 0"):
    basis.generate(PROMPTS, [0.0, 0.0, 0.0], temperature=float("nan"))
  with pytest.raises(FileNotFoundError, match="no trained basis in"):
    ss.load_basis(str(tmp_path))
  with pytest.raises(ValueError, match=r"seed=18446744073709551616: expected an integer in \[-9223372036854775808, "):
    basis.generate(PROMPTS, [0.0, 0.0, 0.0], seed=2**64)
  with pytest.raises(ValueError, match=r"lam\[0, 1\] = -1e\+38: mixing weights must lie within \+-1e\+06"):
    basis.generate(PROMPTS, [0.5, -1e38, 0.0])
  with pytest.raises(ValueError, match=r"chat_template='False': expected True or False"):
    basis.generate(PROMPTS, [0.0, 0.0, 0.0], chat_template="False")
  with pytest.raises(ValueError, match=r"prompts\[0\] is not valid text: .* at character 5"):
    basis.generate(["paris\ud800"], [0.0, 0.0, 0.0])
  with pytest.raises(ValueError, match=r"max_response_tokens=-1: expected an integer >= 0"):
    basis.features(PROMPTS, ["a", "b"], max_response_tokens=-1)
  with pytest.raises(ValueError, match=r"batch_size=2.5: expected an integer >= 1"):
    basis.features(PROMPTS, ["a", "b"], batch_size=2.5)
  with pytest.raises(ValueError, match=r"prompts is bytes: expected a string or a list of strings \(decode the"):
    basis.generate(b"hello", [0.0, 0.0, 0.0])  # Bytes are a sequence of ints: it said "prompts[0] is a int".
  with pytest.raises(ValueError, match=r"lam\[0, 1\] = 1000001.0: mixing weights must lie within \+-1e\+06"):
    basis.generate(PROMPTS, [0.5, 1e6 + 1, 0.0])  # It printed 1e+06 (%g), which looked within the bound.
  with pytest.raises(ValueError, match=r"lam\[0, 0\] = 1e\+39: mixing weights must lie within \+-1e\+06"):
    basis.generate(PROMPTS, np.array([1e39, 0.0, 0.0]))  # It said "lam row 0 is not finite" (cast to float32 first).
  with pytest.raises(ValueError, match=r"return_ended='yes': expected True or False"):
    basis.generate(PROMPTS, [0.0, 0.0, 0.0], return_ended="yes")
  with pytest.raises(
      ValueError, match=r"\+ the longest response \(301 tokens\) = .* positions exceed the model's "
      r"max_len=128; pass max_response_tokens= to cut the responses"):
    basis.features(PROMPTS[:1], ["y" * 300])
  assert basis.features(PROMPTS[:1], ["y" * 300], max_response_tokens=16).shape == (1, 3)
  with pytest.raises(ValueError, match=r"mode='implicit' draws exact samples .* got temperature=0.0"):
    basis.generate(PROMPTS, [0.0, 0.0, 0.0], mode="implicit")  # Greedy: it sampled at temperature 1 instead.


def test_features_and_sampling_arguments_beyond_the_inputs_are_clamped(basis):
  # A batch wider than the pairs scores them once (no padding to batch_size); top_k beyond the vocabulary keeps all.
  want = basis.features(PROMPTS, ["abc", "abd"], batch_size=2)
  np.testing.assert_array_equal(basis.features(PROMPTS, ["abc", "abd"], batch_size=10**9), want)
  sampled = lambda top_k: basis.generate(PROMPTS, [0.0, 2.0, 0.0], temperature=1.0, top_k=top_k, seed=3, max_new_tokens=
                                         6)
  assert sampled(10**6) == sampled(0)


def _edited_copy(workdir, path, edit):
  shutil.copytree(workdir, path)
  config = json.loads((path / "config.json").read_text())
  edit(config)
  (path / "config.json").write_text(json.dumps(config))
  return str(path)


def test_load_basis_names_a_config_or_checkpoint_that_does_not_describe_the_bases(workdir, tmp_path):
  # A config.json that is not the training run's, or that was edited after training: named before any array loads.
  copy = _edited_copy(workdir, tmp_path / "no_field", lambda c: c["model"].pop("num_layers"))
  with pytest.raises(ValueError, match=r"config.json has no field 'model.num_layers'"):
    ss.load_basis(copy)
  (tmp_path / "no_field" / "config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match=r"config.json holds a JSON list: expected the training run's config"):
    ss.load_basis(copy)
  # Fields of the wrong type failed as bare TypeErrors naming neither the file nor the field.
  for section, field, value, expected in (("basis", "num_bases", "3", "an integer >= 1"), ("model", "dtype", "float8",
                                                                                           "a float dtype name")):
    copy = _edited_copy(workdir, tmp_path / f"type_{field}", lambda c: c[section].__setitem__(field, value))
    with pytest.raises(ValueError, match=rf"config.json: {section}.{field}='{value}': expected {expected}"):
      ss.load_basis(copy)
  for bad in (None, 5, ""):
    with pytest.raises(ValueError, match=r"load_basis: workdir=.*: expected the path of a training run's"):
      ss.load_basis(bad)
  for field, value in (("num_bases", 4), ("head_rank", 2)):
    copy = _edited_copy(workdir, tmp_path / field, lambda c: c["basis"].__setitem__(field, value))
    with pytest.raises(
        ValueError, match=rf"config.json says basis.{field}={value}, but checkpoint step {STEPS} was "
        "written with"):
      ss.load_basis(copy)
  copy = _edited_copy(workdir, tmp_path / "logit_bias", lambda c: c["basis"].__setitem__("logit_bias", True))
  with pytest.raises(
      ValueError, match=rf"config.json says basis.logit_bias=True, but checkpoint step {STEPS} was "
      "written with False"):
    ss.load_basis(copy)
  # A field the checkpoint did not record (older checkpoints recorded logit_bias only when on): the arrays' shapes
  # are compared once the backbone loads.
  copy = _edited_copy(workdir, tmp_path / "old", lambda c: c["basis"].__setitem__("logit_bias", True))
  for step in os.listdir(os.path.join(copy, "checkpoints")):
    path = os.path.join(copy, "checkpoints", step, "data", "metadata")  # The JSON item saved with the arrays.
    with open(path) as f:
      saved = json.load(f)
    saved.pop("basis.logit_bias")
    with open(path, "w") as f:
      json.dump(saved, f)
  with pytest.raises(
      ValueError, match=rf"checkpoint step {STEPS} in .* does not fit the bases its config.json "
      r"describes on this backbone: .* has shape none in the checkpoint"):
    ss.load_basis(copy)
  copy = _edited_copy(workdir, tmp_path / "basis_json", lambda c: None)
  (tmp_path / "basis_json" / "basis.json").write_text('{"attributes": ["a", "b", "c"]}')
  with pytest.raises(ValueError, match=r"basis.json is not a readable basis description .*KeyError: 'weightings'"):
    ss.load_basis(copy)
  # Fewer names than bases in a training's own workdir: refused (the unnamed bases were dropped silently; only the
  # main job's basis/ holds extra heads, its users' bespoke ones).
  (tmp_path / "basis_json" / "basis.json").write_text('{"attributes": ["a", "b"], "weightings": [[1, 0], [0, 1]]}')
  with pytest.raises(ValueError, match=r"3 heads bases for 2 names \(a, b\) in its basis.json: expected one name per"):
    ss.load_basis(copy)
  # The main job's basis/ folder given itself: named as such, with the workdir to load (it blamed a basis.json).
  main = tmp_path / "main"
  shutil.copytree(copy, main / "basis")
  shutil.copy(main / "basis" / "config.json", main / "config.json")
  with pytest.raises(
      ValueError, match=r"3 heads bases for the 2 attributes \(a, b\): this is the main job's basis/ "
      rf"folder, .* load the main job's workdir instead: load_basis\('{main}'\)"):
    ss.load_basis(str(main / "basis"))
  assert ss.load_basis(str(main)).num_bases == 2


def test_load_basis_skips_an_unreadable_newest_step_and_leaves_it_in_place(workdir, tmp_path, caplog):
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  steps = sorted(int(s) for s in os.listdir(copy / "checkpoints") if s.isdigit())
  assert len(steps) >= 2 and steps[-1] == STEPS
  shutil.rmtree(copy / "checkpoints" / str(STEPS) / "state")  # A run killed while writing its last step.
  with caplog.at_level("WARNING"):
    basis = ss.load_basis(str(copy))
  assert basis.step == steps[-2]
  assert any(f"step {STEPS}" in r.getMessage() and "corrupt or incomplete" in r.getMessage() for r in caplog.records)
  assert (copy / "checkpoints" / str(STEPS)).is_dir()  # A reader moves nothing (a live run may own the directory).
  for step in steps[:-1]:
    shutil.rmtree(copy / "checkpoints" / str(step) / "state")
  with pytest.raises(ValueError, match=rf"no readable checkpoint step in .*checkpoints: step {STEPS}: "):
    ss.load_basis(str(copy))


def test_load_basis_of_a_live_run_lists_its_steps_again_when_they_are_retired(workdir, tmp_path, monkeypatch, caplog):
  """A live training with checkpoint.max_to_keep=1 retires its only step as it writes the next: the listed step was
  gone when read, and load_basis failed with "no readable checkpoint step" (30% of the loads in an outside test)."""
  from spectral_soup.offline import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  copy = tmp_path / "live"
  shutil.copytree(workdir, copy)
  for step in sorted(int(s) for s in os.listdir(copy / "checkpoints") if s.isdigit())[:-1]:
    shutil.rmtree(copy / "checkpoints" / str(step))  # max_to_keep=1: the newest step only.
  read = checkpoint_lib.Checkpointer.read_data

  def read_while_the_run_saves(self, step):
    if step == STEPS:  # The run saves step STEPS + 1 and retires STEPS just before the read.
      os.rename(copy / "checkpoints" / str(STEPS), copy / "checkpoints" / str(STEPS + 1))
    return read(self, step)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "read_data", read_while_the_run_saves)
  with caplog.at_level("WARNING"):
    basis = ss.load_basis(str(copy))
  assert basis.step == STEPS + 1
  assert not any("corrupt or incomplete" in r.getMessage() for r in caplog.records)  # Retired is not corrupt.


def test_a_main_job_workdir_keeps_the_k_bases(workdir, tmp_path):
  """The main job's `basis/` holds the K attribute bases and then one bespoke head per user: only K are served."""
  job = tmp_path / "job"
  shutil.copytree(workdir, job / "basis")
  config_path = job / "basis" / "config.json"
  config = json.loads(config_path.read_text())
  config["data"]["attributes"] = ["first", "second"]  # K = 2 bases, then one bespoke head.
  config_path.write_text(json.dumps(config))
  basis = ss.load_basis(str(job))
  assert basis.num_bases == 2 and basis.names == ("first", "second")
  assert basis.params["heads"]["b"].shape[0] == 2
  assert len(basis.generate("hi", [[1.0, 0.0], [0.0, 1.0]], max_new_tokens=4)) == 2


def _cli(*args, cwd):
  return subprocess.run([sys.executable, "-m", "spectral_soup.generate", *args], cwd=cwd, env=_env(),
                        capture_output=True, text=True, timeout=600)


def test_generate_cli_serves_users_from_a_workdir(workdir, basis, tmp_path):
  users = tmp_path / "users.json"
  users.write_text("\ufeff" + json.dumps({"reference": [0, 0, 0], "marker": [0, 3, 0]}), encoding="utf-8")
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\ufeffhello there\n\nwhat is up?\n", encoding="utf-8")  # A byte-order mark (Notepad's).
  out = tmp_path / "responses.jsonl"
  result = _cli(f"--workdir={workdir}", f"--users={users}", f"--prompts={prompts}", "--max_new_tokens=12",
                f"--output={out}", cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["user"], r["prompt"]) for r in rows] == [(u, p) for u in ("reference", "marker") for p in PROMPTS]
  want, ended = basis.generate(PROMPTS * 2, [[0, 0, 0]] * 2 + [[0, 3, 0]] * 2, max_new_tokens=12, return_ended=True)
  assert [r["response"] for r in rows] == want and [r["ended"] for r in rows] == ended
  # One soup, one prompt, printed.
  result = _cli(f"--workdir={workdir}", "--lam=0,3,0", "--prompt=hello there", "--max_new_tokens=12", cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip())["response"] == want[2]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lam=1,0"], r"--lam has 2 weights: the basis in .* has 3 \(marker 1, marker 2, marker 3\)"),
        (["--lam=1,x,0"], "--lam='1,x,0': expected comma-separated numbers"),
        (["--lam=1,0,0", "--users=u.json"], "pass exactly one of --lam"),
        (["--users=missing.json"], "--users=missing.json: cannot read it"),
        (["--users=bad.json"], r"user 'b' of --users has 2 weights"),
        (["--lam=1,0,0", "--temperature=nan"], r"--temperature=nan: expected a finite number >= 0"),
        (["--lam=nan,0,0"], r"--lam='nan,0,0': expected finite numbers"),
        (["--users=nan.json"], r"--users=nan.json: user 'a' has \[nan, 0, 0\]: expected finite numbers"),
        (["--users=twice.json"], r"--users=twice.json names user 'a' twice"),
        (["--lam=1,0,0", "--output=missing/out.jsonl"], r"--output=missing/out.jsonl: its directory .*missing does not "
         "exist"),
        (["--lam=1,0,0", "--seed=99999999999999999999"], r"--seed=99999999999999999999: expected an integer in"),
        # The run's own files and this command's inputs are never written over (config.json lost the workdir).
        (["--lam=1,0,0", "--output={workdir}/config.json"], r"--output=.*/config.json is one of the inputs"),
        (["--users=good.json", "--output=good.json"], r"--output=good.json is one of the inputs"),
        (["--lam=1,0,0", "--output={workdir}/checkpoints/x.jsonl"
         ], r"--output=.*x.jsonl is inside the run's checkpoints"),
        # The run's metrics were replaced by the responses; the tokenizer too, after which the workdir could not be
        # served.
        (["--lam=1,0,0", "--output={workdir}/metrics.jsonl"], r"--output=.*metrics.jsonl is one of the run's own files"
        ),
        # Its lock (a second run could then start beside a live one) and its cached features (recomputed).
        (["--lam=1,0,0", "--output={workdir}/.lock"], r"--output=.*\.lock is one of the run's own files"),
        (["--lam=1,0,0", "--output={workdir}/features-0123abcd.npz"], r"features-0123abcd.npz in .*its lock, its "
         "cached features"),
        (["--users=huge.json"], r"--users=huge.json: user 'a' has \[1000000000.*\.\.\.: expected finite numbers"),
        (["--lam=1,0,0", "--output={tokenizer}/tokenizer.json"
         ], r"--output=.*tokenizer.json is inside config.data.tokenizer=.*, which serving the basis reads"),
        # Refused before the basis loads now (they were refused after it, 5-6 s later).
        (["--lam=1e7,0,0"], r"--lam\[0\] = 1e\+07: mixing weights must lie within \+-1e\+06"),
        (["--lam=1,0,0", "--temperature=1e-40"], r"--temperature=1e-40, --top_p=1.0: SamplingConfig.temperature"),
        (["--lam=1,0,0", "--max_new_tokens=1000000"], r"--max_new_tokens=1000000: the model holds \d+ positions"),
    ])
def test_generate_cli_refuses_bad_flags_before_loading(workdir, tmp_path, args, message):
  (tmp_path / "bad.json").write_text(json.dumps({"a": [1, 0, 0], "b": [1, 0]}))
  (tmp_path / "nan.json").write_text('{"a": [NaN, 0, 0]}')
  (tmp_path / "twice.json").write_text('{"a": [1, 0, 0], "a": [0, 1, 0]}')
  (tmp_path / "good.json").write_text('{"a": [1, 0, 0]}')
  (tmp_path / "huge.json").write_text('{"a": [1' + "0" * 400 + ', 0, 0]}')  # OverflowError, a traceback.
  before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
  config = open(os.path.join(workdir, "config.json"), "rb").read()
  tokenizer = json.loads(config)["data"]["tokenizer"]
  kept = {
      path: open(path, "rb").read()
      for path in (os.path.join(workdir, "metrics.jsonl"), os.path.join(tokenizer, "tokenizer.json"))
  }
  result = _cli(f"--workdir={workdir}", "--prompt=hi", *[a.format(workdir=workdir, tokenizer=tokenizer) for a in args],
                cwd=tmp_path)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.startswith("error: ") and re.search(message, result.stderr), result.stderr
  assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
  assert open(os.path.join(workdir, "config.json"), "rb").read() == config
  assert {path: open(path, "rb").read() for path in kept} == kept


def test_generate_cli_checks_max_new_tokens_against_a_checkpoints_positions(workdir, tmp_path):
  """A checkpoint backbone's positions come from its config.json (or GGUF metadata) before its weights load: an
  over-long --max_new_tokens was refused only after the load (minutes for a large checkpoint). Here the checkpoint
  has no weights at all, so only the early check can produce this message."""
  checkpoint = tmp_path / "backbone"
  hf_fixtures.tiny_hf_config("llama", max_position_embeddings=16).save_pretrained(checkpoint)
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  config = json.loads((run / "config.json").read_text())
  config["model"]["path"] = str(checkpoint)
  (run / "config.json").write_text(json.dumps(config))
  result = _cli(f"--workdir={run}", "--prompt=hi", "--lam=1,0,0", "--max_new_tokens=16", cwd=tmp_path)
  assert result.returncode == 2, result.stderr[-2000:]
  assert re.fullmatch(
      r"error: --max_new_tokens=16: the model holds 16 positions \(the checkpoint .*backbone\), "
      r"prompt included: expected fewer.\n", result.stderr), result.stderr[-2000:]


def test_generate_cli_names_a_workdir_without_usable_bases(workdir, tmp_path):
  """A training run killed before its first checkpoint, and a config.json edited after training: one error line
  and exit status 2, as for every other bad file (a traceback before)."""
  empty = tmp_path / "killed"
  empty.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
  (empty / "checkpoints").mkdir()
  edited = tmp_path / "edited"
  shutil.copytree(workdir, edited)
  config = json.loads((edited / "config.json").read_text())
  config["basis"]["head_rank"] += 1
  (edited / "config.json").write_text(json.dumps(config))
  for run, message in ((empty, r"no checkpoint step in .*killed/checkpoints \(did the training run finish a step"),
                       (edited, r"config.json says basis.head_rank=.*, but checkpoint step \d+ was written with")):
    result = _cli(f"--workdir={run}", "--prompt=hi", "--lam=1,0,0", "--max_new_tokens=2", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and re.search(message, result.stderr), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]  # No INFO lines of the libraries.


def test_the_readmes_api_blocks_run(workdir):
  """The README's API blocks, in order in one namespace, on the tiny basis instead of the demo's workdir."""
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  blocks = [
      re.search(r"```python\n(.*?)```",
                text.split(title, 1)[1], re.S).group(1) for title in ("### Serve a trained basis", "### Lower level")
  ]
  assert '"workdir/demo"' in blocks[0]
  namespace = {}
  for i, block in enumerate(blocks):
    code = compile(block.replace('"workdir/demo"', repr(workdir)), f"README.md block {i}", "exec")
    exec(code, namespace)  # pylint: disable=exec-used
  assert len(namespace["texts"]) == 2 and namespace["lam"].shape == (3,)
  assert np.isclose(namespace["lam"].sum(), 1.0) or namespace["lam"].sum() == 0.0
  assert namespace["features"].shape == (2, 3) and np.isfinite(namespace["features"]).all()
  assert namespace["logits"].shape[:2] == (2, 4)
