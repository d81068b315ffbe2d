"""One process of a multi-process CPU run (tests/test_checkpoint.py starts two of these, with the
workdir on the GCS emulator).

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT CONFIG_JSON WORKDIR

Each process has 2 fake CPU devices; the processes join through jax.distributed on 127.0.0.1:PORT
with gloo collectives, so the run's mesh spans all processes' devices. CONFIG_JSON is a run
config written with `config.to_json()`.
"""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402


def main() -> None:
  process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
  config_json, workdir = sys.argv[4:6]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id)
  from cnllama_jax import trainer  # pylint: disable=import-outside-toplevel
  with open(config_json, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  print(f"process {process_id}: {jax.local_device_count()} of {jax.device_count()} devices",
        flush=True)
  result = trainer.train(config, workdir)
  print(f"process {process_id}: finished, preempted={result['preempted']}", flush=True)


if __name__ == "__main__":
  main()
