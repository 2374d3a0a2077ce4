"""Five-field cron expressions (minute hour day-of-month month day-of-week): `*`, lists, ranges and steps,
e.g. "30 2 * * *" (02:30 every day) or "0 */6 * * 1-5". Day of week: 0 = Sunday ... 6 (7 is Sunday too).
As in cron, when both day fields are restricted a day matches either of them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("weekday", 0, 7))


def _values(text: str, lo: int, hi: int, name: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            start, end = lo, hi
        elif "-" in base:
            start, end = (int(x) for x in base.split("-", 1))
        else:
            start = end = int(base)
            if step_text:
                end = hi
        if not (lo <= start <= end <= hi) or step < 1:
            raise ValueError(f"cron {name} field {part!r} is outside {lo}-{hi}")
        out.update(range(start, end + 1, step))
    return frozenset(out)


@dataclass(frozen=True)
class Cron:
    expression: str

    def __post_init__(self):
        parts = self.expression.split()
        if len(parts) != 5:
            raise ValueError(f"cron expression {self.expression!r} needs 5 fields: minute hour day month weekday")
        try:
            fields = [_values(p, lo, hi, name) for p, (name, lo, hi) in zip(parts, _FIELDS)]
        except ValueError as e:
            raise ValueError(f"cron expression {self.expression!r}: {e}") from None
        fields[4] = frozenset(d % 7 for d in fields[4])
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "_any_day", parts[2] == "*")
        object.__setattr__(self, "_any_weekday", parts[4] == "*")

    def _day_matches(self, t: datetime) -> bool:
        _, _, days, months, weekdays = self._fields
        if t.month not in months:
            return False
        in_month, in_week = t.day in days, (t.isoweekday() % 7) in weekdays
        if self._any_day or self._any_weekday:
            return in_month and in_week
        return in_month or in_week

    def next_fire(self, after: datetime) -> datetime:
        """The first time at or after `after` (to the minute) that the expression fires."""
        minutes, hours = self._fields[0], self._fields[1]
        t = after.replace(second=0, microsecond=0) + (timedelta(minutes=1) if after.second or after.microsecond
                                                       else timedelta())
        for _ in range(366 * 5):  # days
            if self._day_matches(t):
                for h in sorted(hours):
                    for m in sorted(minutes):
                        candidate = t.replace(hour=h, minute=m)
                        if candidate >= t:
                            return candidate
            t = (t + timedelta(days=1)).replace(hour=0, minute=0)
        raise ValueError(f"cron expression {self.expression!r} never fires")
