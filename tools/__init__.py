"""Developer tools that are not part of the shipped packages: run from a checkout's root.

`protogen` regenerates the SDK's stubs from protos/ (`make protos`); `fleet` starts `ragfleet serve`
processes on loopback ports for the integration tests and the benchmarks.
"""
