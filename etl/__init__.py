"""labsync: Rupa Health extraction, CSV order validation and LetsGetChecked order loading."""

__version__ = "0.1.0"
