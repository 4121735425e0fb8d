"""Every registry is an explicit dict whose keys are exactly the choices the recipe schema offers, so a name
is written once and a new entry cannot be half-registered."""

from __future__ import annotations

import typing

from finetunekit import config
from finetunekit.addons import ADDONS, OPTIONS
from finetunekit.addons.tta import MODES
from finetunekit.export import EXPORTERS
from finetunekit.strategies import STRATEGIES
from finetunekit.tasks import TASKS


def _choices(section: type, name: str) -> set[str]:
    annotation = section.model_fields[name].annotation
    if typing.get_origin(annotation) is not typing.Literal:
        annotation = next(a for a in typing.get_args(annotation) if typing.get_origin(a) is typing.Literal)
    return set(typing.get_args(annotation))


def test_tasks_registry_matches_the_schema():
    assert set(TASKS) == _choices(config.Recipe, "task") == set(config.TASKS)
    for name, cls in TASKS.items():
        losses = config.TASKS[name][1]
        assert cls.kind == config.TASK_KIND[name]
        assert cls.default_monitor in config.TASKS[name][2]
        # seq2seq's ce is over tokens (its targets are texts)
        assert cls.kind in {"ce": ("classification", "seq2seq"), "bce": ("multilabel",), "mse": ("regression",),
                            "rcnn": ("detection",)}[losses[0]]


def test_every_task_has_a_data_stage():
    from finetunekit.inputs import PREPARERS

    assert set(PREPARERS) == set(config.TASKS)


def test_strategies_registry_matches_the_schema():
    # auto is not a plan: finetunekit.playbook resolves it to one of the others before any plan is made
    assert set(STRATEGIES) | {"auto"} == _choices(config.TrainConfig, "strategy")
    assert "auto" not in STRATEGIES


def test_peft_methods_match_the_schema():
    from finetunekit.models import SOURCES
    from finetunekit.peft_methods import METHODS

    assert set(METHODS) == _choices(config.ModelConfig, "peft")
    assert all(set(source.peft_methods) <= set(METHODS) for source in SOURCES.values())


def test_tta_modes_match_the_schema():
    assert set(MODES) == _choices(config.DataConfig, "tta")


def test_every_addon_is_switched_on_by_a_recipe_option():
    leaves = {key for key, _, _ in config.leaf_fields()}
    assert set(ADDONS) == set(OPTIONS)
    for name, keys in OPTIONS.items():
        assert set(keys) <= leaves, name
        assert ADDONS[name].name == name


def test_exporters_registry():
    from finetunekit.cli_parser import EXPORT_FORMATS

    # the run writes the model folder; `finetunekit export --format` offers the others
    assert set(EXPORTERS) == {"model-folder", *EXPORT_FORMATS}
    assert all(callable(f) for f in EXPORTERS.values())


def test_cli_commands_match_the_parser():
    from finetunekit.cli import COMMANDS
    from finetunekit.cli_parser import build_parser as _build_parser

    parser, _ = _build_parser()
    assert set(COMMANDS) == set(parser._subparsers._group_actions[0].choices)
