"""Typed configs: every stage has one pydantic model; YAML files and dotted overrides fill it in.

Why pydantic: a typo in a YAML key or a wrong type must fail *before* an hour of training, with
an error that names the field. `extra="forbid"` everywhere makes unknown keys an error too.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from rlhfkit.errors import UserError, validation_problems

C = TypeVar("C", bound="StrictModel")


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `train.lr=1e-4` into (["train", "lr"], 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested dict (in place; also returned)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise UserError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(err: ValidationError, source: str, cls: type[BaseModel] | None = None) -> str:
    """One line per error, `section.key: what is wrong`. An unknown key names the settings of `cls`
    with the same or a similar name (`train.batch_size` in PPO: did you mean `ppo.batch_size`?)."""
    lines = [f"{source}: invalid config"]
    known = [row[0] for row in describe_fields(cls)] if cls is not None else []
    for loc, msg, kind in validation_problems(err):
        if kind == "extra_forbidden" and known:
            leaf = loc.rsplit(".", 1)[-1]
            near = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
            near = near or difflib.get_close_matches(loc, known, n=2, cutoff=0.8)
            msg = "unknown setting" + (f"; did you mean {' or '.join(near)}?" if near else "")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def section_defaults(cls: type[BaseModel]) -> dict[str, Any]:
    """The stage's own defaults of every section, as a nested dict.

    Why: a stage may default a section to something other than the section class's defaults (e.g.
    pretraining's `train.lr`); setting one key of that section must keep the stage's other values.
    """
    data: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            data[name] = default.model_dump()
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge `update` into `base` (in place; also returned): mappings merge key by key, the rest replaces."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def read_yaml(path: str | Path, what: str = "file") -> Any:
    """Parse a YAML file; a missing file, bad encoding or bad syntax is a UserError naming path:line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: YAML syntax error: {getattr(e, 'problem', e)}") from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Build a `cls` from an optional YAML file plus dotted overrides; errors name the field."""
    data = section_defaults(cls)
    source = "config"
    if path is not None:
        source = str(path)
        loaded = read_yaml(path, "config file")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: the top level must be a mapping of config sections")
        deep_merge(data, loaded)
    if overrides:
        source = f"{source} (with overrides {' '.join(overrides)})"
        apply_overrides(data, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source, cls)) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see either the old or the whole new content, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_config(config: BaseModel, directory: str | Path, name: str = "config.yaml") -> Path:
    """Save the resolved config next to a stage's outputs, so every result says how it was made."""
    path = Path(directory) / name
    data = json.loads(config.model_dump_json())
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def _type_name(ann: Any) -> str:
    """A field's type as --help shows it: `{a|b|c}` for a Literal, `int | None`, `list[str]`."""
    args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Literal:
        return "{" + "|".join(str(a) for a in args) + "}"
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if ann is type(None):
        return "None"
    if args:
        return str(ann).replace("typing.", "")
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def describe_fields(
    cls: type[BaseModel] | None, prefix: str = "", defaults: BaseModel | None = None
) -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) for every leaf field: the CLI's --help table.

    `defaults` is the enclosing stage's default instance of `cls`, whose values win over the class's.
    An optional section (`model.lora`, `ppo.kl.adaptive`: a model or null) gets a row of its own,
    then its fields, with the defaults they take once it is set.
    """
    rows: list[tuple[str, str, str, str]] = []
    for name, field in (cls.model_fields if cls is not None else {}).items():
        ann = field.annotation
        dotted = f"{prefix}{name}"
        if defaults is not None:
            value: Any = getattr(defaults, name)
        else:
            value = None if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, f"{dotted}.", value if isinstance(value, BaseModel) else None))
            continue
        section = next((a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        default = "required" if field.is_required() and defaults is None else repr(value)
        if section is not None:
            desc = field.description or ""
            desc = desc if "null" in desc else "; ".join(filter(None, [desc, "a section, or null for none"]))
            rows.append((dotted, _type_name(ann), default, desc))
            rows.extend(describe_fields(section, f"{dotted}.", value if isinstance(value, BaseModel) else None))
            continue
        rows.append((dotted, _type_name(ann), default, field.description or ""))
    return rows
