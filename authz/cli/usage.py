"""`authz usage` and `authz price`: what a workspace or key used, and what it cost."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

from authz.cli.output import CliError, iso_utc
from authz.cli.parser import Commands, action_group, usd
from authz.models import CLI_ACTOR, ModelPrice, UsageRow
from authz.store.base import Store
from authz.textsafe import printable
from authz.usage.periods import period_bounds, period_of

_TOTALS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "estimated_requests",
    "estimated_tokens",
    "errors_4xx",
    "errors_5xx",
)


def _month(raw: str) -> str:
    try:
        period_bounds(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM, got {raw!r}") from None
    return raw


def add_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    usage = commands.add_parser(
        "usage", parents=[common], help="a workspace's or a key's ledger for a month"
    )
    target = usage.add_mutually_exclusive_group(required=True)
    target.add_argument("--workspace", help="workspace id")
    target.add_argument("--key", help="key id: its traffic hour by hour")
    usage.add_argument("--month", type=_month, help="YYYY-MM (UTC), default: this month")

    actions = action_group(commands, "price", "model prices (USD per 1M tokens)")
    set_price = actions.add_parser("set", parents=[common], help="set a model's prices")
    set_price.add_argument("model", help='model name; "*" is the default for unknown models')
    set_price.add_argument("--input", type=usd, required=True, help="USD per 1M input tokens")
    set_price.add_argument("--output", type=usd, required=True, help="USD per 1M output tokens")
    actions.add_parser("list", parents=[common], help="list prices")


def _sum(rows: Iterable[UsageRow]) -> dict[str, Any]:
    rows = list(rows)
    totals: dict[str, Any] = {name: sum(getattr(r, name) for r in rows) for name in _TOTALS}
    # Reported tokens (prompt, completion) and estimated ones (usage never reported, charged
    # as reserved) are shown apart; the total, like the quota, counts both.
    totals["total_tokens"] = sum(r.tokens for r in rows)
    totals["spend_usd"] = round(sum(r.spend_usd for r in rows), 6)
    return totals


def _grouped(rows: list[UsageRow], field: str) -> list[dict[str, Any]]:
    groups: dict[str, list[UsageRow]] = defaultdict(list)
    for row in rows:
        groups[getattr(row, field)].append(row)
    return [{field: name, **_sum(group)} for name, group in sorted(groups.items())]


async def usage_report(store: Store, args: argparse.Namespace) -> dict[str, Any]:
    month = args.month or period_of(datetime.now(UTC))
    since, until = period_bounds(month)
    if args.workspace is not None:
        if await store.get_workspace(args.workspace) is None:
            raise CliError(f"no workspace {args.workspace}")
        rows = await store.usage_report(workspace_id=args.workspace, since=since, until=until)
        return {
            "workspace_id": args.workspace,
            "month": month,
            **_sum(rows),
            "by_model": _grouped(rows, "model"),
            "by_key": _grouped(rows, "key_id"),
        }
    key = await store.get_key(args.key)
    if key is None:
        raise CliError(f"no key {args.key}")
    rows = await store.usage_report(key_id=args.key, since=since, until=until)
    hours: dict[datetime, list[UsageRow]] = defaultdict(list)
    for row in rows:
        hours[row.hour].append(row)
    return {
        "key_id": key.id,
        "workspace_id": key.workspace_id,
        "mask": key.mask,
        "active": key.active,
        "last_used_at": None if key.last_used_at is None else iso_utc(key.last_used_at),
        "month": month,
        **_sum(rows),
        "hours": [{"hour": iso_utc(hour), **_sum(group)} for hour, group in sorted(hours.items())],
    }


def _human_usage(report: dict[str, Any]) -> str:
    head = printable(report["workspace_id"] if "by_model" in report else report["key_id"])
    lines = [
        f"{head} in {report['month']}: {report['requests']} requests, "
        f"{report['total_tokens']} tokens ({report['prompt_tokens']} prompt, "
        f"{report['completion_tokens']} completion, {report['estimated_tokens']} estimated "
        f"for {report['estimated_requests']} requests without reported usage), "
        f"errors 4xx {report['errors_4xx']} "
        f"5xx {report['errors_5xx']}, spend ${report['spend_usd']:.6f}"
    ]
    for group, field in (("by_model", "model"), ("by_key", "key_id"), ("hours", "hour")):
        for item in report.get(group, []):
            lines.append(
                f"  {printable(item[field])}: {item['requests']} requests, "
                f"{item['total_tokens']} tokens, ${item['spend_usd']:.6f}"
            )
    return "\n".join(lines)


async def usage_command(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    report = await usage_report(store, args)
    out.write((json.dumps(report, indent=2) if args.json else _human_usage(report)) + "\n")
    return 0


def _price_dict(price: ModelPrice) -> dict[str, Any]:
    return {
        "model": price.model,
        "input_per_1m_usd": price.input_per_1m_usd,
        "output_per_1m_usd": price.output_per_1m_usd,
        "updated_at": None if price.updated_at is None else iso_utc(price.updated_at),
    }


def _price_line(price: ModelPrice) -> str:
    return (
        f"{printable(price.model)}: ${price.input_per_1m_usd} in, "
        f"${price.output_per_1m_usd} out per 1M"
    )


async def price_command(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "set":
        saved = await store.set_price(
            ModelPrice(args.model, args.input, args.output), actor=CLI_ACTOR
        )
        data: Any = _price_dict(saved)
        human = _price_line(saved)
    else:
        prices = await store.list_prices()
        data = [_price_dict(p) for p in prices]
        human = (
            "\n".join(_price_line(p) for p in prices)
            or "(no prices: spend counts as 0; set a default with `authz price set '*' ...`)"
        )
    out.write((json.dumps(data, indent=2) if args.json else human) + "\n")
    return 0
