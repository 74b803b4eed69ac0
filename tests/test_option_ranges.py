"""Every option of every command against its entry in config.py's table of valid values: values just
inside pass, values just outside (inf and nan for numbers, an unknown word for a choice) are one line
naming the option and its range, on the command line, in a --config file and through the entry
points (exit status 2, nothing written)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from flowers import config
from flowers.cli import run
from flowers.config import (Choice, CompareConfig, CrossvalConfig, EvalConfig, ExportConfig, LabelIssuesConfig,
                            PredictConfig, Span, TrainConfig, from_dict, parse, valid_values)
from flowers.errors import UserError

from conftest import REPO

# What each command needs besides its defaults; its entry point (module:function, run under cli.run).
COMMANDS = {
    TrainConfig: ({}, "train:main"),
    EvalConfig: ({}, "eval:main"),
    PredictConfig: ({"inputs": ["photo.jpg"]}, "flowers.predict:main"),
    ExportConfig: ({}, "flowers.export:main"),
    CompareConfig: ({"group": "g"}, "flowers.compare:main"),
    CrossvalConfig: ({}, "flowers.crossval:main"),
    LabelIssuesConfig: ({"folder": "cv"}, "flowers.label_issues:main"),
}


def _configs() -> list[type]:
    return [c for name, c in inspect.getmembers(config, inspect.isclass)
            if name.endswith("Config") and dataclasses.is_dataclass(c)]


def _kind(cls: type, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) is not list else hint


def _cases(inside: bool) -> list:
    cases = []
    for cls in COMMANDS:
        for f in dataclasses.fields(cls):
            valid = valid_values(f)
            if valid is None:  # test_every_option_of_every_command_has_a_range says which
                continue
            values = valid.examples(_kind(cls, f.name))[0 if inside else 1]
            cases += [pytest.param(cls, f, v, id=f"{cls.__name__}-{f.name}-{v!r}") for v in values]
    return cases


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["metavar"] if f.metadata.get("positional") else "--" + f.name.replace("_", "-")


def _argv(cls: type, f: dataclasses.Field, value) -> list[str]:
    """The command line giving `value` to `f` (and what the command needs besides)."""
    required = {k: v for k, v in COMMANDS[cls][0].items() if k != f.name}
    argv = []
    for name, v in [*required.items(), (f.name, value)]:
        if name == "inputs":
            argv += list(v)
        elif name == "folder":  # label_issues' FOLDER
            argv.append(v)
        elif isinstance(v, bool):
            argv.append(("--" if v else "--no-") + name.replace("_", "-"))
        else:
            argv.append(f"--{name.replace('_', '-')}={v}")  # = keeps "-inf" a value
    return argv


def _assert_one_line_naming(error: BaseException, f: dataclasses.Field, valid) -> None:
    message = str(error)
    assert "\n" not in message
    assert _flag(f) in message or f.name in message, message
    if isinstance(valid, Span):
        assert valid.describe() in message, message
    elif isinstance(valid, Choice) and valid is not config.SWITCH:
        assert all(str(word) in message for word in valid.words), message


def test_every_option_of_every_command_has_a_range():
    """A command or option added later must say which values it takes (valid=, choices, or a switch)."""
    assert set(_configs()) == set(COMMANDS), "add the new command to COMMANDS"
    missing = [f"{cls.__name__}.{f.name}" for cls in COMMANDS for f in dataclasses.fields(cls)
               if valid_values(f) is None]
    assert not missing, f"options without an entry in the table of valid values: {missing}"


@pytest.mark.parametrize("cls, f, value", _cases(inside=True))
def test_values_just_inside_are_taken(cls, f, value):
    values = {**COMMANDS[cls][0], f.name: value}
    assert getattr(from_dict(cls, values), f.name) == value
    if f.name != "config":  # (a --config file must exist: the file tests give one)
        assert getattr(parse(cls, _argv(cls, f, value)), f.name) == value


@pytest.mark.parametrize("cls, f, value", _cases(inside=False))
def test_values_just_outside_are_one_line_naming_the_option_and_its_range(cls, f, value):
    valid = valid_values(f)
    with pytest.raises(UserError) as error:
        from_dict(cls, {**COMMANDS[cls][0], f.name: value})
    _assert_one_line_naming(error.value, f, valid)
    if valid is not config.SWITCH:  # a switch takes no value on the command line
        with pytest.raises(UserError) as error:
            parse(cls, _argv(cls, f, value) if value != [] else [])
        _assert_one_line_naming(error.value, f, valid)


@pytest.mark.parametrize("cls, f, value", _cases(inside=False))
def test_the_same_through_a_config_file(cls, f, value, tmp_path):
    if f.metadata.get("positional") or f.name == "config":
        pytest.skip("given on the command line only")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({f.name: value}))
    with pytest.raises(UserError) as error:
        parse(cls, _argv(cls, f, value)[:-1] + ["--config", str(path)])
    _assert_one_line_naming(error.value, f, valid_values(f))


@pytest.mark.parametrize("cls", list(COMMANDS))
def test_yaml_true_and_false_mean_the_bare_flag_and_its_absence(cls, tmp_path):
    """freeze_backbone: true is the whole run (-1) as the bare flag is; resume: true the latest run;
    false their defaults; a switch its value; any other option refuses a boolean in one line."""
    required, _ = COMMANDS[cls]
    positional = required.get("inputs", []) + ([required["folder"]] if "folder" in required else [])
    for f in dataclasses.fields(cls):
        if f.metadata.get("positional") or f.name == "config":
            continue
        for value in (True, False):
            path = tmp_path / "c.yaml"
            path.write_text(yaml.safe_dump({**{k: v for k, v in required.items() if k not in ("inputs", "folder")},
                                            f.name: value}))
            argv = [*positional, "--config", str(path)]
            if valid_values(f) is config.SWITCH:
                assert getattr(parse(cls, argv), f.name) is value
            elif "const" in f.metadata:
                bare = parse(cls, [*positional, _flag(f)])
                expected = getattr(bare, f.name) if value else f.default
                assert getattr(parse(cls, argv), f.name) == expected
                assert getattr(parse(cls, argv), f.name) is not value
            else:
                with pytest.raises(UserError) as error:
                    parse(cls, argv)
                assert "\n" not in str(error.value) and (_flag(f) in str(error.value) or f.name in str(error.value))


def _entry_point(cls: type):
    module, function = COMMANDS[cls][1].split(":")
    return getattr(importlib.import_module(module), function)


@pytest.mark.parametrize("cls, f, value", [c for c in _cases(inside=False)
                                          if valid_values(c.values[1]) is not config.SWITCH and c.values[2] != []])
def test_entry_points_refuse_before_writing_anything(cls, f, value, tmp_path, monkeypatch, capsys):
    """Through each command's main() under cli.run: exit 2, one `error:` line, and no run folder, cache or
    any other file (the output folder and HF_HOME stay as they were)."""
    out, hf_home = tmp_path / "out", tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.chdir(tmp_path)
    argv = _argv(cls, f, value)
    if f.name != "output_dir":
        argv.append(f"--output-dir={out}")
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    with pytest.raises(SystemExit) as exited:
        run(_entry_point(cls))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


@pytest.mark.parametrize("argv, message", [
    (["train.py", "--warmup-epochs", "inf"], "error: --warmup-epochs must be in [0, 100000], got inf"),
    (["eval.py", "--eval-size", "31"], "error: --eval-size must be in [32, 4096], got 31"),
    (["-m", "flowers.predict", "photo.jpg", "--top-k", "0"], "error: --top-k must be at least 1, got 0"),
])
def test_the_real_entry_points_say_the_same(argv, message, tmp_path):
    result = subprocess.run([sys.executable, *[str(REPO / a) if a.endswith(".py") else a for a in argv],
                             "--output-dir", str(tmp_path / "out")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == message, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--warmup-epochs", "inf"], "--warmup-epochs must be in [0, 100000], got inf"),  # was an OverflowError
    (["--weight-decay", "inf"], "--weight-decay must be in [0, 1], got inf"),         # was NaN after an epoch
    (["--cutmix", "inf"], "--cutmix must be in [0, 100], got inf"),                  # was trained with
    (["--momentum", "2"], "--momentum must be in [0, 1), got 2.0"),                  # was ignored by adamw
])
def test_values_that_passed_the_checks_but_cannot_work_are_refused(argv, message):
    with pytest.raises(UserError) as error:
        parse(TrainConfig, argv)
    assert str(error.value) == message


def test_yaml_booleans_of_flags_with_an_optional_value(tmp_path):
    """resume: true is --resume (the latest run), not a TypeError; freeze_backbone: true is the bare
    flag (the whole run, -1), not 1 epoch."""
    path = tmp_path / "c.yaml"
    path.write_text("resume: true\nfreeze_backbone: true\n")
    cfg = parse(TrainConfig, ["--config", str(path)])
    assert (cfg.resume, cfg.freeze_backbone) == ("latest", -1)
    assert (cfg.resume, cfg.freeze_backbone) == (parse(TrainConfig, ["--resume", "--freeze-backbone"]).resume, -1)
    path.write_text("resume: false\nfreeze_backbone: false\n")
    cfg = parse(TrainConfig, ["--config", str(path)])
    assert (cfg.resume, cfg.freeze_backbone) == (None, 0)


def test_the_reference_shows_the_table():
    """docs/reference.md's table of valid values is the one in config.py (regenerate it from
    flowers.config.valid_values_table when an option changes)."""
    reference = (REPO / "docs" / "reference.md").read_text()
    for cls in COMMANDS:
        rows = "\n".join(f"| `{option}` | {values} |" for option, values in config.valid_values_table(cls))
        assert "| option | valid values |\n|---|---|\n" + rows + "\n" in reference, cls.__name__


@pytest.mark.parametrize("cls, f", [pytest.param(cls, f, id=f"{cls.__name__}-{f.name}") for cls in COMMANDS
                                    for f in dataclasses.fields(cls) if isinstance(valid_values(f), Span)])
def test_a_word_for_a_number_names_the_option_and_its_range(cls, f):
    with pytest.raises(UserError) as error:
        parse(cls, _argv(cls, f, "many"))
    _assert_one_line_naming(error.value, f, valid_values(f))
