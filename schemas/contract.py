"""What a CSV contract tells the one validator (etl.intake.validate.CsvValidation).

The validator reads, trims, numbers lines, checks the header and row widths, runs the pandera
schema lazily, turns failures into sentences and writes the reject report; a contract says
which columns, which are required, which id must be unique and how cells are normalised. Two
contracts exist: the LetsGetChecked order batch (the default) and Rupa order intents
(schemas/order_intents.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow


@dataclass(frozen=True)
class Contract:
    name: str  # what a file of this kind is called in messages: "order batch"
    columns: tuple[str, ...]  # every named column, in template order
    required: tuple[str, ...]  # must be in the header (and filled, the schema says)
    schema: pa.DataFrameSchema
    reason_for: Callable[[str, str, str | None], str]  # (check name, column, value) -> sentence
    id_column: str  # unique within a file; the reject report's second column
    extra_prefix: str  # any number of `<prefix><key>` columns ride along (custom., metadata.)
    template: str  # where the header of a good file can be copied from
    row_noun: str = "row"  # "each order needs its own id"
    extra_columns: tuple[str, ...] = ()  # optional named columns outside `columns`
    # when this column is in the header, these required columns may be left out (filled elsewhere)
    relaxed_by: tuple[str, tuple[str, ...]] | None = None
    # how cells are normalised: on the chunk's Arrow arrays before pandas wraps them (fast; the
    # order batch) and/or on the frame afterwards (simple; small files such as intents)
    normalise_arrays: Callable[[dict[str, pa_arrow.Array], int], dict[str, pa_arrow.Array]] | None = None
    normalise: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    # a good file to copy, named in the reasons of unusable files (the template has no rows)
    example: str = ""
    # columns read and then ignored: `problems`, the first column of the fix file labsync writes
    # (FILE.fix.csv), so a fixed copy dropped back is an ordinary batch
    ignored_columns: tuple[str, ...] = ()
    # the columns that hold PHI (declared beside each contract's columns: schemas.columns.PHI,
    # schemas.order_intents.PHI); every `<prefix><key>` column counts too. Their rejected cells are
    # kept only in the reports beside the file, never in the warehouse, and no reason quotes them.
    phi: frozenset[str] = frozenset()

    @property
    def reject_columns(self) -> tuple[str, ...]:
        """`line`: the file's physical line; `row`: the row a spreadsheet shows (header = 1)."""
        return ("line", "row", self.id_column, "column", "value", "reason")

    def is_extra(self, column: str) -> bool:
        return column.startswith(self.extra_prefix) and len(column) > len(self.extra_prefix)

    def is_phi(self, column: str) -> bool:
        return column in self.phi or self.is_extra(column)
