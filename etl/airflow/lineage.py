"""OpenLineage: each labsync task reports its inputs and outputs itself (the provider's extractor
interface, `get_openlineage_facets_on_complete`: etl.airflow.dagkit), because Airflow hands
OpenLineage only the Asset URIs it has a converter for. Datasets, PHI-free (names, never rows):

    the inbox file     by its URL: file:///abs/path/inbox + /orders.csv, or s3://bucket + prefix/orders.csv
    the vendor API     namespace = its base URL's scheme://host[:port], name = the API path
    warehouse tables   namespace = the warehouse's (postgres://host:port, sqlite://path), name
                       = database.schema.table (postgres) or the table (sqlite)

So a lineage server shows inbox -> outbox -> LetsGetChecked -> ledger -> lifecycle tables.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

# task id -> (warehouse tables read, vendor paths read, warehouse tables written, vendor paths written)
TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "prepare": ((), (), ("batch_files", "lgc_outbox", "rejected_rows"), ()),
    "load": (("lgc_outbox",), (), ("lgc_orders", "lgc_outbox"), ("lgc:/v1/orders",)),
    "finish": (("batch_files", "lgc_outbox"), (), ("batch_files",), ()),
    "check": ((), (), (), ()),
    "apply_webhooks": (("webhook_events", "lgc_orders"), ("lgc:/v1/orders",),
                       ("lgc_order_items", "lgc_item_status_history", "webhook_events"), ()),
    "sweep": (("lgc_orders", "lgc_order_items"), ("lgc:/v1/orders",), ("lgc_order_items", "lgc_item_status_history"), ()),
    "fetch_results": (("lgc_order_items",), ("lgc:/v1/results", "lgc:/v1/labresults"),
                      ("lgc_results", "lgc_result_values"), ()),
    "extract_patients": ((), ("rupa:/patients",), ("rupa_patients",), ()),
    "extract_lab_tests": ((), ("rupa:/lab_tests",), ("rupa_lab_tests",), ()),
    "intents": (("rupa_patients",), (), ("rupa_order_intents",), ("rupa:/order_intents",)),
    "rupa_events": (("webhook_events",), ("rupa:/orders",), ("rupa_orders", "rupa_ordered_tests", "rupa_results"), ()),
    "poll_letters": ((), ("lgc:/api/v1/outreach/letters-feed", "lgc:/api/v1/outreach/letters"),
                     ("lgc_outreach_letters",), ()),
    "program_pages": (("lgc_orders", "lgc_order_items", "lgc_results"), (), (), ()),
    "purge": ((), (), ("webhook_events", "lgc_results", "rejected_rows", "lgc_outbox", "phi_access"), ()),
}

# (dag, task) -> the datasets the task reported, worked out in the task's own process right after
# it ran (settings need Airflow's connections, which the provider's forked extractor must not ask)
_SEEN: dict[tuple[str, str], tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {}


def remember(op: Any, result: Any, settings: Any = None) -> None:
    """The datasets this task read and wrote: the inbox files from its (PHI-free) return value."""
    read: list[str] = []
    wrote: list[str] = []
    if op.task_id == "prepare" and isinstance(result, dict):
        read = [b.get("name") for b in result.get("batches") or [] if b.get("name")]
    elif op.task_id == "finish" and isinstance(result, list):
        for o in result:
            if o.get("file"):
                wrote.append(str(o["file"]))
            if o.get("summary"):
                wrote.append(str(o["summary"]))
    elif op.task_id == "intents" and isinstance(result, list):
        read = [f"intents/{o['name']}" for o in result if isinstance(o, dict) and o.get("name")]
    if op.task_id not in TASKS:
        return
    if settings is None:
        from etl.airflow.tasks import airflow_settings

        settings = airflow_settings()
    _SEEN[(op.dag_id, op.task_id)] = datasets(op.dag_id, op.task_id, settings, read, wrote)


def warehouse_namespace(url: str) -> tuple[str, str]:
    """(namespace, name prefix) of the warehouse, by OpenLineage's naming: no credentials."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme.startswith("postgres"):
        db = parts.path.lstrip("/") or "postgres"
        return f"postgres://{parts.hostname or 'localhost'}:{parts.port or 5432}", f"{db}.public."
    if scheme == "sqlite":
        path = url.split("///", 1)[-1] if "///" in url else parts.path
        return f"sqlite://{os.path.abspath(path)}", ""
    return f"{scheme}://{parts.hostname or 'localhost'}" + (f":{parts.port}" if parts.port else ""), ""


def inbox_namespace(inbox: str) -> tuple[str, str]:
    """(namespace, path prefix) of the inbox: file:// or the store's scheme://bucket."""
    text = str(inbox)
    parts = urlsplit(text)
    if parts.scheme and parts.scheme != "file" and len(parts.scheme) > 1:
        return f"{parts.scheme}://{parts.hostname or ''}", parts.path.strip("/")
    path = parts.path if parts.scheme == "file" else text
    return "file", os.path.abspath(path)


def vendor_namespace(base_url: str) -> tuple[str, str]:
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else ""), parts.path.rstrip("/")


def datasets(dag_id: str, task_id: str, settings: Any, read: Sequence[str] = (),
             wrote: Sequence[str] = ()) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """([(namespace, name)] inputs, outputs) of one task."""
    spec = TASKS.get(task_id)
    if spec is None:
        return [], []
    reads, vendor_reads, writes, vendor_writes = spec
    wh_ns, wh_prefix = warehouse_namespace(settings.warehouse_url)
    inbox_ns, inbox_prefix = inbox_namespace(settings.inbox)

    def vendor(path: str) -> tuple[str, str]:
        which, route = path.split(":", 1)
        ns, prefix = vendor_namespace(settings.lgc.base_url if which == "lgc" else settings.rupa.base_url)
        return ns, f"{prefix}{route}"

    def inbox_file(name: str) -> tuple[str, str]:
        return inbox_ns, str(PurePosixPath(inbox_prefix) / name) if inbox_prefix else name

    inputs = ([inbox_file(n) for n in read] + [vendor(p) for p in vendor_reads]
              + [(wh_ns, wh_prefix + t) for t in reads])
    outputs = ([inbox_file(n) for n in wrote] + [vendor(p) for p in vendor_writes]
               + [(wh_ns, wh_prefix + t) for t in writes])
    return inputs, outputs


def facets_on_complete(op: Any, task_instance: Any) -> Any:
    """OpenLineage's extractor interface: what `remember` worked out (nothing asked here: this
    runs in the provider's forked process)."""
    from airflow.providers.openlineage.extractors import OperatorLineage
    from openlineage.client.event_v2 import Dataset

    inputs, outputs = _SEEN.get((op.dag_id, op.task_id), ([], []))
    return OperatorLineage(inputs=[Dataset(namespace=ns, name=n) for ns, n in inputs],
                           outputs=[Dataset(namespace=ns, name=n) for ns, n in outputs])
