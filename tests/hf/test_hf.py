"""Hugging Face interop without transformers: the committed fixtures (tests/fixtures/hf, made by
make_fixtures.py with transformers) load into famjax and give the logits transformers computed;
import -> export -> import is bit-exact; exports hold each exit; a family warm-started from a
checkpoint starts where it is, and trains only what train.trainable says."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util
from safetensors.numpy import load_file
from scipy.special import log_softmax

from famjax.data.config import DataConfig
from famjax.decode.decoder import Decoder
from famjax.hf import checkpoint_export, checkpoint_import, configs
from famjax.model import sharding
from famjax.model.config import ModelConfig
from famjax.model.transformer import FamilialTransformer
from famjax.train import loop, step
from famjax.train.config import ExperimentConfig, TrainConfig

from conftest import tiny_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
NAMES = ("llama_gqa", "qwen2_bias", "mistral_sharded")


def build(cfg: ModelConfig, params=None, seed=0) -> FamilialTransformer:
  with nnx.use_eager_sharding(False):
    model = FamilialTransformer(cfg, rngs=nnx.Rngs(seed))
  if params is not None:
    nnx.update(model, params)
  return model


def fixture_tensors(name: str) -> dict:
  out = {}
  for path in sorted((FIXTURES / name).glob("*.safetensors")):
    out.update(load_file(str(path)))
  return out


@pytest.fixture(scope="module")
def imported():
  return {name: checkpoint_import.load(FIXTURES / name) for name in NAMES}


def test_the_fixtures_cover_gqa_mqa_biases_head_dim_tying_and_shards(imported):
  llama, qwen, mistral = (imported[n][0] for n in NAMES)
  assert (llama.n_heads, llama.kv_heads, llama.unembed, llama.rope_theta) == (4, 2, "shared",
                                                                              5e5)
  assert (qwen.kv_heads, qwen.head_size, qwen.attention_bias, qwen.unembed) == (1, 16, True,
                                                                                "tied")
  assert qwen.head_size * qwen.n_heads != qwen.d_model
  assert len(list((FIXTURES / "mistral_sharded").glob("model-*.safetensors"))) > 1
  assert mistral.exit_layers == (mistral.n_layers,)


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_gives_the_logits_and_greedy_text_transformers_computed(imported, name):
  cfg, params = imported[name]
  expected = np.load(FIXTURES / name / "expected.npz")
  model = build(cfg, params)
  logits_BTV = np.asarray(model(expected["tokens"])[0])
  scale = np.abs(expected["logits"]).max()
  assert np.abs(logits_BTV - expected["logits"]).max() <= 1e-4 * scale
  _, generated = Decoder(model, max_len=16).generate([list(expected["tokens"][0, :4])], 1, 8)
  np.testing.assert_array_equal(np.asarray(generated)[0], expected["greedy"])


@pytest.mark.parametrize("name", NAMES)
def test_import_export_import_is_bit_exact_with_the_fixture_names(imported, name, tmp_path):
  cfg, params = imported[name]
  checkpoint_export.export_exit(cfg, params, 1, tmp_path / "out")
  again_cfg, again = checkpoint_import.load(tmp_path / "out")
  assert again_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, again, params)
  ours, theirs = load_file(str(tmp_path / "out" / "model.safetensors")), fixture_tensors(name)
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
  for key, value in theirs.items():
    np.testing.assert_array_equal(ours[key], value.astype(np.float32), err_msg=key)
  fixture_config = json.loads((FIXTURES / name / "config.json").read_text())
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "tie_word_embeddings", "max_position_embeddings"):
    assert written[field] == fixture_config[field], field
  assert written["rope_parameters"]["rope_theta"] == cfg.rope_theta


FAMILIES = [dict(exit_head="norm", unembed="per_exit"), dict(exit_head="block", unembed="tied"),
            dict(exit_head="block", unembed="shared", n_kv_heads=1, attention_bias=True)]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"{f['exit_head']}-{f['unembed']}")
def test_each_exported_exit_is_a_dense_model_with_that_exits_logits(family, tmp_path):
  cfg = tiny_model(**family)
  model = build(cfg, seed=3)
  params = nnx.to_pure_dict(nnx.state(model))
  tokens_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
  logits_GBTV = np.asarray(model(tokens_BT))
  for exit_ in range(1, cfg.n_exits + 1):
    record = checkpoint_export.export_exit(cfg, params, exit_, tmp_path / f"exit{exit_}")
    private = cfg.exit_head == "block" and exit_ < cfg.n_exits
    assert record["num_hidden_layers"] == cfg.exit_layers[exit_ - 1] + private
    dense_cfg, dense = checkpoint_import.load(tmp_path / f"exit{exit_}")
    assert dense_cfg.unembed == ("tied" if cfg.unembed == "tied" else "shared")
    np.testing.assert_allclose(np.asarray(build(dense_cfg, dense)(tokens_BT)[0]),
                               logits_GBTV[exit_ - 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unembed, head", [("per_exit", "norm"), ("shared", "block")])
def test_added_exits_start_from_the_final_norm_and_unembedding(imported, unembed, head):
  dense_cfg, dense = imported["llama_gqa"]
  cfg = checkpoint_import.family_config(FIXTURES / "llama_gqa", exit_layers=(1, 2, 4),
                                        unembed=unembed,
                         exit_head=head)
  fresh = nnx.to_pure_dict(nnx.state(build(cfg)))
  family = build(cfg, checkpoint_import.family_params(cfg, fresh, dense_cfg, dense, "copy"))
  tokens_BT = np.load(FIXTURES / "llama_gqa" / "expected.npz")["tokens"]
  logits_GBTV = np.asarray(family(tokens_BT))
  # equal up to float rounding: the family scans its layers in two segments, the dense one in one
  np.testing.assert_allclose(logits_GBTV[-1], np.asarray(build(dense_cfg, dense)(tokens_BT))[0],
                             rtol=1e-5, atol=1e-5)
  # an added exit is the truncated dense model (with its next layer, for a block head)
  depth = cfg.exit_layers[0] + (head == "block")
  truncated = jax.tree.map(lambda a: a, dense)
  truncated["segments"][0]["blocks"] = jax.tree.map(lambda a: a[:depth],
                                                    dense["segments"][0]["blocks"])
  short = dataclasses.replace(dense_cfg, n_layers=depth, exit_layers=(depth,))
  np.testing.assert_allclose(logits_GBTV[0], np.asarray(build(short, truncated)(tokens_BT))[0],
                             rtol=1e-5, atol=1e-5)
  fresh_start = checkpoint_import.family_params(cfg, fresh, dense_cfg, dense, "fresh")
  np.testing.assert_array_equal(fresh_start["exits"][0]["norm"]["scale"],
                                fresh["exits"][0]["norm"]["scale"])


def _copy(name: str, tmp_path: Path) -> Path:
  out = tmp_path / name
  shutil.copytree(FIXTURES / name, out)
  return out


def _edit_config(directory: Path, **changes) -> None:
  path = directory / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory: Path, edit) -> None:
  from safetensors.numpy import save_file
  path = directory / "model.safetensors"
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path))


BAD = {
    "no config": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "missing tensor": (lambda d: _edit_tensors(d, lambda t: t.pop(
        "model.layers.1.mlp.up_proj.weight")), "model.layers.1.mlp.up_proj.weight is missing"),
    "wrong shape": (lambda d: _edit_tensors(d, lambda t: t.update(
        {"model.norm.weight": np.ones(5, np.float32)})), "model.norm.weight has shape [5]"),
    "vocabulary": (lambda d: _edit_config(d, vocab_size=16), "larger than vocab_size=16"),
    "rope scaling": (lambda d: _edit_config(d, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope_parameters.rope_type"),
    "architecture": (lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"]),
                     "architectures=['GPT2LMHeadModel']"),
    "llama bias": (lambda d: _edit_config(d, attention_bias=True), "attention_bias=True"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_are_one_line_errors_naming_the_file_and_nothing_is_written(
    case, tmp_path):
  directory = _copy("llama_gqa", tmp_path)
  spoil, message = BAD[case]
  spoil(directory)
  with pytest.raises((ValueError, FileNotFoundError)) as error:
    checkpoint_import.load(directory)
  text = str(error.value)
  assert message in text and "\n" not in text
  assert str(directory) in text
  assert sorted(p.name for p in tmp_path.iterdir()) == ["llama_gqa"]


def test_an_unrelated_output_directory_is_never_replaced(imported, tmp_path):
  cfg, params = imported["qwen2_bias"]
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(FileExistsError, match="not a famjax export"):
    checkpoint_export.export_exit(cfg, params, 1, tmp_path / "mine")
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def _leaves(tree) -> dict:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_a_warm_started_family_trains_only_its_exits_and_last_segment(corpus_dir, tmp_path):
  """init_from a Llama checkpoint with exits after layers 2 and 4, "exits+last_2", early exits
  warmed up over 4 steps: at step 0 the deepest exit's loss is the checkpoint's; afterwards the
  embedding and layers 1-2 are bit-identical, layers 3-4 and the heads moved, and the optimizer
  state holds only what trains."""
  source = FIXTURES / "llama_gqa"
  values = checkpoint_import.with_checkpoint({"model": {"exit_layers": (2, 4), "max_seq_len": 64},
                               "data": {"corpus": str(corpus_dir), "val_fraction": 0.1},
                               "train": {"init_from": str(source), "trainable": "exits+last_2",
                                         "exit_warmup_steps": 4, "batch_size": 4,
                                         "seq_len": 16, "steps": 6, "warmup_steps": 1,
                                         "eval_every": 6, "checkpoint_every": 6,
                                         "eval_batches": 1, "progress": False}})
  assert values["data"]["tokenizer"] == str(source / "tokenizer.json")
  cfg = ExperimentConfig(model=ModelConfig(**values["model"]), data=DataConfig(**values["data"]),
                         train=TrainConfig(**values["train"]))
  dense_cfg, dense = checkpoint_import.load(source)
  np.testing.assert_array_equal(step.exit_weights(cfg.train, 2, 0), [0.0, 0.5])
  np.testing.assert_array_equal(step.exit_weights(cfg.train, 2, 2), [0.25, 0.5])
  summary = loop.train(cfg, tmp_path / "run")
  _, model = loop.load_model(tmp_path / "run")
  after = nnx.to_pure_dict(nnx.state(model))
  before = checkpoint_import.family_params(cfg.model, jax.tree.map(np.asarray, after), dense_cfg,
                                           dense)
  changed = {k: not np.array_equal(v, _leaves(before)[k]) for k, v in _leaves(after).items()}
  frozen = {k for k in changed if k[0] == "embed" or k[:2] == ("segments", 0)}
  assert frozen and not any(changed[k] for k in frozen)
  assert all(changed[k] for k in changed if k not in frozen)
  trainer = loop.Trainer.create(cfg, sharding.make_mesh(devices=jax.devices()[:1]))
  _, adam = trainer.opt_state
  mu_paths = set(traverse_util.flatten_dict(adam.inner_state[0].mu))
  assert mu_paths == set(changed) - frozen
  assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
  assert (tmp_path / "run" / "init_from" / "tokenizer_config.json").is_file()
  assert summary["step"] == 6


def test_the_deepest_exit_starts_at_the_checkpoints_loss(imported):
  dense_cfg, dense = imported["llama_gqa"]
  cfg = checkpoint_import.family_config(FIXTURES / "llama_gqa", exit_layers=(2, 4))
  fresh = nnx.to_pure_dict(nnx.state(build(cfg)))
  family = build(cfg, checkpoint_import.family_params(cfg, fresh, dense_cfg, dense))
  tokens_BT = np.load(FIXTURES / "llama_gqa" / "expected.npz")["tokens"]
  ce_G = np.asarray(family.exit_losses(tokens_BT[:, :-1], tokens_BT[:, 1:]))
  logits = np.load(FIXTURES / "llama_gqa" / "expected.npz")["logits"][:, :-1]
  log_probs = log_softmax(logits.astype(np.float64), axis=-1)
  reference = -np.take_along_axis(log_probs, tokens_BT[:, 1:, None], -1).mean()
  np.testing.assert_allclose(ce_G[-1], reference, rtol=1e-5)


def _run(*args) -> subprocess.CompletedProcess:
  root = Path(__file__).resolve().parents[2]
  return subprocess.run([sys.executable, "-m", *args], cwd=root, capture_output=True, text=True,
                        env=os.environ, timeout=600)


@pytest.mark.slow
def test_the_commands_warm_start_from_a_checkpoint_and_export_every_exit(corpus_dir, tmp_path):
  """experiments.train with init_from (exits after layers 2 and 4 of the Qwen2 fixture) and
  experiments.export --exit=all; a mismatched exit layer is a one-line error that writes
  nothing."""
  common = ["--config=tiny", f"--config.data.corpus={corpus_dir}",
            "--config.data.val_fraction=0.1", f"--config.train.init_from={FIXTURES}/qwen2_bias",
            "--config.train.steps=3", "--config.train.warmup_steps=1",
            "--config.train.seq_len=16", "--config.train.batch_size=4",
            "--config.train.progress=False", "--config.model.max_seq_len=64"]
  bad = _run("experiments.train", f"--workdir={tmp_path / 'bad'}", *common,
             "--config.model.exit_layers=(2,4)")
  assert bad.returncode != 0 and "model.exit_layers" in bad.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "bad").exists()
  out = _run("experiments.train", f"--workdir={tmp_path / 'run'}", *common,
             "--config.model.exit_layers=(1,3)", "--config.train.trainable=exits")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "init_from" in out.stdout and "tokenizer.json" in out.stdout
  exported = _run("experiments.export", f"--workdir={tmp_path / 'run'}", "--exit=all",
                  f"--out={tmp_path / 'hf'}")
  assert exported.returncode == 0, exported.stderr[-2000:]
  index = json.loads((tmp_path / "hf" / "index.json").read_text())
  assert [(e["exit"], e["num_hidden_layers"], e["architecture"]) for e in index["exits"]] == [
      (1, 1, "Qwen2ForCausalLM"), (2, 3, "Qwen2ForCausalLM")]
  deepest_cfg, deepest = checkpoint_import.load(tmp_path / "hf" / "exit2")
  source_cfg, source = checkpoint_import.load(FIXTURES / "qwen2_bias")
  assert configs.architecture_fields(deepest_cfg) == configs.architecture_fields(source_cfg)
  assert deepest_cfg.unembed == "shared"  # the preset's per-exit heads: copies of the embedding
  # trainable=exits: the heads trained; the embedding and the backbone are the source's
  jax.tree.map(np.testing.assert_array_equal, deepest["segments"], source["segments"])
  np.testing.assert_array_equal(deepest["embed"]["embedding"], source["embed"]["embedding"])
  assert (tmp_path / "hf" / "exit1" / "tokenizer.json").is_file()
  config = json.loads((tmp_path / "hf" / "exit1" / "tokenizer_config.json").read_text())
  assert config["eos_token"] == "</s>"
