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


def test_show_config_lists_every_field_with_its_comment():
  import sys  # pylint: disable=g-import-not-at-top
  for module, config, field, comment in (("experiments.train_basis", "configs/train_basis_tiny.py",
                                          "basis.num_bases = 3", "K: one basis per label"),
                                         ("experiments.main", "configs/demo.py", "online.rounds = 4", "T rounds.")):
    result = subprocess.run([sys.executable, "-m", module, f"--config={config}", "--show_config"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(l for l in result.stdout.splitlines() if l.strip().startswith(field))
    assert comment in line, line
    assert "data.prompt_len = " in result.stdout


def test_every_key_of_results_json_is_documented():
  """docs/RESULTS.md names every key that experiments/main.py writes into results.json (and its `offline` part)."""
  with open(os.path.join(ROOT, "experiments", "main.py")) as f:
    source = f.read()
  literal = source[source.index("  results = {"):source.index("  results[\"timing_s\"][\"total_s\"]")]
  keys = set(re.findall(r'"([a-z_]+)":', literal)) - {"scale", "kl", "mean_reward"}
  assert {"methods", "frontier", "at_bespoke_kl", "attribute_shift", "timing_s"} <= keys
  with open(os.path.join(ROOT, "docs", "RESULTS.md")) as f:
    doc = f.read()
  named = lambda k: any(form in doc for form in (f"`{k}`", f"`{k}.", f".{k}`", f"\"{k}\""))
  missing = sorted(k for k in keys if not named(k))
  assert not missing, f"docs/RESULTS.md does not document {missing}"


def test_config_comments_follow_the_variant_and_read_comments_above_a_field(tmp_path):
  """The comments `--show_config` prints: the variant's function (`file.py:local`) only for that variant, comment
  lines above a field without its own, and the `#   ` lines that continue a comment."""
  from spectral_soup.utils import cli  # pylint: disable=g-import-not-at-top
  paper = cli.config_comments(os.path.join(ROOT, "configs", "ultrafeedback_gemma3_1b.py"))
  local = cli.config_comments(os.path.join(ROOT, "configs", "ultrafeedback_gemma3_1b.py") + ":local")
  assert paper["basis.num_bases"].startswith("K: 4 attributes + 26") and "16 chips" in paper["mesh.fsdp"]
  assert local["basis.num_bases"].startswith("The 4 attributes + 2") and local["mesh.fsdp"] == "One device."
  derived = cli.config_comments(os.path.join(ROOT, "configs", "helpsteer2.py"))
  assert "Local" not in derived["launch.accelerator_type"] and "(CPU)" not in derived["model.dtype"]
  demo = cli.config_comments(os.path.join(ROOT, "configs", "demo.py"))
  assert demo["online.l2"].startswith("L2 penalty of the lambda fits") and "nonnegative" in demo["online.constraint"]
  assert demo["train.nan_check"].endswith("(False: checked at log steps only).")  # Continued on the next line.
  assert demo["online.features"].startswith(
      "What spectral and P-Soups lambda regress") and "P-Soups also fixes" not in (
          demo["online.features"])  # Its own comment block only, not the one above the field before it.
  config = tmp_path / "c.py"
  config.write_text(
      "def get_config(arg=''):\n  # Above a and b.\n  config.a = 1\n  config.b = 2\n\n  config.c = 3\n"
      "  config.d = 4  # Own.\n  # Above e.\n  config.e = 5\n  # Above f.\n  config.f = 6\n  if arg == 'x':\n"
      "    x(config)\n\n\ndef x(config):\n  config.d = 5  # X's.\n")
  assert cli.config_comments(str(config)) == {
      "a": "Above a and b.",
      "b": "Above a and b.",
      "d": "Own.",
      "e": "Above e.",
      "f": "Above f."
  }
  assert cli.config_comments(f"{config}:x")["d"] == "X's."
