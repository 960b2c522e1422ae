"""ragfleet services: the runtime every service shares, the services, and the `ragfleet` command."""
