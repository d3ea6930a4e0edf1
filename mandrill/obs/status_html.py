"""The status page and the explain page as HTML: server-rendered with the standard
library (``string.Template``, every value through ``html.escape``), styled inline, and
refreshing itself with a ``<meta http-equiv="refresh">``. Nothing external loads: no
script, no font, no stylesheet, no absolute URL; links are relative to the page's server.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from string import Template
from typing import Any
from urllib.parse import quote

from mandrill.explain import Explanation
from mandrill.obs.status import Snapshot

#: Seconds between refreshes unless the page is asked for another (``?refresh=N``).
REFRESH = 2

_PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
$refresh<title>$title</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #1d1d1f; }
h1 { font-size: 1.4em; margin: .6em 0 .2em; }
h2 { font-size: 1.1em; margin: 1.4em 0 .4em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .2em .6em; border-bottom: 1px solid #eee;
         vertical-align: top; }
th { background: #f5f5f7; font-weight: 600; }
code { font: 12px ui-monospace, monospace; }
.banner { background: #b00020; color: #fff; font-weight: 700; padding: .5em 1em;
          margin: 0 -1.5em; letter-spacing: .05em; }
.meta { color: #555; }
.none { color: #888; font-style: italic; }
.reason { background: #eef; border-radius: 3px; padding: 0 .3em; }
.outcome-restarted, .state-running, .ok { color: #11772a; }
.outcome-failed, .outcome-unknown, .state-silent, .no { color: #b00020; }
.outcome-skipped, .outcome-dry_run, .outcome-cancelled, .state-stopped { color: #8a5a00; }
.outcome-restarting { color: #0050b0; }
form { margin: .6em 0; }
</style>
</head>
<body>
$banner<h1>$title</h1>
$body
</body>
</html>
""")


def render_status(snapshot: Snapshot, refresh: int = REFRESH) -> str:
    """The status page of ``snapshot``; it reloads itself every ``refresh`` seconds (0:
    never)."""
    data = snapshot.to_json()
    daemon = data["daemon"]
    meta = (
        f"this daemon: <code>{_e(daemon['instance_id'])}</code> ({_e(daemon['backend'])},"
        f" mandrill {_e(daemon['version'])}) · ledger time {_e(data['generated_at'])} · "
        + (f"refreshes every {refresh} s · " if refresh else "")
        + '<a href="/status.json">JSON</a>'
    )
    cooldown = data["cooldown"]
    shown = len(cooldown["hosts"])
    more = f", the latest {shown} shown" if cooldown["total"] > shown else ""
    # Read less often than the rest (see StatusBoard.scan_max_age).
    scanned = f" · as of {data['scanned_at'][11:19]}" if data["scanned_at"] else ""
    body = "\n".join([
        f'<p class="meta">{meta}</p>',
        _explain_form(""),
        _section("daemons", f"Daemons of the fleet ({len(data['daemons'])})",
                 ("instance", "host", "pid", "backend", "version", "state", "last heartbeat",
                  "started"),
                 [(_code(row["instance_id"]) + (" (this one)" if row["this"] else ""),
                   _e(row["host"]), _e(row["pid"]), _e(row["backend"]), _e(row["version"]),
                   _class("state-" + row["state"], row["state"]),
                   f"{_e(row['last_seen_ago'])} ago", _e(row["started"]))
                  for row in data["daemons"]],
                 "no daemon has heartbeated"),
        _section("controls", "Safety controls in force", ("control", "setting"),
                 _controls(data["controls"], data["breaker"]), ""),
        _section("under-way", f"Restarts under way ({len(data['under_way'])})",
                 ("host", "since", "owner", "message"),
                 [(_host(row["host"]), f"{_e(row['since'])} ({_e(row['for'])})",
                   _code(row["owner"] or "?") + (" <span class=no>(gone: will be resolved as"
                                                 " unknown)</span>" if row["owner_gone"] else ""),
                   _code(row["message_id"]))
                  for row in data["under_way"]],
                 "none"),
        _section("decisions", f"Last {len(data['decisions'])} decisions",
                 ("decided", "host", "outcome", "reason", "detail", "message"),
                 [(_e(row["decided_at"]), _host(row["host"]),
                   _class("outcome-" + row["outcome"], row["outcome"]),
                   _reason(row["reason"]), _e(row["detail"]), _code(row["message_id"]))
                  for row in data["decisions"]],
                 "none yet"),
        _section("dead-letters", f"Latest dead letters ({len(data['dead_letters'])}){scanned}",
                 ("first seen", "host", "why", "deliveries", "message"),
                 [(_e(row["first_seen"]), _e(row["host"] or "?"), _e(row["detail"]),
                   _e(row["deliveries"]), _code(row["message_id"]))
                  for row in data["dead_letters"]],
                 "none"),
        _section("cooldown", f"Hosts in cooldown ({cooldown['total']}{more}){scanned}",
                 ("host", "last restart", "eligible again at", "in"),
                 [(_host(row["host"]), _e(row["last_restart"]), _e(row["eligible_at"]),
                   _e(row["eligible_in"]))
                  for row in cooldown["hosts"]],
                 "none"),
    ])
    banner = ""
    if data["dry_run"]:
        banner = ('<div class="banner" id="dry-run">DRY RUN: this daemon decides and records,'
                  " and restarts nothing (--live to restart for real)</div>\n")
    return _page("mandrill status", body, banner, refresh)


def render_explanation(explanation: Explanation | None, host: str, error: str = "") -> str:
    """The explain page: a form, and for a host its verdict and every rule that says no."""
    parts = ['<p class="meta"><a href="/status">back to the status</a></p>',
             _explain_form(host)]
    if error:
        parts.append(f'<p class="no">{_e(error)}</p>')
    if explanation is not None:
        data = explanation.to_json()
        verdict = "ok" if data["would_restart"] else "no"
        parts.append(f'<p id="verdict" class="{verdict}"><strong>{_e(data["host"])}</strong>:'
                     f" {_e(data['verdict'])}</p>")
        parts.append(_section(
            "findings", "Rules that say no", ("rule", "reason", "detail", "until", "by"),
            [(_e(f["rule"]), _reason(f["reason"]), _e(f["detail"]), _e(f["until"] or ""),
              _code(f["by"]) if f["by"] else "")
             for f in data["findings"]],
            "none",
        ))
        parts.append(f'<p class="meta">checked at {_e(data["at"])}: '
                     f"{_e(', '.join(data['checked']))}</p>")
    return _page("mandrill explain", "\n".join(parts), "", 0)


def _controls(controls: dict[str, Any], breaker: dict[str, Any] | None) -> list[Sequence[str]]:
    window = controls["window"]
    rate_limit = controls["rate_limit"]
    rows: list[Sequence[str]] = [
        ("dry run", _class("no", "yes: nothing is restarted") if controls["dry_run"] else "no"),
        ("minimum interval between restarts of a host", _e(controls["min_restart_interval"])),
        ("excluded hosts (--exclude)", _list(controls["exclude"])),
        ("allowed hosts (--only)", _list(controls["only"], "all")),
    ]
    if window is None:
        rows.append(("time window", "any day, any time"))
    else:
        state = (_class("ok", "open now") if window["open"]
                 else _class("no", f"closed now: {window['closed_because']}"))
        days = window["weekdays"] or "every day"
        hours = ",".join(window["hours"]) or "all day"
        rows.append(("time window", f"{_e(days)} {_e(hours)} {_e(window['timezone'])} · {state}"))
    if rate_limit is None:
        rows.append(("fleet rate limit", "none"))
    else:
        rows.append(("fleet rate limit",
                     f"{_e(controls['rate_limit_used'])} of {_e(rate_limit['restarts'])}"
                     f" restarts in the last {_e(rate_limit['window'])}"))
    rows += [
        ("restarts at once in one daemon", _e(controls["max_concurrent_restarts"] or "no limit")),
        ("failed restarts before a dead letter", _e(controls["max_attempts"])),
        ("an unknown outcome", "retried" if controls["retry_unknown"] else "counts as restarted"),
        ("breaker", "not configured" if breaker is None
         else ", ".join(f"{_e(key)}: {_e(value)}" for key, value in breaker.items())),
    ]
    return rows


def _section(ident: str, title: str, columns: Sequence[str], rows: Iterable[Sequence[str]],
             empty: str) -> str:
    head = "".join(f"<th>{_e(column)}</th>" for column in columns)
    body = "\n".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                     for row in rows)
    if not body:
        body = f'<tr><td class="none" colspan="{len(columns)}">{_e(empty)}</td></tr>'
    return (f'<section id="{ident}"><h2>{_e(title)}</h2>\n<table>\n<tr>{head}</tr>\n{body}\n'
            "</table></section>")


def _explain_form(host: str) -> str:
    return ('<form action="/explain" method="get"><label>Would a message restart host'
            f' <input name="host" value="{_e(host)}" size="32" required></label>'
            " <button>explain</button></form>")


def _page(title: str, body: str, banner: str, refresh: int) -> str:
    tag = f'<meta http-equiv="refresh" content="{int(refresh)}">\n' if refresh else ""
    return _PAGE.substitute(title=_e(title), refresh=tag, banner=banner, body=body)


def _host(host: str) -> str:
    return f'<a href="/explain?host={escape(quote(host, safe=""))}">{_e(host)}</a>'


def _reason(code: str) -> str:
    return f'<code class="reason">{_e(code)}</code>' if code else ""


def _code(value: object) -> str:
    return f"<code>{_e(value)}</code>"


def _class(name: str, text: str) -> str:
    return f'<span class="{_e(name)}">{_e(text)}</span>'


def _list(values: Sequence[str], empty: str = "none") -> str:
    return ", ".join(_code(value) for value in values) if values else empty


def _e(value: object) -> str:
    return escape("" if value is None else str(value))


__all__ = ["REFRESH", "render_explanation", "render_status"]
