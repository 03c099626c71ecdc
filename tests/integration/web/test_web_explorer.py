"""The console's data explorer: schemas, tables and rows of a browser grant
(filtered, sorted, paged by the server through the gateway) and editing a row,
in Debian's chromium and at the HTTP level, against a real daemon and
PostgreSQL 15."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from conftest import Console, Pages
from harness import wait_for
from playwright.sync_api import expect
from webclient import open_grant, trail

from gateway.testing.pgcluster import TempCluster

TABLE = "web_explorer_items"
ROWS = 120


@pytest.fixture(scope="module")
def items(pg: TempCluster) -> Iterator[str]:
    """A table made by the superuser: the scram account may read and update it,
    the md5 account only read it."""
    with psycopg.connect(pg.superuser_dsn("appdb"), autocommit=True) as admin:
        admin.execute(f"drop table if exists {TABLE}")
        admin.execute(f"create table {TABLE} (id int primary key, name text, qty int, note text)")
        admin.execute(
            f"insert into {TABLE} select g, 'item ' || g, g %% 7,"
            " case when g %% 10 = 0 then null else 'n' end from generate_series(1, %s) g",
            (ROWS,),
        )
        admin.execute(f"grant select, update on {TABLE} to app_scram")
        admin.execute(f"grant select on {TABLE} to md5_app")
    yield TABLE
    with psycopg.connect(pg.superuser_dsn("appdb"), autocommit=True) as admin:
        admin.execute(f"drop table if exists {TABLE}")


def name_of(pg: TempCluster, row_id: int) -> Any:
    with psycopg.connect(pg.superuser_dsn("appdb")) as admin:
        found = admin.execute(f"select name from {TABLE} where id = %s", (row_id,)).fetchone()
    return found[0] if found else None


@pytest.fixture
def grant(mia: httpx.Client) -> Iterator[str]:
    session_id = open_grant(mia, then="explorer")
    yield session_id
    mia.post(f"/ui/terminal/{session_id}/close")


def rows_page(client: httpx.Client, grant: str, **params: Any) -> httpx.Response:
    return client.get(
        f"/ui/explorer/{grant}/rows", params={"schema": "public", "table": TABLE, **params}
    )


def first_column(html: str) -> list[str]:
    """The first cell of each row of the rows table."""
    body = html.split("<tbody>", 1)[1]
    return re.findall(r"<tr>\s*<td[^>]*>([^<]*)</td>", body)


def edit_fields(grant_row: int, name: str) -> dict[str, Any]:
    return {
        "schema": "public",
        "table": TABLE,
        "key": str(grant_row),
        "old:name": f"item {grant_row}",
        "new:name": name,
        "old:qty": str(grant_row % 7),
        "new:qty": str(grant_row % 7),
        "old:note": "n",
        "new:note": "n",
    }


# --- in the browser ------------------------------------------------------------------


def test_the_explorer_lists_browses_and_edits_a_table(
    web: Pages, console: Console, pg: TempCluster, items: str
) -> None:
    page = web.as_user("mia")
    page.goto(console.url("/explorer"))
    page.fill("form.open-grant input[name=resource]", "prod")
    page.fill("form.open-grant input[name=account]", "scram")
    page.click("form.open-grant button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui/explorer/[0-9a-f]+$"))
    session_id = page.url.rsplit("/", 1)[1]
    page.click(".web-schemas a:text-is('public')")
    page.click(f".web-tables a:text-is('{items}')")
    table = page.locator("table.web-rows")
    expect(table.locator("tbody tr")).to_have_count(50)
    expect(table.locator("tbody tr").first.locator("td").first).to_have_text("1")
    # Sorting by id, descending (the second click on its header).
    page.click("th a.sort:text-is('id')")
    page.click("th a.sort:text-is('id')")
    expect(table.locator("tbody tr").first.locator("td").first).to_have_text(str(ROWS))
    page.click("#next-page")
    expect(table.locator("tbody tr").first.locator("td").first).to_have_text(str(ROWS - 50))
    # A filter: name ILIKE 'item 7%'.
    filters = page.locator("form.web-filters .web-filter").last
    filters.locator("select[name=fc]").select_option("name")
    filters.locator("select[name=fo]").select_option("ILIKE")
    filters.locator("input[name=fv]").fill("item 7%")
    page.click("form.web-filters button[type=submit]")
    expect(table.locator("tbody tr")).to_have_count(11)  # item 7 and items 70 to 79
    expect(table.locator("tbody tr").first.locator("td").first).to_have_text("79")
    # Edit row 7.
    page.goto(console.url(f"/explorer/{session_id}/edit?schema=public&table={items}&key=7"))
    page.fill("input[name='new:name']", "renamed in the browser")
    page.click("form.web-edit button[type=submit]")
    expect(page.locator("pre.web-update-sql")).to_have_text(
        f'update "public"."{items}" set "name" = $1::text::text where "id" = $2::text::integer'
    )
    expect(page.locator("table.web-params td:not(:has(code))")).to_have_text(
        ["renamed in the browser", "7"]
    )
    page.click("form.web-confirm button[type=submit]")
    expect(page.locator(".web-updated")).to_contain_text("UPDATE 1")
    assert name_of(pg, 7) == "renamed in the browser"
    updates = wait_for(
        lambda: [s for s in trail(console, session_id) if s["sql"].startswith("update ")] or None
    )
    assert updates[0]["status"] == "ok"
    assert any("information_schema.tables" in s["sql"] for s in trail(console, session_id))


# --- at the HTTP level ---------------------------------------------------------------


def test_schemas_and_tables_are_listed_through_the_gateway(
    console: Console, mia: httpx.Client, grant: str, items: str
) -> None:
    schemas = mia.get(f"/ui/explorer/{grant}")
    assert schemas.status_code == 200 and ">public<" in schemas.text
    tables = mia.get(f"/ui/explorer/{grant}", params={"schema": "public"})
    assert f">{items}<" in tables.text
    statements = wait_for(
        lambda: (
            [s["sql"] for s in trail(console, grant) if "information_schema" in s["sql"]] or None
        )
    )
    assert any("information_schema.schemata" in sql for sql in statements)


def test_rows_are_paged_sorted_and_filtered_by_the_server(
    mia: httpx.Client, grant: str, items: str
) -> None:
    first = rows_page(mia, grant)
    assert first_column(first.text) == [str(i) for i in range(1, 51)]
    assert 'id="next-page"' in first.text and 'id="previous-page"' not in first.text
    last = rows_page(mia, grant, page=2)
    assert first_column(last.text) == [str(i) for i in range(101, 121)]
    assert 'id="next-page"' not in last.text
    by_qty = rows_page(mia, grant, sort="qty", desc="1")
    assert first_column(by_qty.text)[:2] == ["6", "13"]  # qty 6, then by id
    equal = rows_page(mia, grant, fc="id", fo="=", fv="42")
    assert first_column(equal.text) == ["42"]
    less = rows_page(mia, grant, fc=["id", "qty"], fo=["<", ">"], fv=["10", "4"])
    assert first_column(less.text) == ["5", "6"]
    not_equal = rows_page(mia, grant, fc="qty", fo="<>", fv="0", page=2)
    assert len(first_column(not_equal.text)) == ROWS - ROWS // 7 - 100
    nulls = rows_page(mia, grant, fc="note", fo="IS NULL", fv="")
    assert first_column(nulls.text) == [str(i) for i in range(10, 121, 10)]
    assert nulls.text.count('class="null"') == 12
    ilike = rows_page(mia, grant, fc="name", fo="ILIKE", fv="ITEM 11_")
    assert first_column(ilike.text) == [str(i) for i in range(110, 120)]


def test_a_value_is_never_spliced_into_the_sql(
    console: Console, mia: httpx.Client, grant: str, items: str
) -> None:
    hostile = "x'; drop table web_explorer_items; --"
    answer = rows_page(mia, grant, fc="name", fo="=", fv=hostile)
    assert answer.status_code == 200 and "no rows" in answer.text
    assert rows_page(mia, grant).status_code == 200  # the table is still there
    selects = wait_for(
        lambda: (
            [
                s
                for s in trail(console, grant)
                if s["sql"].startswith("select ") and "$1" in s["sql"]
            ]
            or None
        )
    )
    assert all(hostile not in s["sql"] for s in selects)


def test_unknown_columns_tables_and_operators_are_refused(
    mia: httpx.Client, grant: str, items: str
) -> None:
    assert rows_page(mia, grant, sort='id" desc; --').status_code == 400
    assert rows_page(mia, grant, fc="nope", fo="=", fv="1").status_code == 400
    assert rows_page(mia, grant, fc="id", fo="; drop", fv="1").status_code == 400
    missing = mia.get(f"/ui/explorer/{grant}/rows", params={"schema": "public", "table": "nope"})
    assert missing.status_code == 404


def test_an_edit_shows_its_update_then_runs_it_in_a_transaction(
    console: Console, pg: TempCluster, mia: httpx.Client, grant: str, items: str
) -> None:
    form = mia.get(
        f"/ui/explorer/{grant}/edit", params={"schema": "public", "table": items, "key": "3"}
    )
    assert form.status_code == 200 and 'value="item 3"' in form.text
    preview = mia.post(f"/ui/explorer/{grant}/edit", data=edit_fields(3, "renamed 3"))
    assert preview.status_code == 200
    assert "set &#34;name&#34; = $1::text::text where &#34;id&#34; = $2::text::integer" in (
        preview.text
    )
    assert name_of(pg, 3) == "item 3"  # nothing ran yet
    done = mia.post(f"/ui/explorer/{grant}/update", data=edit_fields(3, "renamed 3"))
    assert done.status_code == 200 and "UPDATE 1" in done.text
    assert name_of(pg, 3) == "renamed 3"
    # A row that is gone changes nothing: rolled back, and the page says why.
    gone = mia.post(f"/ui/explorer/{grant}/update", data=edit_fields(999, "ghost"))
    assert gone.status_code == 200
    assert "would have changed 0 rows" in gone.text and "rolled back" in gone.text
    updates = wait_for(
        lambda: [s for s in trail(console, grant) if s["sql"].startswith("update ")] or None
    )
    assert len(updates) == 2


def test_an_account_without_update_sees_no_edit_and_a_forced_edit_is_refused(
    console: Console, pg: TempCluster, items: str
) -> None:
    with console.web_client("mia") as mia:
        session_id = open_grant(mia, account="md5")
        try:
            page = rows_page(mia, session_id)
            assert page.status_code == 200 and first_column(page.text)[0] == "1"
            assert "Edit</a>" not in page.text and "read only for this grant" in page.text
            form = mia.get(
                f"/ui/explorer/{session_id}/edit",
                params={"schema": "public", "table": items, "key": "4"},
            )
            assert form.status_code == 403
            forced = mia.post(f"/ui/explorer/{session_id}/update", data=edit_fields(4, "forced"))
            assert forced.status_code == 403
            preview = mia.post(f"/ui/explorer/{session_id}/edit", data=edit_fields(4, "forced"))
            assert preview.status_code == 403
        finally:
            mia.post(f"/ui/terminal/{session_id}/close")
    assert name_of(pg, 4) == "item 4"
    assert not [s for s in trail(console, session_id) if s["sql"].startswith("update ")]


def test_explorer_routes_belong_to_the_grants_owner_and_need_csrf(
    console: Console, pg: TempCluster, mia: httpx.Client, grant: str, items: str
) -> None:
    # The grant and its rows are there for their owner: the 404s below are about whose it is.
    assert mia.get(f"/ui/explorer/{grant}").status_code == 200
    assert rows_page(mia, grant).status_code == 200
    with console.web_client("max") as other:
        assert other.get(f"/ui/explorer/{grant}").status_code == 404
        assert rows_page(other, grant).status_code == 404
        assert (
            other.post(f"/ui/explorer/{grant}/update", data=edit_fields(5, "x")).status_code == 404
        )
    with console.web_client("mia", csrf=False) as no_csrf:
        assert (
            no_csrf.post(f"/ui/explorer/{grant}/edit", data=edit_fields(5, "x")).status_code == 403
        )
        assert (
            no_csrf.post(f"/ui/explorer/{grant}/update", data=edit_fields(5, "x")).status_code
            == 403
        )
    assert name_of(pg, 5) == "item 5"  # no refused edit ran
    with console.http() as anonymous:
        assert anonymous.get("/ui/explorer").status_code == 303
    with console.web_client("aude") as auditor:
        assert auditor.get("/ui/explorer").status_code == 200
        assert auditor.get(f"/ui/explorer/{grant}").status_code == 404
