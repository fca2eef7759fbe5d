"""The `harmprune` command line (`harmprune.cli.main:main`): engine commands in `main`,
service commands (serve, worker, submit, status, cancel, pull) in `service`."""
