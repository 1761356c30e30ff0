"""STAND-IN for nanochat's configurator (before 2026-01-04), exec'd by a script.

Each `--key=value` argument overrides the script global `key`; the value is read
as a Python literal when it is one, else kept as a string, and must have the
type of the default (unless the default is None). An unknown key is an error.
Written for the stand-in; the behaviour is what nanod relies on.
"""
import sys
from ast import literal_eval

for _arg in sys.argv[1:]:
    assert _arg.startswith("--") and "=" in _arg, f"expected --key=value, got {_arg!r}"
    _key, _text = _arg[2:].split("=")  # one '=' only, like the original
    if _key not in globals():
        raise ValueError(f"Unknown config key: {_key}")
    try:
        _value = literal_eval(_text)
    except (SyntaxError, ValueError):
        _value = _text
    if globals()[_key] is not None:
        assert type(_value) == type(globals()[_key]), f"Type mismatch: {type(_value)} != {type(globals()[_key])}"
    print(f"Overriding: {_key} = {_value}")
    globals()[_key] = _value
