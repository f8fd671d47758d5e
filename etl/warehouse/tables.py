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
    text,
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
SCHEMA_HEADS = frozenset({"0016_alerts"})

JSONType = JSON().with_variant(JSONB(), "postgresql")
TS = DateTime(timezone=True)
Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only

# An item not in a final state (etl.states.FINAL_ITEM_STATUSES), as literal SQL: the predicate of
# the partial index `ix_lgc_order_items_open_checked`, and the very text the sweep's query uses
# (both planners use a partial index only for a query whose WHERE holds its predicate; a bound
# parameter in its place would not match). tests/test_scale_plans.py checks it against states.
OPEN_ITEM_SQL = "status IS NULL OR status NOT IN ('Cancelled', 'NotListed', 'ResultsAvailable', 'ValidationFailed')"

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
    Index("ix_batch_files_file_name", "file_name"),  # --batch NAME (migration 0013_scale_indexes)
    Index("ix_batch_files_status", "status"),  # incomplete / validated batches to resume
    Index("ix_batch_files_received_at", "received_at"),  # labsync batches --since
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
    # when a GET of the order first listed its items (migration 0013_scale_indexes): NULL for an
    # order LetsGetChecked holds that no answer described yet, which the sweep asks about
    Column("tracked_at", TS),
    Index("ix_lgc_orders_batch_id", "batch_id"),
    Index("ix_lgc_orders_state", "state"),
    Index("ix_lgc_orders_claimed_by", "claimed_by"),  # heartbeats renew an owner's claims
    Index("ix_lgc_orders_state_tracked_at", "state", "tracked_at"),  # the sweep's never-answered orders
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
    Index("ix_lgc_outbox_client_order_id", "client_order_id"),  # an order's rows across batches
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
    Index("ix_rupa_results_stored_at", "stored_at"),  # what a run stored (etl.audit)
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
    # when its results (JSON and HL7) were both stored (migration 0013_scale_indexes): items at
    # ResultsAvailable with NULL here are the results still to fetch (etl.orders.results)
    Column("results_stored_at", TS),
    Index("ix_lgc_order_items_client_order_id", "client_order_id"),
    Index("ix_lgc_order_items_status", "status"),
    Index("ix_lgc_order_items_barcode", "barcode"),
    Index("ix_lgc_order_items_status_results_stored_at", "status", "results_stored_at"),
    # open items only, by when they were last checked: the sweep reads the due ones alone
    Index("ix_lgc_order_items_open_checked", "last_checked_at", "client_order_id",
          sqlite_where=text(OPEN_ITEM_SQL), postgresql_where=text(OPEN_ITEM_SQL)),
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
    Index("ix_lgc_results_fetched_at", "fetched_at"),  # what a run stored (etl.audit)
    Index("ix_lgc_results_hl7_fetched_at", "hl7_fetched_at"),
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

# ---- the program's view (migration 0015_program_view, issue 25) ------------------------------
# Which program (programCode) each clientOrderId belongs to, and its participant id: written
# by etl.orders.programs when the outbox row is staged (the PUT body, which holds both, is
# dropped once the order settles). PHI-free: program code and the client's participant id.
lgc_order_programs = Table(
    "lgc_order_programs",
    metadata,
    Column("client_order_id", String(100), primary_key=True),
    Column("program_code", String(200)),
    Column("participant_id", String(200)),
    Column("batch_id", Id),  # the batch that first named it
    Column("recorded_at", TS, nullable=False),
    Index("ix_lgc_order_programs_program_code", "program_code"),
)

# LetsGetChecked's Outreach API: one row per results letter (`<audience>_<barcode>`), from the
# `outreach` webhooks (confirmed by a GET of the notification) and the letters feed; the PDF is
# stored once (sha256). etl.orders.outreach is its only writer.
lgc_outreach_letters = Table(
    "lgc_outreach_letters",
    metadata,
    Column("letter_id", String(120), primary_key=True),  # patient_LGC-0000-0000-0000
    Column("barcode", String(50), nullable=False),
    Column("audience", String(20), nullable=False),  # patient | pcp
    Column("letter_type", String(40), nullable=False),  # PatientResultsLetter | PcpResultsLetter
    Column("status", String(40)),  # DeliverySent
    Column("failure_reason", Text),  # as LetsGetChecked gives it (documented as always null)
    Column("notified_at", TS),  # the notification's timestamp (the vendor's)
    Column("item_id", String(100)),
    Column("client_order_id", String(100)),
    Column("pdf", LargeBinary),  # the letter document (PHI): never logged or shown
    Column("pdf_sha256", String(64)),
    Column("pdf_size", Integer),
    Column("pdf_fetched_at", TS),
    Column("feed_event_id", BigInteger),  # its event in the letters feed (the feed's cursor: the highest)
    Column("first_seen_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Index("ix_lgc_outreach_letters_barcode", "barcode"),
    Index("ix_lgc_outreach_letters_client_order_id", "client_order_id"),
)

# ---- alerts (migration 0016_alerts, issue 24): what fired, where it went, when it cleared ----
# One row per episode of a condition: opened when it first fires, folded while it persists or
# repeats within the quiet period, closed (resolved_at) when it clears. etl.alerts is its only
# writer. PHI-free: batch and file names, counts, links; never a clientOrderId or a patient.
alerts = Table(
    "alerts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("condition_key", String(300), nullable=False),  # e.g. batch_unusable:12, dag_failed:order_batches
    Column("kind", String(40), nullable=False),  # etl.alerts.KINDS
    Column("message", Text, nullable=False),  # the one PHI-free sentence that was sent
    Column("link", String(1000)),  # the summary page or the Airflow run
    Column("first_seen", TS, nullable=False),
    Column("last_seen", TS, nullable=False),
    Column("repeats", Integer, nullable=False, server_default="0"),  # times seen again, folded
    Column("sent_at", TS),  # when a destination took the alert (NULL: not yet)
    Column("sent_to", String(1000)),  # the connection ids that took it
    Column("send_error", String(1000)),  # why a destination did not (no secret: kind + status)
    Column("resolved_at", TS),
    Column("resolved_sent_at", TS),
    Index("ix_alerts_condition_key_resolved_at", "condition_key", "resolved_at"),
    # at most one open episode per condition: two processes that see it at once send it once
    Index("uq_alerts_open_condition", "condition_key", unique=True,
          sqlite_where=text("resolved_at IS NULL"), postgresql_where=text("resolved_at IS NULL")),
)

# ---- one observations table across both vendors (migration 0014_lab_observations, issue 26) ----
# One row per version of an observation (etl.results.observations is its only writer): the
# current one has `current` true; a correction (OBX-11 C, or new content for the same observation
# of the same ordered item) inserts a new current row and marks the earlier one superseded (kept
# as history). A document delivered again adds nothing; a second view of the same result (the
# LetsGetChecked JSON and HL7 of one barcode) is merged into the same row and named in `sources`.
lab_observations = Table(
    "lab_observations",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("vendor", String(20), nullable=False),  # lgc, rupa
    Column("order_id", String(100), nullable=False),  # LGC clientOrderId; Rupa ord_…
    Column("item_id", String(100), nullable=False),  # LGC order-item id; Rupa ordered test ordts_…
    Column("ordered_test", String(200)),  # the ordered test's code: LGC kit code, Rupa labts_…, else OBR-4
    Column("patient_id", String(100)),  # the vendor's patient id (PID-3, Rupa pat_…): an id, never a name
    Column("result_key", String(200), nullable=False),  # the result version: lgc:<barcode>, rupa_results:<id>
    Column("obs_key", String(300), nullable=False),  # the observation within the item (code, sub-id)
    Column("code", String(100)),
    Column("code_system", String(200)),  # http://loinc.org when LOINC, else as the sender named it
    Column("name", Text),
    Column("value", Text),  # as given (PHI)
    Column("value_type", String(10)),  # OBX-2 (NM, SN, ST, CWE, …); LGC JSON: NM or ST
    Column("numeric_value", Float),
    Column("unit", String(50)),
    Column("reference_range", String(200)),
    Column("abnormal_flags", String(100)),  # OBX-8 as sent (repeats joined by ~), or the JSON descriptor
    Column("interpretation", String(10), nullable=False),  # normal, abnormal, critical, unknown
    Column("status", String(5)),  # OBX-11: F, C, P, …
    Column("observed_at", TS),  # OBX-14, else OBR-7, else MSH-7
    Column("sources", JSONType, nullable=False),  # [{"table", "key", "view", "sha256"}]: documents carrying it
    Column("content_sha256", String(64), nullable=False),  # of what it says: a repeat adds nothing
    Column("current", Boolean, nullable=False),
    Column("superseded_by", Id),  # lab_observations.id of the correction
    Column("superseded_at", TS),
    Column("recorded_at", TS, nullable=False),
    Column("notified_at", TS),  # a flagged observation reported as an event (etl.airflow.tasks)
    UniqueConstraint("vendor", "item_id", "obs_key", "result_key"),
    Index("ix_lab_observations_vendor_item_id_current", "vendor", "item_id", "current"),
    Index("ix_lab_observations_interpretation_current", "interpretation", "current"),
    Index("ix_lab_observations_recorded_at", "recorded_at"),
)

# The FHIR export's watermark (etl.results.fhir is its only writer): one row per target.
fhir_exports = Table(
    "fhir_exports",
    metadata,
    Column("target", String(200), primary_key=True),  # "ndjson" or the FHIR base URL's origin+path
    Column("last_observation_id", Id, nullable=False),  # lab_observations.id exported up to
    Column("exported_at", TS, nullable=False),
    Column("resources", Integer, nullable=False),  # how many the last export wrote
)
