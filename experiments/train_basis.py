r"""Offline phase entry point: trains the K basis policies of a config and checkpoints them in --workdir.

  python -m experiments.train_basis --config=configs/train_basis_tiny.py --workdir=workdir/train_basis_tiny \
      [--config.FIELD=VALUE ...]

Running the same command again resumes from the newest good checkpoint in --workdir (bitwise: the data order and
the RNG are part of the checkpoint). SIGTERM (or a first Ctrl-C) saves a checkpoint and exits with status 143;
restart to go on.
Writes: config.json, metrics.jsonl, training_curves.png, tensorboard/ (with tensorboardX), checkpoints/<step>/.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from spectral_soup.utils import cli
from spectral_soup.utils import logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/train_basis_*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics (resumed if it has some).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host (TPU pod slice, multi-node GPU): call jax.distributed.initialize() first, so "
    "that every host joins one job over all global devices (launch/tpu.py sets it on multi-host slices).")
_SHOW_CONFIG = flags.DEFINE_bool(
    "show_config", False, "Print every field of --config with its value and comment, "
    "and exit (no --workdir needed).")
flags.mark_flags_as_required(["config"])  # --workdir is checked in main (not needed by --show_config).

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "stopped early, checkpoint saved; run me again".


def main(argv) -> None:
  del argv
  if _SHOW_CONFIG.value:
    print(cli.describe_config(_CONFIG.value, config_flags.get_config_filename(flags.FLAGS["config"])))
    return
  logs.quiet_orbax()
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()  # Coordinator and process ids from the TPU / cluster environment.
  from spectral_soup.offline import config_checks  # Imported here so that --help and flag errors skip JAX start-up.
  from spectral_soup.offline import resume  # Imported here so that --help and flag errors skip JAX start-up.
  from spectral_soup.offline import train  # Imported here so that --help and flag errors skip JAX start-up.

  config = _CONFIG.value
  with cli.input_checks():  # Fails fast, naming the field, before any compile: one line, exit status 2.
    config_checks.validate_config(config)
    cli.check_workdir(_WORKDIR.value)
    resume.check_not_main_job_workdir(_WORKDIR.value)  # Its bases live in <workdir>/basis, read by load_basis.
  with cli.reporting_input_errors():  # Model path, data, resume and workdir-lock errors: one line too.
    result = train.train_and_evaluate(config, _WORKDIR.value)
  if result.eval_metrics:
    accuracy = " ".join(f"{a:.3f}" for a in result.eval_metrics["accuracy"])
    print(f"Step {result.step}: held-out accuracy per basis {accuracy}.")
  print("Timing: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timing.items()))
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    from spectral_soup import basis as basis_lib  # pylint: disable=g-import-not-at-top
    from spectral_soup.eval import plots  # pylint: disable=g-import-not-at-top
    from spectral_soup.offline import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    if os.path.exists(os.path.join(_WORKDIR.value, metrics_lib.FILENAME)):
      print(f"Training curves: {plots.training_curves(_WORKDIR.value, basis_lib.basis_names(_WORKDIR.value, config))}")
    else:  # Stopped (preempted) before its first logged step: a plot of nothing; the exit status must stay 143.
      print(f"Training curves: none yet (no step logged to {metrics_lib.FILENAME}).")
  if result.preempted:
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
