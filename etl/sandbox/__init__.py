"""The local LetsGetChecked and Rupa APIs (test doubles), served with starlette + uvicorn: they
come with the labsync[sandbox] extra, which Airflow workers do not need."""

from etl.extras import require

require("sandbox", "the sandbox APIs")
