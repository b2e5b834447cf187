"""The operator's side of a running node: the HTTP admin API (api.py, which also hosts the listener,
`AdminServer`), the dashboard (dashboard.py), Prometheus metrics (metrics.py) and the small time series
behind the charts (timeseries.py). Everything here reads the spool and the health monitor and drives
actions through `operations.Operations`, so the API, the dashboard and the CLI change the spool alike."""
