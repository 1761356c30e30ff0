"""`nanod schema`: the JSON Schema of job files, for editors (yaml-language-server)."""
from __future__ import annotations

NAME = "schema"
HELP = "print the JSON Schema of job files"


def add_arguments(parser) -> None:
    pass


def run(args, settings) -> int:
    import json

    from daemon.spec import json_schema
    print(json.dumps(json_schema(), indent=2))
    return 0
