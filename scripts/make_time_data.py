"""Make the second example data set: times of day written many ways -> the 24-hour clock (HH:MM).

The companion of dates (scripts/make_example_data.py) for examples/mix.yaml, which mixes the two: another task
with one checkable answer per row, in another shape (a CSV file with `question` and `answer` columns, which
tunesmith reads as prompt/completion).

    python scripts/make_time_data.py            # writes examples/data/times-train.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import random
from pathlib import Path

NUMBERS = ["twelve", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
QUESTIONS = [
    "Write this time on the 24-hour clock: {}",
    "What is {} in 24-hour HH:MM?",
    "Convert to 24-hour time: {}",
    "Give the time {} as HH:MM.",
]


def part_of_day(hour: int) -> str:
    if 5 <= hour < 12:
        return "in the morning"
    if 12 <= hour < 17:
        return "in the afternoon"
    if 17 <= hour < 21:
        return "in the evening"
    return "at night"


def spell(hour: int, minute: int, rng: random.Random) -> str:
    """One way people write the time; each names it unambiguously (am/pm or a part of the day)."""
    h12 = hour % 12 or 12
    am_pm = "AM" if hour < 12 else "PM"
    styles = [
        lambda: f"{h12}:{minute:02d} {am_pm}",
        lambda: f"{h12}.{minute:02d} {'a.m.' if hour < 12 else 'p.m.'}",
        lambda: f"{h12}:{minute:02d}{am_pm.lower()}",
    ]
    if 0 < minute < 30 and minute % 15:
        styles.append(lambda: f"{minute} minute{'s' * (minute > 1)} past {NUMBERS[hour % 12]} {part_of_day(hour)}")
    if minute == 0:
        styles.append(lambda: f"{NUMBERS[hour % 12]} o'clock {part_of_day(hour)}")
    if minute == 15:
        styles.append(lambda: f"quarter past {NUMBERS[hour % 12]} {part_of_day(hour)}")
    if minute == 30:
        styles.append(lambda: f"half past {NUMBERS[hour % 12]} {part_of_day(hour)}")
    if minute == 45:  # "quarter to" names the next hour, in the part of the day the time is in
        styles.append(lambda: f"quarter to {NUMBERS[(hour + 1) % 12]} {part_of_day(hour)}")
    return rng.choice(styles)()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="examples/data/times-train.csv")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=4321)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    # every minute of the day once at most; a quarter of them on the quarter hours the spoken forms need
    quarters = [(h, m) for h in range(24) for m in (0, 15, 30, 45)]
    others = [(h, m) for h in range(24) for m in range(60) if m % 15]
    times = rng.sample(quarters, args.rows // 4) + rng.sample(others, args.rows - args.rows // 4)
    rng.shuffle(times)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer"])
        for hour, minute in times:
            writer.writerow([rng.choice(QUESTIONS).format(spell(hour, minute, rng)), f"{hour:02d}:{minute:02d}"])
    os.replace(tmp, out)
    print(f"wrote {out} ({len(times)} rows)")


if __name__ == "__main__":
    main()
