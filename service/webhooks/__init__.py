"""Webhooks: signed notifications of a submitter's results (Standard Webhooks conventions).

- ``signing``: ``whsec_`` secrets, the ``webhook-signature`` header, the secrets' encryption at rest;
- ``addresses``: which URLs may be registered and reached (http(s) only; no private addresses);
- ``events``: outbox rows written in the transaction of the state change they report;
- ``sender``: drains due deliveries (a worker's thread, never the request path), with backoff.
"""
