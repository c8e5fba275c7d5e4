"""Measurement: parameters, FLOPs, storage formats, latency, deployment forms, comparisons, reports
and plots."""
