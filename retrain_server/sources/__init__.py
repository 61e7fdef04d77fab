"""Where training data comes from besides files.

Each source turns its rows into the same :class:`~retrain_server.data.Catalog`
and :class:`~retrain_server.data.PurchaseLog` arrays the file loaders produce,
so training code never knows whether it reads CSV/JSONL or a database.
:mod:`.postgres` is the store's PostgreSQL (contract §8).
"""

__all__: list[str] = []
