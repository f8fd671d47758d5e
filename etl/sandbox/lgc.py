"""PLACEHOLDER: the LetsGetChecked sandbox (issue 3 replaces this)."""

from starlette.applications import Starlette

from etl.sandbox.faults import Faults


class LgcSandbox:
    def __init__(self) -> None:
        self.faults = Faults()

    def app(self) -> Starlette:
        return Starlette(routes=[])
