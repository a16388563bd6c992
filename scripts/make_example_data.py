"""Make tunesmith's own example data set: dates written many ways -> ISO 8601 (YYYY-MM-DD).

A task with one checkable answer per row, where a small chat model is mostly wrong
out of the box (it explains, reformats loosely or guesses the day/month order) and
learns the format within a few minutes of LoRA on a CPU.  Alpaca format
(instruction / input / output).  The held-out file shares no date with the
training file.

    python scripts/make_example_data.py            # writes examples/data/dates-{train,test}.jsonl
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
INSTRUCTIONS = [
    "Convert this date to ISO 8601 format (YYYY-MM-DD).",
    "Rewrite the date below as YYYY-MM-DD.",
    "Give this date in ISO format.",
    "Normalise the date to YYYY-MM-DD. Reply with the date only.",
    "What is this date in ISO 8601?",
]


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def spell(date: dt.date, rng: random.Random) -> str:
    """One of many ways people write a date; every one names day, month and year unambiguously."""
    m, d, y = MONTHS[date.month - 1], date.day, date.year
    styles = [
        lambda: f"{m} {d}, {y}",
        lambda: f"{d} {m} {y}",
        lambda: f"{m[:3]} {d} {y}",
        lambda: f"{d} {m[:3]}. {y}",
        lambda: f"the {ordinal(d)} of {m}, {y}",
        lambda: f"{m} {ordinal(d)}, {y}",
        lambda: f"{WEEKDAYS[date.weekday()]}, {m} {d}, {y}",
        lambda: f"{WEEKDAYS[date.weekday()]} {d} {m} {y}",
        lambda: f"{d}.{date.month}.{y} (day.month.year)",
        lambda: f"{date.month}/{d}/{y} (US style)",
        lambda: f"{d}/{date.month}/{y} (UK style)",
        lambda: f"{y}/{date.month:02d}/{d:02d}",
        lambda: f"{ordinal(d)} {m} {y}",
        lambda: f"{m.upper()} {d} {y}",
    ]
    return rng.choice(styles)()


def make_rows(dates: list[dt.date], rng: random.Random) -> list[dict]:
    return [
        {"instruction": rng.choice(INSTRUCTIONS), "input": spell(date, rng), "output": date.isoformat()}
        for date in dates
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="examples/data", help="folder for dates-train.jsonl and dates-test.jsonl")
    parser.add_argument("--train", type=int, default=600, help="training rows")
    parser.add_argument("--test", type=int, default=60, help="held-out rows")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    start, span = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    picked = rng.sample(range(span + 1), args.train + args.test)  # distinct days: no date in both files
    dates = [start + dt.timedelta(days=offset) for offset in picked]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("dates-train.jsonl", dates[: args.train]), ("dates-test.jsonl", dates[args.train :])):
        tmp = out / f".{name}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in make_rows(part, rng):
                handle.write(json.dumps(row) + "\n")
        os.replace(tmp, out / name)
        print(f"wrote {out / name} ({len(part)} rows)")


if __name__ == "__main__":
    main()
