"""The main job's workdir: what a re-run may reuse, another job's workdir, output paths, the previous run's results.

Every check is exercised on a workdir made here (a config.json, an empty basis checkpoint directory), not by running
the job: each test reads or moves a few small files.
"""

import json
import os

import numpy as np
import pytest

from configs import demo
from configs import train_basis_tiny
from experiments import main
from spectral_soup.eval import plots
from spectral_soup.offline import resume
from spectral_soup.utils import files


def _main_workdir(tmp_path, config=None, checkpoint=True):
  """A workdir as the main job leaves it: config.json, and basis/checkpoints/0 when its offline phase ran."""
  config = config or demo.get_config()
  tmp_path.mkdir(exist_ok=True)
  (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
  if checkpoint:
    (tmp_path / "basis" / "checkpoints" / "0").mkdir(parents=True)
  return str(tmp_path)


def test_the_same_config_and_changed_online_or_eval_fields_reuse_the_workdir(tmp_path):
  workdir = _main_workdir(tmp_path)
  config = demo.get_config()
  main.check_workdir_reuse(config, workdir)
  config.online.l2 = 30.0
  config.online.prompts_per_round = 8
  config.eval.num_prompts = 8
  config.eval.frontier.pad = (1.0,)
  main.check_workdir_reuse(config, workdir)
  main.check_workdir_reuse(config, str(tmp_path / "new"))  # A new workdir.


@pytest.mark.parametrize("field, value, message", [
    ("users.seed", 5, r"config\.users\.seed=5 differs from its 0"),
    ("users.kind", "signed", r"config\.users\.kind='signed' differs from its 'dirichlet'"),
    ("data.attributes", ("formality", "density", "sentiment", "verbosity", "readability"),
     r"config\.data\.attributes=\['formality', .*\] differs from its \['readability', "),
    ("eval.split", "dev", r"config\.eval\.split='dev' differs from its 'heldout'"),
    ("loss.rating_scale", 2.0, r"config\.loss\.rating_scale=2\.0 differs from its 1\.0"),
])
def test_a_field_the_saved_heads_depend_on_is_refused_with_both_values(tmp_path, field, value, message):
  workdir = _main_workdir(tmp_path)
  config = demo.get_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=rf"--workdir=.* holds bases and bespoke heads .*: {message}.* use a fresh "):
    main.check_workdir_reuse(config, workdir)


def test_saved_bases_without_their_config_are_refused_but_a_killed_save_is_not_a_basis(tmp_path):
  workdir = _main_workdir(tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(ValueError, match=r"holds saved bases .* but no config\.json"):
    main.check_workdir_reuse(demo.get_config(), workdir)
  # Only the temporary directory of a save that never committed: no bases yet (it was refused the same way).
  os.rename(os.path.join(workdir, "basis", "checkpoints", "0"),
            os.path.join(workdir, "basis", "checkpoints", "0.orbax-checkpoint-tmp-1234"))
  main.check_workdir_reuse(demo.get_config(), workdir)


def test_every_differing_field_is_named(tmp_path):
  workdir = _main_workdir(tmp_path)
  config = demo.get_config()
  config.users.seed = 5
  config.users.concentration = 0.5
  config.online.l2 = 30.0  # Recomputed: not named.
  with pytest.raises(ValueError) as e:
    main.check_workdir_reuse(config, workdir)
  assert "config.users.seed=5" in str(e.value) and "config.users.concentration=0.5" in str(e.value)
  assert "online.l2=" not in str(e.value)


def test_a_field_the_recorded_config_lacks_counts_as_changed(tmp_path):
  workdir = _main_workdir(tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["users"]["concentration"]
  del saved["online"]["estimate"]  # Recomputed every run: may be new.
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match=r"config\.users\.concentration=1\.0 is not in it") as e:
    main.check_workdir_reuse(demo.get_config(), workdir)
  assert "estimate" not in str(e.value)


def test_a_workdir_without_saved_heads_takes_any_config(tmp_path):
  workdir = _main_workdir(tmp_path, checkpoint=False)  # A run stopped before its offline phase.
  config = demo.get_config()
  config.users.seed = 5
  main.check_workdir_reuse(config, workdir)


def test_without_config_json_the_basis_runs_record_is_compared(tmp_path):
  config = demo.get_config()
  basis_config = demo.get_config()
  basis_config.basis.num_bases = 5 + 16  # The offline run's heads: the bases, then one per user.
  (tmp_path / "basis" / "checkpoints" / "0").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"no config\.json"):
    main.check_workdir_reuse(config, str(tmp_path))
  (tmp_path / "basis" / "config.json").write_text(basis_config.to_json_best_effort())
  main.check_workdir_reuse(config, str(tmp_path))
  config.users.seed = 5
  with pytest.raises(ValueError, match=r"config\.users\.seed=5 differs from its 0"):
    main.check_workdir_reuse(config, str(tmp_path))


def test_another_jobs_workdir_is_refused(tmp_path):
  train_basis = tmp_path / "train_basis"  # As experiments.train_basis leaves it.
  (train_basis / "checkpoints" / "4").mkdir(parents=True)
  (train_basis / "config.json").write_text(json.dumps({"seed": 0, "basis": {"num_bases": 3}}))
  with pytest.raises(ValueError, match=r"holds a basis training \(checkpoints/"):
    main.check_workdir_reuse(demo.get_config(), str(train_basis))
  other = tmp_path / "other"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"seed": 0}))
  with pytest.raises(ValueError, match=r"holds a config\.json that the main job did not write"):
    main.check_workdir_reuse(demo.get_config(), str(other))


def test_a_basis_training_refuses_a_main_job_workdir(tmp_path):
  workdir = _main_workdir(tmp_path / "main")
  with pytest.raises(ValueError, match=r"holds a run of the main job"):
    resume.check_not_main_job_workdir(workdir)
  resume.check_not_main_job_workdir(os.path.join(workdir, "basis"))  # Its basis run itself: resume checks apply.
  resume.check_not_main_job_workdir(str(tmp_path / "new"))


def test_a_basis_training_refuses_a_config_json_it_did_not_write_and_resumes_its_own(tmp_path):
  """A Hugging Face checkpoint given as --workdir had its config.json replaced by the training's; a training
  stopped before its first checkpoint (only its config.json) is its own workdir and restarts."""
  foreign = tmp_path / "checkpoint"
  foreign.mkdir()
  (foreign / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
  with pytest.raises(ValueError, match=r"holds a config.json that no basis training wrote \(no basis / model / data"):
    resume.check_not_main_job_workdir(str(foreign))
  own = tmp_path / "own"
  own.mkdir()
  (own / "config.json").write_text(train_basis_tiny.get_config().to_json_best_effort())
  assert resume.workdir_kind(str(own)) == resume.BASIS_TRAINING
  resume.check_not_main_job_workdir(str(own))


@pytest.mark.parametrize("name", ["results.json", "comparisons.npz", "k_ablation.png", "config.json"])
def test_an_output_name_taken_by_a_directory_is_refused_up_front(tmp_path, name):
  main.check_output_paths(str(tmp_path))
  (tmp_path / name).mkdir()
  with pytest.raises(ValueError, match=rf"{name} is a directory: expected a file the run can replace"):
    main.check_output_paths(str(tmp_path))


def test_the_basis_directory_taken_by_a_file_is_refused_up_front(tmp_path):
  (tmp_path / "basis").write_text("")
  with pytest.raises(ValueError, match=r"basis is a file: expected the directory"):
    main.check_output_paths(str(tmp_path))


def test_a_rerun_moves_the_previous_results_aside_with_their_config(tmp_path):
  workdir = _main_workdir(tmp_path)
  outputs = ["results.json", "comparisons.npz", "samples.json"] + list(plots.PLOT_FILES)
  for name in outputs:
    (tmp_path / name).write_text(name)
  (tmp_path / "results.json.tmp-123").write_text("a killed write")
  destination = main.set_aside_previous_outputs(workdir)
  assert os.path.dirname(destination) == os.path.join(workdir, "previous_runs")
  assert sorted(os.listdir(destination)) == sorted(outputs + ["config.json"])
  assert (tmp_path / "config.json").read_text() == open(os.path.join(destination, "config.json")).read()
  assert sorted(os.listdir(tmp_path)) == ["basis", "config.json", "previous_runs"]  # No result beside config.json.
  (tmp_path / "comparisons.npz").write_text("a killed run's")  # Its online phase ended, then it was killed.
  second = main.set_aside_previous_outputs(workdir)
  assert second != destination and sorted(os.listdir(second)) == ["comparisons.npz", "config.json"]
  assert main.set_aside_previous_outputs(workdir) is None  # Nothing left to move.


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_file_where_nothing_can_be_written_is_refused_up_front(tmp_path):
  """os.access passes for root and cannot see pseudo file systems (/proc) or read-only mounts: the check writes for
  real, so an entry point refuses such an --output before the model loads, not after the responses are decoded."""
  problem = files.output_file_problem("--output", "/proc/responses.jsonl")
  assert problem.startswith("--output=/proc/responses.jsonl: its directory ") and "this user can write" in problem
  assert files.output_file_problem("--output", str(tmp_path / "responses.jsonl")) is None


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
  (tmp_path / "taken").mkdir()
  with pytest.raises(OSError):
    files.write_text_atomic(str(tmp_path / "taken"), "x")
  with pytest.raises(OSError):
    files.write_npz_atomic(str(tmp_path / "taken"), x=np.zeros(2))
  (tmp_path / "plot.png").write_bytes(b"old")

  class Failing:

    def savefig(self, path, **unused_kwargs):
      with open(path, "wb") as f:
        f.write(b"half")
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    plots._save(Failing(), str(tmp_path / "plot.png"))  # pylint: disable=protected-access
  assert sorted(os.listdir(tmp_path)) == ["plot.png", "taken"]
  assert (tmp_path / "plot.png").read_bytes() == b"old"
