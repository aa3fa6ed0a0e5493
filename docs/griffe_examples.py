"""A griffe extension for the API reference: engram's docstrings head their doctests "Example:";
griffe's Google parser reads only "Examples:" as an examples section (code) and would render
"Example:" as an admonition of plain text, so this renames the heading before parsing."""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
