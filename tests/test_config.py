import pytest

from famjax.config import (
  DataConfig,
  ExperimentConfig,
  MeshConfig,
  ModelConfig,
  TrainConfig,
  experiment_from_dict,
)


@pytest.mark.parametrize("overrides, field", [
    (dict(exit_layers=(2, 5)), "model.exit_layers"),            # out of range
    (dict(exit_layers=(0, 4)), "model.exit_layers"),            # below 1
    (dict(exit_layers=(3, 2, 4)), "model.exit_layers"),         # not increasing
    (dict(exit_layers=(2, 2, 4)), "model.exit_layers"),         # repeated
    (dict(exit_layers=(1, 2, 3)), "model.exit_layers"),         # last != n_layers
    (dict(exit_layers=()), "model.exit_layers"),                # empty
    (dict(d_model=130), "model.d_model"),                       # not divisible by heads
    (dict(n_layers=0, exit_layers=(0,)), "model.n_layers"),
    (dict(exit_head="mlp"), "model.exit_head"),
    (dict(unembed="both"), "model.unembed"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(vocab_size=-3), "model.vocab_size"),
])
def test_invalid_model_config_names_field(overrides, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    ModelConfig(**overrides)


@pytest.mark.parametrize("overrides, field", [
    (dict(batch_size=0), "train.batch_size"),
    (dict(learning_rate=-1.0), "train.learning_rate"),
    (dict(warmup_steps=500, steps=100), "train.warmup_steps"),
    (dict(schedule="linear"), "train.schedule"),
    (dict(exit_weights=(0.5, -0.1, 0.6)), "train.exit_weights"),
    (dict(exit_weights=(0.0, 0.0)), "train.exit_weights"),
    (dict(steps=0, tokens=0), "train.steps"),
    (dict(tokens=100, batch_size=16, seq_len=128), "train.steps / train.tokens"),
])
def test_invalid_train_config_names_field(overrides, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    TrainConfig(**overrides)


def test_exit_weight_length_mismatch_is_an_error():
  with pytest.raises(ValueError, match=r"train\.exit_weights.*length 3"):
    ExperimentConfig(model=ModelConfig(exit_layers=(2, 3, 4)),
                     train=TrainConfig(exit_weights=(0.5, 0.5)))


def test_token_budget_sets_steps():
  cfg = TrainConfig(tokens=16 * 128 * 7 + 5, batch_size=16, seq_len=128, warmup_steps=1)
  assert cfg.total_steps == 7


def test_seq_len_must_fit_the_rotary_tables():
  with pytest.raises(ValueError, match=r"train\.seq_len"):
    ExperimentConfig(model=ModelConfig(max_seq_len=64), train=TrainConfig(seq_len=128))


def test_other_sections_validate():
  with pytest.raises(ValueError, match=r"data\.tokenizer"):
    DataConfig(tokenizer="wordpiece")
  with pytest.raises(ValueError, match=r"data\.val_fraction"):
    DataConfig(val_fraction=0.0)
  with pytest.raises(ValueError, match=r"mesh\.model"):
    MeshConfig(model=0)


def test_from_dict_rejects_unknown_fields():
  with pytest.raises(ValueError, match=r"model\.n_exits"):
    experiment_from_dict({"model": {"n_exits": 3}})
  cfg = experiment_from_dict({"model": {"exit_layers": [1, 2, 4]}, "train": {"steps": 5,
                                                                            "warmup_steps": 1}})
  assert cfg.model.exit_layers == (1, 2, 4) and cfg.train.steps == 5
