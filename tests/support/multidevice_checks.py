"""Run in a subprocess with 8 fake CPU devices (XLA_FLAGS set before JAX starts); prints JSON.

Called by tests/model/test_sharding.py so the rest of the suite keeps one fast device.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
from famjax.data.config import DataConfig
from famjax.decode import decoder
from famjax.model import sharding
from famjax.model.config import MeshConfig
from famjax.train import checkpoint, loop, step
from famjax.train.config import ExperimentConfig, TrainConfig

from conftest import tiny_model, write_corpus  # noqa: E402


def specs(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): str(leaf.sharding.spec)
          for path, leaf in flat}


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _train_records(workdir: Path) -> list[dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if "train_loss" in r]


def main(workdir: Path):
  assert jax.device_count() == 8, jax.device_count()
  corpus = write_corpus(workdir / "corpus")
  cfg = ExperimentConfig(
      model=tiny_model(d_model=32, n_heads=8, exit_head="block", unembed="per_exit",
                       vocab_size=264),
      data=DataConfig(corpus=str(corpus), val_fraction=0.1),
      # no warmup: the first step's learning rate is not zero, so the parameters move
      train=TrainConfig(batch_size=8, seq_len=32, steps=12, learning_rate=1e-2, warmup_steps=0,
                        log_every=2, eval_every=6, eval_batches=1, checkpoint_every=3,
                        progress=False))
  one = sharding.make_mesh(MeshConfig(data=1, model=1), devices=jax.devices()[:1])
  meshes = {shape: sharding.make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], model=shape[2]))
            for shape in ((8, 1, 1), (1, 1, 8), (2, 1, 4), (1, 8, 1), (2, 2, 2))}
  batch = np.random.default_rng(0).integers(0, 259, (8, 33), dtype=np.int32)
  out = {"step": {}}

  reference = loop.Trainer.create(cfg, one)
  initial = leaves(reference.params)
  ref_loss = float(reference.step(batch)["loss"])
  ref_params = leaves(reference.params)
  out["moved"] = min(float(np.max(np.abs(a - b))) for a, b in zip(ref_params, initial))
  out["param_specs"], out["mu_specs"], out["nu_specs"] = {}, {}, {}
  for shape, mesh in meshes.items():
    trainer = loop.Trainer.create(cfg, mesh)
    adam = trainer.opt_state[1].inner_state[0]
    out["param_specs"][str(shape)] = specs(trainer.params)
    out["mu_specs"][str(shape)], out["nu_specs"][str(shape)] = specs(adam.mu), specs(adam.nu)
    loss = float(trainer.step(batch)["loss"])
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(leaves(trainer.params), ref_params)]
    out["step"][str(shape)] = {"loss": loss, "ref_loss": ref_loss, "max_param_diff": max(diffs)}

  fsdp = loop.Trainer.create(cfg, meshes[(1, 8, 1)])
  leaves_of = lambda t: jax.tree.leaves((t.params, t.opt_state))
  out["fsdp_bytes"] = {
      "per_device": sum(x.addressable_shards[0].data.nbytes for x in leaves_of(fsdp)),
      "total": sum(x.nbytes for x in leaves_of(fsdp))}

  # 3 steps under fsdp, 3 on (data 2, model 4), 3 under fsdp again, the last 3 on one device;
  # compare with an uninterrupted run
  straight = loop.train(cfg, workdir / "straight", mesh=one)
  for mesh, stop in ((meshes[(1, 8, 1)], 3), (meshes[(2, 1, 4)], 6), (meshes[(1, 8, 1)], 9)):
    loop.train(cfg, workdir / "moved", mesh=mesh, stop_after=stop)
  moved = loop.train(cfg, workdir / "moved", mesh=one)
  out["legs"] = [r["step"] for r in _train_records(workdir / "moved")]
  out["resume"] = {"straight": straight["val_loss"], "moved": moved["val_loss"],
                   "straight_train": straight["train_loss"], "moved_train": moved["train_loss"]}
  mngr = checkpoint.manager(workdir / "moved", 3)
  state, _ = checkpoint.restore(mngr, 12, loop.Trainer.create(cfg, one).state)
  ref_state, _ = checkpoint.restore(checkpoint.manager(workdir / "straight", 3), 12,
                                    loop.Trainer.create(cfg, one).state)
  out["resume"]["max_param_diff"] = max(
      float(np.max(np.abs(a - b))) for a, b in zip(leaves(state["params"]),
                                                   leaves(ref_state["params"])))
  # decoding on a (data 2, model 4) mesh == one device
  prompts = [[5, 6, 7, 8], [9, 10]]
  decoded = {}
  for name, mesh in (("one", one), ("mesh", meshes[(2, 1, 4)])):
    dec = decoder.Decoder(step.create_model(cfg.model, 0, mesh), mesh=mesh)
    state, logits = dec.prefill(prompts, 2)
    decoded[name] = {"tokens": np.asarray(dec.continue_(state, logits, 8)[1]).tolist(),
                     "logits": np.asarray(logits)}
  out["decode"] = {"one": decoded["one"]["tokens"], "mesh": decoded["mesh"]["tokens"],
                   "max_logit_diff": float(np.abs(decoded["one"]["logits"]
                                                  - decoded["mesh"]["logits"]).max())}
  out["gqa"] = _grouped_query_on_a_mesh(one, meshes[(2, 1, 4)], prompts)
  print("RESULT " + json.dumps(out))


def _grouped_query_on_a_mesh(one, mesh, prompts) -> dict:
  """8 query and 4 key/value heads with q/k/v biases on (data 2, model 4): the key/value heads
  (kernels, biases, the KV cache) split over `model`, and decoding equals one device's."""
  model_cfg = tiny_model(d_model=32, n_heads=8, n_kv_heads=4, attention_bias=True,
                         vocab_size=264)
  decoded = {}
  for name, on in (("one", one), ("mesh", mesh)):
    model = step.create_model(model_cfg, 0, on)
    dec = decoder.Decoder(model, mesh=on)
    state, logits = dec.prefill(prompts, 2)
    decoded[name] = (np.asarray(dec.continue_(state, logits, 8)[1]).tolist(), np.asarray(logits))
  attn = model.segments[0].blocks.attn
  return {"key_kernel": str(attn.key.kernel.value.sharding.spec),
          "key_bias": str(attn.key.bias.value.sharding.spec),
          "cache": str(state.segments[0].k.sharding.spec),
          "cache_heads": state.segments[0].k.shape[-2],
          "same_tokens": decoded["one"][0] == decoded["mesh"][0],
          "max_logit_diff": float(np.abs(decoded["one"][1] - decoded["mesh"][1]).max())}


if __name__ == "__main__":
  main(Path(sys.argv[1]))
