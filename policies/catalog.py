"""Registering datasets, columns and feeds as policy objects, so rules on their groups cover them.

The server calls these when a steward registers a dataset or defines a feed. A column
never assigned to a class is *not* treated as public — it is unknown, so every
request naming it is denied. Registration therefore assigns every column of a new
dataset to ``public`` (:meth:`CatalogMixin.assign_public_column`) unless the steward
has already classified it; :meth:`CatalogMixin.classify_column` moves a column to
``quasi`` or ``sensitive`` and removes its old class, because a column left in two
classes would get the larger cap. All links of one dataset are made in the same
agency (``*`` by default: the dataset is usable in every agency where someone holds a
role), since Casbin follows a chain of groups only within one domain.
"""

from __future__ import annotations

from civicdp.policies.actions import ColumnClass
from civicdp.policies.objects import (ALL_DATASETS, ALL_FEEDS, WILDCARD, class_group, column_object, column_set,
                              dataset_object, feed_object)


class CatalogMixin:
    """Dataset, column and feed registration on top of a store's ``assign``/``unassign``/``groups_of``."""

    def assign(self, obj: str, group: str, agency: str = WILDCARD) -> bool:
        raise NotImplementedError

    def unassign(self, obj: str, group: str, agency: str = WILDCARD) -> bool:
        raise NotImplementedError

    def groups_of(self, obj: str, agency: str = WILDCARD) -> list[str]:
        raise NotImplementedError

    def register_dataset(self, dataset: str, agency: str = WILDCARD) -> None:
        """Make ``dataset:<dataset>`` a member of ``dataset:*`` and link its column sets to their classes."""
        self.assign(dataset_object(dataset), ALL_DATASETS, agency)
        for column_class in ColumnClass:
            self.assign(column_set(dataset, column_class), class_group(column_class), agency)

    def class_of(self, dataset: str, column: str, agency: str = WILDCARD) -> ColumnClass | None:
        """The class ``column`` is assigned to in ``agency``, or ``None`` if it is unclassified."""
        groups = set(self.groups_of(column_object(dataset, column), agency))
        for column_class in ColumnClass:
            if column_set(dataset, column_class) in groups:
                return column_class
        return None

    def assign_public_column(self, dataset: str, column: str, agency: str = WILDCARD) -> bool:
        """Register ``column`` as public unless it is already classified; True if it was newly classified."""
        self.register_dataset(dataset, agency)
        if self.class_of(dataset, column, agency) is not None:
            return False  # re-registration must not undo a steward's "quasi" or "sensitive"
        return self.assign(column_object(dataset, column), column_set(dataset, ColumnClass.PUBLIC), agency)

    def classify_column(self, dataset: str, column: str, column_class: ColumnClass,
                        agency: str = WILDCARD) -> None:
        """Put ``column`` in ``column_class`` (only), registering the dataset if needed."""
        target = ColumnClass(column_class)
        self.register_dataset(dataset, agency)
        obj = column_object(dataset, column)
        for other in ColumnClass:
            if other is not target:
                self.unassign(obj, column_set(dataset, other), agency)
        self.assign(obj, column_set(dataset, target), agency)

    def register_feed(self, feed: str, agency: str = WILDCARD) -> bool:
        """Make ``feed:<feed>`` a member of ``feed:*``; False if it already was."""
        return self.assign(feed_object(feed), ALL_FEEDS, agency)
