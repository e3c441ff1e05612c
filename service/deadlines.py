"""Deadlines of forget requests in calendar months (GDPR Art. 12(3)).

The controller answers "within one month of receipt", extendable "by two further months where
necessary". A period in months ends on the same day of the month, or on the month's last day when
that day does not exist (Jan 31 + 1 month = Feb 28, or Feb 29 in a leap year; not Mar 2), as in
Regulation 1182/71 on time limits. Times stay in UTC.
"""

from __future__ import annotations

import calendar
from datetime import datetime
from typing import Final

#: The deadline after receipt, in months.
INITIAL_MONTHS: Final = 1
#: At most this many months of extension in total.
MAX_EXTENSION_MONTHS: Final = 2
#: Requests whose deadline still matters: not yet answered (a failed request can be retried).
OPEN_STATUSES: Final = ("received", "queued", "running", "verifying", "failed")


def add_months(moment: datetime, months: int) -> datetime:
    """``moment`` plus ``months`` calendar months, the day clamped to the target month's last day."""
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def due_at(received_at: datetime, extended_months: int = 0) -> datetime:
    """The deadline of a request received at ``received_at`` and extended by ``extended_months``."""
    return add_months(received_at, INITIAL_MONTHS + extended_months)
