"""The job lifecycle, free of any transport: admission, records and commits, the scheduler, the store, events, memo keys."""
