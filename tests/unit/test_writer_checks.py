"""Encoding without validating first refuses exactly what validation refuses.

For every record type's example event, every field (and the fields of nested records and of
the first element of arrays) is set in turn to values of the wrong kind (a float or a bool for
an int, numbers past the int and long ranges, 1 for a boolean, True for a double, a string,
None, containers); ``encode`` must raise InvalidRecordError exactly when fastavro's validator
rejects the value, and otherwise write the same bytes as fastavro's writer.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator

import fastavro
import pytest
from fastavro.validation import validate

from beamstream.schemas.examples import example_event, example_names
from beamstream.schemas.serde import InvalidRecordError, SingleObjectSerde

WRONG = [1.5, True, False, 1, 0, 2**31, -(2**31) - 1, 2**63, "x", None, [], {}, -0.0]


def leaf_paths(value, path=()) -> Iterator[tuple]:
    """Every key path into ``value`` (dict keys, and index 0 of lists)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*path, key)
            yield from leaf_paths(item, (*path, key))
    elif isinstance(value, list) and value:
        yield (*path, 0)
        yield from leaf_paths(value[0], (*path, 0))


def replaced(value: dict, path: tuple, new) -> dict:
    changed = copy.deepcopy(value)
    target = changed
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return changed


@pytest.mark.parametrize("name", example_names())
def test_encode_refuses_exactly_what_validation_refuses(name):
    serde = SingleObjectSerde()
    version = serde.catalog.schema(name)
    example = example_event(name)
    cases = 0
    for path in leaf_paths(example):
        for wrong in WRONG:
            value = replaced(example, path, wrong)
            fits = validate(value, version.schema, raise_errors=False)
            try:
                data = serde.encode(name, value)
            except InvalidRecordError:
                assert not fits, f"{name}{list(path)} = {wrong!r} fits but was refused"
            else:
                assert fits, f"{name}{list(path)} = {wrong!r} does not fit but was written"
                out = io.BytesIO()
                fastavro.schemaless_writer(out, version.schema, value)
                assert data.endswith(out.getvalue())
            cases += 1
    assert cases >= len(WRONG)


def test_an_int_field_given_a_float_names_the_field():
    value = example_event("ImageArrived")
    value["image_number"] = 7.5  # the writer alone would store 7
    with pytest.raises(InvalidRecordError, match="image_number"):
        SingleObjectSerde().encode("ImageArrived", value)
