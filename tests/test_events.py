"""The events contract: append-only JSON lines, read incrementally, tolerant of a half-written line."""

from __future__ import annotations

import pytest

from lora_trainer.events import EventWriter, last_event, read_events


def test_events_are_read_incrementally(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    writer.emit("started", step=0, total_steps=3)
    events, offset = read_events(path)
    assert [e["type"] for e in events] == ["started"]
    writer.emit("step", step=1, loss=0.5)
    more, offset2 = read_events(path, offset)
    assert [(e["type"], e["step"]) for e in more] == [("step", 1)]
    assert read_events(path, offset2) == ([], offset2)


def test_a_half_written_last_line_is_left_for_the_next_read(tmp_path):
    path = tmp_path / "events.jsonl"
    EventWriter(path).emit("step", step=1, loss=0.5)
    with open(path, "a") as f:
        f.write('{"type": "step", "step": 2, "lo')
    events, offset = read_events(path)
    assert [e["step"] for e in events] == [1]
    with open(path, "a") as f:
        f.write('ss": 0.4}\n')
    events, _ = read_events(path, offset)
    assert [e["step"] for e in events] == [2]


def test_garbage_lines_are_skipped_and_last_event_filters_by_type(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    writer.emit("step", step=1, loss=1.0)
    with open(path, "a") as f:
        f.write("not json\n")
    writer.emit("failed", error="boom", hint="do x")
    assert last_event(path, "step")["step"] == 1
    assert last_event(path)["hint"] == "do x"


def test_unknown_event_types_are_refused(tmp_path):
    with pytest.raises(ValueError):
        EventWriter(tmp_path / "e.jsonl").emit("exploded")
