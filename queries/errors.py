"""Errors of the queries package.

Tree::

    QueryError            an invalid query spec (names the field and the fix)
    ├── MetadataError     an invalid dataset metadata declaration
    └── DatasetUnavailable the dataset's files are missing, unreadable or unlike their metadata

Messages depend only on the spec and the public metadata, never on the data.
"""

from __future__ import annotations


class QueryError(ValueError):
    """A query that cannot be answered as asked."""

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        text = f"{field}: {problem}" if field else problem
        super().__init__(f"{text}. {fix}".rstrip(". ") + "." if fix else text)

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "problem": self.problem, "fix": self.fix}


class MetadataError(QueryError):
    """Dataset metadata that cannot be accepted."""


class DatasetUnavailable(QueryError):
    """The dataset's data files cannot be read as their metadata declares."""
