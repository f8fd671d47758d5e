"""Run a contract's pandera schema over one chunk, column by column, and say what failed.

The pandera model (schemas/order_batch.py, schemas/order_intents.py) stays the one statement of
the rules: its columns (required, nullable), the checks on each (pandera's built-ins such as
`str_length` and `isin`, and the model's own `@pa.check` functions) and its dataframe checks.
This runs exactly those checks, with pandera's own check functions and pandera's semantics
(missing cells skipped by checks with `ignore_na`, element-wise checks mapped, a dataframe check
passing rows that are entirely empty), but not through `DataFrameSchema.validate`: that builds a
failure-case report for every check of every column of every chunk (1-2 ms each, ~70 a chunk of
an order batch: more than the checks themselves), only to throw it away when the check passes.
Here a passing check costs its own computation, and a failing one yields one
`(line, column, check name)` per failing row.

The failures are those of `schema.validate(frame, lazy=True)`, but the dtype checks: they hold
by construction (every column the validator builds is Arrow-backed text). tests/test_checks.py
compares the two on chunks that break every rule of both contracts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial
from typing import SupportsInt

import numpy as np
import pandas as pd
import pyarrow.compute as pc

# (index label: the chunk's line number, or None; column or None; check name)
Failure = tuple["SupportsInt | None", "str | None", str]


def failures(schema, frame: pd.DataFrame) -> Iterator[Failure]:
    """Every failed rule of `schema` (a pandera DataFrameSchema) in `frame`. A check that fails
    as a whole rather than row by row yields the index label None."""
    if schema.unique:
        raise ValueError("schema-wide uniqueness is not supported: a contract's id_column is checked "
                         "across the whole file by the validator")
    schema.register_default_backends(type(frame))  # pandera's built-in checks for pandas (cached)
    for name, column in schema.columns.items():
        if column.unique:
            raise ValueError(f"column {name}: uniqueness is checked across the whole file by the "
                             "validator (the contract's id_column), not per chunk")
        for label in _columns_of(frame, name, column):
            yield from _column_failures(frame[label], label, column)
    for check in schema.checks:
        yield from _frame_check_failures(frame, check)


def _columns_of(frame: pd.DataFrame, name: str, column) -> list[str]:
    if column.regex:  # pandera matches a regex column's name with re.match on each label
        pattern = re.compile(name)
        return [c for c in frame.columns if pattern.match(c)]
    if name in frame.columns:
        return [name]
    if column.required:
        raise ValueError(f"column {name} is missing from the chunk")  # the validator adds every column
    return []


def _column_failures(s: pd.Series, label: str, column) -> Iterator[Failure]:
    missing = s.isna().to_numpy()
    present = s
    if missing.any():
        if not column.nullable:
            yield from ((line, label, "not_nullable") for line in s.index[missing])
        if missing.all():
            present = s.iloc[:0]
        else:
            present = s[~missing]
    for check in column.checks:
        data = present if check.ignore_na else s
        if len(data) and not _passes_at_a_glance(data, check):
            yield from _series_check_failures(data, label, check)


def _passes_at_a_glance(data: pd.Series, check) -> bool:
    """True when a built-in check cannot fail on `data`, known without running it: no cell of
    at most N bytes has more than N characters, so `str_length(max_value=N)` passes a column
    whose longest cell (in bytes, read off Arrow's offsets) is N or less: nearly every text
    column of nearly every chunk. Anything else: False (the check runs)."""
    if check.name != "str_length" or not hasattr(data.array, "__arrow_array__"):
        return False
    kw = check._check_kwargs
    if kw.get("min_value") is not None or kw.get("exact_value") is not None or kw.get("max_value") is None:
        return False
    longest = pc.max(pc.binary_length(data.array.__arrow_array__())).as_py()
    return longest is None or longest <= kw["max_value"]


def _function(check):
    if check.groupby is not None:
        raise ValueError(f"check {check.name}: groupby checks are not supported")
    fn = check._check_fn
    builtin = getattr(fn, "__name__", None)
    if builtin is not None and check.is_builtin_check(builtin):
        # a built-in's dispatcher as registered now, with its pandas implementation (what
        # Check.__call__ does too: the schema's copy may predate the registration)
        fn = check.get_builtin_check_fn(builtin)
    return partial(fn, **check._check_kwargs)


def _series_check_failures(data: pd.Series, label: str, check) -> Iterator[Failure]:
    fn = _function(check)
    out = data.map(fn) if check.element_wise else fn(data)
    if _is_scalar_bool(out):
        if not out:
            yield (None, label, check.name)
        return
    passed = _passed(out, data.index, check)
    if not passed.all():
        yield from ((line, label, check.name) for line in data.index[~passed])


def _frame_check_failures(frame: pd.DataFrame, check) -> Iterator[Failure]:
    fn = _function(check)
    out = frame.apply(fn, axis=1) if check.element_wise else fn(frame)
    if _is_scalar_bool(out):
        if not out:
            yield (None, None, check.name)
        return
    if isinstance(out, pd.DataFrame):
        raise ValueError(f"check {check.name}: a dataframe check must answer one value a row")
    passed = _passed(out, frame.index, check)
    if passed.all():
        return
    failed = np.flatnonzero(~passed)
    if check.ignore_na:  # a row with nothing in it passes (pandera's rule)
        failed = failed[~frame.iloc[failed].isna().all(axis=1).to_numpy()]
    yield from ((line, None, check.name) for line in frame.index[failed])


def _is_scalar_bool(out) -> bool:
    return isinstance(out, (bool, np.bool_))


def _passed(out, index: pd.Index, check) -> np.ndarray:
    """A check's answer as one bool a row; a missing answer passes, as in pandera."""
    if not isinstance(out, pd.Series) or not out.index.equals(index):
        raise ValueError(f"check {check.name}: its answer is not one value per row of what it checked")
    return out.to_numpy(dtype=bool, na_value=True)
