"""The data explorer's SQL: catalogue reads, a table's rows (filtered, sorted,
paged) and a one-row UPDATE, run on a browser grant's connection
(:mod:`gateway.app.web.grants`), so every one of them is in the session's trail.

Invariants:

* Every identifier in a statement built here names a schema, table or column
  the catalogue returned for this grant's connection (:func:`describe`), and is
  quoted (:func:`~gateway.credentials.statements.quote_identifier`); a name the
  catalogue does not know is refused before anything is built. Type names come
  from the catalogue too (``format_type``), never from the request.
* No value from the request is ever spliced into SQL: each is a ``$n``
  parameter sent as text and cast to its column's type by the server.
* Rows are read in a READ ONLY transaction, every value as PostgreSQL's own
  text form (``::text``), so what the edit form shows is what the server parses
  back.
* An edit is one UPDATE of one row by its primary key, in a transaction of its
  own: committed only when exactly one row changed, else rolled back
  (:class:`EditRefused` says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import asyncpg

from gateway.credentials.statements import quote_identifier
from gateway.errors import InvalidRequest, NotFound

__all__ = [
    "OPERATORS",
    "PAGE_SIZE",
    "Browse",
    "Column",
    "EditRefused",
    "Filter",
    "Statement",
    "Table",
    "describe",
    "fetch_row",
    "fetch_rows",
    "list_schemas",
    "list_tables",
    "run_update",
    "select_row",
    "select_rows",
    "update_row",
]

#: Rows a page of the explorer shows.
PAGE_SIZE: Final = 50
#: The filter operators, as the form names them; ILIKE compares the text form.
OPERATORS: Final = ("=", "<>", "<", ">", "ILIKE", "IS NULL")

_SCHEMAS: Final = """
select schema_name::text from information_schema.schemata
where schema_name not like 'pg\\_%' and schema_name <> 'information_schema'
order by 1"""
_TABLES: Final = """
select table_name::text, table_type::text from information_schema.tables
where table_schema = $1 order by 1"""
_TABLE: Final = """
select c.oid, has_table_privilege(current_user, c.oid, 'UPDATE')
from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p', 'v', 'm', 'f')"""
_COLUMNS: Final = """
select a.attname::text, pg_catalog.format_type(a.atttypid, null)
from pg_catalog.pg_attribute a
where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped order by a.attnum"""
_PRIMARY_KEY: Final = """
select a.attname::text from pg_catalog.pg_index i
join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
where i.indrelid = $1 and i.indisprimary
order by array_position(i.indkey::int2[], a.attnum)"""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    #: its type as the catalogue names it (``format_type``), for casts
    type: str


@dataclass(frozen=True, slots=True)
class Table:
    schema: str
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    #: whether the grant's role may UPDATE it (``has_table_privilege``)
    can_update: bool

    @property
    def qualified(self) -> str:
        return f"{quote_identifier(self.schema)}.{quote_identifier(self.name)}"

    @property
    def is_editable(self) -> bool:
        return self.can_update and bool(self.primary_key)

    def column(self, name: str) -> Column:
        """The column *name*; refused when the table has none of that name."""
        for column in self.columns:
            if column.name == name:
                return column
        raise InvalidRequest(f"table {self.schema}.{self.name} has no column {name!r}")


@dataclass(frozen=True, slots=True)
class Filter:
    column: str
    op: str
    value: str = ""


@dataclass(frozen=True, slots=True)
class Browse:
    """What the rows page asks for."""

    filters: tuple[Filter, ...] = ()
    sort: str | None = None
    descending: bool = False
    page: int = 0


@dataclass(frozen=True, slots=True)
class Statement:
    """SQL with its ``$n`` parameters (text, or None for NULL)."""

    sql: str
    params: tuple[str | None, ...] = field(default=())


class EditRefused(Exception):
    """An UPDATE that was rolled back, and why."""


#: The range variable of the table whose rows are read.
_ROW: Final = "r"


def _cast(number: int, column: Column) -> str:
    return f"${number}::text::{column.type}"


def select_rows(table: Table, browse: Browse, page_size: int = PAGE_SIZE) -> Statement:
    """The page of *table*'s rows *browse* asks for (one row more than a page:
    whether another page follows)."""
    params: list[str | None] = []
    where: list[str] = []
    for wanted in browse.filters:
        column = table.column(wanted.column)
        name = quote_identifier(column.name)
        if wanted.op == "IS NULL":
            where.append(f"{name} is null")
            continue
        if wanted.op not in OPERATORS:
            raise InvalidRequest(f"unknown filter operator {wanted.op!r}")
        params.append(wanted.value)
        if wanted.op == "ILIKE":
            where.append(f"{name}::text ilike ${len(params)}::text")
        else:
            where.append(f"{name} {wanted.op} {_cast(len(params), column)}")
    columns = ", ".join(f"{quote_identifier(c.name)}::text" for c in table.columns)
    sql = f"select {columns} from {table.qualified} as {_ROW}"
    if where:
        sql += " where " + " and ".join(where)
    # The sort column first, then the primary key: pages in a stable order.
    # Qualified: a bare name in ORDER BY would mean the output column, its text.
    order = []
    if browse.sort:
        direction = " desc" if browse.descending else ""
        order.append(f"{_ROW}.{quote_identifier(table.column(browse.sort).name)}{direction}")
    order += [f"{_ROW}.{quote_identifier(key)}" for key in table.primary_key if key != browse.sort]
    if order:
        sql += " order by " + ", ".join(order)
    params += [str(page_size + 1), str(browse.page * page_size)]
    sql += f" limit ${len(params) - 1}::text::bigint offset ${len(params)}::text::bigint"
    return Statement(sql, tuple(params))


def _key_condition(table: Table, key: tuple[str, ...], first: int) -> tuple[str, list[str]]:
    if not table.primary_key:
        raise InvalidRequest(f"table {table.schema}.{table.name} has no primary key")
    if len(key) != len(table.primary_key):
        raise InvalidRequest("the row's key does not match the table's primary key")
    conditions = [
        f"{quote_identifier(name)} = {_cast(first + i, table.column(name))}"
        for i, name in enumerate(table.primary_key)
    ]
    return " and ".join(conditions), list(key)


def select_row(table: Table, key: tuple[str, ...]) -> Statement:
    columns = ", ".join(f"{quote_identifier(c.name)}::text" for c in table.columns)
    condition, params = _key_condition(table, key, 1)
    return Statement(f"select {columns} from {table.qualified} where {condition}", tuple(params))


def update_row(table: Table, key: tuple[str, ...], changes: dict[str, str | None]) -> Statement:
    """``UPDATE`` of the row whose primary key is *key*, setting *changes*."""
    if not changes:
        raise InvalidRequest("nothing was changed")
    params: list[str | None] = []
    assignments = []
    for name, value in changes.items():
        column = table.column(name)
        params.append(value)
        assignments.append(f"{quote_identifier(column.name)} = {_cast(len(params), column)}")
    condition, key_params = _key_condition(table, key, len(params) + 1)
    sql = f"update {table.qualified} set {', '.join(assignments)} where {condition}"
    return Statement(sql, (*params, *key_params))


# --- running them --------------------------------------------------------------------


async def list_schemas(connection: asyncpg.Connection) -> list[str]:
    async with connection.transaction(readonly=True):
        return [r[0] for r in await connection.fetch(_SCHEMAS)]


async def list_tables(connection: asyncpg.Connection, schema: str) -> list[tuple[str, str]]:
    async with connection.transaction(readonly=True):
        return [(r[0], r[1]) for r in await connection.fetch(_TABLES, schema)]


async def describe(connection: asyncpg.Connection, schema: str, name: str) -> Table:
    """*schema*.*name* as the catalogue knows it through this connection."""
    async with connection.transaction(readonly=True):
        found = await connection.fetchrow(_TABLE, schema, name)
        if found is None:
            raise NotFound(f"no table {schema}.{name} is visible through this grant")
        oid, can_update = found
        columns = await connection.fetch(_COLUMNS, oid)
        key = await connection.fetch(_PRIMARY_KEY, oid)
    return Table(
        schema,
        name,
        tuple(Column(r[0], r[1]) for r in columns),
        tuple(r[0] for r in key),
        bool(can_update),
    )


async def fetch_rows(
    connection: asyncpg.Connection, table: Table, browse: Browse
) -> tuple[list[tuple[str | None, ...]], bool]:
    """A page of rows (as text) and whether another follows."""
    statement = select_rows(table, browse)
    async with connection.transaction(readonly=True):
        records = await connection.fetch(statement.sql, *statement.params)
    rows = [tuple(record.values()) for record in records]
    return rows[:PAGE_SIZE], len(rows) > PAGE_SIZE


async def fetch_row(
    connection: asyncpg.Connection, table: Table, key: tuple[str, ...]
) -> dict[str, str | None]:
    statement = select_row(table, key)
    async with connection.transaction(readonly=True):
        record = await connection.fetchrow(statement.sql, *statement.params)
    if record is None:
        raise NotFound("no such row (it may have changed or been deleted)")
    return {
        column.name: value for column, value in zip(table.columns, record.values(), strict=True)
    }


async def run_update(connection: asyncpg.Connection, statement: Statement) -> str:
    """Run *statement* (an :func:`update_row`) in a transaction of its own; its
    command tag when it changed exactly one row, else :class:`EditRefused`
    after the rollback."""
    async with connection.transaction():
        status = str(await connection.execute(statement.sql, *statement.params))
        if status != "UPDATE 1":
            raise EditRefused(
                f"the UPDATE would have changed {status.removeprefix('UPDATE ')} rows,"
                " not exactly one: it was rolled back"
            )
    return status
