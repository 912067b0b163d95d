"""What each setting's value may be in a TOML file (or in settings handed to `config_from_values`): a wrong
type would otherwise surface later as a TypeError deep in validation, with no key named."""

from __future__ import annotations

from .errors import ConfigError


def _number(v) -> bool:
    # bool is an int to Python, but `shard_size = true` is a mistake
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(v, ok) -> bool:
    return isinstance(v, (list, tuple)) and all(ok(x) for x in v)


NUMBER = ("a number", _number)
INT = ("an integer", lambda v: _number(v) and isinstance(v, int))
BOOL = ("true or false", lambda v: isinstance(v, bool))
TEXT = ("a string", lambda v: isinstance(v, str))
NUMBERS = ("a number, a list of numbers or a comma-separated string",
           lambda v: _number(v) or isinstance(v, str) or _list_of(v, _number))
WORDS = ("a comma-separated string or a list of strings",
         lambda v: isinstance(v, str) or _list_of(v, lambda x: isinstance(x, str)))
TABLE = ("a table ([storage_options] with key = value lines)", lambda v: isinstance(v, dict))

EXPECTED = {
    "score_threshold": NUMBER, "node_memory_share": NUMBER, "max_failure_rate": NUMBER, "store_timeout": NUMBER,
    "shard_size": INT, "max_pixels": INT, "batch_size": INT, "num_actors": INT, "ray_min_images": INT, "read_ahead": INT, "cpus_per_actor": INT,
    "decode_threads": INT, "listing_processes": INT,
    "max_shards_in_flight": INT, "part_rows": INT, "memory_per_actor_mb": INT,
    "jpeg_draft": BOOL, "overwrite": BOOL, "resume": BOOL, "allow_nonempty_output": BOOL, "incremental": BOOL,
    "input_mean": NUMBERS, "input_std": NUMBERS, "extensions": WORDS, "storage_options": TABLE,
    "inventory_prefix": TEXT,
}  # every other setting is TEXT, or BOOL where its default is a bool
_EXAMPLES = {NUMBER: 0.5, INT: 64, BOOL: "true", TEXT: '"..."'}


def _kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a decimal number", str: "a string", list: "a list", tuple: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def check_type(name: str, value, default, source: str) -> None:
    """Raise a ConfigError naming the key, the type it takes and the value given. `None` is "not set" for
    the settings whose default is None."""
    if value is None and default is None:
        return
    expected = EXPECTED.get(name, BOOL if isinstance(default, bool) else TEXT)
    if expected[1](value):
        return
    if name == "storage_options":
        shown = "(not shown: it may hold credentials)"  # a string of key=value pairs can carry a secret
    else:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    example = default if _number(default) and expected in (NUMBER, INT) else _EXAMPLES.get(expected)
    fix = f"e.g. {name} = {example}" if example is not None else "see the README's TOML example"
    if name == "input" and isinstance(value, list):
        fix = "give one folder, prefix or glob, or a manifest file (.txt, .csv or .parquet) listing the URIs"
    raise ConfigError(f"{name} in {source} must be {expected[0]}, got {_kind(value)} {shown}: {fix}")
