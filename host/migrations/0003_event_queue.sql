-- Events waiting for delivery, oldest first per task: written before a frame's
-- events are handed on, deleted when the destination took them, so a receiver that
-- is down (or a restart, or kill -9) loses nothing up to the per-task bound.
CREATE TABLE event_queue (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id     TEXT NOT NULL,
    destination TEXT NOT NULL,
    body        TEXT NOT NULL
);
CREATE INDEX event_queue_by_task ON event_queue (task_id, seq);
