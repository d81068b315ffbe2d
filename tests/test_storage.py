"""Every path may be gs://: inputs, outputs and checkpoints against a GCS emulator on loopback
(the `gcs` fixture in conftest.py; no network)."""
import os
import re

import numpy as np
import pytest

import cnllama_jax
from cnllama_jax import paths, storage_retries, tensor_files
from tests import hf_models


def _upload(local: str, url: str) -> str:
  paths.copy_tree(local, url)
  return url


def _leaves(params) -> dict:
  import jax
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


# --- the path layer ------------------------------------------------------------------------------

def test_read_into_reads_exactly_the_byte_range_locally_and_from_a_bucket(gcs, tmp_path):
  data = np.arange(1000, dtype=np.uint8).tobytes()
  (tmp_path / "f").write_bytes(data)
  url = gcs.bucket() + "/dir/f"
  paths.write_bytes(url, data)
  for where in (str(tmp_path / "f"), url):
    assert paths.size(where) == 1000
    assert paths.read_range(where, 10, 5) == data[10:15]
    with pytest.raises(ValueError, match="truncated"):
      paths.read_range(where, 990, 20)


def test_missing_bucket_and_missing_object_are_one_line_errors_naming_the_url(gcs):
  bucket = gcs.bucket()
  with pytest.raises(FileNotFoundError) as err:
    paths.read_text("gs://no-such-bucket-x/config.json")
  assert str(err.value).startswith("gs://no-such-bucket-x/config.json: bucket gs://no-such-bucket-x "
                                   "does not exist")
  assert "\n" not in str(err.value)
  with pytest.raises(FileNotFoundError, match=f"^{bucket}/nothing: no such file") as err:
    paths.read_text(f"{bucket}/nothing")
  assert "\n" not in str(err.value)


def test_publish_dir_on_a_bucket_is_marked_incomplete_until_done_and_refuses_to_overwrite(gcs):
  out = gcs.bucket() + "/export"
  with pytest.raises(RuntimeError, match="crash"):
    with paths.publish_dir(out) as tmp:
      paths.write_text(paths.join(tmp, "a.txt"), "a")
      raise RuntimeError("crash")
  with pytest.raises(ValueError, match=f"^{out}: incomplete"):
    paths.check_complete(out)
  with paths.publish_dir(out, overwrite=True) as tmp:
    paths.write_text(paths.join(tmp, "b.txt"), "b")
  paths.check_complete(out)
  assert paths.listdir(out) == ["b.txt"]
  with pytest.raises(FileExistsError, match=f"^{out}: already exists and is not empty"):
    with paths.publish_dir(out) as tmp:
      pass
  assert paths.read_text(paths.join(out, "b.txt")) == "b"


def test_storage_retries_parse_from_the_environment_format_and_reach_both_clients():
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
  assert storage_retries.Retries.parse("max_retries=2, initial_delay_s=0.5") == storage_retries.Retries(
      max_retries=2, initial_delay_s=0.5)
  for bad in ("retries=2", "max_retries=two", "max_delay_s=-1"):
    with pytest.raises(ValueError, match=f"^{storage_retries.RETRIES_ENV}=.*bad item") as err:
      storage_retries.Retries.parse(bad)
    assert "\n" not in str(err.value)
  before = storage_retries.configure_retries()
  try:
    storage_retries.configure_retries(storage_retries.Retries(max_retries=2, initial_delay_s=0.5, max_delay_s=3))
    spec = ts_utils.get_ts_context(use_ocdbt=True).spec.to_json()
    assert spec["gcs_request_retries"] == {"max_retries": 2, "initial_delay": "500ms",
                                           "max_delay": "3s"}
  finally:
    storage_retries.configure_retries(before)


_TENSORSTORE_READ = """
import sys
sys.path.insert(0, sys.argv[1])
from cnllama_jax import storage_retries
storage_retries.configure_retries(storage_retries.Retries(max_retries=0, stall_timeout_s=1))
import tensorstore as ts
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
spec = {"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": sys.argv[2], "path": "a/"}}
try:
  ts.open(spec, context=ts_utils.get_ts_context(use_ocdbt=False)).result()
except Exception as err:  # what Orbax would raise
  print("ERROR", " ".join(str(err).split()))
"""


def test_a_store_that_stops_answering_fails_requests_after_the_stall_timeout(gcs):
  """The emulator frozen (SIGSTOP: connections are accepted, nothing is answered), as a bucket
  that hangs: a read through `paths` (gcsfs) fails with a one-line StorageError naming the URL
  after the stall timeout instead of never, and so does a tensorstore (Orbax array) read, in a
  fresh process since tensorstore reads curl's limits once."""
  import signal
  import subprocess
  import sys
  import time
  url = f"{gcs.bucket()}/hang.txt"
  paths.write_text(url, "x")
  env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORSTORE_CURL_")}
  before = storage_retries.configure_retries()
  storage_retries.configure_retries(storage_retries.Retries(max_retries=0, stall_timeout_s=1))
  os.kill(gcs.process.pid, signal.SIGSTOP)
  try:
    start = time.monotonic()
    with pytest.raises(paths.StorageError) as err:
      paths.read_text(url)
    seconds = time.monotonic() - start
    tensorstore = subprocess.run(
        [sys.executable, "-c", _TENSORSTORE_READ, os.path.dirname(os.path.dirname(__file__)),
         url.split("/")[2]], env=env, capture_output=True, text=True, timeout=120)
  finally:
    os.kill(gcs.process.pid, signal.SIGCONT)
    storage_retries.configure_retries(before)
  message = str(err.value)
  assert "\n" not in message and message.startswith(url) and "1 s without a byte" in message
  assert seconds < 10, f"{seconds:.1f} s"
  assert "ERROR" in tensorstore.stdout and "too slow" in tensorstore.stdout, (
      tensorstore.stdout + tensorstore.stderr[-500:])
  assert paths.read_text(url) == "x"  # the store answers again once it does


# --- the base model from a bucket ----------------------------------------------------------------

@pytest.mark.parametrize("layout", ["sharded", "bin-sharded"])
def test_load_hf_from_a_bucket_equals_the_local_load_bitwise(gcs, tmp_path, layout):
  import jax
  from jax.sharding import Mesh
  model = hf_models.make_hf_llama(seed=11, num_key_value_heads=2)
  local = hf_models.save(model, str(tmp_path / layout), layout)
  url = _upload(local, gcs.bucket() + "/base")
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  cfg_local, local_params = cnllama_jax.load_hf(local, mesh=mesh)
  cfg_gcs, gcs_params = cnllama_jax.load_hf(url, mesh=mesh)
  assert cfg_local == cfg_gcs
  ours, theirs = _leaves(local_params), _leaves(gcs_params)
  assert sorted(ours) == sorted(theirs)
  for key, value in ours.items():
    assert value.dtype == theirs[key].dtype and np.array_equal(value, theirs[key]), key


def test_import_reads_each_byte_of_the_weights_at_most_once_with_ranged_reads(gcs, tmp_path,
                                                                               monkeypatch):
  model = hf_models.make_hf_llama(seed=12)
  local = hf_models.save(model, str(tmp_path / "m"), "sharded")
  url = _upload(local, gcs.bucket() + "/base")
  weights = [n for n in paths.listdir(url) if n.endswith(".safetensors")]
  total = sum(paths.size(paths.join(url, n)) for n in weights)
  largest = max(paths.size(paths.join(url, n)) for n in weights)
  reads = []
  real = paths.read_into

  def counting(where, offset, out):
    reads.append((where, out.nbytes))
    return real(where, offset, out)

  monkeypatch.setattr(paths, "read_into", counting)
  cnllama_jax.load_hf(url)
  data = [n for w, n in reads if w.endswith(".safetensors")]
  assert all(w.startswith(url) for w, _ in reads)
  assert sum(data) <= total  # every tensor once (headers included), no full downloads
  assert max(data) < largest  # never a whole shard in one read
  assert len(weights) > 2


def test_a_base_dir_without_config_json_is_a_one_line_error_naming_the_url(gcs, tmp_path):
  model = hf_models.make_hf_llama(seed=13)
  local = hf_models.save(model, str(tmp_path / "m"), "safetensors")
  os.remove(os.path.join(local, "config.json"))
  url = _upload(local, gcs.bucket() + "/base")
  with pytest.raises(FileNotFoundError, match=f"^{url}/config.json: no config.json") as err:
    cnllama_jax.load_hf(url)
  assert "\n" not in str(err.value)
  with pytest.raises(FileNotFoundError, match="^gs://missing-bucket-y/base/config.json: bucket"):
    cnllama_jax.load_hf("gs://missing-bucket-y/base")


def test_weight_source_reads_column_slices_of_bf16_and_bin_tensors(tmp_path):
  import torch
  model = hf_models.make_hf_llama(seed=14).to(torch.bfloat16)
  for layout in ("safetensors", "bin"):
    source = tensor_files.open_weights(hf_models.save(model, str(tmp_path / layout), layout))
    key = "model.layers.1.mlp.down_proj.weight"  # [hidden, intermediate]
    full = model.state_dict()[key].float().numpy()
    out = np.empty((10, 30), np.float32)
    source.read_into(key, (slice(5, 15), slice(100, 130)), out)
    assert np.array_equal(out, full[5:15, 100:130]), layout


# --- exports to a bucket -------------------------------------------------------------------------

def _max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def test_hf_and_peft_exports_to_a_bucket_load_in_transformers_and_peft(gcs, tmp_path):
  import jax
  import peft
  import transformers
  from cnllama_jax import adapters, export, lora as lora_lib
  model = hf_models.make_hf_llama(seed=21, num_key_value_heads=2)
  cfg, params = cnllama_jax.load_hf(hf_models.save(model, str(tmp_path / "base"), "safetensors"))
  bucket = gcs.bucket()
  ids = np.random.default_rng(0).integers(0, 99, size=(2, 9)).astype(np.int32)

  export.save_hf(cfg, params, f"{bucket}/hf", max_shard_bytes=60_000)
  assert paths.exists(f"{bucket}/hf/model.safetensors.index.json")
  assert not paths.exists(f"{bucket}/hf/{paths.INCOMPLETE}")
  paths.copy_tree(f"{bucket}/hf", str(tmp_path / "hf"))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
  assert _max_diff(cnllama_jax.logits(cfg, params, ids), hf_models.hf_logits(loaded, ids)) <= 1e-4

  lora = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
  tree = lora_lib.init_adapters(cfg, lora, jax.random.key(0))
  tree = jax.tree_util.tree_map_with_path(
      lambda p, x: 0.05 * jax.random.normal(jax.random.key(1), x.shape)
      if p[-1].key == "lora_b" else x, tree)
  with_lora = lora_lib.combine(params, tree)
  adapters.save_peft(cfg, with_lora, lora, f"{bucket}/peft", modules_to_save=())
  paths.copy_tree(f"{bucket}/peft", str(tmp_path / "peft"))
  peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path / "peft")).eval()
  assert _max_diff(cnllama_jax.logits(cfg, with_lora, ids, lora=lora),
                   hf_models.hf_logits(peft_model, ids)) <= 1e-4
  assert adapters.load_peft(f"{bucket}/peft")[0] == lora  # and read back from the bucket


def test_export_over_an_existing_one_on_a_bucket_is_refused_and_keeps_it(gcs, tmp_path):
  from cnllama_jax import export
  model = hf_models.make_hf_llama(seed=22)
  cfg, params = cnllama_jax.load_hf(hf_models.save(model, str(tmp_path / "base"), "safetensors"))
  out = gcs.bucket() + "/hf"
  export.save_hf(cfg, params, out)
  before = {n: paths.read_bytes(paths.join(out, n)) for n in paths.listdir(out)}
  with pytest.raises(FileExistsError, match=f"^{out}: already exists and is not empty") as err:
    export.save_hf(cfg, params, out, dtype="bfloat16")
  assert "\n" not in str(err.value)
  assert {n: paths.read_bytes(paths.join(out, n)) for n in paths.listdir(out)} == before


# --- training with the workdir on a bucket -------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "tests", "checkpoint_config.py")


def _losses(workdir) -> dict[int, float]:
  import json
  from cnllama_jax import writers
  text = paths.read_text(paths.join(workdir, writers.HISTORY))
  return {row["step"]: row["loss"] for row in map(json.loads, text.splitlines())}


@pytest.fixture(scope="module")
def tiny_run():
  """The run of tests/checkpoint_config.py (12 steps, a checkpoint every 3), built once: the tests
  below share its init and its compiled step (`_fit` gives each a fresh copy of the state)."""
  from cnllama_jax import build, plan as plan_lib
  from tests import checkpoint_config
  return build.build(plan_lib.plan(checkpoint_config.get_config()))


def _fit(run, workdir: str) -> dict:
  """trainer.train's story on a built run: workdir, data, writers, fit from step 0 or resumed."""
  import contextlib
  import dataclasses
  import jax
  import jax.numpy as jnp
  from cnllama_jax import run_data, trainer, writers
  plan = run.plan
  fresh = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=plan.state_shardings)
  run = dataclasses.replace(run, state=fresh(run.state))  # fit donates the state it steps
  trainer.prepare_workdir(workdir, plan.config)
  data = run_data.datasets(plan.data, plan.cfg.vocab_size, workdir)
  with contextlib.closing(writers.for_run(workdir, plan.config.train.steps, progress=False)) as w:
    return trainer.fit(run, data, workdir, w)


def test_sigkill_with_the_workdir_on_a_bucket_then_resume_gives_identical_losses(gcs, tiny_run):
  import signal
  import subprocess
  import sys
  from cnllama_jax import checkpoint
  bucket = gcs.bucket()
  reference = f"{bucket}/reference"
  _fit(tiny_run, reference)
  assert paths.exists(f"{reference}/config.json") and paths.exists(f"{reference}/metrics.json")
  assert any(n.startswith("events.out") for n in paths.listdir(f"{reference}/tensorboard"))
  workdir = f"{bucket}/killed"
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "launch", "train.py"), f"--config={CONFIG}",
       f"--workdir={workdir}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      cwd=REPO)
  for line in proc.stdout:  # past the checkpoint of step 6
    if line.startswith("step 8/"):
      break
  proc.kill()
  _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, err[-2000:]
  saved = sorted(int(n) for n in paths.listdir(f"{workdir}/{checkpoint.SUBDIR}") if n.isdigit())
  assert saved and max(saved) < 12
  _fit(tiny_run, workdir)  # resumes
  assert _losses(workdir) == _losses(reference)
  assert not os.path.exists(os.path.join(REPO, "gs:"))  # nothing went to a local folder 'gs:'


def test_a_workdir_in_a_missing_bucket_is_a_one_line_error(gcs):
  from cnllama_jax import checkpoint, trainer
  from tests import checkpoint_config
  with pytest.raises(checkpoint.CheckpointError,
                     match="^gs://no-such-bucket-z/run: bucket gs://no-such-bucket-z does not "
                           "exist") as err:
    trainer.train(checkpoint_config.get_config(), "gs://no-such-bucket-z/run")
  assert "\n" not in str(err.value)
  assert not paths.exists("gs://no-such-bucket-z")


def test_the_store_dying_during_an_async_save_stops_the_run_with_one_line_and_keeps_the_last_one(
    gcs, tiny_run, monkeypatch):
  """The emulator is killed as checkpoint 6's first array is written in the background (its
  directories exist by then): the run stops within the (configured, bounded) retries with a
  one-line error naming a URL in the workdir, and once the store is back, checkpoint 3 restores
  (its checksums verified)."""
  import json
  import time
  from orbax.checkpoint._src.serialization import serialization
  from cnllama_jax import checkpoint
  workdir = f"{gcs.bucket()}/run"
  real_write = serialization.async_serialize_from_host
  killed = []

  async def kill_the_store_then_write(rslices, tensorstore_spec, **kwargs):
    if not killed and "checkpoints/6/" in json.dumps(tensorstore_spec):
      gcs.kill()
      killed.append(time.monotonic())
    return await real_write(rslices, tensorstore_spec, **kwargs)

  monkeypatch.setattr(serialization, "async_serialize_from_host", kill_the_store_then_write)
  before = storage_retries.configure_retries()
  storage_retries.configure_retries(storage_retries.Retries(max_retries=1, initial_delay_s=0.05, max_delay_s=0.1))
  try:
    with pytest.raises((OSError, checkpoint.CheckpointError)) as err:
      _fit(tiny_run, workdir)
    seconds = time.monotonic() - killed[0]
  finally:
    gcs.kill()
    gcs.start()
    storage_retries.configure_retries(before)
  message = str(err.value)
  assert "\n" not in message and re.search(rf"(^|: |in ){re.escape(workdir)}/\S+", message), message
  assert seconds < 30, f"stopped {seconds:.0f} s after the store died: {message}"  # no retry storm
  monkeypatch.undo()
  restorer = checkpoint.Checkpoints(workdir, tiny_run.plan, tiny_run.frozen, tiny_run.base_source)
  try:
    assert int(restorer.restore().step) == 3
  finally:
    restorer.close()
