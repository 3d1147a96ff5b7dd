"""The page in Chromium against a service that requires tokens: it asks for one, shows an order
masked or whole as the token allows, keeps the token out of URLs and the page, and signs out."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.sync_api import Route, expect

from order_viewer.adapters.http.auth.tokens import new_token, token_digest
from order_viewer.entrypoints.generate import make_order
from tests.conftest import ServiceProcess, Stack, Topics, encode_orders, produce, wait_until
from tests.e2e.conftest import Tab
from tests.e2e.test_browser import now_iso

# One worker runs the module, so that its tests share its one guarded service.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("browser_auth")]


@dataclass
class GuardedService:
    base_url: str
    tokens: dict[str, str]
    order: dict[str, Any]


@pytest.fixture(scope="module")
def service(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardedService]:
    """This module's service, in place of the shared anonymous one: token authentication, one
    order with known personal details."""
    directory = tmp_path_factory.mktemp("browser-auth")
    tokens = {"support": new_token(), "auditor": new_token()}
    tokens_file = directory / "tokens.txt"
    tokens_file.write_text(
        f"support:{token_digest(tokens['support'])}:orders:read\n"
        f"auditor:{token_digest(tokens['auditor'])}:orders:read:pii\n"
    )
    suffix = uuid.uuid4().hex[:10]
    topics = Topics(f"orders-ba-{suffix}", f"orders-ba-{suffix}.dlq", f"ov-ba-{suffix}")
    process = ServiceProcess(
        stack, topics, directory, HTTP_AUTH="token", HTTP_TOKENS_FILE=str(tokens_file)
    ).start()
    order = make_order(random.Random(99), order_uid=f"e2eauth{suffix}")
    order["delivery"].update(name="Test Testov", phone="+972000000000", email="test@gmail.com")
    order["date_created"] = now_iso()  # the newest, so among the recent orders listed
    produce(stack, topics.orders, encode_orders([order]))
    auditor = {"Authorization": f"Bearer {tokens['auditor']}"}
    wait_until(
        lambda: process.get(f"/order/{order['order_uid']}", headers=auditor).status_code == 200,
        30,
        "the order to be served",
    )
    try:
        yield GuardedService(process.base_url, tokens, order)
    finally:
        process.kill()


def sign_in(tab: Tab, token: str) -> None:
    expect(tab.by("sign-in")).to_be_visible()
    expect(tab.by("status")).to_have_attribute("data-state", "auth")
    tab.by("token-input").fill(token)
    tab.by("token-submit").click()


def assert_token_kept_out_of_sight(tab: Tab, token: str) -> None:
    assert not any(token in url for url in tab.requests), "the token went into a URL"
    assert token not in tab.page.url
    assert token not in tab.page.content(), "the token is in the page"
    assert tab.by("token-input").input_value() == ""


def test_the_page_asks_for_a_token_and_shows_a_masked_order(
    tab: Tab, service: GuardedService
) -> None:
    uid = service.order["order_uid"]
    token = service.tokens["support"]
    tab.open(f"/?id={uid}")
    sign_in(tab, token)
    tab.wait_loaded()
    delivery = tab.by("section-delivery")
    expect(delivery).to_contain_text("T*** T*****")
    expect(delivery).to_contain_text("+97********00")
    expect(delivery).to_contain_text("t***@gmail.com")
    expect(delivery).not_to_contain_text("Test Testov")
    expect(tab.by("masked-note")).to_be_visible()
    expect(tab.by("sign-in")).to_be_hidden()
    expect(tab.by("recent-list")).to_contain_text(uid)
    assert tab.page.evaluate("sessionStorage.getItem('order-viewer.token')") == token
    assert_token_kept_out_of_sight(tab, token)
    tab.assert_clean()


def test_the_live_stream_of_the_order_shown_is_authorised_by_header_not_by_url(
    tab: Tab, service: GuardedService
) -> None:
    uid = service.order["order_uid"]
    token = service.tokens["support"]
    tab.open("/")
    sign_in(tab, token)
    with tab.page.expect_response(lambda r: r.url.endswith(f"/order/{uid}/events")) as stream:
        tab.open(f"/?id={uid}")
        tab.wait_loaded()
    assert stream.value.status == 200
    assert stream.value.request.headers.get("authorization") == f"Bearer {token}"
    assert stream.value.headers["content-type"].startswith("text/event-stream")
    expect(tab.by("section-delivery")).to_contain_text("T*** T*****")
    assert_token_kept_out_of_sight(tab, token)
    tab.assert_clean()


def test_a_pii_token_shows_the_whole_order_and_sign_out_forgets_it(
    tab: Tab, service: GuardedService
) -> None:
    uid = service.order["order_uid"]
    token = service.tokens["auditor"]
    tab.open("/")
    sign_in(tab, token)
    tab.by("order-input").fill(uid)
    tab.by("order-submit").click()
    tab.wait_loaded()
    delivery = tab.by("section-delivery")
    expect(delivery).to_contain_text("Test Testov")
    expect(delivery).to_contain_text("+972000000000")
    expect(tab.by("masked-note")).to_be_hidden()
    assert_token_kept_out_of_sight(tab, token)

    tab.by("sign-out").click()
    expect(tab.by("sign-in")).to_be_visible()
    expect(tab.by("order-view")).to_be_hidden()
    expect(tab.by("sign-out")).to_be_hidden()
    assert tab.page.evaluate("sessionStorage.getItem('order-viewer.token')") is None
    tab.open(f"/?id={uid}")  # a reload asks again
    expect(tab.by("sign-in")).to_be_visible()
    expect(delivery).not_to_contain_text("Test Testov")
    tab.assert_clean()


def test_a_wrong_token_is_refused_and_asked_for_again(tab: Tab, service: GuardedService) -> None:
    tab.open(f"/?id={service.order['order_uid']}")
    sign_in(tab, "not-the-token")
    expect(tab.by("status")).to_contain_text("not accepted")
    expect(tab.by("sign-in")).to_be_visible()
    assert tab.page.evaluate("sessionStorage.getItem('order-viewer.token')") is None
    sign_in(tab, service.tokens["support"])
    tab.wait_loaded()
    expect(tab.by("section-delivery")).to_contain_text("T*** T*****")


def test_a_late_refusal_of_the_first_requests_keeps_why_a_typed_token_was_refused(
    tab: Tab, service: GuardedService
) -> None:
    """The page's two first requests (the order and the recent list) are both refused; the second
    refusal may arrive after the user typed a bad token and must not overwrite the reason."""
    held: list[Route] = []

    def hold(route: Route) -> None:  # Playwright takes only Python functions as handlers
        held.append(route)

    tab.page.route("**/orders?**", hold, times=1)
    tab.open(f"/?id={service.order['order_uid']}")
    sign_in(tab, "two words")
    expect(tab.by("status")).to_contain_text("That is not an access token")

    def request_held() -> bool:
        tab.page.wait_for_timeout(10)  # lets Playwright hand the held request over
        return bool(held)

    wait_until(request_held, 10, "the recent list's request")
    held[0].continue_()
    expect(tab.by("recent-status")).to_contain_text("Sign in to see the recent orders")
    expect(tab.by("status")).to_contain_text("That is not an access token")
    expect(tab.by("sign-in")).to_be_visible()
    tab.assert_clean()


@pytest.mark.parametrize(
    "typed",
    [
        "tok€n",  # beyond Latin-1: fetch() would throw on it
        "🔑" * 10,
        "tökén",
        "two words",
        "tab\there",
        "zero\u200bwidth",
        "nul\x00byte",
    ],
)
def test_a_token_that_cannot_be_one_is_refused_at_once_and_not_kept(
    tab: Tab, service: GuardedService, typed: str
) -> None:
    tab.open(f"/?id={service.order['order_uid']}")
    sign_in(tab, typed)
    expect(tab.by("status")).to_contain_text("That is not an access token")
    expect(tab.by("status")).to_have_attribute("data-state", "auth")
    expect(tab.by("sign-in")).to_be_visible()
    assert tab.page.evaluate("sessionStorage.getItem('order-viewer.token')") is None
    assert tab.order_requests() == [f"{service.base_url}/order/{service.order['order_uid']}"]
    sign_in(tab, f"  {service.tokens['support']}  ")  # pasted with spaces around: kept
    tab.wait_loaded()
    expect(tab.by("section-delivery")).to_contain_text("T*** T*****")
    tab.assert_clean()
