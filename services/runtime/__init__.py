"""What every ragfleet service shares: settings, the gRPC server bootstrap, errors, storage, Ray glue."""
