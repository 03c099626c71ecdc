"""The data explorer (``/ui/explorer``): a browser grant's schemas, tables and
rows (filtered, sorted and paged by the server), and editing one row of a table
with a primary key (docs/web.md).

Who may use it: the opener of the browser grant (anyone else gets "not
found"), with what the grant's database role may do: every catalogue read and
every row goes through the gateway (:mod:`gateway.app.web.tables`), so it is in
the session's trail. Editing needs the role's UPDATE privilege on the table,
asked of PostgreSQL through the grant: without it there is no Edit link, and an
edit posted anyway is refused (403) before any UPDATE is built.

An edit goes form -> the exact UPDATE and its parameters -> confirm -> run in a
transaction of its own that commits only when exactly one row changed.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from starlette.datastructures import FormData
from starlette.responses import HTMLResponse

from gateway.app.web.deps import WebCaller, render, ui
from gateway.app.web.grants import BrowserGrant, Grants, WorkFailed
from gateway.app.web.routes.terminal import grant_list
from gateway.app.web.tables import (
    OPERATORS,
    Browse,
    EditRefused,
    Filter,
    Table,
    describe,
    fetch_row,
    fetch_rows,
    list_schemas,
    list_tables,
    run_update,
    update_row,
)
from gateway.errors import Forbidden, InvalidRequest

router = APIRouter(prefix="/explorer")

Name = Annotated[str, Query(min_length=1, max_length=200)]


@router.get("", response_class=HTMLResponse)
async def explorer_index(request: Request, caller: WebCaller, grants: Grants) -> HTMLResponse:
    return grant_list(request, caller, grants, section="explorer")


def _page(request: Request, template: str, grant: BrowserGrant, **context: Any) -> HTMLResponse:
    """*template*, a page of the explorer on *grant*."""
    return render(request, template, section="explorer", grant=grant, **context)


def _problem_page(request: Request, grant: BrowserGrant, failed: WorkFailed) -> HTMLResponse:
    return _page(request, "explorer/problem.html", grant, problem=failed.problem)


@router.get("/{session_id}", response_class=HTMLResponse)
async def schemas(
    request: Request,
    session_id: str,
    caller: WebCaller,
    grants: Grants,
    schema: Annotated[str, Query(max_length=200)] = "",
) -> HTMLResponse:
    """The grant's schemas; with ``schema``, that schema's tables too."""
    grant = grants.get(caller, session_id)
    try:
        names = await grants.run(grant, list_schemas)
        tables = await grants.run(grant, lambda c: list_tables(c, schema)) if schema else []
    except WorkFailed as failed:
        return _problem_page(request, grant, failed)
    return _page(
        request,
        "explorer/schemas.html",
        grant,
        schemas=names,
        schema=schema,
        tables=tables,
    )


async def _table(grants: Grants, grant: BrowserGrant, schema: str, table: str) -> Table:
    return await grants.run(grant, lambda c: describe(c, schema, table))


def _browse(
    fc: list[str], fo: list[str], fv: list[str], sort: str, desc: bool, page: int
) -> Browse:
    if not len(fc) == len(fo) or len(fv) > len(fc):
        raise InvalidRequest("each filter needs a column and an operator")
    values = [*fv, *([""] * (len(fc) - len(fv)))]
    filters = tuple(
        Filter(column, op, value)
        for column, op, value in zip(fc, fo, values, strict=True)
        if column
    )
    return Browse(filters=filters, sort=sort or None, descending=desc, page=page)


def _link(session_id: str, table: Table, browse: Browse, **change: Any) -> str:
    """The rows page of *table* as *browse* with *change* (page, sort, desc)."""
    state: dict[str, Any] = {
        "sort": browse.sort or "",
        "desc": "1" if browse.descending else "",
        "page": browse.page,
        **change,
    }
    query: list[tuple[str, Any]] = [("schema", table.schema), ("table", table.name)]
    query += [(k, v) for k, v in state.items() if v not in ("", None)]
    for wanted in browse.filters:
        query += [("fc", wanted.column), ("fo", wanted.op), ("fv", wanted.value)]
    return ui(f"/explorer/{session_id}/rows?{urlencode(query)}")


def _edit_link(session_id: str, table: Table, row: dict[str, str | None]) -> str:
    query = [("schema", table.schema), ("table", table.name)]
    query += [("key", row[name] or "") for name in table.primary_key]
    return ui(f"/explorer/{session_id}/edit?{urlencode(query)}")


@router.get("/{session_id}/rows", response_class=HTMLResponse)
async def rows(
    request: Request,
    session_id: str,
    caller: WebCaller,
    grants: Grants,
    schema: Name,
    table: Name,
    sort: Annotated[str, Query(max_length=200)] = "",
    desc: bool = False,
    page: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    fc: Annotated[list[str] | None, Query(max_length=20)] = None,
    fo: Annotated[list[str] | None, Query(max_length=20)] = None,
    fv: Annotated[list[str] | None, Query(max_length=20)] = None,
) -> HTMLResponse:
    grant = grants.get(caller, session_id)
    browse = _browse(fc or [], fo or [], fv or [], sort, desc, page)
    try:
        found = await _table(grants, grant, schema, table)
        page_rows, more = await grants.run(grant, lambda c: fetch_rows(c, found, browse))
    except WorkFailed as failed:
        return _problem_page(request, grant, failed)
    names = [c.name for c in found.columns]
    as_dicts = [dict(zip(names, row, strict=True)) for row in page_rows]
    return _page(
        request,
        "explorer/rows.html",
        grant,
        table=found,
        browse=browse,
        rows=[(row, _edit_link(session_id, found, row)) for row in as_dicts],
        operators=OPERATORS,
        sort_links={
            c.name: _link(
                session_id,
                found,
                browse,
                sort=c.name,
                desc="1" if browse.sort == c.name and not browse.descending else "",
                page=0,
            )
            for c in found.columns
        },
        previous=_link(session_id, found, browse, page=browse.page - 1) if browse.page else None,
        next=_link(session_id, found, browse, page=browse.page + 1) if more else None,
    )


async def _editable(grants: Grants, grant: BrowserGrant, schema: str, table: str) -> Table:
    """The table, when the grant's role may edit its rows (asked of PostgreSQL)."""
    found = await _table(grants, grant, schema, table)
    if not found.can_update:
        raise Forbidden(
            f"the grant's database role may not UPDATE {schema}.{table}",
            hint="a read-only account cannot edit; open a grant of an account that may",
        )
    if not found.primary_key:
        raise InvalidRequest(
            f"{schema}.{table} has no primary key: the explorer edits rows by their key"
        )
    return found


@router.get("/{session_id}/edit", response_class=HTMLResponse)
async def edit_form(
    request: Request,
    session_id: str,
    caller: WebCaller,
    grants: Grants,
    schema: Name,
    table: Name,
    key: Annotated[list[str] | None, Query(max_length=32)] = None,
) -> HTMLResponse:
    grant = grants.get(caller, session_id)
    row_key = tuple(key or ())
    try:
        found = await _editable(grants, grant, schema, table)
        row = await grants.run(grant, lambda c: fetch_row(c, found, row_key))
    except WorkFailed as failed:
        return _problem_page(request, grant, failed)
    return _page(
        request,
        "explorer/edit.html",
        grant,
        table=found,
        key=row_key,
        row=row,
    )


def _changes(table: Table, form: FormData) -> dict[str, str | None]:
    """The columns whose value the form changed, and their new values (None: NULL)."""
    changes: dict[str, str | None] = {}
    for column in table.columns:
        if column.name in table.primary_key or f"old:{column.name}" not in form:
            continue
        was = None if form.get(f"oldnull:{column.name}") else str(form.get(f"old:{column.name}"))
        new = form.get(f"new:{column.name}")
        value = None if form.get(f"null:{column.name}") else str(new if new is not None else "")
        if value != was:
            changes[column.name] = value
    return changes


async def _edit(
    request: Request, grants: Grants, grant: BrowserGrant
) -> tuple[Table, tuple[str, ...], FormData]:
    form = await request.form()
    schema, table = str(form.get("schema") or ""), str(form.get("table") or "")
    key = tuple(str(k) for k in form.getlist("key"))
    return await _editable(grants, grant, schema, table), key, form


@router.post("/{session_id}/edit", response_class=HTMLResponse)
async def edit_preview(
    request: Request, session_id: str, caller: WebCaller, grants: Grants
) -> HTMLResponse:
    """The exact UPDATE the edit would run, with its parameters, to confirm."""
    grant = grants.get(caller, session_id)
    try:
        found, key, form = await _edit(request, grants, grant)
    except WorkFailed as failed:
        return _problem_page(request, grant, failed)
    statement = update_row(found, key, _changes(found, form))
    fields = [(k, str(v)) for k, v in form.multi_items() if k != "csrf_token"]
    return _page(
        request,
        "explorer/confirm.html",
        grant,
        table=found,
        statement=statement,
        fields=fields,
    )


@router.post("/{session_id}/update", response_class=HTMLResponse)
async def update(
    request: Request, session_id: str, caller: WebCaller, grants: Grants
) -> HTMLResponse:
    """Run the confirmed UPDATE: committed when it changed exactly one row."""
    grant = grants.get(caller, session_id)
    try:
        found, key, form = await _edit(request, grants, grant)
        statement = update_row(found, key, _changes(found, form))
        status = await grants.run(grant, lambda c: run_update(c, statement))
    except WorkFailed as failed:
        return _problem_page(request, grant, failed)
    except EditRefused as refused:
        return _page(
            request,
            "explorer/updated.html",
            grant,
            table=None,
            status=None,
            refused=str(refused),
            back=None,
        )
    return _page(
        request,
        "explorer/updated.html",
        grant,
        table=found,
        status=status,
        refused=None,
        back=_link(session_id, found, Browse()),
    )
