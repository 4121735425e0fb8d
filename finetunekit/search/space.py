"""The search space file: recipe options by their dotted names, each a list of choices or a range.

    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}     # a float range (log-uniform)
    train.epochs: {low: 2, high: 6}                      # ints when low and high are ints
    train.weight_decay: {low: 0.0, high: 0.1, step: 0.02}
    train.strategy: [full, lp-ft]                        # a list: categorical

Checked against the recipe schema (config.py) before anything heavy loads: every key must be a recipe option,
and each choice, and both ends of each range, must be a value that option accepts on top of the base recipe.
Torch-free, like config.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from ..config import build_recipe, leaf_fields, read_yaml, short
from ..errors import UserError, did_you_mean

# options a trial never varies: where it runs and how (the study decides those)
NOT_SEARCHABLE = ("out", "overwrite", "resume", "resume_force", "quiet", "description")


@dataclass(frozen=True)
class Param:
    key: str  # the recipe's dotted name: train.lr
    choices: tuple | None = None  # categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    integer: bool = False  # an int range: low and high are ints and the option takes no fractions

    @property
    def is_int(self) -> bool:
        return self.integer

    def suggest(self, trial) -> Any:
        """This parameter's value for an optuna trial (a retried trial gets its fixed value back)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return "{" + ", ".join(str(c) for c in self.choices) + "}"
        kind = "int" if self.is_int else "float"
        return f"{kind} [{self.low:g}, {self.high:g}]" + (" log" if self.log else "") + \
            (f" step {self.step:g}" if self.step else "")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_space(path: str | Path, base: dict[str, Any]) -> list[Param]:
    """The parameters of the space file at `path`, each checked against the recipe `base` (a dict of the
    recipe's options, as Recipe.model_dump() gives) it varies. One-line UserErrors naming the file and key."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--space {p}: no such file")
    data = read_yaml(p)
    if not data:
        raise UserError(f"--space {p}: no parameters (expected recipe options such as 'train.lr: {{low: 1.0e-4, "
                        f"high: 1.0e-2, log: true}}')")
    fields = {key: info for key, _, info in leaf_fields()}
    valid = list(fields)
    params = []
    for key, spec in _flat(data).items():
        if key not in valid:
            raise UserError(f"{p}: {key}: not a recipe option{did_you_mean(key, valid)}")
        if key in NOT_SEARCHABLE:
            raise UserError(f"{p}: {key}: not searchable (the study sets it for each trial)")
        param = _param(p, key, spec, takes_float=_takes_float(fields[key]))
        for value in (param.choices if param.choices is not None else (param.low, param.high)):
            _check_value(p, key, value, base)
        params.append(param)
    return params


def _flat(data: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as written (train.lr), or nested ones ({train: {lr: ...}}): a range's own mapping is a leaf."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and not ({"low", "high"} & set(v)) and "." not in str(k):
            for sub, spec in v.items():
                out[f"{k}.{sub}"] = spec
        else:
            out[str(k)] = v
    return out


def _takes_float(info: Any) -> bool:
    """Whether the option's type admits fractions (float, float | None): {low: 0, high: 1} is then a float range."""
    annotation = info.annotation
    return annotation is float or float in get_args(annotation)


def _param(p: Path, key: str, spec: Any, takes_float: bool) -> Param:
    where = f"{p}: {key}"
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{where}: an empty list of choices")
        if len(set(map(repr, spec))) != len(spec):
            raise UserError(f"{where}: a choice is listed twice: {short(spec)}")
        if not all(v is None or isinstance(v, (str, int, float, bool)) for v in spec):
            raise UserError(f"{where}: choices must be plain values (text, numbers, true/false), got {short(spec)}")
        return Param(key, choices=tuple(spec))
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected a list of choices or a range {{low: X, high: Y}}, got {short(spec)}")
    unknown = set(spec) - {"low", "high", "log", "step"}
    if unknown:
        word = sorted(unknown)[0]
        raise UserError(f"{where}: unknown range field '{word}' (expected low, high, log, step)"
                        f"{did_you_mean(word, ['low', 'high', 'log', 'step'])}")
    if "low" not in spec or "high" not in spec:
        raise UserError(f"{where}: a range needs both low and high, got {short(spec)}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if not (_is_number(low) and _is_number(high)):
        raise UserError(f"{where}: low and high must be numbers, got {short(low)} and {short(high)}")
    if not low < high:
        raise UserError(f"{where}: expected low < high, got {low} and {high}")
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false, got {short(log)}")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0, got {low}")
    if step is not None:
        if not _is_number(step) or step <= 0:
            raise UserError(f"{where}: step must be a number > 0, got {short(step)}")
        if log:
            raise UserError(f"{where}: step and log cannot be combined (optuna samples one or the other)")
        if isinstance(low, int) and isinstance(high, int) and not isinstance(step, int):
            raise UserError(f"{where}: an int range needs an int step, got {step}")
    integer = isinstance(low, int) and isinstance(high, int) and not takes_float
    return Param(key, low=low, high=high, log=log, step=step, integer=integer)


def _check_value(p: Path, key: str, value: Any, base: dict[str, Any]) -> None:
    """The recipe option `key` accepts `value` (on top of the base recipe), else a one-line error."""
    try:
        build_recipe(base, {key: value}, override_names={key: key})
    except UserError as e:
        raise UserError(f"{p}: {e}") from None
