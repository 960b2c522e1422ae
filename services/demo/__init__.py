"""The demo: a small project-made corpus with known answers, used by `ragfleet demo` and the e2e tests."""
