"""``actstore info``: describe a store (model, dataset, hooks, progress, sizes, statistics).

The summary is plain JSON values; :func:`pipelines.report.store_tables` prints it.
"""

from __future__ import annotations

from typing import Any

import actstore


def describe_store(url: str) -> dict[str, Any]:
    """The store's summary as plain JSON values (see ``Store.summary``)."""
    return actstore.open_store(url).summary()

