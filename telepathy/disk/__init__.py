"""The torch-free half of the checkpoint store: where files go in a save dir (:mod:`.save_dir`), how bytes reach
disk durably (:mod:`.durable`), what a checkpoint must contain (:mod:`.manifest`), the temporary-directory commit
(:mod:`.commit`), the catalog of committed checkpoints (:mod:`.catalog`), retention, the writer lock and the event
log. Nothing in this package imports torch, so the supervisor and ``telepathy status`` start in a fraction of a
second (a test checks)."""
