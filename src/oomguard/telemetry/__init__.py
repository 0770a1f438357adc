"""The vocabulary the layers above report in: refusal reasons, and the typed
hooks through which the broker, the healer and the storm guard publish their
figures. Stdlib only, imported by those layers and by the exporter alike."""
