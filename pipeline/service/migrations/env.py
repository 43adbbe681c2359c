"""Alembic environment of the service database: generic, online only. The connection comes
from ``pipeline.service.db.migrate`` (``config.attributes["connection"]``), or from the
``sqlalchemy.url`` option for Alembic's own command line."""
from alembic import context
from sqlalchemy import engine_from_config, pool

from pipeline.service.db import Base

target_metadata = Base.metadata


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = engine_from_config(context.config.get_section(context.config.config_ini_section, {}),
                                prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as conn:
        run(conn)
        conn.commit()
