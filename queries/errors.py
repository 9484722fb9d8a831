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


def dataset_unavailable(table: str | None) -> DatasetUnavailable:
    """The fixed answer when reading ``table`` (None: an analysis's tables) failed.

    The library's own message is never shown: it could quote values from the data.
    """
    which = f"table '{table}'" if table else "the tables this analysis reads"
    return DatasetUnavailable("table", f"the data files of {which} are missing, unreadable, or "
                              "do not have the columns and types its metadata declares",
                              "Ask the data steward to check the dataset's files against metadata.json")
