"""Online phase: learning each user's mixing vector lambda from feedback (docs/METHOD.md section 5).

By job: `fit` fits lambda from pairwise preferences (the damped Newton solver in `newton`, the feasible sets in
`projections`), `ratings` from ratings, `laplace` gives the Laplace posterior, Thompson samples and the pair to show
next, and `state` keeps the users' comparisons and refits them all in one compiled call. `direction` gives the Bayes
estimate of a nonnegative lambda's direction (the posterior mean of lambda / sum(lambda)), `selection` chooses the
fits' penalty by cross-validated prediction of the choices. `users` holds the simulated users, `protocol` the online
rounds over generated responses, and `exact_mdp` a small token-level MDP solved exactly, which checks the souping
claims of docs/METHOD.md section 4 and the online loop.
"""

from spectral_soup.online import exact_mdp
from spectral_soup.online.checks import CONSTRAINTS
from spectral_soup.online.fit import DEFAULT_NUM_ITERS
from spectral_soup.online.fit import fit_lambda
from spectral_soup.online.fit import fit_lambda_batched
from spectral_soup.online.fit import log_loss
from spectral_soup.online.fit import sgd_update
from spectral_soup.online.fit import unit_total_weight
from spectral_soup.online.laplace import PAIR_RULES
from spectral_soup.online.laplace import choose_pair
from spectral_soup.online.laplace import choose_pair_batched
from spectral_soup.online.laplace import posterior
from spectral_soup.online.laplace import posterior_batched
from spectral_soup.online.laplace import thompson_sample
from spectral_soup.online.projections import project_box
from spectral_soup.online.projections import project_simplex
from spectral_soup.online.ratings import fit_lambda_ratings
from spectral_soup.online.state import UserState
from spectral_soup.online.state import init_user_state
from spectral_soup.online.state import state_posterior
from spectral_soup.online.state import update_users
from spectral_soup.online.users import USER_KINDS
from spectral_soup.online.users import SimulatedUsers
from spectral_soup.online.users import choice_prob
from spectral_soup.online.users import linear_users
from spectral_soup.online.users import make_users
from spectral_soup.online.users import simulate_choice
from spectral_soup.online.users import standardize_scores
from spectral_soup.online.users import true_reward

__all__ = [
    "exact_mdp", "CONSTRAINTS", "DEFAULT_NUM_ITERS", "fit_lambda", "fit_lambda_batched", "log_loss", "sgd_update",
    "unit_total_weight", "PAIR_RULES", "choose_pair", "choose_pair_batched", "posterior", "posterior_batched",
    "thompson_sample", "project_box", "project_simplex", "fit_lambda_ratings", "UserState", "init_user_state",
    "state_posterior", "update_users", "USER_KINDS", "SimulatedUsers", "choice_prob", "linear_users", "make_users",
    "simulate_choice", "standardize_scores", "true_reward"
]
