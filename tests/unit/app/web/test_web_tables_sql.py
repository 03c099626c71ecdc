"""The data explorer's statements (gateway/app/web/tables.py): names from the
catalogue, quoted; values only ever parameters."""

from __future__ import annotations

import pytest

from gateway.app.web.tables import (
    Browse,
    Column,
    Filter,
    Table,
    select_row,
    select_rows,
    update_row,
)
from gateway.credentials.statements import quote_identifier
from gateway.errors import InvalidRequest

ODD = Table(
    schema='we"ird',
    name="Items; drop",
    columns=(Column("id", "integer"), Column('na"me', "text"), Column("qty", "bigint")),
    primary_key=("id",),
    can_update=True,
)


def test_identifiers_are_always_quoted_with_inner_quotes_doubled() -> None:
    assert quote_identifier("plain") == '"plain"'
    assert quote_identifier('a"b') == '"a""b"'
    assert ODD.qualified == '"we""ird"."Items; drop"'


def test_a_page_of_rows_reads_text_ordered_by_the_primary_key() -> None:
    statement = select_rows(ODD, Browse(page=2), page_size=10)
    assert statement.sql == (
        'select "id"::text, "na""me"::text, "qty"::text from "we""ird"."Items; drop" as r'
        ' order by r."id" limit $1::text::bigint offset $2::text::bigint'
    )
    assert statement.params == ("11", "20")


def test_filters_and_sorting_use_parameters_and_catalogue_types() -> None:
    browse = Browse(
        filters=(
            Filter("qty", ">", "5"),
            Filter('na"me', "ILIKE", "x'; drop table t; --"),
            Filter("id", "IS NULL", "ignored"),
        ),
        sort="qty",
        descending=True,
    )
    statement = select_rows(ODD, browse, page_size=10)
    assert (
        ' where "qty" > $1::text::bigint and "na""me"::text ilike $2::text and "id" is null'
        ' order by r."qty" desc, r."id" limit $3::text::bigint offset $4::text::bigint'
    ) in statement.sql
    assert statement.params == ("5", "x'; drop table t; --", "11", "0")
    assert "drop table" not in statement.sql


@pytest.mark.parametrize(
    "browse",
    [
        Browse(sort='id" desc; --'),
        Browse(filters=(Filter("nope", "=", "1"),)),
        Browse(filters=(Filter("id", "; drop", "1"),)),
    ],
)
def test_unknown_names_and_operators_are_refused(browse: Browse) -> None:
    with pytest.raises(InvalidRequest):
        select_rows(ODD, browse)


def test_an_update_sets_the_changed_columns_of_one_row_by_its_key() -> None:
    statement = update_row(ODD, ("7",), {'na"me': "new", "qty": None})
    assert statement.sql == (
        'update "we""ird"."Items; drop" set "na""me" = $1::text::text, "qty" = $2::text::bigint'
        ' where "id" = $3::text::integer'
    )
    assert statement.params == ("new", None, "7")
    assert select_row(ODD, ("7",)).params == ("7",)


def test_an_update_needs_a_change_and_the_whole_key() -> None:
    with pytest.raises(InvalidRequest):
        update_row(ODD, ("7",), {})
    with pytest.raises(InvalidRequest):
        update_row(ODD, ("7", "8"), {"qty": "1"})
    keyless = Table("s", "t", (Column("a", "text"),), (), can_update=True)
    assert not keyless.is_editable
    with pytest.raises(InvalidRequest):
        update_row(keyless, (), {"a": "1"})
