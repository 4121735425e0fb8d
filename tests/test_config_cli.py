"""The Recipe schema and the CLI generated from it: one line, exit 2, fast, with a did-you-mean."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from finetunekit import Recipe, UserError
from finetunekit.cli import RECIPES_DIR
from finetunekit.config import build_recipe, leaf_fields

from conftest import cli, run_cli


@pytest.mark.parametrize("args, expected", [
    (["fit", "--epoch", "3"], "unknown option --epoch (did you mean '--epochs'?)"),
    (["fit", "--strategy", "linear-prob"], "'bitfit' or 'norm-head', got 'linear-prob' (did you mean "
                                           "'linear-probe'?)"),
    (["fit", "--epochs", "0"], "--epochs: expected a value >= 1, got '0'"),
    (["fit", "--lr", "fast"], "--lr: expected a valid number"),
    (["fit", "--image-size", "8"], "--image-size: expected a value >= 16"),
    (["fit", "--precision", "fp8"], "--precision: expected 'auto', 'no', 'bf16' or 'fp16'"),
    (["fit", "--config", "no-such-recipe"], "--config no-such-recipe: no such file or shipped recipe"),
    (["fit", "--data", "/no/such/dir"], "--data /no/such/dir: no such file or folder"),
    (["fit"], "--data: required"),
    (["fit", "--data", ".", "--model", "timm:resnet_18"], "--model timm:resnet_18: not a timm model (did you mean"),
    (["fit", "--data", ".", "--model", "keras:resnet"], "--model keras:resnet: expected timm:<name>"),
    (["predict", "/no/run", "x.jpg"], "/no/run: not a finetunekit run or model folder"),
    # checked before the data is read ("." holds no images: reading it would fail first)
    (["fit", "--data", ".", "--checkpoint-every", "10x"], "--checkpoint-every 10x: expected a number of updates"),
    (["fit", "--log-with", "mlfow"], "--log-with: expected a comma-separated list of tensorboard, mlflow, wandb, none "
                                     "(did you mean 'mlflow'?), got 'mlfow'"),
    (["fit", "--log-with", "none,mlflow"], "--log-with: expected 'none' alone"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected):
    start = time.perf_counter()
    r = run_cli(*args)
    elapsed = time.perf_counter() - start
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finetunekit: error: "), r.stderr
    assert expected in lines[0]
    if args[:2] != ["fit", "--data"] and "--model" not in args and args[0] == "fit":
        assert elapsed < 3.0, f"validation took {elapsed:.1f}s (a fresh interpreter included)"


def test_validation_needs_no_torch():
    """Option errors come before torch is imported: that is what keeps them under a second."""
    import subprocess
    import sys

    code = ("import sys\nfrom finetunekit.cli import run\nfrom finetunekit import UserError\n"
            "try:\n    run(['fit', '--epochs', '-1'])\nexcept UserError:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported during validation'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_yaml_unknown_and_misplaced_keys(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(UserError, match=r"r.yaml: unknown option 'train.epoch' \(did you mean 'train.epochs'\?\)"):
        Recipe.load(bad)
    bad.write_text("epochs: 3\n")
    with pytest.raises(UserError, match=r"unknown option 'epochs' \(did you mean 'train.epochs'\?\)"):
        Recipe.load(bad)
    bad.write_text("train:\n  epochs: many\n")
    with pytest.raises(UserError, match=r"r.yaml: train.epochs: expected a valid integer"):
        Recipe.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="must be a mapping"):
        Recipe.load(bad)


def test_flags_override_yaml_and_python_api_agree(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  path: imgs\n  image_size: 96\ntrain:\n  epochs: 7\n  lr: 0.01\n")
    from_file = Recipe.load(path, {"train.epochs": "3"})
    assert (from_file.train.epochs, from_file.train.lr, from_file.data.image_size) == (3, 0.01, 96)
    # the file's relative path is relative to the file's folder; the same from Python names it so
    from_python = Recipe(data={"path": str(tmp_path / "imgs"), "image_size": 96}, train={"epochs": 3, "lr": 0.01})
    assert from_python == from_file
    # the resolved recipe round-trips through YAML
    again = build_recipe(yaml.safe_load(from_file.to_yaml()), {})
    assert again == from_file


def test_every_option_has_a_flag_a_default_and_a_description():
    flags = [flag for _, flag, _ in leaf_fields()]
    assert len(flags) == len(set(flags)), "two options share a flag"
    for key, flag, info in leaf_fields():
        assert info.description, f"{key} has no description"
    for core in ("--data", "--val", "--model", "--weights", "--strategy", "--epochs", "--batch-size", "--lr",
                 "--image-size", "--seed", "--out", "--quiet"):
        assert core in flags


def test_shipped_recipes_parse_and_are_listed():
    recipes = sorted(RECIPES_DIR.glob("*.yaml"))
    assert len(recipes) >= 3
    listed = run_cli("recipes").stdout
    for path in recipes:
        recipe = Recipe.load(path)
        assert recipe.description, f"{path.name} has no description"
        assert path.stem in listed
        from finetunekit.models import check_spec, modality

        check_spec(recipe.model_name)  # the hub-only recipes name real models (hub ids: well-formed)
        assert modality(recipe.model_name) == recipe.modality, path.name  # the hub-only recipes name real models


def _parser():
    from finetunekit.cli_parser import build_parser as _build_parser

    return _build_parser()[0]


def test_fit_help_is_grouped_by_topic_with_meaningful_defaults_only():
    from finetunekit.config import GROUPS

    grouped = [key for _, keys in GROUPS for key in keys]
    assert sorted(grouped) == sorted(key for key, _, _ in leaf_fields()), "an option in no group, or in two"
    assert len(grouped) == len(set(grouped))
    code, text, _ = cli("fit", "--help")
    assert code == 0
    assert text.startswith("usage: finetunekit fit [--config RECIPE] [OPTION ...]\n")
    titles = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles == ["options"] + [title for title, _ in GROUPS]
    assert "(default: None)" not in text and "(default: False)" not in text
    flat = " ".join(text.split())
    assert "--[no-]pretrained start from the source's pretrained weights (off: random init) (default: on)" in flat
    assert "--epochs N training epochs; default: 10 for images, 3 for text" in flat
    assert "--batch-size N samples per step on one device" in flat and "(default: 32)" in flat
    assert "--task TASK what to learn" in flat and "one of image-classification, image-multilabel" in flat


def test_every_option_of_every_command_has_help_and_version():
    parser = _parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.option_strings or action.dest not in ("help",):
                assert action.help, f"{name} {action.option_strings or action.dest}: no help"
    from finetunekit import __version__

    code, out, _ = cli("--version")
    assert code == 0 and out == f"finetunekit {__version__}\n"


def test_a_recipe_files_paths_are_relative_to_it_and_flags_to_the_cwd(tmp_path):
    from finetunekit.cli import recipe_from_args

    (tmp_path / "exp").mkdir()
    path = tmp_path / "exp" / "r.yaml"
    path.write_text("data:\n  path: ../data/train\n  val: /abs/val\n  test: test.csv\nmodel:\n  weights: w.safetensors\n"
                    "train:\n  teacher: hf:../teacher\nout: ../runs/a\n")
    from finetunekit.cli_parser import build_parser as _build_parser

    parser, dests = _build_parser()
    recipe = recipe_from_args(parser.parse_args(["fit", "--config", str(path)]), dests)
    assert recipe.data.path == tmp_path / "data" / "train"
    assert recipe.data.val == Path("/abs/val") and recipe.data.test == tmp_path / "exp" / "test.csv"
    assert recipe.model.weights == tmp_path / "exp" / "w.safetensors"
    assert recipe.train.teacher == f"hf:{tmp_path / 'teacher'}" and recipe.out == tmp_path / "runs" / "a"
    # a flag stays as typed: relative to the current directory
    recipe = recipe_from_args(parser.parse_args(["fit", "--config", str(path), "--data", "here/train"]), dests)
    assert recipe.data.path == Path("here/train") and recipe.data.test == tmp_path / "exp" / "test.csv"
    # the shipped recipes name the shared data from their own folder, wherever the command runs
    from conftest import SHARED_DATA

    sst2 = Recipe.load(RECIPES_DIR / "sst2-minilm.yaml")
    assert sst2.data.path.resolve() == (SHARED_DATA / "sst2" / "train.tsv").resolve()
    cifar = recipe_from_args(parser.parse_args(["fit", "--config", "cifar10-lite0-full"]), dests)
    assert cifar.data.path.resolve() == (SHARED_DATA / "cifar10-mini").resolve()


def test_none_unsets_an_optional_option_but_is_a_word_for_one_that_cannot_be_unset():
    from finetunekit.cli_parser import build_parser as _build_parser, recipe_from_args

    parser, dests = _build_parser()
    recipe = recipe_from_args(parser.parse_args(["fit", "--data", "d", "--log-with", "none", "--val", "none",
                                                 "--augment", "none"]), dests)
    assert recipe.log_with == "none" and recipe.trackers == []
    assert recipe.data.val is None
    assert recipe.data.augment == "none"
