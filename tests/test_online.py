"""Online phase (spectral_soup.online): lambda fits vs independent solvers, robustness, posterior and pair choice,
simulated users, and the exact-MDP checks of docs/METHOD.md section 4 (a), (b) and the online loop (c).

Kept cheap for 2 CPU cores: most fits share one compiled shape (_U, _N, _K) and the MDP runs in float64 numpy.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from scipy import special

from spectral_soup import online
from spectral_soup import soup
from spectral_soup.online import exact_mdp as em
from spectral_soup.online import newton

_U, _N, _K = 16, 24, 6  # The shared batch shape of the robustness tests (one compilation).

# ----------------------------------------------------------------------------------------------------------------------
# Independent references (float64).
# ----------------------------------------------------------------------------------------------------------------------


def _objective64(x, p, l2, mu=None):
  x = np.asarray(x, np.float64)
  p = np.asarray(p, np.float64)
  mu = np.zeros(x.shape[1]) if mu is None else np.asarray(mu, np.float64)

  def f(w):
    z = x @ w
    value = np.sum(np.logaddexp(0.0, z) - p * z) + 0.5 * l2 * np.sum((w - mu)**2)
    grad = x.T @ (0.5 * (1.0 + np.tanh(0.5 * z)) - p) + l2 * (w - mu)
    return value, grad

  return f


def _scipy_fit(x, p, l2, mu=None, *, constraint=None, box=None):
  f = _objective64(x, p, l2, mu)
  num = np.shape(x)[1]
  if constraint == "simplex":
    res = optimize.minimize(f, np.full(num, 1.0 / num), jac=True, method="SLSQP", bounds=[(0.0, None)] * num,
                            constraints=[dict(type="eq", fun=lambda w: w.sum() - 1.0,
                                              jac=lambda w: np.ones(num))], options=dict(ftol=1e-14, maxiter=1000))
  else:
    res = optimize.minimize(f, np.zeros(num), jac=True, method="L-BFGS-B", bounds=None if box is None else [box] * num,
                            options=dict(ftol=1e-15, gtol=1e-10, maxiter=10000, maxfun=100000))
  return res.x


def _grad64(x, p, l2, w, mask=None):
  x = np.asarray(x, np.float64)
  m = np.ones(x.shape[-2]) if mask is None else np.asarray(mask, np.float64)
  x = np.where(m[..., None] > 0, x, 0.0)
  z = np.einsum("...nk,...k->...n", x, w)
  return np.einsum("...nk,...n->...k", x, m * (1 / (1 + np.exp(-z)) - p)) + np.asarray(l2)[..., None] * w


def _problem(seed, num_users=_U, num_rows=_N, num=_K, *, soft=False):
  """Random pairwise data with per-user feature scales: (x [U, N, K] f32, p [U, N] f32, true w)."""
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=(num_users, 1, 1)))
  x = (rng.standard_normal((num_users, num_rows, num)) * scale).astype(np.float32)
  w = rng.standard_normal((num_users, num)) / scale[:, 0]
  prob = 1.0 / (1.0 + np.exp(-np.einsum("unk,uk->un", x, w)))
  p = prob if soft else (rng.uniform(size=prob.shape) < prob)
  return x, p.astype(np.float32), w


# ----------------------------------------------------------------------------------------------------------------------
# fit_lambda accuracy.
# ----------------------------------------------------------------------------------------------------------------------


def test_fit_lambda_1000_users_one_vmapped_call_matches_scipy_and_sklearn():
  num_users = 1000
  x, p_hard, _ = _problem(0, num_users)
  _, p_soft, _ = _problem(0, num_users, soft=True)
  p = np.where(np.arange(num_users)[:, None] < num_users // 2, p_hard, p_soft)  # Half soft labels (ties etc.).
  l2 = np.exp(np.random.default_rng(1).uniform(np.log(1e-2), np.log(10.0), size=num_users)).astype(np.float32)
  # The API contract: jax.vmap(fit_lambda) over users (keyword l2 is mapped by vmap: one l2 per user).
  lam = np.asarray(jax.jit(jax.vmap(online.fit_lambda))(x, p, l2=l2))
  assert lam.shape == (num_users, _K) and lam.dtype == np.float32
  # Every user: the float64 gradient of the objective vanishes (relative to the gradient at 0).
  grad = _grad64(x, p, l2, lam.astype(np.float64))
  grad0 = _grad64(x, p, l2, np.zeros_like(lam, np.float64))
  assert np.max(np.linalg.norm(grad, axis=1) / np.linalg.norm(grad0, axis=1)) < 1e-4
  # scipy L-BFGS in float64 on a spread of users (hard and soft labels).
  for u in range(0, num_users, 32):
    np.testing.assert_allclose(lam[u], _scipy_fit(x[u], p[u], l2[u]), rtol=1e-3, atol=1e-3, err_msg=f"user {u}")
  # scikit-learn: C * sum log-loss + 1/2 |w|^2 with C = 1 / l2 has the same optimum (hard labels only).
  linear_model = pytest.importorskip("sklearn.linear_model")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for u in range(1, num_users // 2, 24):
      if p[u].min() == p[u].max():
        continue  # sklearn needs both classes.
      clf = linear_model.LogisticRegression(C=1.0 / float(l2[u]), fit_intercept=False, tol=1e-10, max_iter=10000)
      clf.fit(x[u].astype(np.float64), p[u].astype(int))
      np.testing.assert_allclose(lam[u], clf.coef_[0], rtol=1e-3, atol=1e-3, err_msg=f"user {u}")


def _newton64(x, p, l2, iters=30):
  """Undamped Newton in float64 from 0 (converges on these well-conditioned problems): [U, K]."""
  x, p = np.asarray(x, np.float64), np.asarray(p, np.float64)
  lam = np.zeros((x.shape[0], x.shape[2]))
  for _ in range(iters):
    s = 1.0 / (1.0 + np.exp(-np.einsum("unk,uk->un", x, lam)))
    g = np.einsum("unk,un->uk", x, s - p) + l2 * lam
    h = np.einsum("unk,unj->ukj", x * (s * (1.0 - s))[..., None], x) + l2 * np.eye(x.shape[2])
    lam = lam - np.linalg.solve(h, g[..., None])[..., 0]
  return lam


def test_default_fit_ends_at_float32_precision():
  """The default call (early stopping) ends within float32 rounding of the float64 optimum, in a few steps.

  K = 30 features, N = 64 comparisons, margins of a few units (the online benchmark's problem): near the optimum
  the line search's slope at the full step is rounding; a line search that took its sign at face value halved the
  step there and ended ~1e-5 away (and took more steps to stop).
  """
  rng = np.random.default_rng(3)
  num_users, num_rows, num = 128, 64, 30
  truth = rng.standard_normal((num_users, num)) / np.sqrt(num) * 3.0
  x = rng.standard_normal((num_users, num_rows, num)).astype(np.float32)
  p = (rng.uniform(size=(num_users, num_rows)) < 1.0 / (1.0 + np.exp(-np.einsum("unk,uk->un", x, truth))))
  p = p.astype(np.float32)
  lam = np.asarray(online.fit_lambda_batched(x, p, l2=1.0))
  ref = _newton64(x, p, 1.0)
  error = np.max(np.abs(lam - ref), axis=1) / np.maximum(1.0, np.max(np.abs(ref), axis=1))
  assert error.max() < 1e-6, f"users {np.flatnonzero(error >= 1e-6)[:8]}: relative error up to {error.max():.2e}"


def test_masks_warm_start_prior_and_single_user_form():
  x, p, _ = _problem(1)
  rng = np.random.default_rng(2)
  num_real = rng.integers(3, _N, size=_U)
  mask = np.arange(_N)[None, :] < num_real[:, None]
  x_pad = np.where(mask[..., None], x, np.nan).astype(np.float32)  # NaN padding must not leak.
  p_pad = np.where(mask, p, 7.0).astype(np.float32)
  fit = functools.partial(online.fit_lambda_batched, l2=0.5)
  lam = np.asarray(fit(x_pad, p_pad, mask=mask))
  assert np.all(np.isfinite(lam))
  for u in range(0, _U, 3):
    n = num_real[u]
    np.testing.assert_allclose(lam[u], _scipy_fit(x[u, :n], p[u, :n], 0.5), rtol=1e-3, atol=1e-3)
  # The one-user form gives the same answer; fit_lambda on [U, N, K] is the batched form itself.
  np.testing.assert_allclose(online.fit_lambda(x_pad[0], p_pad[0], l2=0.5, mask=mask[0]), lam[0], atol=1e-5)
  np.testing.assert_array_equal(online.fit_lambda(x_pad, p_pad, l2=0.5, mask=mask), lam)
  with pytest.raises(ValueError, match=r"delta_features must have shape \[U, N, K\]"):
    fit(x_pad[0], p_pad[0], mask=mask[0])
  with pytest.raises(ValueError, match=r"\[N, K\] \(one user\) or \[U, N, K\]"):
    online.fit_lambda(x_pad[0, 0], p_pad[0, 0], l2=0.5)
  with pytest.raises(TypeError, match="l3"):
    fit(x_pad, p_pad, l3=1.0)
  # Features given as [K, N]: the error names the transposition (it blamed prefs' shape).
  with pytest.raises(
      ValueError, match=r"prefs has 20 entries per user but delta_features \(5, 20\) has 5 rows: "
      r"is delta_features transposed\? Expected \[N, K\]"):
    online.fit_lambda(np.ones((5, 20), np.float32), np.ones(20, np.float32), l2=1.0)
  # Warm starts (anywhere, even far away) reach the same optimum.
  for init in (lam + 0.3 * rng.standard_normal(lam.shape), 20.0 * rng.standard_normal(lam.shape)):
    np.testing.assert_allclose(fit(x_pad, p_pad, mask=mask, init=init.astype(np.float32)), lam, atol=2e-5)
  # A prior mean: the l2 penalty is centered there.
  mu = np.full(_K, 1.0 / _K, np.float32)
  lam_mu = np.asarray(fit(x_pad, p_pad, mask=mask, prior_mean=mu))
  np.testing.assert_allclose(lam_mu[2], _scipy_fit(x[2, :num_real[2]], p[2, :num_real[2]], 0.5, mu), rtol=1e-3,
                             atol=1e-3)


def test_degenerate_feedback_is_finite_and_posterior_positive_definite():
  x, p, _ = _problem(3)
  mask = np.ones((_U, _N), bool)
  mask[0] = False  # No comparisons at all.
  p[1] = 0.5  # All ties.
  p[2] = 1.0  # All one side.
  p[3] = (x[3] @ np.arange(1, _K + 1) > 0).astype(np.float32)  # Perfectly separable.
  x[4] *= 1e6  # Huge feature scale.
  x[5] *= 1e-6  # Tiny feature scale.
  x[6, :, 0] = 0.0  # A feature that never varies.
  mu = np.zeros((_U, _K), np.float32)
  mu[0] = 0.25
  lam = np.asarray(online.fit_lambda_batched(x, p, l2=1.0, mask=mask, prior_mean=mu))
  assert np.all(np.isfinite(lam))
  np.testing.assert_allclose(lam[0], mu[0], atol=1e-7)  # No data: the prior.
  np.testing.assert_allclose(lam[1], 0.0, atol=1e-6)  # Ties: the symmetric optimum 0.
  assert lam[6, 0] == 0.0  # Unidentified direction: stays at the prior.
  for u in (1, 2, 3, 5):
    np.testing.assert_allclose(lam[u], _scipy_fit(x[u], p[u], 1.0), rtol=1e-3, atol=1e-3, err_msg=f"user {u}")
  # Extreme scale: the predicted margins stay moderate (the optimum balances the data, lam ~ 1e-6).
  assert np.max(np.abs(x[4] @ lam[4])) < 1e3
  mean, cov = online.posterior_batched(lam, x, mask, l2=1.0)
  cov = np.asarray(cov)
  assert np.all(np.isfinite(cov)) and np.allclose(cov, np.swapaxes(cov, 1, 2))
  assert np.min(np.linalg.eigvalsh(cov.astype(np.float64))) > 0
  assert not np.any(np.isnan(np.linalg.cholesky(cov)))  # float32 Cholesky succeeds.
  np.testing.assert_allclose(cov[0], np.eye(_K), rtol=1e-4)  # No data: the prior covariance I / l2.
  np.testing.assert_array_equal(mean, lam)


def test_one_nan_user_does_not_change_the_others():
  x, p, _ = _problem(4)
  fit = functools.partial(online.fit_lambda_batched, l2=1.0)
  clean = np.asarray(fit(x, p))
  x_bad = x.copy()
  x_bad[7, 3, 2] = np.nan
  p_bad = p.copy()
  p_bad[9, 0] = np.nan
  with pytest.warns(RuntimeWarning, match=r"users \[7, 9\] have non-finite"):  # The warning names both users.
    dirty = np.asarray(fit(x_bad, p_bad))
  others = np.setdiff1d(np.arange(_U), [7, 9])
  np.testing.assert_array_equal(dirty[others], clean[others])
  assert np.all(np.isnan(dirty[[7, 9]]))  # The bad users are flagged by NaN, not silently fitted.


def test_a_fit_that_stops_short_of_the_optimum_is_named():
  """A warm start far beyond the data's scale can need more than num_iters Newton steps: those users are named in a
  warning (their lam was returned short of the optimum without a signal); every user not named is at the optimum."""
  rng = np.random.default_rng(11)
  x = (50.0 * rng.normal(size=(_U, _N, _K))).astype(np.float32)
  p = (rng.random((_U, _N)) < 0.5).astype(np.float32)
  init = (1000.0 * rng.normal(size=(_U, _K))).astype(np.float32)
  fit = functools.partial(online.fit_lambda_batched, l2=1.0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # A cold start converges: no warning.
    cold = np.asarray(fit(x, p))
  with pytest.warns(RuntimeWarning, match=r"of 16 users \(\[.*\]\) did not converge within num_iters=25") as record:
    warm = np.asarray(fit(x, p, init=init))
  named = [int(u) for u in str(record[0].message).split("([")[1].split("])")[0].split(", ")]
  off = np.flatnonzero(np.abs(warm - cold).max(axis=1) > 1e-3 * np.maximum(1.0, np.abs(cold).max(axis=1)))
  assert len(off) and set(off) <= set(named)  # Every user left off the optimum is named.
  u = named[0]
  with pytest.warns(RuntimeWarning, match=r"fit_lambda: the fit did not converge within num_iters=25"):
    online.fit_lambda(x[u], p[u], l2=1.0, init=init[u])  # The one-user form too.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    more = np.asarray(fit(x, p, init=init, num_iters=200))  # More steps: converged, silent, at the optimum.
    np.asarray(fit(x, p, init=init, tol=0.0))  # A fixed number of steps asked for: no convergence claim.
    jax.jit(lambda a, b, c: online.fit_lambda(a, b, l2=1.0, init=c))(x, p, init)  # Traced: nothing to name.
  np.testing.assert_allclose(more, cold, rtol=1e-4, atol=1e-4)
  # Ill-conditioned and nearly separable (features ~1e3, l2 = 1): the step stays at float32 rounding above tol, but
  # the objective has nothing left to give (within 1e-6 of the float64 optimum's): converged, not named.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 10)) * 1e3
  p = ((x @ rng.normal(size=10) / 1e3 + 0.3 * rng.normal(size=64)) > 0).astype(np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    lam = np.asarray(online.fit_lambda(x, p, l2=1.0), np.float64)
  opt = _scipy_fit(x, p, 1.0)
  for _ in range(5):  # float64 Newton from scipy's answer: the optimum to float64 precision.
    s = 1.0 / (1.0 + np.exp(-x @ opt))
    opt = opt - np.linalg.solve((x * (s * (1.0 - s))[:, None]).T @ x + np.eye(10), x.T @ (s - p) + opt)
  value = lambda w: _objective64(x, p, 1.0)(w)[0]
  assert 0.0 <= value(lam) - value(opt) <= 1e-6 * value(opt)


def test_constrained_fits_match_scipy():
  x, p, _ = _problem(5)
  simplex = np.asarray(online.fit_lambda_batched(x, p, l2=1.0, constraint="simplex"))
  box = np.asarray(online.fit_lambda_batched(x, p, l2=1.0, constraint="box", box=(-0.1, 0.3)))
  np.testing.assert_allclose(simplex.sum(1), 1.0, atol=1e-5)
  assert simplex.min() >= 0.0 and box.min() >= -0.1 and box.max() <= 0.3
  assert np.mean(box == 0.3) > 0.05 and np.mean(simplex == 0.0) > 0.05  # Constraints are active.
  for u in range(0, _U, 2):
    np.testing.assert_allclose(simplex[u], _scipy_fit(x[u], p[u], 1.0, constraint="simplex"), atol=1e-3)
    np.testing.assert_allclose(box[u], _scipy_fit(x[u], p[u], 1.0, box=(-0.1, 0.3)), atol=1e-3)


def test_constrained_fits_are_exact_on_ill_conditioned_data():
  # Feature columns 30-100x apart in scale (cond(H) ~ 1e3-1e4): the inner solver's fixed budget of first-order steps
  # alone left the box fit 4x short of an interior optimum, and the simplex fit 4e-3 away.
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((64, 2)) * [100.0, 1.0]).astype(np.float32)
  p = (rng.uniform(size=64) < 1 / (1 + np.exp(-x.astype(np.float64) @ [0.005, 6.0]))).astype(np.float32)
  free = np.asarray(online.fit_lambda(x, p, l2=0.1))
  assert free.min() > 0  # The optimum is interior to lam >= 0, so the box fit must find the same point.
  for box in ((0.0, np.inf), (-np.inf, np.inf)):
    np.testing.assert_allclose(online.fit_lambda(x, p, l2=0.1, constraint="box", box=box), free, rtol=1e-5)

  num_users, num_rows, num = 8, 64, 5
  scale = np.geomspace(1.0, 100.0, num)
  x = (rng.standard_normal((num_users, num_rows, num)) * scale).astype(np.float32)
  w = rng.dirichlet(np.ones(num), size=num_users) * 0.5 / scale
  p = (rng.uniform(size=(num_users, num_rows)) < 1 / (1 + np.exp(-np.einsum("unk,uk->un", x, w)))).astype(np.float32)
  nonneg = np.asarray(online.fit_lambda_batched(x, p, l2=1.0, constraint="box", box=(0.0, np.inf)))
  simplex = np.asarray(online.fit_lambda_batched(x, p, l2=1.0, constraint="simplex"))
  for u in range(num_users):
    f = _objective64(x[u], p[u], 1.0)
    ref_box = _scipy_fit(x[u], p[u], 1.0, box=(0.0, None))
    ref_simplex = _scipy_fit(x[u], p[u], 1.0, constraint="simplex")
    np.testing.assert_allclose(nonneg[u], ref_box, atol=1e-5 * max(1.0, np.abs(ref_box).max()))
    # The simplex optimum is flat along some edges at float32's resolution of the objective: compare objectives.
    assert f(simplex[u].astype(np.float64))[0] - f(ref_simplex)[0] <= 1e-6 * abs(f(ref_simplex)[0])


@pytest.mark.parametrize("num, seed", [(5, 121), (30, 371)])
def test_constrained_fits_find_the_active_set_at_extreme_conditioning(num, seed):
  """Feature columns 1e-2 to 1e2 in scale (cond(H) ~ 4e5): FISTA's 50 inner steps did not find which bounds are
  active, and the simplex fit ended 0.1 away from the optimum (K = 5) or with 0.07 on bases whose weight is 0
  (K = 30). The active-set rounds reach the optimum: its KKT conditions hold in float64."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(64, num)) * np.logspace(-2, 2, num)
  w = rng.normal(size=num) * 2
  p = (rng.random(64) < 1 / (1 + np.exp(-np.clip(x @ w, -50, 50)))).astype(np.float64)
  lam = np.asarray(online.fit_lambda(x.astype(np.float32), p.astype(np.float32), l2=0.3, constraint="simplex"),
                   np.float64)
  _, grad = _objective64(x.astype(np.float32), p, 0.3)(lam)
  assert abs(lam.sum() - 1.0) < 1e-5 and lam.min() >= 0.0
  support = lam > 1e-6
  level = grad[support].mean()  # The simplex multiplier: every weighted basis has the same gradient.
  scale = np.abs(grad).max()
  assert np.abs(grad[support] - level).max() <= 1e-3 * scale, (grad, lam)
  assert (grad[~support] >= level - 1e-3 * scale).all(), (grad, lam)  # No zero weight would lower the objective.
  f = _objective64(x.astype(np.float32), p, 0.3)
  assert f(lam)[0] <= f(_scipy_fit(x.astype(np.float32), p, 0.3, constraint="simplex"))[0] + 1e-6 * f(lam)[0]


def _implicit_case(seed, num_rows, num):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((num_rows, num))
  x[:, 0] -= 1.0  # Basis 0 loses most comparisons: exact zeros / active bounds under the constraints.
  p = (rng.uniform(size=num_rows) < 0.5).astype(np.float64)
  return x, p, rng.standard_normal(num)


@pytest.mark.parametrize("constraint, box", [(None, None), ("simplex", None), ("box", (-0.2, 0.3))])
def test_default_fit_is_differentiable_and_matches_finite_differences_of_scipy(constraint, box):
  """jax.grad through the default (early-stopping) fit: the implicit function theorem at the optimum, against central
  differences of an independent float64 solver (scipy) in l2 and in feature entries."""
  x, p, w = _implicit_case(5, 30, 4)
  l2 = 0.8

  def ours(x, l2):
    return online.fit_lambda(x, p.astype(np.float32), l2=l2, constraint=constraint, box=box) @ w.astype(np.float32)

  g_x, g_l2 = jax.grad(ours, argnums=(0, 1))(x.astype(np.float32), np.float32(l2))
  lam = _scipy_fit(x, p, l2, constraint=constraint, box=box)
  if constraint is not None:  # The case of interest: some bound is active at the optimum.
    assert np.sum(np.isclose(lam, 0.0, atol=1e-6) | np.isclose(lam, 0.3, atol=1e-6)) >= 1, lam
  h = 1e-3

  def diff(shift_x, shift_l2):
    up = _scipy_fit(x + shift_x, p, l2 + shift_l2, constraint=constraint, box=box)
    down = _scipy_fit(x - shift_x, p, l2 - shift_l2, constraint=constraint, box=box)
    return (up - down) @ w / (2 * h)

  np.testing.assert_allclose(g_l2, diff(0.0, h), rtol=2e-3, atol=2e-4)
  for i, j in ((0, 0), (7, 1), (19, 3)):
    e = np.zeros_like(x)
    e[i, j] = h
    np.testing.assert_allclose(g_x[i, j], diff(e, 0.0), rtol=2e-3, atol=2e-4, err_msg=f"x[{i}, {j}]")


@pytest.mark.parametrize("constraint, box", [(None, None), ("simplex", None), ("box", (-0.2, 0.3))])
def test_implicit_derivative_equals_differentiating_the_steps(constraint, box):
  """Batched, jitted: the implicit derivative (default tol) in every differentiable input equals reverse mode through
  12 unrolled Newton steps (tol=0), the start has derivative 0, a NaN padding row masked out stays out of the
  derivative, and forward mode agrees with reverse mode."""
  num_users, num_rows, num = 3, 24, 5
  cases = [_implicit_case(seed, num_rows, num) for seed in range(num_users)]
  x = np.stack([c[0] for c in cases]).astype(np.float32)
  p = np.stack([c[1] for c in cases]).astype(np.float32)
  w = np.float32(cases[0][2])
  mask = np.ones((num_users, num_rows), np.float32)
  mask[:, -2:] = 0.0
  mask[0, 3] = 2.5  # A row weight.
  x[1, -1] = np.nan  # Masked-out padding.
  mu = np.full((num_users, num), 0.1, np.float32)

  def loss(x, p, mask, l2, mu, init, tol):
    lam = online.fit_lambda(x, p, l2=l2, mask=mask, prior_mean=mu, init=init, constraint=constraint, box=box, tol=tol,
                            num_iters=12, num_inner_iters=20)
    return jnp.sum(jnp.sin(lam @ w))

  args = (x, p, mask, np.full(num_users, 0.7, np.float32), mu, np.zeros((num_users, num), np.float32))
  implicit = jax.jit(jax.grad(loss, argnums=tuple(range(6))), static_argnums=6)(*args, 1e-5)
  unrolled = jax.grad(loss, argnums=tuple(range(6)))(*args, 0.0)
  for name, got, want in zip(("x", "p", "mask", "l2", "prior_mean"), implicit, unrolled):
    got, want = np.nan_to_num(np.asarray(got), nan=9.0), np.nan_to_num(np.asarray(want), nan=9.0)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max(), err_msg=name)
  assert np.all(np.isfinite(implicit[0])) and not np.any(implicit[0][1, -2:]), "masked rows have no derivative"
  assert not np.any(np.asarray(implicit[5])), "the start does not move the optimum"
  if constraint is None:  # Forward mode (one more compile: once): the directional derivative in l2.
    tangent = jax.jvp(lambda l2: loss(x, p, mask, l2, mu, args[5], 1e-5), (args[3],), (np.ones(num_users, np.float32),))
    np.testing.assert_allclose(tangent[1], np.sum(implicit[3]), rtol=1e-4)


def test_argument_validation():
  x, p, _ = _problem(6, 1)
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="l2"):
      online.fit_lambda(x[0], p[0], l2=bad)
  with pytest.raises(ValueError, match="constraint"):
    online.fit_lambda(x[0], p[0], l2=1.0, constraint="ball")
  with pytest.raises(ValueError, match="box"):
    online.fit_lambda(x[0], p[0], l2=1.0, constraint="box")
  with pytest.raises(ValueError, match="prefs"):
    online.fit_lambda(x[0], p[0, :-1], l2=1.0)
  with pytest.raises(ValueError, match="l2"):
    online.fit_lambda_ratings(x[0], p[0], l2=0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Ratings, SGD, projections.
# ----------------------------------------------------------------------------------------------------------------------


def test_ratings_fit_matches_lstsq():
  rng = np.random.default_rng(7)
  feats = rng.standard_normal((40, _K)).astype(np.float32)
  ratings = (feats @ rng.standard_normal(_K) + 0.3 * rng.standard_normal(40)).astype(np.float32)
  mask = rng.uniform(size=40) < 0.7
  l2, mu = 2.0, np.full(_K, 0.2)
  lam = online.fit_lambda_ratings(feats, ratings, l2=l2, mask=mask, prior_mean=mu)
  a = np.concatenate([feats[mask], np.sqrt(l2) * np.eye(_K)]).astype(np.float64)
  b = np.concatenate([ratings[mask], np.sqrt(l2) * mu])
  np.testing.assert_allclose(lam, np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-4)
  # An unpenalized intercept: the same as centering, and invariant to an offset of the ratings.
  lam_c = online.fit_lambda_ratings(feats, ratings + 5.0, l2=l2, fit_intercept=True)
  fc, rc = feats - feats.mean(0), ratings - ratings.mean()
  ref = np.linalg.lstsq(np.concatenate([fc, np.sqrt(l2) * np.eye(_K)]), np.concatenate([rc, np.zeros(_K)]),
                        rcond=None)[0]
  np.testing.assert_allclose(lam_c, ref, atol=1e-4)


@pytest.mark.parametrize("num", [5, 30])
def test_ratings_fit_is_exact_with_feature_columns_of_uneven_scale(num):
  """The solve's jitter is relative to each diagonal entry: one relative to the largest entry, added to all, moved
  the closed form by 3% (K = 5) to 13% (K = 30) with columns 100x apart."""
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(64, num)) * np.logspace(-1, 1, num)
  ratings = rng.normal(size=64) + 3.0
  lam = online.fit_lambda_ratings(feats.astype(np.float32), ratings.astype(np.float32), l2=0.3)
  exact = np.linalg.solve(feats.T @ feats + 0.3 * np.eye(num), feats.T @ ratings)
  np.testing.assert_allclose(lam, exact, rtol=2e-4, atol=2e-5 * np.abs(exact).max())


def test_ratings_fit_with_a_large_common_offset_in_the_features():
  """Implicit-reward features with a common offset (no fit_intercept): cond(X^T X + l2 I) ~ 5e5. The normal
  equations lost 6% of lam in float32; least squares on the stacked system keeps float32's precision."""
  feats = np.array([[100.0, 100.2, 99.9, 100.1], [100.1, 99.8, 100.3, 100.0]])
  ratings, l2 = np.array([1.0, -0.5]), 0.1
  exact = np.linalg.solve(feats.T @ feats + l2 * np.eye(4), feats.T @ ratings)
  assert np.linalg.cond(feats.T @ feats + l2 * np.eye(4)) > 1e5
  lam = online.fit_lambda_ratings(feats.astype(np.float32), ratings.astype(np.float32), l2=l2)
  np.testing.assert_allclose(lam, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
  # A concrete jax / numpy bool is a bool.
  np.testing.assert_array_equal(
      online.fit_lambda_ratings(feats.astype(np.float32), ratings.astype(np.float32), l2=l2,
                                fit_intercept=jnp.asarray(True)),
      online.fit_lambda_ratings(feats.astype(np.float32), ratings.astype(np.float32), l2=l2, fit_intercept=True))


@pytest.mark.parametrize("feature, l2, start", [(-300.0, 0.1, "prior_mean"), (-30.0, 0.01, "init"),
                                                (-100.0, 0.1, "init"), (-1e4, 1e-3, "init")])
def test_a_start_that_saturates_the_logits_still_reaches_the_optimum(feature, l2, start):
  """From lam = 1 with a feature of -300 the Hessian is ~l2 and the Newton step overshoots the line's minimum
  ~10^3-fold: with step sizes only down to 2^-10 the fit never left its start (objective 280 against 0.35)."""
  x, p = np.array([[feature]], np.float32), np.array([0.9], np.float32)
  prior = np.ones(1, np.float32) if start == "prior_mean" else None
  lam = float(online.fit_lambda(x, p, l2=l2, prior_mean=prior, init=np.ones(1, np.float32))[0])
  # The optimum in float64: the gradient's root, by bisection (it is increasing in lam).
  mu = 1.0 if start == "prior_mean" else 0.0
  grad = lambda a: feature * (special.expit(feature * a) - 0.9) + l2 * (a - mu)
  exact = optimize.brentq(grad, -10.0, 10.0, xtol=1e-15)
  assert abs(lam - exact) <= 1e-5 * max(1.0, abs(exact)), (lam, exact)


def _stable_newton64(x, p, l2, iters=200):
  """Damped Newton in float64 with the residual and curvature written for any margin: [U, K]."""
  out = []
  for xu, pu in zip(np.asarray(x, np.float64), np.asarray(p, np.float64)):
    objective = lambda lam, xu=xu, pu=pu: np.sum(np.logaddexp(0.0, xu @ lam) - pu * (xu @ lam)) + 0.5 * l2 * lam @ lam
    lam = np.zeros(xu.shape[1])
    for _ in range(iters):
      z = xu @ lam
      g = xu.T @ ((1.0 - pu) * special.expit(z) - pu * special.expit(-z)) + l2 * lam
      h = (xu * (special.expit(z) * special.expit(-z))[:, None]).T @ xu + l2 * np.eye(len(lam))
      step, t = np.linalg.solve(h, g), 1.0
      while objective(lam - t * step) > objective(lam) and t > 1e-12:
        t /= 2
      lam = lam - t * step
    out.append(lam)
  return np.stack(out)


@pytest.mark.parametrize("scale, l2", [(1e2, 1e-3), (1e3, 1e-3), (1e4, 1.0), (3e4, 1.0)])
def test_separable_comparisons_with_large_margins_reach_the_optimum(scale, l2):
  """A consistent user (separable comparisons) whose closest margins at the optimum lie beyond ~8: for p = 1,
  float32's sigmoid(z) - p holds the derivative -e^-z to an absolute 6e-8 only (1e-3 relative at z = 10, exactly 0
  from z ~ 17), and s (1 - s) likewise, so the fit stopped 1e-3 to 6e-3 (relative) short of the optimum, silently in
  `update_users` and traced calls."""
  rng = np.random.default_rng(0)
  truth = rng.standard_normal((3, 3))
  x = rng.standard_normal((3, 20, 3)) * scale
  p = (np.einsum("unk,uk->un", x, truth) > 0).astype(np.float32)
  ref = _stable_newton64(x, p, l2)
  margins = np.abs(np.einsum("unk,uk->un", x, ref))
  assert margins.min() > 8.0  # Every comparison lies where sigmoid(z) - 1 keeps a few digits at most.
  lam = np.asarray(online.fit_lambda_batched(x.astype(np.float32), p, l2=l2), np.float64)
  error = np.linalg.norm(lam - ref, axis=1) / np.linalg.norm(ref, axis=1)
  assert error.max() < 1e-6, error
  z = np.linspace(-40.0, 40.0, 81)
  for label in (0.0, 0.3, 1.0):  # sigmoid(z) - p (soft labels too), to a few ulps at any margin (float64: the same).
    np.testing.assert_allclose(np.asarray(newton.residual(jnp.asarray(z, jnp.float32), label), np.float64),
                               (1.0 - label) * special.expit(z) - label * special.expit(-z), rtol=1e-6, atol=0)


def test_sgd_update_is_a_gradient_step():
  lam, d = np.array([0.2, -0.1, 0.4]), np.array([1.0, 2.0, -1.0])
  new = online.sgd_update(lam, d, 1.0, 0.1, 0.5)
  grad = (1 / (1 + np.exp(-lam @ d)) - 1.0) * d + 0.5 * lam
  np.testing.assert_allclose(new, lam - 0.1 * grad, atol=1e-6)
  assert new @ d > lam @ d  # Moves toward preferring y_a.


def test_simplex_and_box_projections():
  rng = np.random.default_rng(8)
  y = (3.0 * rng.standard_normal((200, 7))).astype(np.float32)
  y[0] = 0.0
  y[1] = [5.0, 5.0, 5.0, -1.0, 0.0, 0.0, 0.0]
  x = np.asarray(online.project_simplex(y))
  assert x.min() >= 0.0
  np.testing.assert_allclose(x.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(x[0], 1.0 / 7, atol=1e-7)
  np.testing.assert_allclose(x[1], [1 / 3, 1 / 3, 1 / 3, 0, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(online.project_simplex(x), x, atol=1e-6)  # Idempotent.
  # Optimality: (y - x) . (z - x) <= 0 for every z in the simplex (checked at the vertices).
  assert np.max((y - x) @ np.eye(7) - np.sum((y - x) * x, -1, keepdims=True)) < 1e-4
  # Matches a brute-force projection (scipy) on a few points.
  for u in range(2, 6):
    row = y[u].astype(np.float64)
    res = optimize.minimize(lambda v, r=row: (np.sum(
        (v - r)**2), 2 * (v - r)), np.full(7, 1 / 7), jac=True, method="SLSQP", bounds=[(0, None)] * 7,
                            constraints=[dict(type="eq", fun=lambda v: v.sum() - 1)], options=dict(ftol=1e-14))
    np.testing.assert_allclose(x[u], res.x, atol=1e-5)
  np.testing.assert_allclose(online.project_box(y[:3], -1.0, 2.0), np.clip(y[:3], -1.0, 2.0))
  # Entries far beyond the radius (float32 at 1e7 rounded the radius away: [1, 1, 1] and [0, 0, 0] before).
  big = np.asarray(online.project_simplex(np.array([[1e7, 1e7, 1e7], [2e7, 2e7, 0.0], [-3e7, 1e8, 1e8 + 16]])))
  np.testing.assert_allclose(big, [[1 / 3] * 3, [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], atol=1e-6)
  # That is what a user without comparisons gets under a large prior (the projected prior).
  np.testing.assert_allclose(
      online.fit_lambda(np.zeros((0, 3)), np.zeros(0), l2=1.0, constraint="simplex", prior_mean=[2e7, 2e7, 0.0]),
      [0.5, 0.5, 0.0], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Posterior, sampling, pair selection, batched state.
# ----------------------------------------------------------------------------------------------------------------------


def test_posterior_is_inverse_hessian_and_thompson_samples_match_it():
  x, p, _ = _problem(9, 1)
  lam = online.fit_lambda(x[0], p[0], l2=1.0)
  mean, cov = online.posterior(lam, x[0], l2=1.0)
  s = 1 / (1 + np.exp(-x[0].astype(np.float64) @ np.asarray(lam, np.float64)))
  hess = (x[0] * (s * (1 - s))[:, None]).T @ x[0] + np.eye(_K)
  np.testing.assert_allclose(np.asarray(cov) @ hess, np.eye(_K), atol=2e-3)
  samples = np.asarray(online.thompson_sample(jax.random.PRNGKey(0), mean, cov, num_samples=4000))
  np.testing.assert_allclose(samples.mean(0), mean, atol=0.1 * np.sqrt(np.diag(cov)).max())
  np.testing.assert_allclose(np.cov(samples.T), cov, atol=0.15 * np.abs(cov).max())


def test_posterior_and_max_info_weigh_saturated_logits_exactly():
  """s (1 - s) at logits beyond ~17 (float32's 1 - s is 0 there, while s for -z keeps e^-z): the posterior of a
  separable pair of rows at feature scale 1e4 (logits +-20) was 1.95x too wide, and depended on the rows' signs;
  max_info's choice depended on the candidates' order."""
  x = np.array([[1e4], [-1e4]], np.float32)
  lam = online.fit_lambda(x, np.array([1.0, 0.0], np.float32), l2=0.01)
  z = x.astype(np.float64) @ np.asarray(lam, np.float64)
  assert np.all(np.abs(z) > 18)
  weights = np.exp(-np.logaddexp(0, z) - np.logaddexp(0, -z))
  exact = 1.0 / (np.sum(weights * 1e8) + 0.01)
  for rows in (x, -x):
    _, cov = online.posterior(lam, rows, l2=0.01)
    np.testing.assert_allclose(float(cov[0, 0]), exact, rtol=1e-4)
  # Pair scores log(1 + s (1 - s) d^T cov d): (0, 2) at logit -18 beats (1, 2) at logit +22 in float64.
  feats = np.array([[0.0], [40.0], [18.0]], np.float32)
  for order in ([0, 1, 2], [2, 1, 0]):
    i, j = online.choose_pair(feats[order], np.array([-1.0], np.float32), np.eye(1, dtype=np.float32), rule="max_info")
    assert {order[int(i)], order[int(j)]} == {0, 2}


def test_choose_pair_max_variance_hand_made():
  feats = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.5, 0.5]], np.float32)
  cov = np.diag([1.0, 0.01]).astype(np.float32)
  # Pair variances d^T cov d: (0,1) 1, (0,2) .09, (0,3) .2525, (1,2) 1.09, (1,3) .2525, (2,3) .3125.
  i, j = online.choose_pair(feats, np.zeros(2), cov, rule="max_variance")
  assert (int(i), int(j)) == (1, 2)
  # Masking candidate 2 out leaves (0, 1).
  i, j = online.choose_pair(feats, np.zeros(2), cov, candidate_mask=np.array([1, 1, 0, 1], bool))
  assert (int(i), int(j)) == (0, 1)
  # max_info discounts predictable pairs: with a mean that ranks 1 far above 2, (0, 1) wins over (1, 2).
  i, j = online.choose_pair(feats, np.array([0.0, -3.0]), cov, rule="max_info")
  assert (int(i), int(j)) == (0, 1)
  for seed in range(5):
    i, j = online.choose_pair(feats, np.zeros(2), cov, rule="thompson", key=jax.random.PRNGKey(seed))
    assert int(i) != int(j) and 0 <= int(i) < 4 and 0 <= int(j) < 4


def test_update_users_ring_buffer_refits_in_one_call():
  num_users, buffer_size, num, rounds = 6, 24, 3, 27  # The shape of the MDP test's state (one compilation).
  state = online.init_user_state(num_users, num, buffer_size, l2=1.0)
  rng = np.random.default_rng(10)
  deltas = rng.standard_normal((rounds, num_users, num)).astype(np.float32)
  prefs = (rng.uniform(size=(rounds, num_users)) < 0.5).astype(np.float32)
  give = rng.uniform(size=(rounds, num_users)) < 0.9
  give[:, 0] = True  # User 0 answers every round (its buffer wraps), user 1 never does.
  give[:, 1] = False
  deltas[5, 2, 0] = np.nan  # Non-finite comparisons are not appended (the user's num_invalid counts them).
  prefs[7, 3] = np.nan
  give[[5, 7], [2, 3]] = True
  for t in range(rounds):
    state = online.update_users(state, deltas[t], prefs[t], give[t])
  # A finite label outside [0, 1] is a convention error, refused as fit_lambda refuses it (it was dropped silently).
  with pytest.raises(ValueError, match=r"new_pref\[3\] = -1.0: expected a label in \[0, 1\]"):
    online.update_users(state, deltas[0], np.where(np.arange(num_users) == 3, -1.0, 1.0), give[0] | True)
  mean, cov = online.state_posterior(state)
  state = jax.tree.map(np.asarray, state)
  valid = give & np.all(np.isfinite(deltas), -1) & np.isfinite(prefs)
  np.testing.assert_array_equal(state.count, valid.sum(0))
  np.testing.assert_array_equal(state.num_invalid, [0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(state.lam[1], np.zeros(num))
  for u in range(num_users):
    rows = np.flatnonzero(valid[:, u])[-buffer_size:]  # The last N valid comparisons, in ring order.
    slots = np.arange(valid[:, u].sum())[-buffer_size:] % buffer_size
    np.testing.assert_array_equal(state.features[u][slots], deltas[rows, u])
    np.testing.assert_array_equal(state.mask[u], np.isin(np.arange(buffer_size), slots))
    if rows.size:
      np.testing.assert_allclose(state.lam[u], _scipy_fit(deltas[rows, u], prefs[rows, u], 1.0), atol=1e-4)
  assert mean.shape == (num_users, num) and cov.shape == (num_users, num, num)
  np.testing.assert_allclose(cov[1], np.eye(num), rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Simulated users.
# ----------------------------------------------------------------------------------------------------------------------


def test_users_train_and_eval_splits_never_coincide():
  for kind in online.USER_KINDS:
    train = [np.asarray(online.make_users(kind, 5, s, split="train").weights) for s in range(4)]
    evals = [np.asarray(online.make_users(kind, 5, s, split="eval").weights) for s in range(4)]
    if kind in ("dirichlet", "signed"):
      for a in train:
        for b in evals:
          assert not np.allclose(a, b)
    again = np.asarray(online.make_users(kind, 5, 0, split="train").weights)
    np.testing.assert_array_equal(again, train[0])  # Seeded: reproducible.
  users = online.make_users("dirichlet", 50, 0)
  np.testing.assert_allclose(users.weights.sum(1), 1.0, atol=1e-6)
  assert np.all(np.asarray(users.weights) >= 0)
  assert np.any(np.asarray(online.make_users("signed", 50, 0).weights) < 0)
  with pytest.raises(ValueError, match="split"):
    online.make_users("dirichlet", 5, 0, split="test")


def test_true_reward_and_choices_per_kind():
  scores = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, -0.5]], np.float32)  # [N=2, A=3]
  lin = online.linear_users(np.array([[0.5, 0.25, 0.25], [1.0, -1.0, 0.0]]))
  np.testing.assert_allclose(online.true_reward(lin, scores), [[0.375, 0.375], [2.0, -2.0]], atol=1e-6)
  thr = online.make_users("threshold", 20, 1, num_attributes=3)
  r = np.asarray(online.true_reward(thr, scores))
  j = np.asarray(thr.attributes[:, 0])
  np.testing.assert_array_equal(r, (scores[:, j].T > np.asarray(thr.threshold)[:, None]).astype(np.float32))
  prod = online.make_users("product", 20, 1, num_attributes=3)
  i, j = np.asarray(prod.attributes).T
  assert np.all(i != j)
  np.testing.assert_allclose(online.true_reward(prod, scores),
                             np.tanh(scores[:, i].T) * np.tanh(scores[:, j].T), atol=1e-6)
  assert np.all(np.abs(online.true_reward(prod, 30.0 * scores)) <= 1.0)  # Bounded, whatever the scores' tails.
  # Bradley-Terry frequencies match the probabilities; temperature 0 is deterministic.
  rng = np.random.default_rng(2)
  sa, sb = rng.standard_normal((4000, 3)), rng.standard_normal((4000, 3))
  choices = np.asarray(online.simulate_choice(jax.random.PRNGKey(0), lin, sa, sb))
  probs = np.asarray(online.choice_prob(lin, sa, sb))
  assert set(np.unique(choices)) <= {0.0, 1.0}
  assert np.all(np.abs(choices.mean(1) - probs.mean(1)) < 0.03)
  hard = online.linear_users(np.asarray(lin.weights), temperature=0.0)
  margin = np.asarray(online.true_reward(hard, sa) - online.true_reward(hard, sb))
  np.testing.assert_array_equal(online.simulate_choice(jax.random.PRNGKey(1), hard, sa, sb), margin > 0)
  raw = rng.normal(3.0, 2.0, size=(100, 3))
  z, mean, std = online.standardize_scores(raw)
  np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.std(0), 1.0, atol=1e-5)
  np.testing.assert_allclose(online.standardize_scores(raw[:10], mean, std)[0], z[:10], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Exact MDP: docs/METHOD.md section 4 claims and the online loop.
# ----------------------------------------------------------------------------------------------------------------------

_BETA = 1.0


@functools.lru_cache(maxsize=None)
def _mdp_setup():
  mdp = em.make_mdp(vocab_size=4, horizon=4, seed=0)
  rewards = em.random_sequence_rewards(mdp, 3, seed=1)  # [K=3, 256] in [0, 1].
  policy = em.optimal_policy(rewards, mdp, _BETA)
  return mdp, rewards, policy


def _exact_optimum(mdp, reward):
  return em.sequence_log_probs(em.optimal_policy(reward, mdp, _BETA))


def test_mdp_soft_value_iteration_and_implicit_features():
  mdp, rewards, policy = _mdp_setup()
  logp = em.sequence_log_probs(policy)
  ref = em.sequence_log_probs(mdp.ref)
  np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-12)
  # pi*(y) = pi_ref(y) exp(R(y) / beta) / Z, and f_k(y) = R_k(y) - V_k(root) exactly.
  _, values = em.soft_value_iteration(rewards, mdp, _BETA)
  feats = em.implicit_features(logp, ref, _BETA)
  np.testing.assert_allclose(feats.T, rewards - values[0], atol=1e-12)
  # The exact optimum maximizes G = E[R] - beta KL, where G equals V(root).
  g_opt = em.regularized_value(logp, ref, rewards, _BETA)
  np.testing.assert_allclose(g_opt, values[0][:, 0], atol=1e-12)
  other = em.sequence_log_probs(em.explicit_soup_policy(policy, mdp.ref, [0.5, 0.5, 0.0]))
  assert np.all(em.regularized_value(other, ref, rewards, _BETA) < g_opt)


def test_mdp_claim_a_sequence_level_soup_is_exact():
  mdp, rewards, policy = _mdp_setup()
  basis, ref = em.sequence_log_probs(policy), em.sequence_log_probs(mdp.ref)
  rng = np.random.default_rng(0)
  for lam in (rng.dirichlet(np.ones(3)), np.array([2.0, -1.5, 0.7]), np.array([-3.0, 0.0, 0.5])):
    exact = _exact_optimum(mdp, lam @ rewards)
    np.testing.assert_allclose(np.exp(em.sequence_soup(basis, ref, lam)), np.exp(exact), atol=1e-12)
    assert em.kl(em.sequence_soup(basis, ref, lam), exact) < 1e-6


def test_mdp_claim_b_token_level_soup_exact_cases_and_error_growth():
  mdp, rewards, policy = _mdp_setup()
  rng = np.random.default_rng(1)
  simplex = [rng.dirichlet(np.ones(3)) for _ in range(5)]
  negative = [np.array(v) for v in ([1.5, -0.5, 0.0], [0.0, 2.0, -1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, -1.0])]

  def token_kl(lam, mdp=mdp, rewards=rewards, policy=policy):
    tok = em.sequence_log_probs(em.explicit_soup_policy(policy, mdp.ref, lam))
    exact = _exact_optimum(mdp, tuple(np.tensordot(lam, r, 1) for r in em.token_rewards(rewards, mdp)))
    return em.kl(tok, exact)

  kl_simplex = np.array([token_kl(l) for l in simplex])
  kl_negative = np.array([token_kl(l) for l in negative])
  bounds = np.array([em.token_soup_kl_bound(rewards, l, _BETA, mdp.horizon) for l in simplex])
  assert np.all(kl_simplex <= bounds) and bounds.max() < 6e-3  # (H-1)/8 * (1/8)^2 for rewards in [0, 1].
  assert kl_simplex.max() < kl_negative.min()  # Negative weights: larger error (here > 10x).
  for l in negative:
    assert token_kl(l) <= em.token_soup_kl_bound(rewards, l, _BETA, mdp.horizon)
  # The error grows with extrapolation lam = e_0 + t (e_0 - e_1); exact at t = 0 (a single basis).
  errors = [token_kl(np.array([1.0 + t, -t, 0.0])) for t in (0.0, 0.5, 1.0, 2.0)]
  assert errors[0] < 1e-12 and np.all(np.diff(errors) > 0)
  # Exact for every lam (any signs) when the soft values combine linearly: per-token rewards depending only on
  # (t, a) and a prefix-independent reference.
  mdp_cf = em.make_mdp(4, 4, seed=0, context_free=True)
  rewards_cf = em.random_token_rewards(mdp_cf, 3, seed=2, context_free=True)
  policy_cf = em.optimal_policy(rewards_cf, mdp_cf, _BETA)
  for lam in simplex[:2] + negative[:2]:
    assert token_kl(lam, mdp_cf, rewards_cf, policy_cf) < 1e-12
  # The project's float32 soup (spectral_soup.soup) computes the same token-level mixture.
  lam, depth = negative[0], mdp.horizon - 2
  tok = em.explicit_soup_policy(policy, mdp.ref, lam)
  np.testing.assert_allclose(jax.jit(soup.soup_logits)(mdp.ref[depth], policy[depth], lam), tok[depth], atol=1e-5)


def test_mdp_claim_c_online_regret_decreases():
  mdp, rewards, _ = _mdp_setup()
  weights = 3.0 * np.random.default_rng(5).dirichlet(np.ones(3), size=6)  # 6 users (independent seeds).
  out = em.run_online(mdp, rewards, _BETA, weights, num_rounds=24, l2=1.0, seed=0)
  regret = out["regret"]  # [6, 25], regret[:, 0] = pi_ref.
  assert np.all(regret >= -1e-9)
  first, last = regret[:, 1:6].mean(), regret[:, -5:].mean()
  assert last < 0.75 * first, (first, last)
  assert out["score"][:, -5:].mean() > out["score"][:, 1:6].mean()
  # The fitted lam moves toward the true weights.
  err = np.abs(out["lam"] - weights[:, None]).mean(axis=(0, 2))
  assert err[-1] < err[1]


# ----------------------------------------------------------------------------------------------------------------------
# Users without comparisons under a constraint, unit total weight, pair variances of offset candidates.
# ----------------------------------------------------------------------------------------------------------------------


def test_users_without_comparisons_hold_the_projected_prior():
  prior = np.array([-0.5, 0.2, 0.1], np.float32)
  nonneg = {"constraint": "box", "box": (0.0, np.inf)}
  clipped = np.maximum(prior, 0.0)  # [0, 0.2, 0.1]
  np.testing.assert_array_equal(online.init_user_state(2, 3, 4, prior_mean=prior, **nonneg).lam, [clipped] * 2)
  np.testing.assert_allclose(online.init_user_state(2, 3, 4, constraint="simplex").lam, np.full((2, 3), 1 / 3))
  state = online.init_user_state(2, 3, 4, prior_mean=prior)  # Made without the constraint: lam = the prior.
  state = online.update_users(state, np.ones((2, 3), np.float32), np.ones(2, np.float32), [True, False], **nonneg)
  np.testing.assert_array_equal(state.lam[1], clipped)  # fit_lambda's answer for no comparisons.
  assert np.all(np.asarray(state.lam[0]) >= 0) and int(state.count[1]) == 0
  np.testing.assert_array_equal(state.prior_mean, np.broadcast_to(prior, (2, 3)))  # The penalty's center is kept.
  with pytest.raises(TypeError, match=r"state must be a UserState .* got a dict"):  # An AttributeError before.
    online.update_users({"lam": state.lam}, np.ones((2, 3), np.float32), np.ones(2, np.float32))


def test_unit_total_weight_keeps_the_direction_of_small_rows():
  lam = np.array([[9e-7, 0.0, 0.0], [4e-7, 5e-7, 0.0], [0.0, 0.0, 0.0], [1e-45, 0.0, 0.0]], np.float32)
  np.testing.assert_allclose(online.unit_total_weight(lam),
                             [[1.0, 0.0, 0.0], [4 / 9, 5 / 9, 0.0], [1 / 3] * 3, [1 / 3] * 3])  # 1e-45: subnormal.
  with pytest.raises(ValueError, match=r"unit_total_weight needs lambda of shape \[\.\.\., K\] with K >= 1"):
    online.unit_total_weight(np.zeros((2, 0)))


def test_choose_pair_variances_of_candidates_with_a_common_offset():
  # Features ~1e4 with unit spread: expanding d^T cov d into f_i^T cov f_i + ... loses every digit of the pairs'
  # variances in float32 and picked a random pair.
  rng = np.random.default_rng(11)
  cov = np.diag([1.0, 0.5, 0.2]).astype(np.float32)
  for _ in range(5):
    feats = (1e4 + rng.standard_normal((6, 3))).astype(np.float32)
    d = feats.astype(np.float64)[:, None] - feats[None]
    variance = np.triu(np.einsum("ijk,kl,ijl->ij", d, cov, d), k=1)
    best = np.unravel_index(np.argmax(variance), variance.shape)
    assert tuple(int(a) for a in online.choose_pair(feats, np.zeros(3), cov)) == best
