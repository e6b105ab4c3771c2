"""Sharded training on fake CPU devices; each check runs in a subprocess so XLA_FLAGS can give it
8 (or 2) devices before JAX starts, while the rest of the suite keeps one."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from famjax.model import sharding
from famjax.model.config import MeshConfig
from famjax.model.sharding import RULES, mesh_shape

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]

# Golden specs, one per parameter kind (axis names from RULES), trailing unsharded axes dropped;
# blocks stacked in a segment have a leading, unsplit "layers" axis.
GOLDEN = {
    "embed/embedding": "('model', 'fsdp')",
    "attn/query/kernel": "('fsdp', 'model')", "attn/key/kernel": "('fsdp', 'model')",
    "attn/value/kernel": "('fsdp', 'model')", "attn/out/kernel": "('model', None, 'fsdp')",
    "mlp/gate/kernel": "('fsdp', 'model')", "mlp/up/kernel": "('fsdp', 'model')",
    "mlp/down/kernel": "('model', 'fsdp')",
    "norm/scale": "()", "attn_norm/scale": "()", "mlp_norm/scale": "()",
    "unembed/kernel": "('fsdp', 'model')",
}


def fake_devices_env(n):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
             PYTHONPATH=str(ROOT))
  return env


def canonical(spec: str) -> str:
  """'P(None, 'model', None)' -> "(None, 'model')"."""
  inner = spec[spec.index("(") + 1: spec.rindex(")")]
  parts = [p.strip() for p in inner.split(",") if p.strip()]
  while parts and parts[-1] == "None":
    parts.pop()
  return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("multidevice")
  script = str(ROOT / "tests" / "support" / "multidevice_checks.py")
  out = subprocess.run([sys.executable, script, str(workdir)], capture_output=True, text=True,
                       env=fake_devices_env(8), timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def golden_for(path: str) -> str:
  key = next(k for k in sorted(GOLDEN, key=len, reverse=True) if path.endswith(k))
  if path.startswith("segments/"):
    return canonical("(None, " + GOLDEN[key][1:]) if GOLDEN[key] != "()" else "()"
  return GOLDEN[key]


@pytest.mark.slow
def test_every_parameter_follows_the_rules_table(checks):
  specs = checks["param_specs"]["(2, 1, 4)"]
  assert len(specs) == 52  # 3 segments and 2 private blocks of 9, 3 norms, 3 heads, embedding
  for path, spec in specs.items():
    assert canonical(spec) == golden_for(path), path


MESHES = ["(8, 1, 1)", "(1, 1, 8)", "(2, 1, 4)", "(1, 8, 1)", "(2, 2, 2)"]


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
def test_optimizer_state_follows_its_parameters(checks, shape):
  params = checks["param_specs"][shape]
  for moment in ("mu_specs", "nu_specs"):
    assert checks[moment][shape].keys() == params.keys()
    for path, spec in checks[moment][shape].items():
      assert canonical(spec) == canonical(params[path]), (moment, path)
  if shape == "(1, 1, 8)":
    assert any("'model'" in spec for spec in params.values())


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
def test_one_step_matches_one_device(checks, shape):
  """float32 reductions split across devices add in another order: a few ulps (1e-6 relative on a
  loss of ~6) is the expected difference. Adam's first step moves every parameter by about the
  learning rate (1e-2) whatever its gradient's size, so parameters with tiny gradients amplify
  those ulps to ~4e-5; a structural error would move them by a whole step."""
  step = checks["step"][shape]
  assert checks["moved"] > 1e-4  # the step changed every parameter on one device
  assert step["loss"] == pytest.approx(step["ref_loss"], rel=1e-6)
  assert step["max_param_diff"] < 1e-3


@pytest.mark.slow
def test_checkpoint_moves_between_meshes(checks):
  """3 steps under fsdp, 3 on (data 2, model 4), 3 under fsdp, the last 3 on 1 device == one
  uninterrupted run."""
  assert checks["legs"] == list(range(2, 13, 2))
  resume = checks["resume"]
  for a, b in zip(resume["moved"] + resume["moved_train"],
                  resume["straight"] + resume["straight_train"]):
    assert a == pytest.approx(b, rel=1e-5)
  assert resume["max_param_diff"] < 1e-3  # 12 Adam steps of 1e-2, see the test above


@pytest.mark.slow
def test_decoding_on_a_mesh_equals_one_device(checks):
  decoded = checks["decode"]
  assert decoded["mesh"] == decoded["one"] and decoded["max_logit_diff"] < 1e-4


@pytest.mark.slow
def test_grouped_query_heads_split_over_the_model_axis(checks):
  gqa = checks["gqa"]
  assert "'model'" in gqa["key_kernel"] and "'model'" in gqa["key_bias"]
  assert "'model'" in gqa["cache"] and gqa["cache_heads"] == 4
  assert gqa["same_tokens"] and gqa["max_logit_diff"] < 1e-4


def test_key_value_heads_must_split_evenly_over_the_model_axis():
  mesh = types.SimpleNamespace(axis_names=("data", "fsdp", "model"), devices=np.empty((1, 1, 4)))
  cfg = tiny_model(d_model=32, n_heads=8, n_kv_heads=2, vocab_size=264)
  with pytest.raises(ValueError, match=r"model.n_kv_heads \(0: n_heads\)=2 must be divisible "
                     r"by mesh.model=4"):
    sharding.check_fits_mesh(cfg, 8, mesh)
  sharding.check_fits_mesh(dataclasses.replace(cfg, n_kv_heads=4), 8, mesh)


@pytest.mark.slow
def test_fsdp_splits_parameters_and_optimizer_state(checks):
  """Per device: within 1.1x of the total over 8 (norm scales and step counters are whole)."""
  per_device, total = checks["fsdp_bytes"]["per_device"], checks["fsdp_bytes"]["total"]
  assert per_device <= 1.1 * total / 8


def test_mesh_shape_resolution():
  assert mesh_shape(MeshConfig(data=-1, model=4), 8) == (2, 1, 4)
  assert mesh_shape(MeshConfig(data=2, model=-1), 8) == (2, 1, 4)
  assert mesh_shape(MeshConfig(data=1, fsdp=-1), 8) == (1, 8, 1)
  with pytest.raises(ValueError, match="mesh.data \\* mesh.fsdp \\* mesh.model must equal the 8"):
    mesh_shape(MeshConfig(data=3, model=1), 8)
  assert dict(RULES)["vocab"] == "model" and dict(RULES)["batch"] == ("data", "fsdp")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cli(workdir, corpus, *extra):
  return [sys.executable, "-m", "experiments.train", "--config=tiny",
          f"--workdir={workdir}", f"--config.data.corpus={corpus}",
          "--config.data.val_fraction=0.1",
          "--config.model.d_model=32", "--config.model.n_heads=4", "--config.model.d_ff=64",
          "--config.train.steps=6", "--config.train.warmup_steps=1", "--config.train.seq_len=32",
          "--config.train.batch_size=8", "--config.train.eval_batches=1",
          "--config.train.checkpoint_every=3", "--config.train.progress=False", *extra]


@pytest.mark.slow
def test_two_processes_match_one(corpus_dir, tmp_path):
  """jax.distributed over localhost (CPU collectives), one device per process, == one process
  with two devices."""
  single = subprocess.run(cli(tmp_path / "single", corpus_dir), cwd=ROOT, capture_output=True,
                          text=True, env=fake_devices_env(2), timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  address = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(cli(tmp_path / "multi", corpus_dir, f"--coordinator_address={address}",
                                "--num_processes=2", f"--process_id={i}"),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a = json.loads((tmp_path / "single" / "summary.json").read_text())
  b = json.loads((tmp_path / "multi" / "summary.json").read_text())
  assert b["step"] == a["step"] == 6
  for x, y in zip(a["val_loss"] + a["train_loss"], b["val_loss"] + b["train_loss"]):
    assert x == pytest.approx(y, rel=1e-5)
  assert (tmp_path / "multi" / "checkpoints" / "6").exists()
