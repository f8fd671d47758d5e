"""Every state name labsync stores or shows, in one place.

The values are the strings stored in the warehouse and printed by the CLI; `StrEnum` members
compare equal to those strings, so `row.state == OrderState.ACCEPTED` works on rows read back.
Add a state here (and nowhere else) when a table gains one; the README's tables list them.
"""

from __future__ import annotations

from enum import StrEnum


class OrderState(StrEnum):
    """`lgc_orders.state`: what LetsGetChecked made of one clientOrderId."""

    PENDING = "pending"  # claimed and (maybe) in flight; a crash leaves this trace
    ACCEPTED = "accepted"  # a 2xx carrying the documented order
    REJECTED = "rejected"  # 400: the vendor refused the order; a corrected payload may go again
    CONFLICT = "conflict"  # 409, or accepted earlier with a different payload; never re-sent
    FAILED = "failed"  # not sent or no usable answer; sent again on a later run
    UNCONFIRMED = "unconfirmed"  # a 2xx whose body is not the documented order; sent again later


# Final for the ledger: a row in one of these states is never sent again with the same payload.
SETTLED_ORDER_STATES = frozenset({OrderState.ACCEPTED, OrderState.REJECTED, OrderState.CONFLICT})
# Not settled: the row is sent again by a later run (a batch holding one is `incomplete`).
UNSETTLED_ORDER_STATES = frozenset({OrderState.PENDING, OrderState.FAILED, OrderState.UNCONFIRMED})


class BatchStatus(StrEnum):
    """`batch_files.status`: where one dropped file stands."""

    RECEIVED = "received"  # registered by its sha256, not yet validated
    VALIDATED = "validated"  # every row checked; valid rows ready to send
    LOADED = "loaded"  # every valid row settled
    INCOMPLETE = "incomplete"  # some valid rows are not settled yet (failed / pending)
    UNUSABLE = "unusable"  # the file as a whole cannot be used; nothing was sent
