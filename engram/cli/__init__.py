"""The `engram` command line: parse arguments, call the library, print.

Every subcommand prints a human summary by default and one JSON object with `--json`. Errors go
to stderr; with `--json`, stdout also gets one object {"error": message, "error_type": the
exception's class name, "exit_code": code}.

Exit codes:
    0    success
    1    a check failed (`verify` found a damaged chunk)
    2    arguments that do not parse (usage error: a missing flag, an unknown choice, a count out of
         its range)
    3    engram refused the input, or a file could not be read or written (missing table, mismatched
         spec, bad ids, a missing or damaged tokenizer file, an output folder that does not exist, a
         table already at the output path without --overwrite, a --scale-block that does not divide D,
         a build that would not fit on the disk; a dry run of one prints its plan, then exits 3)
    130  interrupted
"""

from __future__ import annotations

from engram.cli.app import build_parser, main

__all__ = ["main", "build_parser"]
