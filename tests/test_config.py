"""Config loading: defaults, overrides, and one clear message for each kind of bad input."""

from __future__ import annotations

import os

import pytest

from dpbp.config import OPTIONS, load_config, to_toml
from dpbp.errors import UserError
from tests.conftest import REPO


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_defaults_are_the_digits_job():
    cfg = load_config()
    assert cfg["data.name"] == "digits" and cfg["model.sizes"][0] == 64


def test_file_then_set_override(tmp_path):
    cfg = load_config(write(tmp_path, "[optim]\nlr = 0.5\n"), ["optim.lr=0.25", "model.sizes=[64,8,10]",
                                                              "model.activation=relu"])
    assert cfg["optim.lr"] == 0.25 and cfg["model.sizes"] == [64, 8, 10] and cfg["model.activation"] == "relu"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.path='a \"quoted\" path.npz'", "loss.l2=0"])
    assert load_config(write(tmp_path, to_toml(cfg))) == cfg


@pytest.mark.parametrize("text,needle", [
    ("[optim]\nlearning_rate = 0.1\n", "unknown key 'optim.learning_rate' (did you mean 'optim.lr'?)"),
    ("[optim]\nlr = 'fast'\n", "optim.lr = 'fast' is a string; it must be a number"),
    ("[optim]\nlr = -1\n", "optim.lr = -1.0 is out of range; allowed: > 0"),
    ("[model]\nactivation = 'gelu'\n", "model.activation = 'gelu' is not allowed; choose one of"),
    ("[model]\nsizes = [4]\n", "model.sizes = [4] is out of range"),
    ("[data]\nbatch_size = true\n", "data.batch_size = True is a boolean; it must be an integer"),
    ("[model]\noutput = 'identity'\n", "loss.kind = 'cross_entropy' needs model.output"),
    ("[optim\nlr = 1\n", "is not valid TOML"),
])
def test_bad_config_is_one_clear_message(tmp_path, text, needle):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, text))
    assert needle in str(e.value)


def test_bad_set_value():
    with pytest.raises(UserError, match="model.sizes=\\[1,2"):
        load_config(None, ["model.sizes=[1,2"])
    with pytest.raises(UserError, match="expected key=value"):
        load_config(None, ["optim.lr"])


@pytest.mark.parametrize("args,needle", [
    (["--config", "nope.toml"], "config file 'nope.toml' does not exist"),
    (["--set", "optim.lr=0"], "optim.lr = 0.0 is out of range"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--init", "missing.npz"], "missing.npz: no such file"),
])
def test_cli_reports_bad_input_once_without_traceback(run_cli, args, needle):
    for ranks in (None, 2):
        proc = run_cli("train", *args, ranks=ranks, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count(needle) == 1, proc.stderr
        assert "Traceback" not in proc.stderr


def test_every_key_has_a_doc():
    assert all(o.doc for o in OPTIONS.values())


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "configs"))))
def test_shipped_configs_are_valid(name):
    """Every file in configs/ only overrides known keys with allowed values."""
    cfg = load_config(os.path.join(REPO, "configs", name))
    assert cfg["model.sizes"][0] >= 1


def test_mnist_config_names_the_idx_files_and_fails_clearly_without_them(run_cli, tmp_path):
    proc = run_cli("train", "--config", os.path.join(REPO, "configs/mnist.toml"), "--out", tmp_path / "m",
                   cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "mnist/train-images-idx3-ubyte.gz" in proc.stderr


@pytest.mark.parametrize("setting,needle,not_there", [
    ("optim.lr=fast", "--set 'optim.lr=fast': optim.lr needs a number, e.g. --set optim.lr=0.1", "quote"),
    ("train.steps=many", "train.steps needs a whole number", "quote"),
    ("data.standardize=yes", "data.standardize needs true or false", "quote"),
    ("lr=0.05", "unknown key 'lr' (did you mean 'optim.lr'?)", "TOML"),
    ("lr=fast", "unknown key 'lr' (did you mean 'optim.lr'?)", "TOML"),
    ("batch=16", "unknown key 'batch' (did you mean 'data.batch_size'?)", "TOML"),
    ("data.standardise=true", "did you mean 'data.standardize'?", "TOML"),
])
def test_set_messages_say_what_the_key_needs(setting, needle, not_there):
    with pytest.raises(UserError) as e:
        load_config(None, [setting])
    assert needle in str(e.value) and not_there not in str(e.value), str(e.value)


@pytest.mark.parametrize("setting,needle", [
    ("data.val_fraction=-0.5", "data.val_fraction = -0.5 is out of range; allowed: 0 <= fraction < 1, or -1"),
    ("data.val_fraction=1", "out of range"),
    ("data.ignore_columns='id'", "data.ignore_columns = 'id' is a string; it must be a list"),
    ("data.ignore_columns=[1]", "data.ignore_columns = [1] is out of range; allowed: a list of distinct column names"),
    ("data.classes=['cat','cat']", "allowed: a list of distinct non-empty names"),
    ("data.classes=['']", "allowed: a list of distinct non-empty names"),
    ("data.standardize=1", "data.standardize = 1 is an integer; it must be a boolean"),
])
def test_new_data_keys_are_checked(setting, needle):
    with pytest.raises(UserError) as e:
        load_config(None, [setting])
    assert needle in str(e.value), str(e.value)


def test_new_data_keys_have_defaults_round_trip_and_table_rows(tmp_path):
    from dpbp.config import reference_markdown
    cfg = load_config()
    assert cfg["data.val_fraction"] == -1.0 and cfg["data.ignore_columns"] == [] and cfg["data.classes"] == []
    assert cfg["data.standardize"] is False
    cfg = load_config(None, ["data.ignore_columns=['id', 'a \"b\"']", "data.classes=['dog','cat']",
                             "data.standardize=true", "data.val_fraction=0.1"])
    assert load_config(write(tmp_path, to_toml(cfg))) == cfg
    table = reference_markdown()
    for key, default in (("data.val_fraction", "-1.0"), ("data.ignore_columns", "[]"), ("data.classes", "[]"),
                         ("data.standardize", "false")):
        assert f"| `{key}` | `{default}` |" in table
