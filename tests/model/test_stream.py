"""The row stream owns the data position: it re-orders blocks, skips what a checkpoint consumed, and
its `state_dict` round trip continues exactly where the original would have (Ray-free)."""

import pytest
import torch

from tessera.model.stream import RowStream, model_inputs


def blocks(groups, rows_per_group=3, batch_size=1):
    """Stands in for a Ray dataset shard: packed rows of `groups` (here rank 0 of 2), in blocks that arrive
    newest first, as Ray Data may deliver them; the reader must restore the order."""
    rows = [{"group": torch.tensor(g), "row": torch.tensor(r), "rows_in_group": torch.tensor(rows_per_group),
             "input_ids": torch.tensor([g * 10 + r])} for g in groups for r in range(rows_per_group)][::-1]
    return lambda: ({k: torch.stack([c[k] for c in rows[i:i + batch_size]]) for k in rows[0]}
                    for i in range(0, len(rows), batch_size))


def ids(stream, n):
    it = iter(stream)
    return [int(next(it)["input_ids"][0, 0]) for _ in range(n)]


def test_a_resumed_stream_skips_to_the_position_it_was_given():
    """The source always starts at the stage's beginning; the stream drops what its restored position
    already consumed, so the driver never guesses which checkpoint Ray Train will restore."""
    source = blocks([0, 2, 4, 6])
    assert ids(RowStream(source, 1, 0, 2), 4) == [0, 1, 2, 20]
    for position, expected in (((2, 1), [21, 22, 40, 41]), ((3, 0), [40, 41, 42, 60])):  # (3, 0): rank 1's group
        stream = RowStream(source, 1, 0, 2)
        stream.load_state_dict({"next": list(position)})
        assert ids(stream, 4) == expected
    stream = RowStream(source, 1, 0, 2, stage="s")
    stream.load_state_dict({"next": [6, 2]})
    with pytest.raises(RuntimeError, match="stage 's': the data stream ran out"):
        ids(stream, 2)


def test_state_dict_round_trip_continues_exactly():
    source = blocks([0, 2, 4, 6, 8], batch_size=2)
    whole = RowStream(source, 2, 0, 2)
    it = iter(whole)
    first = [next(it) for _ in range(3)]
    state = whole.state_dict()
    assert state == {"next": [2, 3]}, "groups 0 and 2 (3 rows each) consumed: next is past group 2's last row"
    rest = [next(it) for _ in range(3)]
    resumed = RowStream(source, 2, 0, 2)
    resumed.load_state_dict(state)
    again = iter(resumed)
    for a, b in zip(rest, [next(again) for _ in range(3)]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert int(first[0]["group"][0]) == 0 and set(model_inputs(first[0])) == {"input_ids"}
