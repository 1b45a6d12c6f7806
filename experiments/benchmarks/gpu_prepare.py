r"""Prepares `gpu.sh` for a GPU machine without network: wheels of the missing requirements, and the command to run.

  python -m experiments.benchmarks.gpu_prepare [--out=.whl] [--have=FILE] [--python_version=3.12] [--limit_mb=64]

The GPU machine is expected to have Python with jax (CUDA), flax, optax, orbax-checkpoint, chex and transformers
installed, as CUDA images of JAX usually do; whatever else `setup.py`'s runtime requirements name is fetched here
as wheels for that machine's Python (`pip download --no-deps --only-binary=:all:` for manylinux x86-64), together
with their own requirements, recursively, until every name is either fetched or listed in `--have` (default:
`gpu_image_packages.txt` beside this file, the image BENCHMARKS.md's GPU table was measured on; on another machine
write its list with `python3 -m pip list --format=freeze > have.txt`). A requirement published only as a source
archive is built into a wheel here (`pip wheel --no-deps`), and every wheel's tags are checked against the target's:
a compiled package built for this machine's Python is refused here, not by the install there. Markers are evaluated for
the target (Linux, x86-64, `--python_version`). The wheels and the repository's tracked files must fit `--limit_mb`
together (what can travel to the machine); the script fails, naming the largest wheels, when they do not.

It prints the one command to run there, in the repository's root:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
      PYTHONPATH=/tmp/site PYTHON=python3 bash experiments/benchmarks/gpu.sh "${OUT:-/tmp/gpu_bench}"

`--find_links DIR --no_index` fetch from a local folder of wheels instead of the package index (tests).
"""

from __future__ import annotations

import argparse
import ast
import email.parser
import os
import re
import subprocess
import sys
import zipfile
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set

from experiments.benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_HAVE = os.path.join(HERE, "gpu_image_packages.txt")
# The target's platform tags, newest first (the GPU image is Ubuntu 24.04: glibc 2.39).
PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)) + ("manylinux2014_x86_64",
                                                                                   "manylinux1_x86_64", "linux_x86_64")


def normalize(name: str) -> str:
  """PEP 503 name: lower case, runs of '-', '_', '.' as one '-'."""
  return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
  match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
  if not match:
    raise ValueError(f"cannot read a package name from the requirement {requirement!r}.")
  return normalize(match.group(1))


def runtime_requirements(setup_py: str = os.path.join(common.REPO, "setup.py")) -> List[str]:
  """INSTALL_REQUIRES of setup.py, read without running it."""
  with open(setup_py, encoding="utf-8") as f:
    tree = ast.parse(f.read(), setup_py)
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "INSTALL_REQUIRES" for t in node.targets):
      return list(ast.literal_eval(node.value))
  raise ValueError(f"{setup_py}: no INSTALL_REQUIRES list.")


def read_have(path: str) -> Set[str]:
  """Package names of a `pip list --format=freeze` file or a plain list (one per line, '#' comments)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--have={path}: no such file (expected one package name per line, or the output of "
                            "`python3 -m pip list --format=freeze` on the GPU machine).")
  names = set()
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      try:
        names.add(requirement_name(line))
      except ValueError as e:
        raise ValueError(f"{path}, line {number}: {e}") from None
  return names


def wheel_requirements(wheel: str, python_version: str) -> List[str]:
  """The wheel's unconditional requirements (and those whose markers hold on Linux x86-64 `python_version`)."""
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    if not names:
      raise ValueError(f"{wheel}: not a wheel (no .dist-info/METADATA).")
    metadata = email.parser.Parser().parsestr(z.read(names[0]).decode("utf-8"))
  environment = {
      "python_version": python_version,
      "python_full_version": f"{python_version}.0",
      "sys_platform": "linux",
      "platform_system": "Linux",
      "platform_machine": "x86_64",
      "os_name": "posix",
      "implementation_name": "cpython",
      "platform_python_implementation": "CPython",
      "extra": ""
  }
  out = []
  for line in metadata.get_all("Requires-Dist") or []:
    requirement = Requirement(line)
    if requirement.marker is None or requirement.marker.evaluate(environment):
      out.append(str(requirement).split(";")[0].strip())
  return out


def wheel_name(path: str) -> str:
  return normalize(os.path.basename(path).split("-")[0])


def fetch(requirements: Sequence[str], out: str, python_version: str, pip_args: Sequence[str]) -> None:
  """Downloads a wheel of each requirement for the target; builds one here when only a source archive exists."""
  platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
  for requirement in requirements:
    download = [
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
        python_version, "--implementation", "cp", *platform_args, "-d", out, *pip_args, requirement
    ]
    result = subprocess.run(download, capture_output=True, text=True, check=False)
    if result.returncode == 0:
      continue
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, *pip_args, requirement]
    built = subprocess.run(build, capture_output=True, text=True, check=False)
    if built.returncode != 0:
      raise RuntimeError(f"no wheel of {requirement!r} for Python {python_version} on manylinux x86-64, and "
                         f"building one failed:\n{result.stderr[-1500:]}\n{built.stderr[-1500:]}")
    print(f"  {requirement}: built a wheel here (pip found none for the target)", flush=True)


def target_tags(python_version: str) -> Set[Any]:
  """The wheel tags CPython `python_version` on manylinux x86-64 installs (`packaging.tags`, as pip decides)."""
  from packaging import tags  # pylint: disable=g-import-not-at-top
  version = tuple(int(x) for x in python_version.split("."))
  interpreter = f"cp{version[0]}{version[1]}"
  return (set(tags.cpython_tags(version, platforms=PLATFORMS)) |
          set(tags.compatible_tags(version, interpreter, platforms=PLATFORMS)))


def unusable_wheels(out: str, python_version: str) -> List[str]:
  """The wheels in `out` that the target cannot install (built for another Python or platform)."""
  from packaging.utils import parse_wheel_filename  # pylint: disable=g-import-not-at-top
  usable = target_tags(python_version)
  bad = []
  for name in sorted(os.listdir(out)):
    if name.endswith(".whl"):
      try:
        wheel_tags = parse_wheel_filename(name)[3]
      except ValueError:
        bad.append(name)
        continue
      if not set(wheel_tags) & usable:
        bad.append(name)
  return bad


def prepare(out: str, have: Set[str], python_version: str, pip_args: Sequence[str] = (),
            roots: Optional[Iterable[str]] = None) -> Dict[str, int]:
  """Fetches the closure of `roots` (default: setup.py's runtime requirements) minus `have` into `out`.

  Returns {wheel file name: bytes} of every wheel in `out` afterwards.
  """
  os.makedirs(out, exist_ok=True)
  queue = [r for r in (roots if roots is not None else runtime_requirements()) if requirement_name(r) not in have]
  seen: Set[str] = set(have)
  while queue:
    todo = []
    for requirement in queue:
      name = requirement_name(requirement)
      if name not in seen:
        seen.add(name)
        todo.append(requirement)
    present = {wheel_name(w) for w in os.listdir(out) if w.endswith(".whl")}
    fetch([r for r in todo if requirement_name(r) not in present], out, python_version, pip_args)
    wheels = {wheel_name(w): os.path.join(out, w) for w in os.listdir(out) if w.endswith(".whl")}
    queue = []
    for requirement in todo:
      name = requirement_name(requirement)
      if name not in wheels:
        raise RuntimeError(f"pip reported success for {requirement!r} but {out} holds no wheel named {name}.")
      queue += [r for r in wheel_requirements(wheels[name], python_version) if requirement_name(r) not in seen]
  duplicates = {}
  for w in os.listdir(out):
    if w.endswith(".whl"):
      duplicates.setdefault(wheel_name(w), []).append(w)
  bad = unusable_wheels(out, python_version)
  if bad:  # Found here, not by a failed install on the GPU machine after its time is spent.
    raise RuntimeError(f"{out} holds wheels that CPython {python_version} on manylinux x86-64 cannot install: {bad} "
                       "(built here for this machine's Python, where only a source archive with compiled code is "
                       "published, or left by an earlier run for another --python_version). Remove them (or the "
                       "folder) and run again; a compiled package must come as a wheel for the target.")
  several = {name: files for name, files in duplicates.items() if len(files) > 1}
  if several:
    raise RuntimeError(f"{out} holds several versions of {sorted(several)}: {several}; one install would fail. "
                       "Remove the folder and run again.")
  return {w: os.path.getsize(os.path.join(out, w)) for w in sorted(os.listdir(out)) if w.endswith(".whl")}


def tracked_bytes() -> int:
  """Bytes of the repository's tracked files (what travels besides the wheels); 0 outside a git checkout."""
  try:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=common.REPO, capture_output=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return 0
  total = 0
  for name in files.decode().split("\0"):
    path = os.path.join(common.REPO, name)
    if name and os.path.isfile(path):
      total += os.path.getsize(path)
  return total


def command(out: str) -> str:
  rel = os.path.relpath(os.path.abspath(out), common.REPO)
  return (f"python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site {rel}/*.whl && "
          f"PYTHONPATH=/tmp/site PYTHON=python3 bash experiments/benchmarks/gpu.sh \"${{OUT:-/tmp/gpu_bench}}\"")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, int]:
  p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.gpu_prepare", description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.path.join(common.REPO, ".whl"),
                 help="Folder of the wheels (ignored by git; name it where the working tree is copied).")
  p.add_argument("--have", default=DEFAULT_HAVE, help="Packages the GPU machine already has (see above).")
  p.add_argument("--python_version", default="3.12", help="The GPU machine's Python (major.minor).")
  p.add_argument("--limit_mb", type=float, default=64.0, help="Most MiB the wheels and tracked files may take.")
  p.add_argument("--find_links", default="", help="Fetch from this folder of wheels (with --no_index: only there).")
  p.add_argument("--no_index", action="store_true", help="Do not use the package index.")
  args = p.parse_args(argv)
  if not re.fullmatch(r"3\.\d+", args.python_version):
    raise SystemExit(f"--python_version={args.python_version!r}: expected major.minor, e.g. 3.12.")
  pip_args = (["--find-links", args.find_links] if args.find_links else []) + (["--no-index"] if args.no_index else [])
  have = read_have(args.have)
  try:
    wheels = prepare(args.out, have, args.python_version, pip_args)
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  repo = tracked_bytes()
  total = sum(wheels.values()) + repo
  for name, size in wheels.items():
    print(f"  {size / 2**20:7.2f} MiB  {name}")
  print(f"wheels {sum(wheels.values()) / 2**20:.1f} MiB + tracked files {repo / 2**20:.1f} MiB = "
        f"{total / 2**20:.1f} MiB (limit {args.limit_mb:.0f} MiB)")
  if total > args.limit_mb * 2**20:
    largest = sorted(wheels.items(), key=lambda kv: -kv[1])[:3]
    raise SystemExit(f"too large to travel: {total / 2**20:.1f} MiB > --limit_mb={args.limit_mb:.0f}; largest "
                     f"wheels: {[f'{n} ({s / 2**20:.1f} MiB)' for n, s in largest]}.")
  print("On the GPU machine, in the repository's root:\n  " + command(args.out))
  if os.path.relpath(os.path.abspath(args.out), common.REPO).startswith(".."):
    print(f"note: --out={args.out} lies outside the repository: copy it to the machine yourself and adjust the "
          "wheels' path in that command.")
  else:
    print(f"({os.path.relpath(os.path.abspath(args.out), common.REPO)}/ is ignored by git: name it among the paths "
          "that travel with the working tree.)")
  return wheels


if __name__ == "__main__":
  main(sys.argv[1:])
