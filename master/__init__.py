"""The distexec master: queues jobs, dispatches them to slaves, keeps the history."""
