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
