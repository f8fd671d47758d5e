"""The webhook receiver: vendors' events in, stored raw, answered fast.

    POST /webhooks/lgc    LetsGetChecked order / result events (optionally signed)
    POST /webhooks/rupa   Rupa order / patient / lab test events (signature configurable)
    GET  /healthz         liveness (no warehouse call)
    GET  /readyz          readiness: the warehouse answers
    GET  /webhooks/rupa/return   a practitioner back from Rupa Checkout (`?row_id=…&order=…`)

Receiving is deliberately dumb: check the size and the signature, store the raw bytes in
`webhook_events` (deduplicated by their sha256, since vendors deliver at least once), answer
200. Nothing is parsed beyond the event's type and nothing is fetched here; applying an event
(confirming it with the vendor's API, updating orders) is a task's job (`etl.webhooks.store`
hands those tasks the events to apply). A storage failure answers 503 so the vendor retries.

Modules: `verify` (HMAC signatures), `store` (the table), `app` (the ASGI app).
"""
