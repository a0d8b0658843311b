"""Extra `granucap` subcommands, one module each, named for its command (`nltk_data.py` is `granucap
nltk-data`). A module here defines `add_parser(subparsers)` that registers its subcommand with
`set_defaults(func=...)`; the function takes the parsed args and returns the exit code. Add the module's name
to COMMAND_MODULES to have it listed by `granucap --help`. `one_sample.py` is no command: it holds what
`extract` and `recaption` share.
"""

COMMAND_MODULES: list[str] = [
    "export",
    "extract",
    "recaption",
    "inspect",
    "doctor",
    "student",
    "nltk_data",
    "refilter",
]
