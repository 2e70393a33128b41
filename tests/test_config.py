"""Config loading, composition, overrides and validation: every mistake is named with key, value and fix."""

from __future__ import annotations

import textwrap

import pytest

from raypo.config import ConfigError, RaypoConfig, config_from_dict, load_config, to_dict


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_give_a_valid_config():
    cfg = load_config()
    assert isinstance(cfg, RaypoConfig)
    assert cfg.scaling.num_workers == 2 and cfg.deepspeed.zero_stage == 3


def test_yaml_composes_defaults_in_order_then_file_then_overrides(tmp_path):
    write(tmp_path, "model/tiny.yaml", "model:\n  path: tiny://llama\n  dtype: float32\n")
    write(tmp_path, "loss/ipo.yaml", "loss:\n  name: ipo\n  beta: 0.1\n")
    write(tmp_path, "loss/dpo.yaml", "defaults: [ipo]\nloss:\n  name: dpo\n")
    main = write(tmp_path, "run.yaml", """\
        defaults:
          - model/tiny
          - loss/dpo.yaml
        loss:
          beta: 0.2
        train:
          max_steps: 7
        """)
    cfg = load_config(main, ["train.max_steps=9", "loss.params.label_smoothing=0.1"])
    assert cfg.model.dtype == "float32"
    assert cfg.loss.name == "dpo"  # the include's own include came first, the include itself on top
    assert cfg.loss.beta == 0.2  # the file beats its defaults
    assert cfg.train.max_steps == 9  # the command line beats the file
    assert cfg.loss.params == {"label_smoothing": 0.1}


def test_round_trip_through_dict():
    cfg = load_config(None, ["loss.name=lipo_lambda", "loss.beta=0.05"])
    assert config_from_dict(to_dict(cfg)) == cfg


MISTAKES = [
    # (what, overrides or yaml, fragments every message must contain)
    ("misspelt section", {"modle": {"path": "x"}}, ["unknown key 'modle'", "did you mean 'model'"]),
    ("misspelt key", {"loss": {"bta": 0.1}}, ["unknown key 'loss.bta'", "did you mean 'beta'"]),
    ("nested misspelt key", {"model": {"lora": {"rank": 8}}}, ["unknown key 'model.lora.rank'"]),
    ("wrong type", {"scaling": {"num_workers": "two"}}, ["'scaling.num_workers'", "'two'", "expected int"]),
    ("float for int", {"train": {"max_steps": 1.5}}, ["'train.max_steps'", "1.5", "expected int"]),
    ("beta <= 0", {"loss": {"beta": 0.0}}, ["loss.beta=0.0", "must be > 0"]),
    ("negative beta", {"loss": {"beta": -0.1}}, ["loss.beta=-0.1"]),
    ("lambda off the simplex", {"lambdas": {"schedule": "fixed", "weights": [0.5, 0.6]}},
     ["lambdas.weights=[0.5, 0.6]", "not on the simplex", "sum is 1.1"]),
    ("negative lambda", {"lambdas": {"schedule": "fixed", "weights": [1.5, -0.5]}},
     ["lambdas.weights=[1.5, -0.5]", "non-negative"]),
    ("fixed without weights", {"lambdas": {"schedule": "fixed"}}, ["lambdas.weights is required"]),
    ("num_workers < 1", {"scaling": {"num_workers": 0}}, ["scaling.num_workers=0", ">= 1"]),
    ("unknown loss", {"loss": {"name": "lipo_lamda"}},
     ["loss.name='lipo_lamda'", "did you mean 'lipo_lambda'"]),
    ("unknown schedule", {"lambdas": {"schedule": "dirichelt"}}, ["did you mean 'dirichlet'"]),
    ("wmpo without alpha", {"loss": {"name": "wmpo"}}, ["loss.params.alpha=0.0", "wmpo"]),
    ("beta in params", {"loss": {"params": {"beta": 0.1}}}, ["move it to loss.beta"]),
    ("eval fraction out of range", {"data": {"eval_fraction": 1.0}}, ["data.eval_fraction=1.0"]),
    ("bad dtype", {"model": {"dtype": "fp16"}}, ["model.dtype='fp16'"]),
    ("dirichlet alpha not positive", {"lambdas": {"schedule": "dirichlet", "alpha": [1.0, 0.0]}},
     ["lambdas.alpha=[1.0, 0.0]"]),
    ("learned without results", {"lambdas": {"schedule": "learned"}}, ["lambdas.learned.results_path"]),
    ("lambda/dimension mismatch",
     {"data": {"dimensions": ["helpfulness", "honesty"]},
      "lambdas": {"schedule": "fixed", "weights": [0.2, 0.3, 0.5]}}, ["one weight per dimension"]),
    ("offload params without ZeRO-3", {"deepspeed": {"zero_stage": 2, "offload_params": True}},
     ["deepspeed.offload_params"]),
    ("lr not positive", {"optimizer": {"lr": 0}}, ["optimizer.lr=0"]),
]


@pytest.mark.parametrize("what,raw,fragments", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_named(what, raw, fragments):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    msg = str(exc.value)
    for fragment in fragments:
        assert fragment in msg, f"{what}: {fragment!r} not in {msg!r}"


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"loss": {"beta": -1.0}, "scaling": {"num_workers": 0}, "train": {"epochs": 0}})
    assert len(exc.value.problems) == 3


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["loss.beta"])


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_config(write(tmp_path, "broken.yaml", "loss: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "list.yaml", "- a\n- b\n"))
    with pytest.raises(ConfigError, match="defaults entry 'nope' not found"):
        load_config(write(tmp_path, "inc.yaml", "defaults: [nope]\n"))
    a = write(tmp_path, "a.yaml", "defaults: [b]\n")
    write(tmp_path, "b.yaml", "defaults: [a]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)


def test_error_names_the_file(tmp_path):
    path = write(tmp_path, "run.yaml", "scaling:\n  num_workers: -1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_table_lambdas_tolerate_published_rounding():
    rows = [[0.469, 0.092, 0.198, 0.242], [0.013, 0.341, 0.623, 0.022]]  # sums 1.001 and 0.999
    cfg = config_from_dict({"lambdas": {"schedule": "table", "table": rows}})
    assert cfg.lambdas.table == rows


def test_loss_params_are_checked_against_the_loss_registry():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"loss": {"name": "lipo_lambda", "params": {"scael": "valid"}}})
    assert "loss.params.scael" in str(exc.value) and "did you mean 'scale'" in str(exc.value)
    cfg = config_from_dict({"loss": {"name": "lipo_lambda", "params": {"scale": "valid"}}})
    assert cfg.loss.params == {"scale": "valid"}


def test_every_registered_loss_is_a_valid_loss_name():
    """The loss registry is the one list of loss names: every entry validates, a near miss is corrected."""
    from raypo.config import loss_names
    from raypo.losses.registry import LOSS_REGISTRY

    assert loss_names() == tuple(LOSS_REGISTRY)
    for name in LOSS_REGISTRY:
        params = {"alpha": 0.1} if name == "wmpo" else {}
        assert config_from_dict({"loss": {"name": name, "params": params}}).loss.name == name
    with pytest.raises(ConfigError, match="'lipo_lamda' is not one of .*did you mean 'lipo_lambda'"):
        config_from_dict({"loss": {"name": "lipo_lamda"}})
