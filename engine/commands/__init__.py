"""Extra `granucap` subcommands, one module each. A module here defines `add_parser(subparsers)` that
registers its subcommand with `set_defaults(func=...)`; the function takes the parsed args and returns the
exit code. Add the module's name to COMMAND_MODULES to have it listed by `granucap --help`.
"""

COMMAND_MODULES: list[str] = [
    "export",
    "try_one",
    "inspect",
    "doctor",
    "student",
]
