r"""One process of a local multi-host basis-training job (run by tests/test_multihost.py, one process per host).

  python tests/multihost_worker.py --process_id=0 --num_processes=2 --port=PORT --workdir=DIR --out=OUT.npz \
      --overrides='{"train.num_steps": 4, "mesh.data": 4, "mesh.model": 2}'

Joins `--num_processes` processes on this machine through a coordinator at 127.0.0.1:PORT (CPU collectives over
gloo), runs `train.train_and_evaluate` on `configs/train_basis_tiny.py` with the overrides, and process 0 writes the
final trainable parameters (gathered from every host), the last train metrics, the held-out metrics, the timing
and which process holds each mesh device to `--out` (npz: `params/<path>`, `train/<name>`, `eval/<name>`,
`timing/<name>`, `info/<name>`). `--num_processes=1` runs the same job in one process without
`jax.distributed` (the reference). The number of devices per process comes from the caller's XLA_FLAGS
(`--xla_force_host_platform_device_count=N`), which must be set before JAX starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # Run as a script: the repository's packages and configs.
  sys.path.insert(0, REPO)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--process_id", type=int, default=0, help="This process's index in the job.")
  parser.add_argument("--num_processes", type=int, default=1, help="Processes in the job (1: no jax.distributed).")
  parser.add_argument("--port", type=int, default=0, help="Coordinator port on 127.0.0.1 (num_processes > 1).")
  parser.add_argument("--workdir", required=True, help="The job's workdir, shared by every process.")
  parser.add_argument("--out", required=True, help="Where process 0 writes the results (.npz).")
  parser.add_argument("--overrides", default="{}", help="JSON {flat config field: value} over train_basis_tiny.")
  parser.add_argument("--timeout_s", type=int, default=60, help="How long to wait for the other processes.")
  return parser.parse_args(argv)


def flatten(tree, prefix: str) -> dict:
  """{"prefix/a/b": array} for a nested dict of arrays."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}/{name}"))
    else:
      out[f"{prefix}/{name}"] = np.asarray(value)
  return out


def main(argv=None) -> None:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top

  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=args.timeout_s)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  from configs import train_basis_tiny  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import train  # pylint: disable=g-import-not-at-top

  config = train_basis_tiny.get_config()
  config.update_from_flattened_dict(json.loads(args.overrides))
  result = train.train_and_evaluate(config, args.workdir)
  mesh = mesh_lib.mesh_from_config(config.mesh)  # The job's mesh (the same devices in the same order).
  # Every host takes part in the gather; only process 0 writes.
  params = multihost_utils.process_allgather(result.state["params"], tiled=True)
  if jax.process_index() == 0:
    import numpy as np  # pylint: disable=g-import-not-at-top
    arrays = {
        **flatten(params, "params"),
        **flatten(result.train_metrics, "train"),
        **flatten(result.eval_metrics, "eval"),
        "info/devices":
            np.asarray([jax.process_count(), jax.device_count(),
                        jax.local_device_count()]),
        "info/step":
            np.asarray(result.step),
        # Which process holds each device of the mesh: [data, fsdp, model].
        "info/mesh_process":
            np.vectorize(lambda d: d.process_index)(mesh.devices),
        **{
            f"timing/{name}": np.asarray(value) for name, value in result.timing.items()
        }
    }
    tmp = args.out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, args.out)  # Complete or absent.
  if args.num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
