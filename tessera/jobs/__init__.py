"""One entrypoint per verb: `python -m tessera.jobs.<verb> --config X.yaml`."""
