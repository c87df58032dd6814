"""Opening an Optuna storage that other drivers may be opening at the same moment."""

from __future__ import annotations

import time

import optuna

# Drivers started together on an empty database race to create Optuna's tables; whoever loses
# finds them created on the next attempt.
SCHEMA_ATTEMPTS = 3
SCHEMA_RETRY_S = 1.0


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """``optuna.storages.get_storage(url)``, retried when a concurrent driver creating the same
    schema makes the first attempt fail."""
    import sqlalchemy.exc

    for _ in range(SCHEMA_ATTEMPTS - 1):
        try:
            return optuna.storages.get_storage(url)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            time.sleep(SCHEMA_RETRY_S)
    return optuna.storages.get_storage(url)
