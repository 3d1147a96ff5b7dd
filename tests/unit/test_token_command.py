"""`order-viewer token create` with arguments of every kind: a line for the token file, or one
line on stderr saying what is wrong and nothing on stdout."""

from __future__ import annotations

import pytest

from order_viewer.adapters.http.auth import SCOPES
from order_viewer.adapters.http.auth.tokens import parse_scopes, parse_token_file, token_digest
from order_viewer.entrypoints.cli import main

NAME_RULE = "a client name is 1 to 64 letters, digits, '.', '_', '@' or '-'"
SCOPE_RULE = f"unknown scope; known are {', '.join(sorted(SCOPES))}"


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["a:b", "--scopes", "orders:read"], f"argument name: {NAME_RULE}"),
        (["x\ny", "--scopes", "orders:read"], f"argument name: {NAME_RULE}"),
        (["", "--scopes", "orders:read"], f"argument name: {NAME_RULE}"),
        (["a" * 300, "--scopes", "orders:read"], f"argument name: {NAME_RULE}"),
        (["a b", "--scopes", "orders:read"], f"argument name: {NAME_RULE}"),
        (["é", "--scopes", "orders:read"], f"argument name: {NAME_RULE}"),
        (["a\x00", "--scopes", "orders:read"], f"argument name: {NAME_RULE}"),
        (["support", "--scopes", "orders:write"], f"argument --scopes: {SCOPE_RULE}"),
        (["support", "--scopes", ""], f"argument --scopes: {SCOPE_RULE}"),
        (["support", "--scopes", "orders:read,,x"], f"argument --scopes: {SCOPE_RULE}"),
        (["support", "--scopes", "orders:read,"], f"argument --scopes: {SCOPE_RULE}"),
        (["support", "--scopes", "ORDERS:READ"], f"argument --scopes: {SCOPE_RULE}"),
        (["support", "--scopes", "orders:read\nforged:line"], f"argument --scopes: {SCOPE_RULE}"),
        (["support"], "the following arguments are required: --scopes"),
        (["--scopes", "orders:read"], "the following arguments are required: name"),
    ],
)
def test_hostile_arguments_are_refused_with_one_line(
    arguments: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["token", "create", *arguments])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"order-viewer token create: {complaint} (see order-viewer token create --help)\n"
    )


def test_a_token_is_printed_once_with_its_line_for_the_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["token", "create", "support@ops", "--scopes", " orders:read , metrics:read "]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == (
        "token for support@ops (shown this once; the service keeps only its digest):"
    )
    token, line = lines[1].strip(), lines[3].strip()
    assert line == f"support@ops:{token_digest(token)}:metrics:read,orders:read"
    (principal,) = parse_token_file(line).principals.values()
    assert principal.name == "support@ops"
    assert principal.scopes == {"orders:read", "metrics:read"}


@pytest.mark.parametrize("text", ["", " ", ",", ",,", "orders:read,,x"])
def test_an_empty_scope_list_or_an_empty_scope_is_an_unknown_scope(text: str) -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        parse_scopes(text)
