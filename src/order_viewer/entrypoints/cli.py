"""The `order-viewer` command."""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from importlib.metadata import version
from pathlib import Path
from typing import NoReturn, TypeVar

import sqlalchemy.exc

from order_viewer.adapters import logs
from order_viewer.adapters.http.access import AccessConfigurationError
from order_viewer.adapters.http.auth.tokens import (
    check_client_name,
    new_token,
    parse_scopes,
    token_digest,
)
from order_viewer.adapters.postgres.migrate import migrate
from order_viewer.bootstrap import access_policy
from order_viewer.config import ConfigurationError, Settings, load_settings
from order_viewer.entrypoints import dlq, produce, trail
from order_viewer.entrypoints.check import check
from order_viewer.entrypoints.server import serve
from order_viewer.service.ports import DatabaseUnavailable

T = TypeVar("T")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    arguments = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigurationError as error:
        print(f"order-viewer: {error}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    command: int = arguments.run(settings, arguments)
    return command


class _Parser(argparse.ArgumentParser):
    """Refuses a command line in one line on stderr, as every other refusal of the command is
    written; the usage is a --help away. Its subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="order-viewer",
        description="Orders from Kafka into PostgreSQL, served by id over HTTP. "
        "Configured by environment variables (see the README).",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version('order-viewer')}"
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="consume orders and serve them over HTTP until stopped"
    )
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser("migrate", help="bring the database schema to the newest version")
    migrate.set_defaults(run=_migrate)

    check = commands.add_parser(
        "check", help="verify the configuration and reach the database and the broker"
    )
    check.set_defaults(run=_check)

    produce = commands.add_parser(
        "produce", help="send realistic random orders to the orders topic"
    )
    produce.add_argument(
        "--count",
        type=_non_negative,
        default=None,
        help="orders to send (default 10, or 1 with --file)",
    )
    produce.add_argument(
        "--invalid-ratio",
        type=_ratio,
        default=0.0,
        metavar="R",
        help="share of broken messages, 0 to 1 (default 0)",
    )
    produce.add_argument(
        "--seed", type=int, default=None, help="random seed, for a repeatable stream"
    )
    produce.add_argument(
        "--file", type=Path, default=None, help="send this file's order as it is, --count times"
    )
    produce.set_defaults(run=_produce)

    token = commands.add_parser("token", help="bearer tokens for HTTP_AUTH=token")
    token_commands = token.add_subparsers(title="token commands", required=True, metavar="COMMAND")
    create = token_commands.add_parser(
        "create", help="print a new random token once, and its line for HTTP_TOKENS_FILE"
    )
    create.add_argument("name", type=_argument(check_client_name), help="the client's name")
    create.add_argument(
        "--scopes",
        type=_argument(parse_scopes),
        required=True,
        help="comma-separated: orders:read (personal fields masked), orders:read:pii (whole), "
        "metrics:read, orders:trail",
    )
    create.set_defaults(run=_create_token)

    dead_letters = commands.add_parser(
        "dlq", help="the dead-letter topic: counts by reason, replay"
    ).add_subparsers(title="dead-letter commands", required=True, metavar="COMMAND")
    dlq_stats = dead_letters.add_parser(
        "stats", help="count the dead letters by reason code, with the first and last time"
    )
    dlq_stats.set_defaults(run=_dlq_stats)
    replay = dead_letters.add_parser(
        "replay", help="send dead letters back to the orders topic (their key and value as is)"
    )
    replay.add_argument("--reason", choices=dlq.KNOWN_REASONS, help="only this reason code")
    replay.add_argument(
        "--since",
        type=_argument(dlq.parse_time),
        help="only those dead-lettered at or after this ISO 8601 time",
    )
    replay.add_argument(
        "--until",
        type=_argument(dlq.parse_time),
        help="only those dead-lettered before this ISO 8601 time",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="count what would be sent, send nothing"
    )
    replay.add_argument(
        "--unverified",
        action="store_true",
        help="also send the dead letters whose original record is not in the orders topic with "
        "their key and value, e.g. once retention removed it: only if everyone who can write "
        "the dead-letter topic is trusted",
    )
    replay.set_defaults(run=_dlq_replay)

    order_trail = commands.add_parser(
        "trail", help="what became of every message of an order, and its state (from the database)"
    )
    order_trail.add_argument("order_uid", type=_argument(trail.order_uid), help="the order id")
    order_trail.set_defaults(run=_trail)
    return parser


def _argument(check: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a checker that raises ValueError with its reason."""

    def parse(text: str) -> T:
        try:
            return check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _serve(settings: Settings, _: argparse.Namespace) -> int:
    try:
        access = access_policy(settings)
    except AccessConfigurationError as error:
        print(f"order-viewer: {error}", file=sys.stderr)
        return 2
    return serve(settings, access)


def _create_token(_: Settings, arguments: argparse.Namespace) -> int:
    token = new_token()
    scopes = ",".join(sorted(arguments.scopes))
    print(f"token for {arguments.name} (shown this once; the service keeps only its digest):")
    print(f"  {token}")
    print("line for HTTP_TOKENS_FILE:")
    print(f"  {arguments.name}:{token_digest(token)}:{scopes}")
    return 0


def _migrate(settings: Settings, _: argparse.Namespace) -> int:
    try:
        migrate(str(settings.database_url))
    except sqlalchemy.exc.OperationalError as error:
        print(f"order-viewer: cannot reach the database: {error.orig}".strip(), file=sys.stderr)
        return 1
    print("database schema is up to date")
    return 0


def _check(settings: Settings, _: argparse.Namespace) -> int:
    print("configuration: ok")
    verdicts = check(settings)
    for verdict in verdicts:
        print(verdict)
    return 0 if all(verdict.ok for verdict in verdicts) else 1


def _produce(settings: Settings, arguments: argparse.Namespace) -> int:
    batch: Iterable[tuple[bytes | None, bytes, bool]]
    if arguments.file is not None:
        count = arguments.count or 1
        try:
            batch = itertools.repeat(produce.file_message(arguments.file), count)
        except OSError as error:
            print(f"order-viewer: cannot read {arguments.file}: {error.strerror}", file=sys.stderr)
            return 2
    else:
        count = arguments.count or 10
        batch = produce.messages(count, arguments.invalid_ratio, arguments.seed)
    summary = produce.produce(settings, batch, count, interactive=sys.stderr.isatty())
    print(
        f"sent {summary.sent} messages ({summary.invalid} invalid) to {settings.kafka_topic} "
        f"in {summary.seconds:.2f} s ({summary.rate:,.0f}/s); {summary.failed} failed"
    )
    return 1 if summary.failed else 0


def _dlq_stats(settings: Settings, _: argparse.Namespace) -> int:
    try:
        by_reason = dlq.stats(settings, interactive=sys.stderr.isatty())
    except dlq.DeadLetterToolError as error:
        print(f"order-viewer: {error}", file=sys.stderr)
        return 1
    dlq.print_stats(by_reason, settings.kafka_dlq_topic)
    return 0


def _dlq_replay(settings: Settings, arguments: argparse.Namespace) -> int:
    if arguments.since and arguments.until and arguments.since >= arguments.until:
        print("order-viewer: --since must be before --until", file=sys.stderr)
        return 2
    selection = dlq.Selection(arguments.reason, arguments.since, arguments.until)
    try:
        summary = dlq.replay(
            settings,
            selection,
            dry_run=arguments.dry_run,
            send_unverified=arguments.unverified,
            interactive=sys.stderr.isatty(),
        )
    except dlq.DeadLetterToolError as error:
        print(f"order-viewer: {error}", file=sys.stderr)
        return 1
    action = "would send" if arguments.dry_run else "sent"
    sent = summary.sendable if arguments.dry_run else summary.sent
    unverified = "none"
    if summary.unverified:
        fate = (
            ("would be sent" if arguments.dry_run else "sent")
            if arguments.unverified
            else "skipped"
        )
        unverified = f"{summary.unverified.total()} {fate} ({_counts(summary.unverified)})"
    print(
        f"{summary.selected} dead letters selected; {action} {sent} to {settings.kafka_topic} "
        f"in {summary.seconds:.2f} s; unverified: {unverified}; "
        f"skipped: {_counts(summary.skipped) or 'none'}; {summary.failed} failed"
    )
    return 1 if summary.failed else 0


def _trail(settings: Settings, arguments: argparse.Namespace) -> int:
    uid = arguments.order_uid
    try:
        found = trail.whole_trail(str(settings.database_url), uid)
    except DatabaseUnavailable as error:
        print(f"order-viewer: cannot reach the database: {error}", file=sys.stderr)
        return 1
    if not settings.order_trail_enabled:
        print("order-viewer: ORDER_TRAIL_ENABLED=false: nothing new is recorded", file=sys.stderr)
    if found is None:
        print(
            f"order-viewer: nothing is known of order {uid}: no message of it handled, not "
            "stored, not deleted",
            file=sys.stderr,
        )
        return 1
    trail.print_trail(*found, trail.console(sys.stdout.isatty()))
    return 0


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{counter[what]} {what}" for what in sorted(counter))


if __name__ == "__main__":
    sys.exit(main())
