"""cis490-reconcile: backfill index.jsonl rows for episode tarballs the receiver
stored but never indexed."""

__version__ = "0.1.0"
