import pytest

from famjax.data.config import DataConfig
from famjax.model.config import MeshConfig, ModelConfig
from famjax.train.config import ExperimentConfig, TrainConfig, config_hash, experiment_from_dict


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
    (dict(n_heads=4, n_kv_heads=3), "model.n_kv_heads"),        # not a divisor of n_heads
    (dict(n_kv_heads=-1), "model.n_kv_heads"),
    (dict(head_dim=7), "model.head_dim"),                       # odd: rotary pairs
    (dict(attention_bias="yes"), "model.attention_bias"),
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
    (dict(trainable="heads"), "train.trainable"),
    (dict(trainable="exits+last_0"), "train.trainable"),
    (dict(init_exits="random"), "train.init_exits"),
    (dict(exit_warmup_steps=300, steps=200), "train.exit_warmup_steps"),
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


def test_head_dim_need_not_divide_d_model():
  cfg = ModelConfig(d_model=130, n_heads=4, head_dim=64, n_kv_heads=1)
  assert (cfg.head_size, cfg.kv_heads) == (64, 1)
  assert (ModelConfig().head_size, ModelConfig().kv_heads) == (32, 4)


def test_trainable_layers_must_end_where_an_exit_segment_ends():
  model = ModelConfig(exit_layers=(1, 2, 4))
  assert ExperimentConfig(model=model, train=TrainConfig(trainable="exits+last_2"))
  with pytest.raises(ValueError, match=r"train\.trainable.*K in \[3, 2\]"):
    ExperimentConfig(model=model, train=TrainConfig(trainable="exits+last_1"))
  with pytest.raises(ValueError, match=r"train\.trainable.*a dense model"):
    ExperimentConfig(model=ModelConfig(exit_layers=(4,)),
                     train=TrainConfig(trainable="exits+last_2"))


def test_fields_added_later_keep_every_recorded_runs_hash():
  """Hashes of two configs taken before model.n_kv_heads, head_dim, attention_bias and the warm
  start's train fields existed: the new fields at their defaults change no fingerprint."""
  assert config_hash(ExperimentConfig()) == "d8c9c2adfc1738d8"
  old = ExperimentConfig(model=ModelConfig(d_model=64, n_heads=8),
                         train=TrainConfig(exit_weights=(0.2, 0.3, 0.5)))
  assert config_hash(old) == "af3badc049925e69"
  gqa = ExperimentConfig(model=ModelConfig(d_model=64, n_heads=8, n_kv_heads=2),
                         train=TrainConfig(exit_weights=(0.2, 0.3, 0.5)))
  assert config_hash(gqa) != config_hash(old)
