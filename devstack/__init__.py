"""The local development stack of order-viewer: PostgreSQL and Kafka on this machine, for
`make run`, `make stack` and the tests. Dev tooling only, not part of the order_viewer wheel."""

from devstack.settings import MissingDependency, StackError, StackSettings, settings_from_env
from devstack.stack import LocalStack

__all__ = ["LocalStack", "MissingDependency", "StackError", "StackSettings", "settings_from_env"]
