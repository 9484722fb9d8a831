"""The names of what the policy protects, and what a stored name may contain.

One naming scheme for the whole server::

    server                     the administrative surface within the request's agency:
                               accounts, keys, roles, rules, dataset registration,
                               budgets, the audit log (``dataset.list`` of the agency too)
    dataset:<name>             a registered dataset (metadata, releases, row counts);
                               member of the group ``dataset:*``
    column:<dataset>/<column>  a column; member of exactly one column set
                               ``colset:<dataset>/public|quasi|sensitive``, which is a
                               member of ``colset:*/public|quasi|sensitive``
    feed:<name>                a scheduled release feed; member of ``feed:*``

Groups such as ``dataset:*`` and ``colset:*/quasi`` are plain names linked with
Casbin's ``g2``, not patterns: an object is covered by a rule on a group only once it
has been assigned to it, so anything never registered is denied by default. The only
pattern is a bare ``*`` as the object of a *deny* rule, meaning every object. Names
go into Casbin's comma-separated policy lines and 255-character SQL columns, so
:func:`validate_name` refuses commas, brackets, parentheses, control characters,
surrounding spaces and over-long names.
"""

from __future__ import annotations

import re

from civicdp.policies.actions import ColumnClass
from civicdp.policies.errors import InvalidRuleValue

WILDCARD = "*"
SERVER = "server"
ALL_DATASETS = "dataset:*"
ALL_FEEDS = "feed:*"
#: The adapter's columns are VARCHAR(255); PostgreSQL refuses longer values.
MAX_NAME_LENGTH = 255
_UNSAFE = re.compile(r"[,\[\]()\x00-\x1f\x7f]")


def validate_name(field: str, value: object) -> str:
    """``value`` if it is safe to store as one field of a rule; raises :class:`InvalidRuleValue`."""
    if not isinstance(value, str) or not value:
        raise InvalidRuleValue(field, value, "must be a non-empty string")
    value = str(value)  # a StrEnum member (a Role) is stored as its plain value
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidRuleValue(field, value, f"is longer than {MAX_NAME_LENGTH} characters")
    if value != value.strip() or _UNSAFE.search(value):
        raise InvalidRuleValue(field, value, "contains a comma, bracket, parenthesis, control character "
                                             "or surrounding space")
    return value


def _part(field: str, value: str) -> str:
    validate_name(field, value)
    if WILDCARD in value or "/" in value:
        raise InvalidRuleValue(field, value, "may not contain '*' or '/' (reserved for groups)")
    return value


def dataset_object(dataset: str) -> str:
    """``dataset:<dataset>``."""
    return f"dataset:{_part('dataset name', dataset)}"


def column_object(dataset: str, column: str) -> str:
    """``column:<dataset>/<column>``."""
    return f"column:{_part('dataset name', dataset)}/{_part('column name', column)}"


def column_set(dataset: str, column_class: ColumnClass) -> str:
    """``colset:<dataset>/<class>``: the columns of one dataset in one class."""
    return f"colset:{_part('dataset name', dataset)}/{ColumnClass(column_class).value}"


def class_group(column_class: ColumnClass) -> str:
    """``colset:*/<class>``: the columns of every dataset in one class (rules name this)."""
    return f"colset:*/{ColumnClass(column_class).value}"


def feed_object(feed: str) -> str:
    """``feed:<feed>``."""
    return f"feed:{_part('feed name', feed)}"
