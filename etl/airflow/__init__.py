"""Everything that imports Apache Airflow lives here, so the rest of `etl/` (and the CLI) works
without it:

    provider.py   get_provider_info(): the `apache_airflow_provider` entry point (pure data, no
                  Airflow import: Airflow reads it to list the connection types and their forms)
    hooks.py      LgcHook, RupaHook: connection types `labsync-lgc` / `labsync-rupa`, their form
                  fields, the Test button (a real token), and the vendor settings a task uses
    settings.py   the task settings: the environment overlaid with the Hooks' Connections
    dagkit.py     what every labsync DAG gets (read at parse time: light): `task` (asset extras,
                  metrics, lineage) and `labsync_dag()` (alert callbacks, Deadline Alerts)
    alerting.py   the DAG callbacks' work: a failed run, a run past its deadline (etl.alerts)
    notifiers.py  Airflow's SMTP and Slack notifiers for etl.alerts.destinations
    observe.py    after a task: asset event extras and metrics (Airflow's Stats)
    lineage.py    the datasets each task reports to OpenLineage
"""
