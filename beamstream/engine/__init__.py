"""The one exactly-once engine (layer 2): how every consumer that writes commits, aborts and retries."""
