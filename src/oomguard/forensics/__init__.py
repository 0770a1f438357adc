"""Seeing what happened: kernel OOM reports, the event store, metrics, ranking and status."""
