"""Writing many rows at once: one UPDATE with each row's own values, one UPDATE whose row locks are
taken in key order, one COPY of new rows (objects, or values); and the `any` lookup, a list of keys
as one parameter.

A batch names its 250 rows in every statement. Django's psycopg backend binds parameters on the
client, quoting each in Python: `pk__in` with 250 UUIDs cost 2.0 ms of CPU a statement, `pk__any`
0.45 ms; rows' values travel as one JSON document for the same reason (bench/README.md, profiles).
"""

from __future__ import annotations

import datetime
import decimal
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

from django.db import connections, models, transaction
from django.db.models import Case, Field, JSONField, Value, When
from django.db.models.fields.related import ForeignObject
from django.db.models.lookups import In
from django.utils import timezone
from psycopg.types.json import Jsonb

# What may stand bare in an array literal: keys (integers, UUIDs), never free text.
_BARE_KEYS = re.compile(r"[0-9A-Za-z-]*(,[0-9A-Za-z-]+)*")


class AnyOf(In):
    """`field__any=[…]`: `field IN (…)`, sent to PostgreSQL as `field = ANY(%s::type[])` with the
    whole list as one array literal (keys only; anything else, and other databases, get IN)."""

    lookup_name = "any"

    def as_postgresql(self, compiler: Any, connection: Any) -> tuple[str, tuple[Any, ...]]:
        # The values are prepared already (get_prep_lookup: UUIDs, integers); In's own
        # process_rhs would prepare each again for its placeholder, 500 times a statement.
        values = [value for value in self.rhs if value is not None] if self.rhs_is_direct_value() else []
        if values:
            lhs, lhs_params = self.process_lhs(compiler, connection)
            literal = ",".join(map(str, values))
            if _BARE_KEYS.fullmatch(literal):
                array_type = self.lhs.output_field.db_type(connection)
                return f"{lhs} = ANY(%s::{array_type}[])", (*lhs_params, "{" + literal + "}")
        return super().as_sql(compiler, connection)


Field.register_lookup(AnyOf)
ForeignObject.register_lookup(AnyOf)  # related fields keep lookups of their own, not Field's


def rows_update(queryset: models.QuerySet, changes: Mapping[Any, Mapping[str, Any]]) -> int:
    """Apply `changes` ({pk: {field: value}}, the same fields for every pk) in one statement.

    A field with one value for every row is a plain assignment; the others take each row's own
    value. Unlike QuerySet.bulk_update this keeps the queryset's own filter (e.g. state IN the
    allowed sources), so the row count says how many rows matched it.
    """
    if not changes:
        return 0
    names = list(next(iter(changes.values())))
    if any(set(fields) != set(names) for fields in changes.values()):
        raise ValueError("rows_update needs the same fields for every row")
    common: dict[str, Any] = {}
    varying: list[str] = []
    for name in names:
        first = next(iter(changes.values()))[name]
        if all(fields[name] == first for fields in changes.values()):
            common[name] = first
        else:
            varying.append(name)
    rows = queryset.filter(pk__any=list(changes))
    if varying and connections[queryset.db].vendor == "postgresql":
        return _update_from_values(rows, changes, common, varying)
    model = queryset.model
    per_row = {
        name: Case(
            *(
                When(pk=pk, then=Value(fields[name], output_field=model._meta.get_field(name)))
                for pk, fields in changes.items()
            ),
            output_field=model._meta.get_field(name),
        )
        for name in varying
    }
    return rows.update(**common, **per_row)


def rows_update_in_key_order(queryset: models.QuerySet, **values: Any) -> int:
    """queryset.update(**values), its rows locked first in primary-key order.

    Every transaction that locks many messages takes the locks in one order, the claims' order
    (SELECT … FOR UPDATE ORDER BY pk): a bare UPDATE locks rows in whatever order its plan reads
    them (a bitmap heap scan reads them in physical order), and two batches that share messages
    (a task the sweeper published again beside the original) then deadlock, each holding a row
    the other waits for. The write names only the locked keys, whose rows cannot change under
    their locks. Returns how many rows were updated.
    """
    with transaction.atomic(using=queryset.db):
        locked = list(queryset.select_for_update(of=("self",)).order_by("pk").values_list("pk", flat=True))
        if not locked:
            return 0
        return queryset.model._base_manager.using(queryset.db).filter(pk__any=locked).update(**values)


def _update_from_values(
    rows: models.QuerySet, changes: Mapping[Any, Mapping[str, Any]], common: dict[str, Any], varying: list[str]
) -> int:
    """UPDATE … FROM jsonb_to_recordset(%s) on PostgreSQL: every row's values in one JSON parameter.

    A CASE per field cost Django ~50 µs a row to build; a VALUES list, a quoted parameter per value.
    """
    connection = connections[rows.db]
    meta = rows.model._meta
    quote = connection.ops.quote_name
    pk_field = meta.pk
    fields = [meta.get_field(name) for name in varying]
    assignments, params = [], []
    for name, value in common.items():
        field = meta.get_field(name)
        assignments.append(f"{quote(field.column)} = %s")
        params.append(field.get_db_prep_save(value, connection))
    for field in fields:
        assignments.append(f"{quote(field.column)} = v.{quote(field.column)}")
    document = [
        {"pk_": _json_value(pk_field, pk, connection)}
        | {field.column: _json_value(field, row[field.name], connection) for field in fields}
        for pk, row in changes.items()
    ]
    columns = [f"pk_ {pk_field.db_type(connection)}"]
    columns += [f"{quote(field.column)} {field.db_type(connection)}" for field in fields]
    record = ", ".join(columns)
    matching_sql, matching_params = rows.values("pk").query.sql_with_params()
    table, pk_column = quote(meta.db_table), quote(pk_field.column)
    sql = (
        f"UPDATE {table} SET {', '.join(assignments)} "
        f"FROM jsonb_to_recordset(%s::jsonb) AS v({record}) "
        f"WHERE {table}.{pk_column} = v.pk_ AND {table}.{pk_column} IN ({matching_sql})"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, json.dumps(document), *matching_params])
        return cursor.rowcount


def _json_value(field: Field, value: Any, connection: Any) -> Any:
    """A field's value as jsonb_to_recordset reads it back into the column's type."""
    if isinstance(field, JSONField):
        return value  # the document itself, nested
    value = field.get_db_prep_save(value, connection)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, decimal.Decimal)):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"rows_update cannot send {type(value).__name__} ({field.name}) as JSON")


def rows_insert(
    model: type[models.Model], objs: list[models.Model], using: str = "default", *, new_keys: bool = False
) -> None:
    """bulk_create(objs) as one COPY on PostgreSQL: Django's per-field preparation of a wide row
    (~130 µs a message) is most of what a batch INSERT costs; COPY takes the values as they are.

    The objects must carry their primary key, or have an auto-increment one: left to the
    database and not read back, or with `new_keys` taken first from its sequence (one nextval()
    round trip for all) and set on the objects, for a caller that needs them. Elsewhere (SQLite)
    it is bulk_create, which reads them back.
    """
    if not objs:
        return
    connection = connections[using]
    if connection.vendor != "postgresql" or (new_keys and len(objs) == 1):
        # One new row: INSERT … RETURNING is one round trip where nextval() and COPY take two.
        model.objects.using(using).bulk_create(objs)
        return
    meta = model._meta
    if new_keys:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
                [meta.db_table, meta.pk.column, len(objs)],
            )
            for obj, (key,) in zip(objs, cursor.fetchall(), strict=True):
                obj.pk = key
    fields = [f for f in meta.concrete_fields if not (f.primary_key and getattr(objs[0], f.attname) is None)]
    now = timezone.now()
    for field in fields:
        if getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False):
            for obj in objs:
                setattr(obj, field.attname, now)
    names = [field.attname for field in fields]
    _copy(model, fields, [[getattr(obj, name) for name in names] for obj in objs], using)
    for obj in objs:
        obj._state.adding, obj._state.db = False, using  # saved, as bulk_create leaves them


def rows_copy(
    model: type[models.Model], names: Sequence[str], rows: list[Sequence[Any]], using: str = "default"
) -> None:
    """rows_insert for rows given as values (of the fields whose attnames are `names`, in that
    order) rather than objects: a model instance costs ~10 µs to build, more than its row's COPY.
    No defaults are filled in: every NOT NULL column needs a value."""
    if not rows:
        return
    connection = connections[using]
    meta = model._meta
    if connection.vendor != "postgresql":
        model.objects.using(using).bulk_create([model(**dict(zip(names, row, strict=True))) for row in rows])
        return
    _copy(model, [meta.get_field(name) for name in names], rows, using)


def _copy(model: type[models.Model], fields: list[Field], rows: list[Sequence[Any]], using: str) -> None:
    """One COPY of these rows (values of `fields`, in order) into the model's table."""
    connection = connections[using]
    json_fields = [index for index, field in enumerate(fields) if isinstance(field, JSONField)]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(field.column) for field in fields)
    sql = f"COPY {quote(model._meta.db_table)} ({columns}) FROM STDIN"

    def copy_rows(sql: str, params: Any, many: bool, context: dict[str, Any]) -> None:
        with context["cursor"].cursor.copy(sql) as copy:
            for row in rows:
                values = list(row)
                for index in json_fields:
                    values[index] = Jsonb(values[index])
                copy.write_row(values)

    with connection.cursor() as cursor, connection.wrap_database_errors:
        # Through the cursor's execute wrappers (connection.execute_wrapper: instrumentation,
        # fault injection in tests) like any statement, and Django's error wrapper, so a unique
        # violation is django.db.IntegrityError as it is from bulk_create; and into the query
        # log when one is kept (DEBUG, tests counting statements).
        logged = cursor.debug_sql(f"{sql} -- {len(rows)} rows") if hasattr(cursor, "debug_sql") else nullcontext()
        with logged:
            cursor._execute_with_wrappers(sql, None, False, copy_rows)


def rows_insert_ignoring_conflicts(model: type[models.Model], objs: list[models.Model], using: str = "default") -> None:
    """bulk_create(objs, ignore_conflicts=True) as one statement outside any transaction of its own
    (in autocommit, one round trip): on PostgreSQL the rows travel as one JSON document, as in
    rows_update, where Django would quote each of their values in Python (most of a webhook's CPU)."""
    if not objs:
        return
    connection = connections[using]
    meta = model._meta
    fields = [f for f in meta.concrete_fields if not f.primary_key]
    if connection.vendor != "postgresql":
        model._base_manager.using(using).bulk_create(objs, ignore_conflicts=True)
        return
    quote = connection.ops.quote_name
    columns = ", ".join(quote(field.column) for field in fields)
    record = ", ".join(f"{quote(field.column)} {field.db_type(connection)}" for field in fields)
    document = [
        {field.column: _json_value(field, getattr(obj, field.attname), connection) for field in fields} for obj in objs
    ]
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({columns}) SELECT {columns} "
        f"FROM jsonb_to_recordset(%s::jsonb) AS v({record}) ON CONFLICT DO NOTHING"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [json.dumps(document)])
