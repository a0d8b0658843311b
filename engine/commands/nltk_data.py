"""`granucap nltk-data install [--force]` / `granucap nltk-data check`: the NLTK data folder the offline
extractor reads (engine/language/nltk_data.py), filled from the packages install.sh installs, nothing
downloaded. `install` is idempotent and ends with `check`."""

from __future__ import annotations

import argparse
import sys


def cmd_install(args: argparse.Namespace) -> int:
    from engine.language import lexicon, nltk_data

    try:
        root = nltk_data.install(force=args.force)
        # the noun lexicon is built from the WordNet just installed (kept when it is up to date)
        lexicon.load(root)
        print(nltk_data.check())
    except (nltk_data.NltkDataMissing, LookupError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from engine.language import nltk_data

    try:
        print(nltk_data.check())
    except (nltk_data.NltkDataMissing, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("nltk-data", help="install or check the NLTK data the offline `nltk` extractor reads")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("install", help="fill the data folder from WordNet (apt) and textblob-aptagger (pip), "
                                           "build the noun lexicon, then check; idempotent")
    a.add_argument("--force", action="store_true", help="rewrite every file, even those already in place")
    a.set_defaults(func=cmd_install)
    a = actions.add_parser("check", help="load WordNet and the tagger from the data folder and run them once")
    a.set_defaults(func=cmd_check)
