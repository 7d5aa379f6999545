"""A distexec slave: registers with the master and runs the jobs it is sent."""
