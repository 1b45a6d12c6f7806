"""The main job's config: the demo validates; bad values fail before anything loads, naming the field."""

import json
import pathlib

import pytest

from configs import demo
from experiments import main


def test_demo_config_validates():
  main.validate_config(demo.get_config())


@pytest.mark.parametrize(
    "field, value",
    [
        ("users.kind", "linear"),
        ("users.num_users", 0),
        ("online.rounds", 0),
        ("online.l2", 0.0),
        ("online.mode", "naive"),
        ("eval.num_prompts", 1),
        ("eval.pareto_bases", (1, 1)),
        ("basis.num_bases", 3),
        ("basis.kind", "lora"),
        ("optim.learning_rate", -1.0),
        ("basis.vocab_support", -5),
        ("eval.split", "test"),
        ("eval.soups", ("naive",)),
        ("eval.soups", ("params", "params")),  # Decoded twice under one name.
        ("online.constraint", "simplex"),
        ("basis.init", "normal"),
        ("online.pad_weights_l2", -1.0),
        ("online.estimate", "mean"),
        ("eval.pareto_bases", ("(1,x)",)),  # A tuple override that is not a Python literal arrives as a string.
        ("eval.pareto_bases", (1, 2, 3)),
        ("eval.pareto_points", 1),
        ("eval.num_bootstrap", 0),
        ("eval.num_bootstrap", 19),  # Fewer draws than a 90% interval needs: its ends were min and max.
        ("eval.num_bootstrap", 10**9),  # It ran out of memory after the whole decode.
        ("online.l2", 1e39),  # Beyond float32: the fits returned NaN.
        ("data.top_p", 2.0),
        ("data.temperature", -1.0),
        ("data.max_new_tokens", 0),
        ("data.generation_batch_size", 0),
        ("data.tie_margin", -1.0),
        ("data.seed", -1),
        # Integers beyond 32 bits failed deep inside jax or numpy (a traceback, a config.json left behind).
        ("users.num_users", 10**30),
        ("data.max_new_tokens", 10**30),
        ("train.feature_batch_size", 10**30),
        ("data.seed", 10**30),
        ("data.attributes", ("verbosity", "verbosity", "sentiment", "density", "formality")),
        ("data.tokenizer", "/nonexistent/tokenizer"),  # Ignored: the job reads model.path's.
        ("online.prior_mean", -5.0),  # Only -1 means 1 / K.
        ("eval.pad_l2", 1e-300),
        ("model.path", "embedded:no_such_model"),
        ("model.path", "/nonexistent/checkpoint"),
        ("eval.samples_per_prompt", 10**8),  # Its responses could not be held: out of memory after the online phase.
    ])
def test_bad_field_is_named(field, value):
  config = demo.get_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    main.validate_config(config)


@pytest.mark.parametrize("scales", [(0.5, 2.0), (0.0, 1.0), (-1.0, 1.0), (1.0, float("nan")), ("(0.5,nan)",),
                                    (1.0, 1e7)])
def test_a_frontier_without_the_fitted_method_is_refused(scales):
  config = demo.get_config()
  config.eval.frontier.pad = scales
  with pytest.raises(ValueError, match=r"eval\.frontier\.pad"):
    main.validate_config(config)


def test_a_bootstrap_beyond_the_machines_memory_is_refused(monkeypatch):
  """16 users x 512 prompts x 100,000 draws: 6.1 GiB of float64 per method, allocated after the whole decode."""
  monkeypatch.setattr(main.memory, "host_memory_bytes", lambda: 8 * 2**30)
  config = demo.get_config()
  config.eval.num_prompts, config.eval.num_bootstrap = 512, 100_000
  with pytest.raises(
      ValueError, match=r"eval\.num_bootstrap=100000 is invalid: expected a number of draws whose "
      r"bootstrap fits half of this machine's 8\.0 GiB: .* = 6\.48 GiB"):
    main.validate_config(config)
  config.eval.num_bootstrap = 2000
  main.validate_config(config)


def test_a_negative_seed_is_refused():
  config = demo.get_config()
  config.seed = -1
  with pytest.raises(ValueError, match=r"config\.seed=-1 is invalid: expected an integer in \[0, 2\*\*63 - 1\]"):
    main.validate_config(config)


def test_unit_total_weight_needs_nonnegative_lambda():
  config = demo.get_config()
  config.online.unit_total_weight = True
  main.validate_config(config)  # The demo fits nonnegative lambda.
  config.online.constraint = "none"
  with pytest.raises(ValueError, match=r"online\.unit_total_weight"):
    main.validate_config(config)


def test_the_posterior_mean_direction_needs_unit_total_weight():
  config = demo.get_config()
  config.online.estimate = "posterior_mean"
  main.validate_config(config)
  config.online.unit_total_weight = False
  with pytest.raises(ValueError, match=r"online\.estimate"):
    main.validate_config(config)


def test_a_seed_beyond_64_bits_is_refused():
  config = demo.get_config()
  config.seed = 2**63 - 1
  main.validate_config(config)
  config.seed = 2**63
  with pytest.raises(ValueError, match=r"config\.seed=9223372036854775808 is invalid: expected an integer in \[0, "):
    main.validate_config(config)


def test_the_prompt_pools_of_the_demo_fit():
  assert main.check_prompt_pools(demo.get_config(), num_online=247, num_eval=73) == []


def test_more_comparisons_per_round_than_training_prompts_are_refused_after_the_data_loads():
  config = demo.get_config()
  config.online.prompts_per_round = 1000
  with pytest.raises(
      ValueError, match=r"config\.online\.prompts_per_round=1000 is invalid: expected an integer in 1\.\.247 \(the "
      r"prompt pool\): the hash split of the 320 prompts holds out 73 and leaves 247"):
    main.check_prompt_pools(config, num_online=247, num_eval=73)


@pytest.mark.parametrize("num_eval", [0, 1])
def test_an_eval_fraction_that_holds_out_too_few_prompts_is_refused(num_eval):
  config = demo.get_config()
  config.data.eval_fraction = 0.003
  with pytest.raises(
      ValueError, match=r"config\.data\.eval_fraction=0\.003 is invalid: expected a share that holds "
      rf"out at least 2 held-out prompts to evaluate on: .* holds out {num_eval} "):
    main.check_prompt_pools(config, num_online=320 - num_eval, num_eval=num_eval)


def test_an_eval_fraction_that_leaves_too_few_training_prompts_is_refused():
  config = demo.get_config()
  config.data.eval_fraction = 0.99
  with pytest.raises(
      ValueError, match=r"config\.data\.eval_fraction=0\.99 is invalid: expected a share that leaves at "
      r"least train\.batch_size=32 training prompts .* holds out 315 and leaves 5 "):
    main.check_prompt_pools(config, num_online=5, num_eval=315)


def test_fewer_prompts_than_eval_num_prompts_is_a_warning_not_a_silent_clip():
  config = demo.get_config()
  config.eval.num_prompts = 1_000_000
  warnings = main.check_prompt_pools(config, num_online=247, num_eval=73)
  assert len(warnings) == 1 and "config.eval.num_prompts=1000000" in warnings[0] and "uses all 73" in warnings[0]
  config = demo.get_config()
  config.eval.split = "dev"  # 60 dev prompts against the demo's 64.
  warnings = main.check_prompt_pools(config, num_online=187, num_eval=60)
  assert len(warnings) == 1 and "dev prompts" in warnings[0] and "of the 247 training prompts" in warnings[0]


def test_a_response_longer_than_the_model_takes_is_refused():
  config = demo.get_config()
  main.check_decode_length(config, prompt_len=64, max_len=8192)
  config.eval.max_new_tokens = 100_000
  with pytest.raises(
      ValueError, match=r"config\.eval\.max_new_tokens=100000 is invalid: expected <= 8128: the "
      r"model's max_len=8192"):
    main.check_decode_length(config, prompt_len=64, max_len=8192)
  config.eval.max_new_tokens, config.data.prompt_len = 2, 100_000  # The prompt alone is too long: named.
  with pytest.raises(
      ValueError, match=r"config\.data\.prompt_len=100000 is invalid: expected < the model's "
      r"max_len=8192 positions"):
    main.check_decode_length(config, prompt_len=100_000, max_len=8192)


def test_a_decode_that_cannot_fit_in_memory_is_refused_before_it_compiles():
  from spectral_soup.models import config as model_config  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import cost  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import memory  # pylint: disable=g-import-not-at-top
  smollm = model_config.llama(vocab_size=49_152, embed_dim=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                              mlp_dim=1_536)
  config = demo.get_config()
  # The demo's decode: 128 rows x (64 + 32) positions x 45 KiB of cache, 0.5 GiB of weights, 24 MiB of logits.
  assert cost.decode_memory_bytes(smollm, 128, 96) == pytest.approx(1.05 * 2**30, rel=0.01)
  main.check_decode_memory(config, smollm, prompt_len=64, limit_bytes=2 * 2**30)
  main.check_decode_memory(config, smollm, prompt_len=64, limit_bytes=None)  # Unknown: not checked.
  config.eval.max_new_tokens = 8_000
  with pytest.raises(
      ValueError, match=r"config\.eval\.max_new_tokens=8000 with config\.eval\.chunk_rows=128 needs at least 44\.8 "
      r"GiB to decode \(128 rows x 8064 cache positions x 45 KiB, .*more than the device's 23\.5 GiB: lower "
      r"eval\.chunk_rows"):
    main.check_decode_memory(config, smollm, prompt_len=64, limit_bytes=int(23.5 * 2**30))
  config.eval.max_new_tokens, config.eval.chunk_rows = 32, 100_000
  with pytest.raises(ValueError, match=r"chunk_rows=100000 needs at least 430\.8 GiB"):
    main.check_decode_memory(config, smollm, prompt_len=64, limit_bytes=int(23.5 * 2**30))
  assert memory.memory_limit_bytes() > 2**20  # CPU: the physical memory.


def test_implicit_acceptance_rate_is_null_when_the_implicit_soup_was_not_evaluated():
  """It was 0.0 (an empty sum over max(0, 1)), which reads as "every proposal rejected"."""
  assert main.implicit_acceptance_rate(["explicit", "guided"], [0.0, 0.0], [0.0, 0.0]) is None
  assert main.implicit_acceptance_rate(["explicit", "implicit", "implicit"], [9.0, 3.0, 5.0],
                                       [0.0, 4.0, 12.0]) == pytest.approx(0.5)


def test_results_json_is_strict_json_with_null_for_non_finite_numbers():
  finite = {"a": [0.1, 1e-300, -2.5, 3], "b": {"c": True, "d": None, "e": "x"}, "f": (1.5, 2)}
  assert main.json_text(finite) == json.dumps(finite, indent=2)  # Finite values: exactly as before.
  text = main.json_text({"k_ablation": {"heldout_choice_accuracy": [float("nan"), 0.5]}, "x": [float("inf")]})

  def refuse(token):
    raise ValueError(token)

  parsed = json.loads(text, parse_constant=refuse)
  assert parsed == {"k_ablation": {"heldout_choice_accuracy": [None, 0.5]}, "x": [None]}


def test_results_json_records_the_config_and_the_code():
  source = pathlib.Path(main.__file__).read_text()
  literal = source[source.index("  results = {"):source.index("  results[\"timing_s\"][\"total_s\"]")]
  assert '"config": json.loads(config.to_json_best_effort())' in literal and '"code": code' in literal
  code = main.code_version()
  assert set(code) == {"version", "git_commit", "git_modified"}
