"""The auto-healer: health probes, grace windows, the storm guard and ending runs."""
