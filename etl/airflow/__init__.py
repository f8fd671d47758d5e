"""Everything that imports Apache Airflow lives here, so the rest of `etl/` (and the CLI) works
without it:

    provider.py   get_provider_info(): the `apache_airflow_provider` entry point (pure data, no
                  Airflow import: Airflow reads it to list the connection types and their forms)
    hooks.py      LgcHook, RupaHook: connection types `labsync-lgc` / `labsync-rupa`, their form
                  fields, the Test button (a real token), and the vendor settings a task uses
    settings.py   the task settings: the environment overlaid with the Hooks' Connections
"""
