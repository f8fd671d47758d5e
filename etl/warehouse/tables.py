"""Every warehouse table, defined once. Alembic migrations create and change them; the code
reads and writes them through these `Table` objects. Types work on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# The Alembic head(s) this code needs. `warehouse.connect()` compares the database's
# `alembic_version` with this set instead of importing Alembic (commands that do not migrate start
# fast); tests/test_warehouse.py asserts it equals the migration scripts' heads, so a new
# migration without a matching change here fails the suite.
SCHEMA_HEADS = frozenset({"0012_phi_access"})

JSONType = JSON().with_variant(JSONB(), "postgresql")
TS = DateTime(timezone=True)
Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only

# ---- order batches (CSV files dropped by program managers) ---------------------------------
batch_files = Table(
    "batch_files",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("file_name", String(500), nullable=False),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("status", String(20), nullable=False),  # etl.states.BatchStatus
    Column("received_at", TS, nullable=False),
    Column("processed_at", TS),
    Column("total_rows", Integer),
    Column("valid_rows", Integer),
    Column("rejected_rows", Integer),
    Column("error", Text),  # why the file was unusable (no PHI)
    # who is processing the file right now (migration 0004_outbox): an owner from etl.claims
    # (an Airflow DAG run or `cli:<uuid>`), and until when; a lapsed claim is taken over.
    Column("claimed_by", String(100)),
    Column("claimed_until", TS),
    # where the file ended up, relative to the inbox (e.g. processed/orders.csv); NULL until moved
    Column("stored_as", String(1000)),
    # a move under way (migration 0009_inbox_moves): on object stores a move is a copy then a
    # delete, so a run that dies between the two leaves both; the next run finishes the move to
    # the same place instead of making a second copy. Relative to the inbox, like stored_as.
    Column("moving_from", String(1000)),
    Column("moving_to", String(1000)),
)

rejected_rows = Table(
    "rejected_rows",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("batch_id", Id, ForeignKey("batch_files.id", ondelete="CASCADE"), nullable=False),
    Column("line", Integer, nullable=False),  # the file's physical line (header = 1)
    Column("excel_row", Integer),  # the row a spreadsheet shows (header = 1); NULL before 0010
    Column("client_order_id", String(200)),
    Column("column_name", String(200), nullable=False),
    Column("value", Text),  # NULL for a PHI column (schemas: the contract declares them); the fix file has it
    Column("reason", Text, nullable=False),
    Index("ix_rejected_rows_batch_id_line", "batch_id", "line"),
)

# ---- LetsGetChecked ledger: one row per clientOrderId ------------------------------------
lgc_orders = Table(
    "lgc_orders",
    metadata,
    Column("client_order_id", String(100), primary_key=True),
    Column("batch_id", Id, ForeignKey("batch_files.id", ondelete="SET NULL")),
    Column("line", Integer),
    Column("state", String(20), nullable=False),  # pending, accepted, rejected, conflict, failed
    Column("http_status", Integer),
    Column("order_item_ids", JSONType),  # [{"code": ..., "id": ...}] as returned by LGC
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),  # no PHI
    Column("payload_sha256", String(64), nullable=False),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    # which live run is sending this order right now (migration 0002_lgc): "host:pid:nonce",
    # and until when that claim holds; both NULL once the outcome is written.
    Column("claimed_by", String(100)),
    Column("claimed_until", TS),
    Index("ix_lgc_orders_batch_id", "batch_id"),
    Index("ix_lgc_orders_state", "state"),
    Index("ix_lgc_orders_claimed_by", "claimed_by"),  # heartbeats renew an owner's claims
)

# ---- the order outbox: one row per valid CSV row of a batch (migration 0004_outbox) ---------
# `prepare` writes each row's exact PUT body here; load tasks read id ranges of it. The body
# holds PHI: it is set to NULL as soon as the row is settled (accepted, rejected, conflict,
# already_settled) and kept while the row may still have to go out (queued, pending, failed,
# given_up).
lgc_outbox = Table(
    "lgc_outbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("batch_id", Id, ForeignKey("batch_files.id", ondelete="CASCADE"), nullable=False),
    Column("line", Integer),
    Column("client_order_id", String(100), nullable=False),
    Column("body", Text),  # the exact bytes PUT, as UTF-8 text; NULL once settled
    Column("body_sha256", String(64), nullable=False),  # etl.orders.payload.payload_sha256
    Column("outcome", String(20), nullable=False),  # etl.states.OutboxState
    Column("http_status", Integer),
    Column("attempts", Integer, nullable=False, default=0),  # loads that sent it, across runs
    Column("last_error", Text),  # no PHI
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    UniqueConstraint("batch_id", "client_order_id"),
    Index("ix_lgc_outbox_batch_id_id", "batch_id", "id"),
    Index("ix_lgc_outbox_outcome", "outcome"),
)

# ---- the vendor budget, shared by every loader of the deployment (etl.lgc.budget) ----------
# Times are seconds since the epoch on the *database's* clock (loaders' clocks may disagree).
vendor_budget = Table(
    "vendor_budget",
    metadata,
    Column("vendor", String(200), primary_key=True),  # one LetsGetChecked account: host + clientId
    Column("next_slot", Double, nullable=False),  # the next free send slot (rate limit)
)

vendor_budget_leases = Table(
    "vendor_budget_leases",
    metadata,
    Column("vendor", String(200), primary_key=True),
    Column("holder", String(200), primary_key=True),  # one loader (a load task or CLI run)
    Column("want", Integer, nullable=False),  # requests in flight it could use
    Column("held", Integer, nullable=False),  # requests in flight it may have (concurrency limit)
    Column("lease_until", Double, nullable=False),  # lapsed: its slots count for nobody
)

# ---- Rupa Health copies ----------------------------------------------------------------
rupa_patients = Table(
    "rupa_patients",
    metadata,
    Column("id", String(100), primary_key=True),
    Column("first_name", String(200)),
    Column("last_name", String(200)),
    Column("birthday", String(10)),  # YYYY-MM-DD as the API gives it
    Column("email", String(320)),
    Column("attributes", JSONType),
    Column("relationships", JSONType),
    Column("content_sha256", String(64), nullable=False),
    Column("first_seen_at", TS, nullable=False),
    Column("last_seen_at", TS, nullable=False),
    Column("updated_at", TS),  # from the API when it gives one
    Column("deleted_at", TS),  # set by a full sync that no longer sees the row
)

rupa_lab_tests = Table(
    "rupa_lab_tests",
    metadata,
    Column("id", String(100), primary_key=True),
    Column("name", String(500)),
    Column("lab_name", String(500)),
    Column("attributes", JSONType),
    Column("relationships", JSONType),
    Column("content_sha256", String(64), nullable=False),
    Column("first_seen_at", TS, nullable=False),
    Column("last_seen_at", TS, nullable=False),
    Column("updated_at", TS),
    Column("deleted_at", TS),
)

sync_state = Table(
    "sync_state",
    metadata,
    Column("stream", String(50), primary_key=True),  # patients, lab_tests
    Column("status", String(20), nullable=False),  # running, succeeded, failed
    Column("run_started_at", TS),
    Column("run_finished_at", TS),
    Column("last_success_at", TS),
    Column("resume_url", Text),  # next page of an interrupted run
    Column("inserted", Integer, nullable=False, default=0),
    Column("updated", Integer, nullable=False, default=0),
    Column("unchanged", Integer, nullable=False, default=0),
    Column("deleted", Integer, nullable=False, default=0),
    Column("watermark", String(100)),
    Column("error", Text),
)

oauth_tokens = Table(
    "oauth_tokens",
    metadata,
    Column("provider", String(50), primary_key=True),  # e.g. "rupa"
    Column("access_token", Text),
    Column("refresh_token", Text),
    Column("expires_at", TS),
    Column("updated_at", TS, nullable=False),
)

# ---- vendor events (webhooks): stored raw by etl.webhooks, applied later by tasks ----------
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("source", String(20), nullable=False),  # lgc, rupa
    Column("sha256", String(64), nullable=False),  # of the raw body: deliveries repeat
    Column("event_type", String(100)),  # as the vendor named it (order, Result, order.updated, ...)
    Column("content_type", String(100)),
    Column("body", LargeBinary, nullable=False),  # the raw bytes as received (may hold PHI)
    Column("received_at", TS, nullable=False),
    Column("deliveries", Integer, nullable=False, default=1),  # how often the vendor sent it
    Column("state", String(20), nullable=False),  # etl.states.WebhookEventState
    Column("attempts", Integer, nullable=False, default=0),  # apply attempts
    Column("applied_at", TS),
    Column("error", Text),  # why applying failed (no PHI)
    # the delivery proved its sender (signature or capability path; migration 0011_event_auth):
    # only then may a body's contents be written; NULL (older rows) counts as not
    Column("authenticated", Boolean),
    UniqueConstraint("source", "sha256"),
    Index("ix_webhook_events_source_state_id", "source", "state", "id"),
)

# ---- Rupa Checkout (migration 0007_rupa_checkout) -------------------------------------------
# The intents ledger: one row per intents-file `row_id` (the idempotency key), like lgc_orders.
rupa_order_intents = Table(
    "rupa_order_intents",
    metadata,
    Column("row_id", String(100), primary_key=True),
    Column("batch_id", Id, ForeignKey("batch_files.id", ondelete="SET NULL")),
    Column("line", Integer),
    Column("state", String(20), nullable=False),  # etl.states.IntentState
    Column("patient_id", String(100)),  # Rupa's pat_… (given, found or created)
    Column("lab_test_ids", JSONType),  # ["labts_…", …]
    Column("return_url", Text),
    Column("meta", JSONType),  # the row's metadata.<key> cells (kept here; Rupa documents no field)
    Column("order_intent_id", String(100)),
    Column("checkout_url", Text),
    Column("order_id", String(100)),  # the Order made at checkout, once an event or ?order= tells
    Column("attempts", Integer, nullable=False, default=0),  # order-intent requests sent
    Column("resends", Integer, nullable=False, default=0),  # sent again after an unknown outcome
    Column("last_error", Text),  # no PHI
    Column("payload_sha256", String(64), nullable=False),
    Column("claimed_by", String(100)),
    Column("claimed_until", TS),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Index("ix_rupa_order_intents_batch_id", "batch_id"),
    Index("ix_rupa_order_intents_order_intent_id", "order_intent_id"),
)

# Orders and their tests, from Rupa's order.updated / order.new_result events.
rupa_orders = Table(
    "rupa_orders",
    metadata,
    Column("id", String(100), primary_key=True),  # ord_…
    Column("status", String(100)),
    Column("patient_id", String(100)),
    Column("order_intent_id", String(100)),
    Column("date_submitted", TS),
    Column("date_paid", TS),
    Column("date_completed", TS),
    Column("date_canceled", TS),
    Column("payer", String(100)),
    Column("total_price", String(40)),
    Column("attributes", JSONType),
    Column("relationships", JSONType),
    Column("event_created_at", TS, nullable=False),  # of the newest event applied: older ones are skipped
    Column("first_seen_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Index("ix_rupa_orders_order_intent_id", "order_intent_id"),
)

rupa_ordered_tests = Table(
    "rupa_ordered_tests",
    metadata,
    Column("id", String(100), primary_key=True),  # ordts_…
    Column("order_id", String(100), nullable=False),
    Column("lab_test_id", String(100)),
    Column("date_results_received_from_lab", TS),
    Column("attributes", JSONType),
    Column("relationships", JSONType),
    # the newest result links (short-lived, may carry signatures: never logged or shown)
    Column("results_pdf_url", Text),
    Column("results_hl7_url", Text),
    Column("results_pending", Integer, nullable=False, default=0),  # 1: a link still to download
    Column("results_attempts", Integer, nullable=False, default=0),
    Column("results_error", Text),  # why the last download failed (no PHI)
    Column("event_created_at", TS, nullable=False),
    Column("first_seen_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Index("ix_rupa_ordered_tests_order_id", "order_id"),
    Index("ix_rupa_ordered_tests_results_pending", "results_pending"),
)

# Result files, downloaded at once (links expire): bytes and sha256, one row per distinct content.
rupa_results = Table(
    "rupa_results",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("ordered_test_id", String(100), nullable=False),
    Column("order_id", String(100), nullable=False),
    Column("kind", String(10), nullable=False),  # pdf, hl7
    Column("sha256", String(64), nullable=False),
    Column("size", Integer, nullable=False),
    Column("content_type", String(100)),
    Column("content", LargeBinary, nullable=False),  # PHI: never logged
    Column("stored_at", TS, nullable=False),
    UniqueConstraint("ordered_test_id", "kind", "sha256"),
    Index("ix_rupa_results_order_id", "order_id"),
)

# ---- LetsGetChecked after the PUT: items, their status history, results (etl.orders.lifecycle) --
lgc_order_items = Table(
    "lgc_order_items",
    metadata,
    Column("item_id", String(100), primary_key=True),  # LetsGetChecked's order-item id
    Column("client_order_id", String(100), nullable=False),
    Column("code", String(100)),  # the test kit code (e.g. GLCS)
    Column("status", String(40)),  # etl.states.ItemStatus (the vendor's codes)
    Column("status_at", TS),  # the vendor's timestamp of that status (newest wins)
    Column("status_source", String(20)),  # etl.states.StatusSource of the current status
    Column("barcode", String(50)),  # lgcKitIdentifier.numericalCode, from KitRegistered on
    Column("alpha_code", String(20)),  # lgcKitIdentifier.alphaCode
    Column("outbound_tracking", String(100)),  # shipment.OutboundTrackingNumber
    Column("inbound_tracking", String(100)),  # shipment.InboundTrackingNumber
    Column("replacement_item_id", String(100)),  # replacementOrderItemId
    Column("vendor_created_at", TS),  # createdAt
    Column("vendor_updated_at", TS),  # updatedAt
    Column("first_seen_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),  # our last write to this row
    Column("last_checked_at", TS),  # our last GET of its order (the sweep polls stale ones)
    Column("cancel_state", String(20)),  # etl.states.CancelState, NULL if never asked
    Column("cancel_requested_at", TS),
    Column("cancel_error", Text),  # why LetsGetChecked refused the PATCH (no PHI)
    Index("ix_lgc_order_items_client_order_id", "client_order_id"),
    Index("ix_lgc_order_items_status", "status"),
    Index("ix_lgc_order_items_barcode", "barcode"),
)

lgc_item_status_history = Table(
    "lgc_item_status_history",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("item_id", String(100), nullable=False),
    Column("client_order_id", String(100), nullable=False),
    Column("status", String(40), nullable=False),
    Column("previous_status", String(40)),  # the item's status when this was observed
    Column("source", String(20), nullable=False),  # etl.states.StatusSource
    Column("vendor_timestamp", TS),  # the webhook's timestamp, or the item's updatedAt on a poll
    Column("applied", Boolean, nullable=False),  # False: older than the status already held
    Column("webhook_event_id", Id),  # webhook_events.id when the source is a webhook
    Column("recorded_at", TS, nullable=False),
    Index("ix_lgc_item_status_history_item_id_id", "item_id", "id"),
)

lgc_results = Table(
    "lgc_results",
    metadata,
    Column("barcode", String(50), primary_key=True),
    Column("item_id", String(100), nullable=False),
    Column("client_order_id", String(100), nullable=False),
    Column("alpha_code", String(20)),
    Column("json_body", LargeBinary, nullable=False),  # GET v1/results, raw bytes (PHI)
    Column("json_sha256", String(64), nullable=False),
    Column("hl7_body", LargeBinary),  # GET v1/labresults, HL7 2.3 ORU^R01, raw bytes (PHI)
    Column("hl7_sha256", String(64)),
    Column("fetched_at", TS, nullable=False),
    Column("hl7_fetched_at", TS),
    Column("value_count", Integer, nullable=False),
    Index("ix_lgc_results_item_id", "item_id"),
)

lgc_result_values = Table(
    "lgc_result_values",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("barcode", String(50), ForeignKey("lgc_results.barcode", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),  # order within testResults[]
    Column("biomarker_name", Text),
    Column("test_code", String(100)),
    Column("kind", String(40)),  # Quantitative, Qualitative, Genetic
    Column("descriptor", String(100)),  # Normal, High, Not Detected, ...
    Column("value", Text),  # as given (a number or a qualitative value)
    Column("numeric_value", Float),  # the value when it is a number
    Column("unit", String(50)),
    Column("lower_bound", String(50)),
    Column("upper_bound", String(50)),
    Column("loinc", String(20)),
    Column("headline", Text),
    Column("description", Text),
    UniqueConstraint("barcode", "position"),
)

# ---- the audit trail (migration 0012_phi_access): who saw or wrote PHI, when ----------------
# Append-only: etl.audit is its only writer; nothing updates a row, and rows are deleted only by
# the trail's own retention (LABSYNC_RETENTION_AUDIT_DAYS). Subjects are ids only, never names.
phi_access = Table(
    "phi_access",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", TS, nullable=False),
    Column("actor", String(300), nullable=False),  # cli:<OS user>, airflow:<task instance>, receiver:<address>
    Column("action", String(40), nullable=False),  # etl.states.AuditAction
    Column("subject_kind", String(40), nullable=False),  # order, batch, file, results, webhook_event, class
    Column("subject_ids", JSONType, nullable=False),  # ["ORD-1", …]: ids only (at most audit.MAX_IDS)
    Column("record_count", Integer, nullable=False),  # how many records were shown, written or purged
    Column("detail", String(500)),  # a PHI-free note: a file's name in the inbox, a retention class
    Index("ix_phi_access_at", "at"),
    Index("ix_phi_access_actor", "actor"),
)
