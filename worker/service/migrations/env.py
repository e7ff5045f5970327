"""Alembic environment of the results table.

Normally run by :func:`astronn_dist.worker.service.results.migrate`, which hands over a connection already inside
the migration transaction (and lock): ``config.attributes["connection"]``.

By hand (developers), with ``worker/service/alembic.ini``::

    alembic -c worker/service/alembic.ini upgrade head               # ASTRONN_DIST_DATABASE_URL's database
    alembic -c worker/service/alembic.ini revision --autogenerate -m "add column x"

The database URL then comes from ``-x url=...``, else the settings (``ASTRONN_DIST_DATABASE_URL``).
Only the ``astro_nn_dist`` table is compared: a shared PostgreSQL database may hold others.
"""

from __future__ import annotations

from typing import Any

from alembic import context

from astronn_dist.worker.service.results import TABLE_NAME, VERSION_TABLE, Base, make_engine, migration_transaction, normalize_url

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and "connection" not in config.attributes:
    # Only by hand (alembic.ini's logging); the service keeps its own logging configuration.
    from logging.config import fileConfig

    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Autogenerate looks at our table (and its indexes) only."""
    if type_ == "table":
        return name == TABLE_NAME
    table = getattr(obj, "table", None)
    return table is None or table.name == TABLE_NAME


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_object=_include_object,
        compare_type=True,
        # ALTER on SQLite goes through table copies ("batch" mode) in generated migrations.
        render_as_batch=True,
        **kwargs,
    )


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from astronn_dist.worker.config import Settings

        url = Settings.from_env().database_url
    return url


def run_offline() -> None:
    """``--sql``: print the DDL instead of running it."""
    _configure(url=normalize_url(_url()), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # from astronn_dist.worker.service.results.migrate: transaction and lock are held
        _configure(connection=connection)
        context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with migration_transaction(engine) as conn:
            _configure(connection=conn)
            context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
