"""Grafana dashboards as code: see generate.py."""
