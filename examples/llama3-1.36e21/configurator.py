"""Command-line configuration for train.py: `python train.py config/<variant>.py --key=value ...`.

The idea is nanoGPT's configurator: train.py declares every setting with a default at its top,
config files named on the command line override those defaults, and `--key=value` arguments
override both, applied left to right. Unlike nanoGPT's, every override is checked:

- a key that train.py does not declare is an error (a typo must not silently do nothing);
- a value must have the type of the default: int stays int, a float key also accepts an int
  (`--learning_rate=1` means 1.0), bool keys accept True/False, str keys take the text as given;
- `--key=value` values are parsed with ast.literal_eval, never executed. Only config files that
  the user names are executed as Python (they are plain assignments written by llama3gen).
"""

import ast
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


def load_config(defaults, argv):
    """Apply config files and --key=value overrides in `argv` to `defaults`; return a new dict."""
    config = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"{arg}: overrides are written --key=value")
            key, text = arg[2:].split("=", 1)
            if key not in config:
                raise ConfigError(f"--{key}: unknown setting; known: {', '.join(sorted(config))}")
            value = _parse_value(key, text, config[key])
            config[key] = _check_type(key, value, defaults[key], f"--{key}={text}")
        else:
            for key, value in _read_config_file(arg).items():
                if key not in config:
                    raise ConfigError(f"{arg}: unknown setting {key!r}; "
                                      f"known: {', '.join(sorted(config))}")
                config[key] = _check_type(key, value, defaults[key], arg)
    return config
