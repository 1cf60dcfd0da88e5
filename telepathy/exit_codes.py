"""Exit codes of telepathy's programs, in one place (no imports: the supervisor must start fast).

0 and 99 and 130 are the spec's; the others are refusals that a restart or a requeue would repeat, so the
supervisor does not restart them and the submit script does not requeue them."""

EXIT_COMPLETE = 0  # training complete
EXIT_USAGE = 2  # bad flags or values (argparse)
EXIT_CANNOT_RESUME = 3  # the checkpoint does not fit this run, or strict resume found it invalid
EXIT_SAVE_DIR_BUSY = 75  # another live run writes to the save dir (EX_TEMPFAIL)
EXIT_REQUEUE = 99  # preempted with a durable checkpoint: requeue
EXIT_INTERRUPTED = 130  # SIGINT: saved, stopped by a person

NOT_RESTARTED = (EXIT_USAGE, EXIT_CANNOT_RESUME, EXIT_SAVE_DIR_BUSY)
