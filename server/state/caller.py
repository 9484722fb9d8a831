"""Who is calling: an authenticated account."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """An authenticated account."""

    account_id: int
    name: str
    agency: str

    @property
    def subject(self) -> str:
        return subject_of(self.name)


def subject_of(account_name: str) -> str:
    return f"account:{account_name}"
