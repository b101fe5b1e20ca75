"""Command-line configuration for train.py: `python train.py config/<variant>.py --key=value ...`.

The idea is nanoGPT's configurator: train.py declares every setting with a default at its top,
config files named on the command line override those defaults, and `--key=value` arguments
override both, applied left to right. Unlike nanoGPT's, every override is checked:

- a key that train.py does not declare is an error (a typo must not silently do nothing);
- a value must have the type of the default: int stays int, a float key also accepts an int
  (`--learning_rate=1` means 1.0), bool keys accept True/False, str keys take the text as given;
- a value must lie in its setting's allowed range (train.py's RULES table, written with the
  helpers below: at_least, between, one_of, ...), and settings that depend on each other must
  agree (train.py's RELATIONS); the error names the key, the value, where it came from and what
  is allowed;
- a bool setting may be given as a bare `--key`, meaning `--key=True` (`--dry_run`);
- `--key=value` values are parsed with ast.literal_eval, never executed. Only config files that
  the user names are executed as Python (they are plain assignments written by llama3gen).
"""

import ast
import math
import os


class ConfigError(ValueError):
    """A config file or --key=value argument that train.py cannot accept."""


def _type_name(value):
    return type(value).__name__


def _check_type(key, value, default, where):
    """Return `value` converted to the type of `default`, or raise ConfigError."""
    expected = type(default)
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{key}: default has unsupported type {_type_name(default)}")
    raise ConfigError(
        f"{where}: {key} must be {expected.__name__} (like its default {default!r}), "
        f"got {_type_name(value)} {value!r}")


def _parse_value(key, text, default):
    """Turn the text after `--key=` into a Python value of the default's type."""
    if isinstance(default, str):
        # Paths and names are taken as written; a quoted literal ('"x"') is unquoted.
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        return parsed if isinstance(parsed, str) else text
    if isinstance(default, bool) and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--{key}={text}: cannot parse {text!r} as a Python literal "
                          f"({_type_name(default)} expected)") from None


def _read_config_file(path):
    """Execute a config file the user named and return the settings it assigns."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        source = f.read()
    namespace = {}
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as e:  # report any error in the file with its name
        raise ConfigError(f"{path}: {type(e).__name__}: {e}") from e
    # Plain values only: skip builtins, imported modules and helper functions or classes.
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str))}


# -----------------------------------------------------------------------------
# Allowed ranges

INT_LIMIT = 2**63  # ints at or beyond this overflow torch's and numpy's int64


class Rule:
    """The values one setting allows: test(value) is true for them; `allowed` says which they
    are ("an int >= 1"), for the error message."""

    def __init__(self, test, allowed):
        self.test, self.allowed = test, allowed


def _finite(value):
    """Not inf or nan (1e999 parses as inf); an int within int64."""
    return abs(value) < INT_LIMIT if isinstance(value, int) else math.isfinite(value)


def at_least(low):
    return Rule(lambda v: _finite(v) and v >= low, f">= {low}")


def greater_than(low):
    return Rule(lambda v: _finite(v) and v > low, f"> {low}")


def between(low, high, *, high_included=True):
    """low <= value <= high (or < high)."""
    if high_included:
        return Rule(lambda v: _finite(v) and low <= v <= high, f"in [{low}, {high}]")
    return Rule(lambda v: _finite(v) and low <= v < high, f"in [{low}, {high})")


def even_at_least(low):
    return Rule(lambda v: _finite(v) and v >= low and v % 2 == 0, f"even and >= {low}")


def one_of(*choices):
    return Rule(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


NOT_EMPTY = Rule(lambda v: v.strip() != "", "a non-empty path")
ANY_TEXT = Rule(lambda v: True, "any text")


def check_ranges(config, rules, relations, sources):
    """Raise ConfigError for the first setting outside its rule or relation.

    rules: {key: Rule} for every key that is not a bool (True and False are both allowed);
    relations: [(key, test(config), allowed)], checked once every key is in range; `allowed` may
    name other settings as {key}; sources: {key: where its value came from}."""
    for key, value in config.items():
        rule = rules.get(key)
        if rule is None:
            if isinstance(value, bool):
                continue
            raise ConfigError(f"{key} has no allowed range: add it to RULES in train.py")
        if not rule.test(value):
            allowed = rule.allowed
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not _finite(value):
                allowed += " and below 2**63" if isinstance(value, int) else " and finite"
            raise ConfigError(f"{sources[key]}: {key} must be {allowed}, got {value!r}")
    for key, test, allowed in relations:
        if not test(config):
            raise ConfigError(f"{sources[key]}: {key} must be {allowed.format(**config)}, "
                              f"got {config[key]!r}")


def load_config(defaults, argv, rules=None, relations=()):
    """Apply config files and --key=value overrides in `argv` to `defaults`; return a new dict.
    With `rules`, also check every value's range (check_ranges)."""
    config = dict(defaults)
    sources = {key: f"train.py default {key} = {value!r}" for key, value in defaults.items()}
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg and isinstance(config.get(arg[2:]), bool):
                arg += "=True"  # a bare flag: --dry_run
            if "=" not in arg:
                raise ConfigError(f"{arg}: overrides are written --key=value")
            key, text = arg[2:].split("=", 1)
            if key not in config:
                raise ConfigError(f"--{key}: unknown setting; known: {', '.join(sorted(config))}")
            value = _parse_value(key, text, config[key])
            config[key] = _check_type(key, value, defaults[key], f"--{key}={text}")
            sources[key] = f"--{key}={text}"
        else:
            for key, value in _read_config_file(arg).items():
                if key not in config:
                    raise ConfigError(f"{arg}: unknown setting {key!r}; "
                                      f"known: {', '.join(sorted(config))}")
                config[key] = _check_type(key, value, defaults[key], arg)
                sources[key] = arg
    if rules is not None:
        check_ranges(config, rules, relations, sources)
    return config
