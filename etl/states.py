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


# Final for the ledger: a row in one of these states is never sent again with the same payload.
SETTLED_ORDER_STATES = frozenset({OrderState.ACCEPTED, OrderState.REJECTED, OrderState.CONFLICT})


class BatchStatus(StrEnum):
    """`batch_files.status`: where one dropped file stands."""

    RECEIVED = "received"  # registered by its sha256, not yet validated
    VALIDATED = "validated"  # every row checked; valid rows ready to send
    LOADED = "loaded"  # every valid row settled
    INCOMPLETE = "incomplete"  # some valid rows are not settled yet (failed / pending)
    UNUSABLE = "unusable"  # the file as a whole cannot be used; nothing was sent


class WebhookEventState(StrEnum):
    """`webhook_events.state`: a vendor event stored raw by the receiver, then applied by a task."""

    RECEIVED = "received"  # stored, not yet applied
    APPLIED = "applied"  # its effect is in the warehouse
    IGNORED = "ignored"  # understood and deliberately not applied (an unknown or irrelevant type)
    FAILED = "failed"  # applying it failed; `error` says why (PHI-free); retried by the next apply


# Orders LetsGetChecked holds under our clientOrderId: `accepted`, and `conflict` (a 409, or an
# order accepted earlier with other data: either way LetsGetChecked keeps an order). Both are
# tracked after the PUT (etl.lgc.lifecycle).
TRACKED_ORDER_STATES = frozenset({OrderState.ACCEPTED, OrderState.CONFLICT})


class ItemStatus(StrEnum):
    """`lgc_order_items.status`: LetsGetChecked's own status codes for one order item, as its
    GET Order v2 and order webhooks publish them (stored with the vendor's spelling)."""

    SUBMITTED = "Submitted"  # received by LetsGetChecked, not yet processed
    CREATED = "Created"  # accepted for fulfilment
    KIT_DISPATCHED = "KitDispatched"  # the kit is on its way (outbound tracking number)
    KIT_REGISTERED = "KitRegistered"  # the participant activated the kit: barcode + alpha code
    KIT_ARRIVED_AT_LAB = "KitArrivedAtLab"  # the sample reached the lab (inbound tracking)
    RESULTS_AVAILABLE = "ResultsAvailable"  # results released (JSON and HL7 by barcode)
    VALIDATION_FAILED = "ValidationFailed"  # from Submitted: LetsGetChecked cannot process it
    CANCELLED = "Cancelled"  # only by a PATCH, only up to KitArrivedAtLab


# An item in one of these never changes again: `labsync track` stops asking about it.
FINAL_ITEM_STATUSES = frozenset(
    {ItemStatus.RESULTS_AVAILABLE, ItemStatus.CANCELLED, ItemStatus.VALIDATION_FAILED}
)
# The happy path in order: position = how far an item got (for display and the sandbox).
ITEM_LIFECYCLE = (
    ItemStatus.SUBMITTED, ItemStatus.CREATED, ItemStatus.KIT_DISPATCHED, ItemStatus.KIT_REGISTERED,
    ItemStatus.KIT_ARRIVED_AT_LAB, ItemStatus.RESULTS_AVAILABLE,
)
# LetsGetChecked cancels an item only before its kit reaches the lab.
CANCELLABLE_ITEM_STATUSES = frozenset(
    {ItemStatus.SUBMITTED, ItemStatus.CREATED, ItemStatus.KIT_DISPATCHED, ItemStatus.KIT_REGISTERED}
)


class StatusSource(StrEnum):
    """`lgc_item_status_history.source` (and `lgc_order_items.status_source`): who told us."""

    POLL = "poll"  # our own GET of the order: the vendor's answer, settles any conflict
    WEBHOOK = "webhook"  # a notification: may repeat and arrive out of order


class CancelState(StrEnum):
    """`lgc_order_items.cancel_state`: labsync's side of a cancellation (the PATCH is
    processed asynchronously; a later status confirms or overtakes it)."""

    REQUESTED = "cancel requested"  # PATCH answered 202; waiting for status Cancelled
    CONFIRMED = "cancelled"  # LetsGetChecked reports the item Cancelled
    TOO_LATE = "cancel too late"  # the item moved on to the lab (or finished) instead
