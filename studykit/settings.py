"""The settings engine: a stage's config dataclass becomes its command line (flags, `--help` in sections), reads
--config files and study-file tables with their types checked, and is printed, saved and written back as flags.
studykit/config.py holds the stage configs it serves."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from studykit.dependency_logs import VERBOSE_FLAG, VERBOSE_HELP
from studykit.errors import UserError, first_line
from studykit.io import atomic_write_text

ConfigT = TypeVar("ConfigT")


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field that carries its command-line help (and optional `choices`)."""
    factory = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return dataclasses.field(metadata={"help": help, **extra}, **factory)


def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def require(flag: str, value: float, expected: str, holds: Callable[[float], bool]) -> None:
    """A numeric setting must be a finite number for which `holds` is true (NaN and inf never are)."""
    if not (math.isfinite(value) and holds(value)):
        raise UserError(f"{flag} must be {expected} (got {value}).")


# numpy's seeds (the data order) are 0 to 2**32 - 1; torch's are wider.
MAX_SEED = 2**32 - 1


def check_ranges(config: Any, names: str = "flags") -> None:
    """Every setting whose field gives a `minimum` (and `maximum`) lies in that range; each item of a list does. Run
    where settings are parsed (flags and --config files, study files and --set), before validate(): a seed of -1 would
    otherwise end in numpy's traceback. `names`: "flags" (--seed) or "keys" (seed, as a study file writes it)."""
    for field in dataclasses.fields(config):
        low, high = field.metadata.get("minimum"), field.metadata.get("maximum")
        if low is None and high is None:
            continue
        name = field.metadata.get("flag", _flag_name(field.name)) if names == "flags" else field.name
        value = getattr(config, field.name)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and not ((low is None or item >= low) and (high is None or item <= high)):
                expected = f"from {low} to {high}" if high is not None else f"at least {low}"
                raise UserError(f"{name} must be {expected} (got {item}).")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default, unless its help already says what the default means ('2 x rank' rather than
    None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """A mistyped command line reads like every other user error: one `error:` line and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help).\n")


# What to do with what an output directory already holds: decided on each command line, never carried over from a
# config file, so relaunching from a saved train_config.json (a study's trainings save overwrite = true) never
# replaces or resumes a run unasked.
LAUNCH_ACTIONS = ("resume", "overwrite")
# argparse's name for --config FILE, apart from every field (StudyConfig's own `config` field is its study file).
CONFIG_FILE_DEST = "config_file"
VERBOSE_DEST = "verbose_dependencies"
CONFIG_FILE_HELP = (
    "settings to start from: the *_config.json this stage saved, or a .json or .toml file of the same "
    "keys (the flags with _ for -); flags given here override it; relative paths in it are read from the "
    "current directory, and its resume and overwrite are ignored (give --resume or --overwrite here), so "
    "a saved config relaunched as is never replaces a finished run (default: none)"
)


def help_sections(config_cls: type) -> dict[str, list[str]]:
    """The config's fields by --help section: its HELP_SECTIONS (section title -> field names, in order), and the
    fields it leaves out under "other settings". A config without HELP_SECTIONS has one unnamed section."""
    sections = getattr(config_cls, "HELP_SECTIONS", None)
    names = [field.name for field in dataclasses.fields(config_cls)]
    if not sections:
        return {"": names}
    grouped = {title: [name for name in fields if name in names] for title, fields in sections.items()}
    listed = {name for fields in grouped.values() for name in fields}
    unlisted = [name for name in names if name not in listed]
    return {**grouped, **({"other settings": unlisted} if unlisted else {})}


def build_parser(config_cls: type, description: str) -> argparse.ArgumentParser:
    parser = _Parser(description=description, formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(config_cls)
    fields = {field.name: field for field in dataclasses.fields(config_cls)}
    if "config" not in fields:
        parser.add_argument("--config", dest=CONFIG_FILE_DEST, metavar="FILE", default=None, help=CONFIG_FILE_HELP)
    # Read by the entry point before the parse (dependency_logs.quiet_dependencies); accepted here, kept by no config.
    parser.add_argument(VERBOSE_FLAG, dest=VERBOSE_DEST, action="store_true", help=VERBOSE_HELP)
    for title, names in help_sections(config_cls).items():
        group = parser.add_argument_group(title) if title else parser
        for name in names:
            _add_field(group, fields[name], hints[name])
    return parser


def _add_field(parser, field: dataclasses.Field, hint: Any) -> None:
    annotation, optional = unwrap_optional(hint)
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    kwargs: dict[str, Any] = {"default": default, "help": field.metadata.get("help", ""), "dest": field.name}
    flag = field.metadata.get("flag", _flag_name(field.name))
    if "choices" in field.metadata:
        kwargs["choices"] = field.metadata["choices"]
    if annotation is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
        if field.metadata.get("repeatable"):
            kwargs["action"] = "append"  # `--set A --set B`, each flag one value
        else:
            kwargs["nargs"] = "+"
    kwargs["type"] = _parse_optional(annotation) if optional else annotation
    parser.add_argument(flag, **kwargs)


def _parse_optional(annotation: Any):
    def parse(text: str):
        return None if text.lower() in ("none", "") else annotation(text)

    parse.__name__ = getattr(annotation, "__name__", "value")
    return parse


def parse_config(config_cls: type[ConfigT], description: str, argv: Optional[Sequence[str]] = None) -> ConfigT:
    """The stage's config from its defaults, then --config FILE's settings, then the flags given: the later wins."""
    parser = build_parser(config_cls, description)
    values = field_values(parser, argv)
    config_file = values.pop(CONFIG_FILE_DEST, None)
    if config_file is not None:
        # The file's settings become the defaults, so every flag on the command line still overrides them.
        parser.set_defaults(**read_config_file(Path(config_file), config_cls))
        values = field_values(parser, argv)
        values.pop(CONFIG_FILE_DEST)
    config = config_cls(**values)
    check_ranges(config)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def field_values(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> dict[str, Any]:
    """The parsed command line without the flags that belong to no field (--verbose)."""
    values = vars(parser.parse_args(argv))
    values.pop(VERBOSE_DEST)
    return values


def field_types(config_cls: type) -> dict[str, tuple[Any, Optional[Sequence[str]]]]:
    """Each field's type and, where its flag has them, its choices."""
    hints = typing.get_type_hints(config_cls)
    return {field.name: (hints[field.name], field.metadata.get("choices")) for field in dataclasses.fields(config_cls)}


def fields_accepted(config_cls: type) -> str:
    return f"fields of {config_cls.__name__} (the stage's flags with _ for -)"


def _fits(value: Any, annotation: Any) -> bool:
    """JSON's null fits an Optional setting (TOML has none); an integer is a fine float, but true is no number."""
    annotation, optional = unwrap_optional(annotation)
    if value is None:
        return optional
    if typing.get_origin(annotation) is list:
        return isinstance(value, list) and all(_fits(item, typing.get_args(annotation)[0]) for item in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    annotation, _ = unwrap_optional(annotation)
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0]).removeprefix('a ')}s"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        annotation, str(annotation)
    )


def _value_kind(value: Any) -> str:
    kinds = {
        bool: "true/false",
        int: "a whole number",
        float: "a decimal number",
        str: "a string",
        list: "a list",
        dict: "a table",
        type(None): "null",
    }
    return kinds.get(type(value), f"a {type(value).__name__}")


def _how_to_write(key: str, value: Any, annotation: Any) -> str:
    annotation, _ = unwrap_optional(annotation)
    if typing.get_origin(annotation) is list and _fits(value, typing.get_args(annotation)[0]):
        return f"put it in brackets: {key} = {json.dumps([value])}"
    if isinstance(value, str) and annotation in (bool, int, float):
        return f"write {key} as {_type_name(annotation)}, without quotes"
    return f"write {key} as {_type_name(annotation)}"


def check_settings(
    values: dict[str, Any], types: dict[str, tuple[Any, Optional[Sequence[str]]]], place: str, accepted: str
) -> None:
    """Every key of a settings table (a study file's, a --config file's) is one its stage knows, and every value has
    that setting's type (and is one of its choices): file values reach the configs unconverted, where a string lr would
    fail deep inside training. `place` says where the table is, e.g. "[budget] in studies/quick.toml"."""
    unknown = sorted(set(values) - set(types))
    if unknown:
        meant = [guess for key in unknown for guess in difflib.get_close_matches(key, list(types), n=1)]
        raise UserError(
            f"{place} has unknown setting(s) {unknown}"
            + (f" (did you mean {meant}?)" if meant else "")
            + f"; use {accepted}."
        )
    for key, value in values.items():
        annotation, choices = types[key]
        shown = json.dumps(value, default=str)
        if not _fits(value, annotation):
            raise UserError(
                f"{place} sets {key} = {shown}, {_value_kind(value)}, but {key} takes {_type_name(annotation)}; "
                f"{_how_to_write(key, value, annotation)}."
            )
        if choices and value not in choices:
            raise UserError(f"{place} sets {key} = {shown}; use one of {list(choices)}.")


def read_config_file(path: Path, config_cls: type) -> dict[str, Any]:
    """A --config file's settings, checked like a study file's table; its LAUNCH_ACTIONS are left out (said so when
    one of them is on)."""
    if not path.is_file():
        raise UserError(f"--config {path} is not a file; pass a stage's saved *_config.json or a .toml file.")
    if path.suffix not in (".json", ".toml"):
        raise UserError(
            f"--config {path} is neither a .json nor a .toml file; pass a stage's saved *_config.json or a .toml file."
        )
    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except ValueError as error:  # JSON's and TOML's decode errors, and bytes that are not UTF-8
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise UserError(f"--config {path} is not valid {kind} ({first_line(error)}); fix the file.") from None
    if not isinstance(values, dict):
        raise UserError(
            f"--config {path} holds {_value_kind(values)}, not a table of settings; write one key per setting."
        )
    check_settings(values, field_types(config_cls), f"--config {path}", fields_accepted(config_cls))
    for key in LAUNCH_ACTIONS:
        if values.pop(key, False):
            print(
                f"note: --config {path} sets {key} = true, which a config file never carries over; pass --{key} "
                "to do it."
            )
    return values


def command_line(config: Any) -> list[str]:
    """The flags that give `config` back through parse_config. Every field is written out, so a printed command means
    the same under another version's defaults."""
    hints = typing.get_type_hints(type(config))
    args: list[str] = []
    for field in dataclasses.fields(config):
        value, flag = getattr(config, field.name), field.metadata.get("flag", _flag_name(field.name))
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if value is None:
            if default is not None:
                args += [flag, "none"]
        elif unwrap_optional(hints[field.name])[0] is bool:
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list) and field.metadata.get("repeatable"):
            args += [part for item in value for part in (flag, str(item))]
        elif isinstance(value, list):
            if value:
                args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def config_to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def print_config(config: Any, stream=None) -> None:
    stream = stream or sys.stdout
    print(f"{type(config).__name__}:", file=stream)
    for key, value in config_to_dict(config).items():
        print(f"  {key}: {value}", file=stream)
    stream.flush()


def save_config(config: Any, path: Path) -> None:
    atomic_write_text(Path(path), json.dumps(config_to_dict(config), indent=2) + "\n")
