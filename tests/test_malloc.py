"""The package's glibc malloc settings (spectral_soup/_malloc.py): applied on import, opt-out, harmless elsewhere."""

import os
import platform
import subprocess
import sys

import pytest

import spectral_soup
from spectral_soup import _malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _tuned_in_fresh_process(**env) -> str:
  code = "import spectral_soup; print(spectral_soup.MALLOC_TUNED)"
  full_env = {k: v for k, v in os.environ.items() if k != _malloc.OPT_OUT}
  full_env.update(env)
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True, check=True)
  return out.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_settings_apply_on_import_and_every_value_is_accepted():
  assert spectral_soup.MALLOC_TUNED
  assert _tuned_in_fresh_process() == "True"
  # glibc refuses values above its limits (mallopt returns 0): each one must be accepted.
  assert _malloc.retain_freed_memory()


def test_opt_out_keeps_glibc_defaults():
  assert _tuned_in_fresh_process(**{_malloc.OPT_OUT: "1"}) == "False"


def test_nothing_is_changed_off_glibc(monkeypatch):
  monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
  assert not _malloc.retain_freed_memory()
