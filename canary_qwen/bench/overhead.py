"""The served-overhead section of a benchmark's report: for each served entry of an engine flavour, how much of the
timed pass its engine spent on its own work (admitting requests and stepping, from the server's
``canary_qwen_engine_busy_seconds_total``) and how much went to the serving path instead.

"Engine idle per request" is (wall - engine busy) / requests. At 1 request in flight it is the time a request spent
outside the engine: the client, transport, Triton's queues and models, the response path. At more in flight it is
the time the engine had nothing to do while requests were on their way, which is what makes a served pass slower
than a local batch. The next regression of the serving path shows here in one run.
"""

from __future__ import annotations

HEADER = ("entry", "in flight", "requests", "wall (s)", "engine busy (s)", "busy share", "engine idle per request")


def overhead_rows(results: dict) -> list[list[str]]:
    rows = []
    for run in results["runs"]:
        busy = run.get("engine_busy_s")
        if run["skipped"] or busy is None or not run["n_clips"]:
            continue
        wall = run["wall_s"]
        idle_ms = 1000 * max(0.0, wall - busy) / run["n_clips"]
        rows.append(
            [
                f"`{run.get('spec') or run['backend']}`",
                str(run["batch_size"]),
                str(run["n_clips"]),
                f"{wall:.2f}",
                f"{busy:.2f}",
                f"{100 * min(1.0, busy / wall):.0f} %",
                f"{idle_ms:.0f} ms",
            ]
        )
    return rows


def overhead_section(results: dict, heading: str = "###") -> list[str]:
    """Markdown lines of the section (a table and what it means); none when no served engine entry ran."""
    rows = overhead_rows(results)
    if not rows:
        return []
    lines = [f"{heading} Served overhead", ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "|".join(" --- " for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [
        "",
        "Engine busy: seconds the server's engine spent admitting requests and stepping during the timed pass "
        "(its `canary_qwen_engine_busy_seconds_total`). Engine idle per request: (wall - busy) / requests; at 1 in "
        "flight, each request's time outside the engine (client, transport, Triton, response path).",
        "",
    ]
    return lines
