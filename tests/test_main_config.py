"""The main job's config: the demo validates; bad values fail before anything loads, naming the field."""

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
        ("online.constraint", "simplex"),
        ("basis.init", "normal"),
        ("online.pad_weights_l2", -1.0),
        ("online.estimate", "mean"),
        ("eval.pareto_bases", ("(1,x)",)),  # A tuple override that is not a Python literal arrives as a string.
        ("eval.pareto_bases", (1, 2, 3)),
        ("eval.pareto_points", 1),
        ("eval.num_bootstrap", 0),
        ("data.top_p", 2.0),
        ("data.temperature", -1.0),
        ("data.max_new_tokens", 0),
        ("data.generation_batch_size", 0),
        ("data.tie_margin", -1.0),
        ("data.seed", -1),
    ])
def test_bad_field_is_named(field, value):
  config = demo.get_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    main.validate_config(config)


@pytest.mark.parametrize("scales", [(0.5, 2.0), (0.0, 1.0), (-1.0, 1.0), (1.0, float("nan")), ("(0.5,nan)",)])
def test_a_frontier_without_the_fitted_method_is_refused(scales):
  config = demo.get_config()
  config.eval.frontier.pad = scales
  with pytest.raises(ValueError, match=r"eval\.frontier\.pad"):
    main.validate_config(config)


def test_a_negative_seed_is_refused():
  config = demo.get_config()
  config.seed = -1
  with pytest.raises(ValueError, match=r"config\.seed=-1 is invalid: expected >= 0"):
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
