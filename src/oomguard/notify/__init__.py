"""Telling people: event hooks that run commands and POST webhooks.

Every hook has its own bounded queue and thread, so a hook that hangs,
fails or floods never delays the daemon, the broker or the healer, and the
event is in the store whatever happens to its hooks.
"""
