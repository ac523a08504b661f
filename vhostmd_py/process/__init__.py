"""The daemon process's life: start-up order, daemonizing, pid file, privileges."""
