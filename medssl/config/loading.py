"""YAML -> validated, typed settings. The only module that parses YAML.

Every model forbids unknown keys, so a typo (`lerning_rate`) is an error naming the field instead of a
silently ignored setting. A YAML mapping may start with `use: other.yaml`: that file is loaded first (path
relative to the including file) and the remaining keys override it, which is how `pipelines/*.yaml` compose
the reusable pieces in `configs/`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from medssl.config.base import Section
from medssl.config.pipeline import PipelineConfig
from medssl.errors import ConfigError


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", fix="check the path (relative to where you run medssl)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file is not valid YAML: {err}", where=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("config file must hold a mapping of settings", where=str(path))
    return _resolve_uses(data, path.parent)


def _resolve_uses(node: Any, base: Path) -> Any:
    """Replace every `{use: file, ...}` mapping by the file's content overridden by the other keys."""
    if isinstance(node, list):
        return [_resolve_uses(item, base) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _resolve_uses(value, base) for key, value in node.items()}
    if "use" in node:
        included = _read_yaml((base / str(node.pop("use"))).resolve())
        node = deep_merge(included, node)
    return node


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` strings from the command line; the value is parsed as YAML (so 3 is an int)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE", fix="write e.g. pretrain.train.steps=500")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def validate(model: type[Section], data: dict, source: str) -> Section:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            field = ".".join(str(p) for p in problem["loc"]) or "(top level)"
            message = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"]
            lines.append(f"{field}: {message}")
        raise ConfigError("invalid configuration:\n    " + "\n    ".join(lines), where=source,
                          fix="fix the named fields (see README 'Configuration reference')") from None


def load_pipeline(path: Path | str, overrides: list[str] = ()) -> PipelineConfig:
    path = Path(path)
    data = apply_overrides(_read_yaml(path), list(overrides))
    return validate(PipelineConfig, data, str(path))
