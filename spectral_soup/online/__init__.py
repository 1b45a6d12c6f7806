"""Online phase: learning each user's mixing vector lambda from feedback (docs/METHOD.md section 5).

`update` holds the pure (jitted, vmappable) update rules, `users` the simulated users, and `exact_mdp` a small
token-level MDP solved exactly, which checks the souping claims of docs/METHOD.md section 4 and the online loop.
"""

from spectral_soup.online import exact_mdp
from spectral_soup.online.update import CONSTRAINTS
from spectral_soup.online.update import DEFAULT_NUM_ITERS
from spectral_soup.online.update import PAIR_RULES
from spectral_soup.online.update import UserState
from spectral_soup.online.update import choose_pair
from spectral_soup.online.update import choose_pair_batched
from spectral_soup.online.update import fit_lambda
from spectral_soup.online.update import fit_lambda_batched
from spectral_soup.online.update import fit_lambda_ratings
from spectral_soup.online.update import init_user_state
from spectral_soup.online.update import log_loss
from spectral_soup.online.update import posterior
from spectral_soup.online.update import posterior_batched
from spectral_soup.online.update import project_box
from spectral_soup.online.update import project_simplex
from spectral_soup.online.update import sgd_update
from spectral_soup.online.update import state_posterior
from spectral_soup.online.update import thompson_sample
from spectral_soup.online.update import update_users
from spectral_soup.online.users import USER_KINDS
from spectral_soup.online.users import SimulatedUsers
from spectral_soup.online.users import choice_prob
from spectral_soup.online.users import linear_users
from spectral_soup.online.users import make_users
from spectral_soup.online.users import simulate_choice
from spectral_soup.online.users import standardize_scores
from spectral_soup.online.users import true_reward
