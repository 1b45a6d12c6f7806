"""The code is formatted with yapf's Google style (pyproject.toml [tool.yapf]: 2-space indent, 120 columns)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = ("spectral_soup", "experiments", "tests", "configs", "launch")


def test_yapf_leaves_every_file_unchanged():
  out = subprocess.run([sys.executable, "-m", "yapf", "--diff", "--recursive", "--parallel", *FOLDERS], cwd=ROOT,
                       capture_output=True, text=True, check=False)
  assert out.returncode == 0, (f"run `yapf -i -r -p {' '.join(FOLDERS)}` from the repository root; it would change:\n" +
                               out.stdout[:3000] + out.stderr[-2000:])
