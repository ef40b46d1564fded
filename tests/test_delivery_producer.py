"""Replacing a broken producer: the real-broker restart test (test_lifecycle.py) proves the path
end to end; this pins down the order of the swap, which that test cannot force: a new producer
that cannot be made yet must not leave the filter holding a closed one."""

from __future__ import annotations

from depois_stream.filter.clients.base import ClientError
from depois_stream.filter.delivery import Delivery
from depois_stream.filter.metrics import Metrics


class _Producer:
    def __init__(self) -> None:
        self.closed = False

    def close(self, timeout_s: float) -> None:
        self.closed = True


def test_a_producer_that_cannot_be_replaced_yet_is_kept_open_and_replaced_later() -> None:
    made: list[_Producer] = []
    failing = [False]

    def make() -> _Producer:
        if failing[0]:
            raise ClientError("broker unreachable", True)
        made.append(_Producer())
        return made[-1]

    delivery = Delivery(make, None, None, Metrics(), ("c", "q", "d"), on_delivered=lambda r: None)
    first = delivery.producer
    failing[0] = True
    delivery._renew_producer()
    assert delivery.producer is first and not first.closed
    failing[0] = False
    delivery._renew_producer()
    assert delivery.producer is made[-1] is not first and first.closed
