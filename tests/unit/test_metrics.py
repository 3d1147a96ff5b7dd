"""HTTP metrics are labelled by route, never by the raw path."""

import pytest

from order_viewer.adapters.metrics import route_template


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/order/abc", "/order/{order_uid}"),
        ("/order/", "/order/{order_uid}"),
        ("/order/abc/events", "/order/{order_uid}/events"),
        ("/order/a/b/events", "/order/{order_uid}/events"),
        ("/static/app.js", "/static"),
        ("/docs/static/swagger-ui-bundle.js", "/docs/static"),
        ("/docs", "/docs"),
        ("/readyz", "/readyz"),
        ("/static", "other"),
        ("/docs/other", "other"),
        ("/wp-admin/setup.php", "other"),
    ],
)
def test_route_template(path: str, route: str) -> None:
    assert route_template(path) == route
