"""The loop's own helpers: what it sends with every dispatch."""

from __future__ import annotations

import random
import uuid

from service.dispatcher import new_prompt_id


def test_prompt_ids_are_uuid4s_that_seeding_the_global_random_does_not_repeat() -> None:
    random.seed(7)
    first = [new_prompt_id() for _ in range(100)]
    random.seed(7)
    again = [new_prompt_id() for _ in range(100)]
    assert len(set(first) | set(again)) == 200
    assert all(uuid.UUID(p).version == 4 and str(uuid.UUID(p)) == p for p in first)
