"""Monitoring: run catalogs and comparisons, HTML reports, trackers, alerts, profiling."""
