"""Choosing tensors and weights by name: globs, or regular expressions written 're:...'."""

from __future__ import annotations

import fnmatch
import re

__all__ = ["name_matches"]


def name_matches(name: str, patterns) -> bool:
    """Whether `name` matches one of `patterns`: globs, or regular expressions written 're:...'."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False
