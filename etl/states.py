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

    RECEIVED = "received"  # registered by its sha256; being validated by its claimer
    VALIDATED = "validated"  # every row checked; its outbox rows are complete and loadable
    LOADED = "loaded"  # every valid row settled
    INCOMPLETE = "incomplete"  # some valid rows are not settled yet (failed / pending)
    UNUSABLE = "unusable"  # the file as a whole cannot be used; nothing was sent


class WebhookEventState(StrEnum):
    """`webhook_events.state`: a vendor event stored raw by the receiver, then applied by a task."""

    RECEIVED = "received"  # stored, not yet applied
    APPLIED = "applied"  # its effect is in the warehouse
    IGNORED = "ignored"  # understood and deliberately not applied (an unknown or irrelevant type)
    FAILED = "failed"  # applying it failed; `error` says why (PHI-free); retried by the next apply


class OutboxState(StrEnum):
    """`lgc_outbox.outcome`: what became of one row of one batch (its own result).

    `lgc_orders` says what LetsGetChecked holds per clientOrderId; the outbox says, per batch and
    line, whether *this* row went out and how. A batch's counts come from here (plus
    `rejected_rows`), so every row of a file ends in exactly one of these."""

    QUEUED = "queued"  # written by prepare; not claimed by a loader yet
    PENDING = "pending"  # claimed by a loader; sent or about to be, outcome not recorded yet
    ACCEPTED = "accepted"
    REJECTED = "rejected"  # by LetsGetChecked (400), or locally when the row cannot be mapped
    CONFLICT = "conflict"  # 409, or accepted earlier with a different payload: not sent
    FAILED = "failed"  # no usable answer, or not sent (stopped, interrupted); sent again later
    UNCONFIRMED = "unconfirmed"  # a 2xx that was not the documented order; sent again later
    GIVEN_UP = "given_up"  # failed LABSYNC_MAX_ATTEMPTS times: needs a person
    ALREADY_SETTLED = "already_settled"  # an earlier batch settled this clientOrderId; nothing sent


# Rows in these states are done: their body is deleted (it holds PHI) and nothing re-sends them.
SETTLED_OUTBOX_STATES = frozenset({
    OutboxState.ACCEPTED, OutboxState.REJECTED, OutboxState.CONFLICT, OutboxState.ALREADY_SETTLED,
})
# Rows in these states go out again by themselves (a later run or `labsync retry`).
RETRYABLE_OUTBOX_STATES = frozenset({
    OutboxState.QUEUED, OutboxState.PENDING, OutboxState.FAILED, OutboxState.UNCONFIRMED,
})


class IntentState(StrEnum):
    """`rupa_order_intents.state`: what became of one intents-file row (its `row_id`).

    Rupa takes no idempotency key, so the ledger is written before and right after each call:
    a row left `sending` is one whose order-intent request went out with no answer recorded
    (the process died, or the connection broke). It is sent again by the next run and counted
    in `resends`, because that request may have left a second, unused cart at Rupa."""

    PENDING = "pending"  # claimed; the patient step (idempotent at Rupa) not finished yet
    SENDING = "sending"  # POST /order_intents went out; no answer recorded (outcome unknown)
    CREATED = "created"  # the order intent exists; its checkout_url is recorded. Final
    REJECTED = "rejected"  # Rupa refused the row (4xx): nothing was created; sent again only when the row changes
    FAILED = "failed"  # stopped before the order-intent request went out (patient step, outage); sent next run


# Final for the intents ledger (with the same row content): never sent again.
SETTLED_INTENT_STATES = frozenset({IntentState.CREATED, IntentState.REJECTED})
# Orders LetsGetChecked holds under our clientOrderId: `accepted`, and `conflict` (a 409, or an
# order accepted earlier with other data: either way LetsGetChecked keeps an order). Both are
# tracked after the PUT (etl.orders.lifecycle).
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
    # labsync's own, not LetsGetChecked's: the order's GET no longer lists this item (an item
    # known only from an older answer, or from an event before events became hints)
    NOT_LISTED = "NotListed"


# An item in one of these never changes again: `labsync track` stops asking about it.
FINAL_ITEM_STATUSES = frozenset(
    {ItemStatus.RESULTS_AVAILABLE, ItemStatus.CANCELLED, ItemStatus.VALIDATION_FAILED, ItemStatus.NOT_LISTED}
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


class AuditAction(StrEnum):
    """`phi_access.action`: what a person or a task did with PHI (etl.audit records it)."""

    ORDER_STATUS_SHOWN = "order status shown"  # `labsync status CLIENT_ORDER_ID`
    BATCH_STATUS_SHOWN = "batch status shown"  # `labsync status --batch NAME`: its orders' rows
    RESULTS_STORED = "results stored"  # result documents fetched into the warehouse
    REPORT_WRITTEN = "report written"  # a rejects / fix / summary / checkout file beside a batch
    DRY_RUN_WRITTEN = "dry-run file written"  # the request bodies a run would send (--dry-run)
    WEBHOOK_RECEIVED = "webhook received"  # a delivery stored by the receiver (may hold PHI)
    PURGE = "purge"  # a retention class purged (etl.retention): one row per class, with its count
    RESULTS_SHOWN = "results shown"  # `labsync results --flagged`: flagged observations listed (no values)
    EXPORT_WRITTEN = "export written"  # `labsync export fhir`: results written to files or a FHIR server
