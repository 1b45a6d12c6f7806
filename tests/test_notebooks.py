"""The Colab notebooks of experiments/colab run top to bottom in their tiny settings, and every plot cell draws.

Each notebook runs in a fresh Python kernel (nbclient) with SPECTRAL_SOUP_NOTEBOOK_TINY=1, one CPU device and its
workdir under the test's temporary directory (set by a cell inserted after the notebook's `parameters` cell, as
papermill does). Cells tagged `plot` must leave a PNG among their outputs.
"""

from __future__ import annotations

import os
import time

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "experiments", "colab")
NOTEBOOKS = ("quickstart.ipynb", "online_adaptation.ipynb")
CELL_TIMEOUT_S = 300


def _kernel_env(tmp_path) -> dict:
  env = dict(os.environ, SPECTRAL_SOUP_NOTEBOOK_TINY="1", SPECTRAL_SOUP_PROGRESS="0", JAX_PLATFORMS="cpu",
             SPECTRAL_SOUP_CACHE=str(tmp_path / "cache"), MPLBACKEND="module://matplotlib_inline.backend_inline")
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)  # One CPU device, as in Colab.
  return env


def _tagged(nb, tag):
  return [cell for cell in nb.cells if tag in cell.get("metadata", {}).get("tags", [])]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_tiny_settings(name, tmp_path):
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  (parameters,) = _tagged(nb, "parameters")
  assert 'TINY = os.environ.get("SPECTRAL_SOUP_NOTEBOOK_TINY") == "1"' in parameters.source
  plots = _tagged(nb, "plot")
  assert plots, f"{name} has no cell tagged 'plot'"
  assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "saved with outputs"
  injected = nbformat.v4.new_code_cell(f"WORKDIR = {str(tmp_path / 'workdir')!r}")
  nb.cells.insert(nb.cells.index(parameters) + 1, injected)

  t0 = time.time()
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {
                                       "path": COLAB
                                   }})
  client.execute(env=_kernel_env(tmp_path))  # Raises CellExecutionError, with the cell and traceback, on an error.
  print(f"{name}: {time.time() - t0:.1f} s")

  for cell in plots:
    images = [out for out in cell.outputs if "image/png" in out.get("data", {})]
    assert images, f"{name}: a plot cell drew no image:\n{cell.source[:300]}"


def test_a_basis_of_the_other_branch_and_unknown_user_attributes_are_named():
  """A tiny basis with TINY off failed deep inside a later cell (a None tokenizer, a missing data.num_prompts); a
  SmolLM2 basis with TINY on fed synthetic ids to SmolLM2; a user naming an attribute the basis lacks became the
  reference (lam = 0), silently."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from configs import demo, train_basis_tiny  # pylint: disable=g-import-not-at-top
  from experiments.colab import common  # pylint: disable=g-import-not-at-top
  tiny, smol = train_basis_tiny.get_config(), demo.get_config()
  common.check_basis(tiny, True)
  common.check_basis(smol, False)
  with pytest.raises(ValueError, match="a random backbone .*set TINY = True"):
    common.check_basis(tiny, False)
  with pytest.raises(ValueError, match="on the backbone 'embedded:smollm2'.*set TINY = False"):
    common.check_basis(smol, True)
  smol.data.source = "ultrafeedback"
  with pytest.raises(ValueError, match="data.source='ultrafeedback'.*spectral_soup.load_basis"):
    common.check_basis(smol, False)
  lam = common.user_lams({"a": {"marker 2": 2.0}, "ref": {}}, ("marker 1", "marker 2"))
  assert lam.tolist() == [[0.0, 2.0], [0.0, 0.0]]
  with pytest.raises(ValueError, match=r"user 'b' names \['marker 3'\], which this basis does not have"):
    common.user_lams({"b": {"marker 3": 2.0}}, ("marker 1", "marker 2"))
