"""The configuration schema: every key, its default, its type and what it allows, in one place.

Config files (TOML) and ``--set key=value`` only override these defaults, as in nanoGPT.
With no config at all the default job runs: a 64-64-10 tanh/softmax net on the 8x8 digits.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass
from typing import Any, Callable

from dpbp.errors import UserError


@dataclass(frozen=True)
class Option:
    key: str
    default: Any
    kind: type  # int, float, str, bool or list (its items checked by `check`)
    doc: str
    choices: tuple = ()
    check: Callable[[Any], bool] | None = None
    allowed: str = ""  # how `check` reads in an error message
    trajectory: bool = True  # does changing it change the numbers a run computes?


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _sizes_ok(v):
    return len(v) >= 2 and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v)


def _betas_ok(v):
    return len(v) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v)


def _fraction(v):
    return 0 <= v < 1


# data.val_fraction's "not given": the data set's own default (dpbp.data.builtin.VAL_FRACTION for the
# built-in sets, none for a data file). TOML has no null, so "not given" must be a value of the type.
AUTO = -1.0


def _fraction_or_auto(v):
    return v == AUTO or 0 <= v < 1


def _names(v):
    return all(isinstance(s, str) and s.strip() == s and s for s in v) and len(set(v)) == len(v)


SCHEMA: tuple[Option, ...] = (
    Option("seed", 0, int, "Seed for initial weights, shuffling and the validation split.",
           check=_non_negative, allowed=">= 0"),
    Option("model.sizes", [64, 64, 10], list, "Layer widths: input, hidden..., output.",
           check=_sizes_ok, allowed="a list of at least two positive integers"),
    Option("model.activation", "tanh", str, "Hidden-layer activation.",
           choices=("sigmoid", "tanh", "relu", "identity")),
    Option("model.output", "softmax", str, "Output-layer activation.",
           choices=("sigmoid", "identity", "softmax")),
    Option("model.dtype", "float64", str, "Floating-point type of parameters, activations and gradients.",
           choices=("float64", "float32")),
    Option("model.dropout", 0.0, float,
           "Inverted dropout on hidden units while training: each is zeroed with this probability and the rest "
           "scaled by 1 / (1 - p); the mask depends only on (seed, step, sample's place in the batch, layer, unit).",
           check=_fraction, allowed="0 <= p < 1"),
    Option("model.init", "auto", str,
           "Initial weights. uniform: W ~ U(-a, a), a = sqrt(6 / fan_in) for relu (He), sqrt(6 / (fan_in + "
           "fan_out)) otherwise (Glorot), biases 0, from seed; seed_example: the tutorial's 2-2-2 weights; "
           "auto: seed_example for the built-in seed data on a 2-2-2 net, else uniform.",
           choices=("auto", "uniform", "seed_example")),
    Option("loss.kind", "cross_entropy", str,
           "squared_error = 1/2 sum (y - o)^2 (the seed's); cross_entropy = -sum y log o (softmax or sigmoid output).",
           choices=("squared_error", "cross_entropy")),
    Option("loss.reduction", "mean", str,
           "sum: E_total over the global batch; mean: E_total / global batch size.",
           choices=("sum", "mean")),
    Option("loss.l2", 1e-4, float, "L2 penalty lambda/2 * sum ||W||^2 on weights (not biases).",
           check=_non_negative, allowed=">= 0"),
    Option("optim.kind", "sgd", str,
           "sgd: w <- w - eta v with momentum (torch.optim.SGD); adam / adamw: torch.optim.Adam / AdamW.",
           choices=("sgd", "adam", "adamw")),
    Option("optim.lr", 0.1, float, "Learning rate eta (the schedule's peak).", check=_positive, allowed="> 0"),
    Option("optim.momentum", 0.9, float, "sgd: momentum mu in v <- mu * v + g (0 = plain SGD).",
           check=lambda v: 0 <= v < 1, allowed="0 <= momentum < 1"),
    Option("optim.nesterov", False, bool, "sgd: step along g + mu v (Nesterov) instead of v."),
    Option("optim.betas", [0.9, 0.999], list, "adam/adamw: decay rates (beta1, beta2) of the moment estimates.",
           check=_betas_ok, allowed="two numbers in [0, 1)"),
    Option("optim.eps", 1e-8, float, "adam/adamw: eps in the denominator sqrt(v_hat) + eps.",
           check=_positive, allowed="> 0"),
    Option("optim.weight_decay", 0.01, float, "adamw: decoupled decay w <- w - eta lambda w, on weights only.",
           check=_non_negative, allowed=">= 0"),
    Option("optim.schedule", "constant", str,
           "Learning rate after warm-up: constant; step: eta gamma^floor((t - warmup) / step_size); cosine: "
           "min_lr + (eta - min_lr)(1 + cos(pi (t - warmup) / (T - warmup))) / 2.",
           choices=("constant", "step", "cosine")),
    Option("optim.warmup_steps", 0, int, "Linear warm-up: eta (t + 1) / warmup for the first updates t.",
           check=_non_negative, allowed=">= 0"),
    Option("optim.min_lr", 0.0, float, "cosine: the learning rate at the last step.", check=_non_negative,
           allowed=">= 0"),
    Option("optim.step_size", 100, int, "step: updates between two decays.", check=_positive, allowed="> 0"),
    Option("optim.gamma", 0.1, float, "step: factor of each decay.", check=_positive, allowed="> 0"),
    Option("optim.clip_norm", 0.0, float,
           "Scale the reduced gradient by min(1, c / (||g|| + 1e-6)) before the update (0 = off).",
           check=_non_negative, allowed=">= 0"),
    Option("optim.shard", False, bool,
           "ZeRO stage 1: each rank keeps 1/P of the optimizer state, reduce-scatters the gradient and "
           "allgathers the parameters (bitwise the same update).", trajectory=False),
    Option("data.name", "digits", str, "Built-in data set, used when data.path is empty.",
           choices=("seed", "xor", "spirals", "digits", "random")),
    Option("data.path", "", str,
           "A data file (overrides data.name): .npz with arrays x and y; .npy or IDX inputs (targets in "
           "data.targets); or CSV with a header (targets named by data.target_column)."),
    Option("data.targets", "", str,
           "The targets of a .npy or IDX data.path: .npy or IDX labels (n,) or targets (n, outputs)."),
    Option("data.target_column", "", str,
           "CSV: the target column(s), comma-separated names; one column of whole numbers = class labels."),
    Option("data.val_path", "", str,
           "A held-out data file in any data.path format (replaces the data.val_fraction split)."),
    Option("data.val_targets", "", str, "The targets file of a .npy or IDX data.val_path."),
    Option("data.val_fraction", AUTO, float,
           "Share of the training data held out for evaluation (split by seed, the same on every rank; with "
           "data.shuffle = false the last rows); -1: the data set's own default, 0.2 of a built-in set and "
           "none of a data file; unused when data.val_path is set.",
           check=_fraction_or_auto, allowed="0 <= fraction < 1, or -1"),
    Option("data.ignore_columns", [], list, "CSV: columns that are neither features nor targets (e.g. an id).",
           check=_names, allowed="a list of distinct column names"),
    Option("data.classes", [], list,
           "Class names, in label order: label k is classes[k]. Empty: a CSV target column of names gives "
           "its sorted distinct names (training stores them in the run's config.toml).",
           check=_names, allowed="a list of distinct non-empty names", trajectory=False),
    Option("data.standardize", False, bool,
           "Shift and scale each input feature by the training rows' mean and standard deviation "
           "(1 where it is 0), computed alike on any number of ranks."),
    Option("data.batch_size", 64, int, "Global batch: samples per step summed over all ranks.",
           check=_positive, allowed="> 0"),
    Option("data.micro_batch", 0, int,
           "Rows a rank runs forward/backward on at a time, adding each micro-batch's gradient before the "
           "step's one reduction (0 = its whole share at once).", check=_non_negative, allowed=">= 0",
           trajectory=False),
    Option("data.shuffle", True, bool, "Shuffle each epoch with a permutation from (seed, epoch); false keeps file order."),
    Option("data.drop_last", False, bool, "Drop the last partial batch of each epoch."),
    Option("train.steps", 0, int, "Steps to train (0: use train.epochs).", check=_non_negative, allowed=">= 0",
           trajectory=False),
    Option("train.epochs", 30, int, "Epochs to train when train.steps is 0.", check=_non_negative, allowed=">= 0",
           trajectory=False),
    Option("train.log_every", 20, int, "Steps between progress lines and metrics records.",
           check=_positive, allowed="> 0", trajectory=False),
    Option("train.eval_every", 100, int, "Steps between held-out evaluations (0: only at the end).",
           check=_non_negative, allowed=">= 0", trajectory=False),
    Option("train.early_stop_patience", 0, int,
           "Stop after this many held-out evaluations without a new best held-out loss (0 = never); the best "
           "parameters are kept in best.npz whenever there is a held-out set.", check=_non_negative,
           allowed=">= 0", trajectory=False),
    Option("train.checkpoint_every", 200, int, "Steps between checkpoints (0: only at the end).",
           check=_non_negative, allowed=">= 0", trajectory=False),
    Option("train.keep_checkpoints", 3, int, "How many of the newest checkpoints to keep.",
           check=_positive, allowed="> 0", trajectory=False),
    Option("train.check_replicas_every", 100, int,
           "Steps between checks that every rank holds the same parameters (0: never).",
           check=_non_negative, allowed=">= 0", trajectory=False),
    Option("comm.reduce", "fast", str,
           "fast: MPI Allreduce of the float gradients; reproducible: bitwise the same result for any rank count.",
           choices=("fast", "reproducible"), trajectory=False),
    Option("comm.chunk", 32, int,
           "reproducible mode: samples per fixed gradient chunk (the unit whose gradient is computed identically "
           "on any rank).", check=_positive, allowed="> 0", trajectory=False),
    Option("comm.bucket_mb", 0.0, float,
           "fast mode, more than one rank: overlap the gradient Allreduce with backward in buckets of at least "
           "this many MB, last layer first, when the gradient makes two or more (else, and with 0: one "
           "Allreduce after backward).", check=_non_negative,
           allowed=">= 0", trajectory=False),
    Option("comm.timeout", 60.0, float,
           "Seconds after which a rank waiting in MPI gives up on a rank that stopped answering (stalled, dead, "
           "cut off) or stopped coming (busy for longer; 10 times this in start-up, the first step, an "
           "evaluation or a checkpoint write): every rank exits with status 4 and one message names it "
           "(0: wait for ever).", check=_non_negative, allowed=">= 0", trajectory=False),
)

OPTIONS: dict[str, Option] = {o.key: o for o in SCHEMA}
# Names other trainers use for a key, so that an unknown key can point to ours.
SYNONYMS = {"learning_rate": "lr", "batch": "batch_size", "epochs_total": "epochs", "optimizer": "kind",
            "dropout_rate": "dropout", "patience": "early_stop_patience", "warmup": "warmup_steps"}


def defaults() -> dict[str, Any]:
    return {o.key: _copy(o.default) for o in SCHEMA}


def _copy(v):
    return list(v) if isinstance(v, list) else v


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(v), type(v).__name__)


def unknown_key(key: str, origin: str) -> UserError:
    """The error for a key the schema lacks, with the closest key if one is close: first a key whose
    last component is this one (``lr`` -> ``optim.lr``) or starts with it (``batch`` -> ``data.batch_size``),
    then difflib on whole keys, on the section's keys, on last components."""
    section, _, last = key.rpartition(".")
    by_last: dict[str, list[str]] = {}
    for k in OPTIONS:
        by_last.setdefault(k.rpartition(".")[2], []).append(k)
    same_section = [k for k in OPTIONS if k.rpartition(".")[0] == section]
    prefixed = [k for name, keys in by_last.items() if len(last) >= 3 and name.startswith(last) for k in keys]
    synonym = by_last.get(SYNONYMS.get(last, ""), [])
    close = (by_last.get(last, []) or synonym or prefixed or difflib.get_close_matches(key, OPTIONS, n=1)
             or difflib.get_close_matches(key, same_section, n=1, cutoff=0.5)
             or [k for name in difflib.get_close_matches(last, by_last, n=1, cutoff=0.6) for k in by_last[name]])
    hint = f" (did you mean {' or '.join(repr(k) for k in close[:2])}?)" if close else ""
    return UserError(f"{origin}: unknown key {key!r}{hint}")


def validate_value(key: str, value: Any, origin: str) -> Any:
    """Check one value against the schema; return it normalised (ints accepted where floats are)."""
    if key not in OPTIONS:
        raise unknown_key(key, origin)
    opt = OPTIONS[key]
    if opt.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok_type = isinstance(value, opt.kind) and not (opt.kind is int and isinstance(value, bool))
    if not ok_type:
        raise UserError(f"{origin}: {key} = {value!r} is {_type_name(value)}; it must be "
                        f"{_type_name(opt.default)}")
    if opt.kind is float and not math.isfinite(value):
        raise UserError(f"{origin}: {key} = {value!r} is not a finite number")
    if opt.choices and value not in opt.choices:
        raise UserError(f"{origin}: {key} = {value!r} is not allowed; choose one of "
                        + ", ".join(repr(c) for c in opt.choices))
    if opt.check is not None and not opt.check(value):
        raise UserError(f"{origin}: {key} = {value!r} is out of range; allowed: {opt.allowed}")
    return _copy(value)


def _example(opt: Option) -> str:
    """A --set value of the option's type, for messages: its default, in TOML."""
    if opt.kind is list:
        return "[" + ",".join(_toml_value(v) for v in opt.default or ["a", "b"]) + "]"
    return _toml_value(opt.default)


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with value read as a TOML value; a bare word is taken as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {text!r}: expected key=value, e.g. --set optim.lr=0.05")
    if key not in OPTIONS:
        raise unknown_key(key, f"--set {text!r}")
    opt, raw = OPTIONS[key], raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if opt.kind is str and raw and "\n" not in raw:
            return key, raw
        need = {int: "a whole number", float: "a number", bool: "true or false",
                list: "a list in brackets"}.get(opt.kind, "a TOML value")
        raise UserError(f"--set {text!r}: {key} needs {need}, e.g. --set {key}={_example(opt)}") from None
    return key, value


def load_config(source: str | dict | None = None, overrides: list[str] | tuple = ()) -> dict[str, Any]:
    """Defaults, then the TOML file (or a dict of keys, nested {"optim": {"lr": 0.1}} or flat
    {"optim.lr": 0.1}, as dpbp.fit takes it), then each ``--set``; validated as a whole."""
    cfg = defaults()
    if isinstance(source, dict):
        table, origin = source, "config"
    else:
        table, origin = (_read_toml(source) if source else {}), f"config {source!r}"
    for key, value in _flatten(table).items():
        cfg[key] = validate_value(key, value, origin)
    for text in overrides:
        key, value = parse_override(text)
        cfg[key] = validate_value(key, value, "--set")
    check_consistency(cfg)
    return cfg


def _read_toml(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"config file {path!r} is a directory") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path!r} is not valid TOML: {e}") from None


def check_consistency(cfg: dict[str, Any]) -> None:
    """Rules that tie several keys together."""
    if cfg["loss.kind"] == "cross_entropy" and cfg["model.output"] not in ("softmax", "sigmoid"):
        raise UserError(f"loss.kind = 'cross_entropy' needs model.output 'softmax' or 'sigmoid', "
                        f"not {cfg['model.output']!r}")
    if cfg["model.output"] == "softmax" and cfg["model.sizes"][-1] < 2:
        raise UserError("model.output = 'softmax' needs at least 2 output units in model.sizes")
    if cfg["optim.nesterov"] and (cfg["optim.kind"] != "sgd" or cfg["optim.momentum"] == 0):
        raise UserError(f"optim.nesterov = true needs optim.kind = 'sgd' with optim.momentum > 0 (kind is "
                        f"{cfg['optim.kind']!r}, momentum {cfg['optim.momentum']})")
    if cfg["optim.schedule"] == "cosine" and cfg["train.steps"] and cfg["optim.warmup_steps"] >= cfg["train.steps"]:
        raise UserError(f"optim.schedule = 'cosine' needs optim.warmup_steps ({cfg['optim.warmup_steps']}) < "
                        f"train.steps ({cfg['train.steps']})")
    if cfg["model.init"] == "seed_example" and cfg["model.sizes"] != [2, 2, 2]:
        raise UserError(f"model.init = 'seed_example' is the tutorial's 2-2-2 network; model.sizes is "
                        f"{cfg['model.sizes']}")
    if cfg["train.steps"] == 0 and cfg["train.epochs"] == 0:
        raise UserError("set train.steps or train.epochs to a positive number")


def to_toml(cfg: dict[str, Any]) -> str:
    """The resolved config as TOML, grouped by section; ``load_config`` reads it back unchanged."""
    lines, section = [], None
    for opt in SCHEMA:
        head, _, name = opt.key.rpartition(".")
        if head != section:
            if head:
                lines.append(f"\n[{head}]")
            section = head
        lines.append(f"{name} = {_toml_value(cfg[opt.key])}")
    return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def trajectory_items(cfg: dict[str, Any]) -> dict[str, Any]:
    """The keys whose values change what a run computes (used to refuse a mismatched resume)."""
    return {o.key: cfg[o.key] for o in SCHEMA if o.trajectory}


def trajectory_hash(cfg: dict[str, Any]) -> str:
    text = json.dumps(trajectory_items(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_markdown() -> str:
    """The config reference table that docs/config.md embeds (a test keeps them equal)."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for o in SCHEMA:
        allowed = ", ".join(f"`{c}`" for c in o.choices) if o.choices else (o.allowed or _type_name(o.default))
        rows.append(f"| `{o.key}` | `{_toml_value(o.default)}` | {allowed} | {o.doc} |")
    return "\n".join(rows) + "\n"


README_BEGIN, README_END = "<!-- config-table:begin -->", "<!-- config-table:end -->"


def update_readme(path: str) -> None:
    """Replace the table between README_BEGIN and README_END in `path` with ``reference_markdown()``."""
    with open(path) as f:
        text = f.read()
    head, sep, rest = text.partition(README_BEGIN + "\n")
    _, sep2, tail = rest.partition(README_END)
    if not (sep and sep2):
        raise UserError(f"{path}: no {README_BEGIN} ... {README_END} markers")
    with open(path, "w") as f:
        f.write(head + sep + reference_markdown() + sep2 + tail)


if __name__ == "__main__":  # python -m dpbp.config --markdown | --readme docs/config.md
    import sys
    if sys.argv[1:] == ["--markdown"]:
        print(reference_markdown(), end="")
    elif len(sys.argv) == 3 and sys.argv[1] == "--readme":
        try:
            update_readme(sys.argv[2])
        except (UserError, OSError) as e:
            print(f"dpbp.config: error: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        sys.exit("usage: python -m dpbp.config --markdown      print the config reference table\n"
                 "       python -m dpbp.config --readme FILE   rewrite it in FILE between the markers")
