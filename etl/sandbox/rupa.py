"""PLACEHOLDER: the Rupa Health sandbox (issue 4 replaces this)."""

from starlette.applications import Starlette

from etl.sandbox.faults import Faults


class RupaSandbox:
    def __init__(self) -> None:
        self.faults = Faults()

    def app(self) -> Starlette:
        return Starlette(routes=[])
