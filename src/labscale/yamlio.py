"""Reading YAML files the way a user means them.

`load_yaml(path)` is `yaml.safe_load` with three changes, each a one-line ConfigError instead of a surprise:

* duplicate keys in a mapping are refused (PyYAML keeps the last silently), naming the key and both lines;
* only `true` / `false` (any case) are booleans, as in YAML 1.2: `yes`, `no`, `on`, `off`, `y`, `n` stay the
  strings the user wrote (`labels: [yes, no]` is two labels, not two booleans);
* a file that is a folder, not UTF-8 text, or binary is named as such.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from labscale.errors import ConfigError

_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and no duplicate keys."""


# Drop YAML 1.1's yes/no/on/off booleans; keep true/false.
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))


def _mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let the constructor raise its own error
            continue
        if first is not None:
            raise ConfigError(f"duplicate key '{key}' at line {key_node.start_mark.line + 1} (first at line "
                              f"{first + 1}) of '{loader.name}'", "keep one of them: YAML would silently use the last")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_text(path: str | Path, what: str = "file") -> str:
    """The file's text, or a one-line error: missing, a folder, binary, or not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} '{path}' is a folder, not a file", "pass the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist", "check the path")
    data = path.read_bytes()
    if b"\0" in data:
        raise ConfigError(f"{what} '{path}' is a binary file, not YAML text", "pass the path of a YAML file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{what} '{path}' is not UTF-8 text (byte 0x{data[e.start]:02x} at line {line})",
                          "save it as UTF-8") from None


def load_yaml(path: str | Path, what: str = "file"):
    """Parse a YAML file strictly (see the module docstring); syntax errors name the line and column."""
    text = read_text(path, what)
    loader = StrictLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise ConfigError(f"malformed YAML in '{path}'{where}: {problem}", "fix the YAML syntax") from None
    finally:
        loader.dispose()
