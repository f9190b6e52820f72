"""What a caller holds after ``admit``: the slot (a lease), the reserved tokens, and how to give them back.

``Admission`` and ``AsyncAdmission`` (likewise ``Reservation``, ``HeartbeatPump``) are one source,
``backends/_async/admission.py``: the sync twins are generated from it by ``scripts/unasync.py``. They share
their state and rules (:mod:`taskgate.backends._admission_base`); only the calls to the door differ. Inside
``with admission:`` (or a throttled Celery task / RQ job), :func:`taskgate.current` returns it, so the body
can ``taskgate.current().settle(usage)``.

Token rules: with escrow accounting the estimate is reserved at admit; ``settle(actual)`` charges the actual
(refund or extra charge). With debit accounting ``settle(actual)`` debits it. If the holder never settles,
the estimate counts as the actual (escrow: it stays charged; debit: it is debited at release) — usage is
never forgotten, and a crashed holder's reservation stays charged until its window ends.
"""

from __future__ import annotations

from taskgate.backends._admission_base import Held, current, usage_tokens
from taskgate.backends._admission_base import held_here as held_here  # (the integrations set it)
from taskgate.backends._async.admission import AsyncAdmission, AsyncReservation
from taskgate.backends._async.admission import AsyncHeartbeatPump as AsyncHeartbeatPump
from taskgate.backends._sync.admission import Admission, Reservation
from taskgate.backends._sync.admission import HeartbeatPump as HeartbeatPump

__all__ = [
    "Admission",
    "AsyncAdmission",
    "AsyncReservation",
    "Held",
    "Reservation",
    "current",
    "usage_tokens",
]
