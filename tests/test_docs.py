"""Every repository path that a docstring, comment or document names exists (docs/METHOD.md, BENCHMARKS.md, ...)."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A path inside the repository, or a top-level document; globs and format templates are not paths.
PATH = re.compile(r"(?<![\w./-])((?:docs|spectral_soup|experiments|configs|launch)/[\w./-]+"
                  r"\.(?:py|md|sh|json|jsonl|ipynb)|[A-Z]+\.md)")


def test_every_named_repository_file_exists():
  files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.ipynb", "*.sh"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
  assert len(files) > 50
  missing = []
  for name in files:
    if name.startswith("tests/"):  # Tests name missing files on purpose (bad-input checks).
      continue
    with open(os.path.join(ROOT, name), errors="ignore") as f:
      text = f.read()
    for match in PATH.finditer(text):
      ref = match.group(1).rstrip(".")
      here = os.path.join(ROOT, os.path.dirname(name), ref)  # Relative to the naming file, or to the root.
      if not (os.path.exists(os.path.join(ROOT, ref)) or os.path.exists(here)):
        missing.append(f"{name} names {ref}")
  assert not missing, "\n".join(missing)
