"""Integration tests: real models, the CLI, end to end (package marker avoids test-module name clashes)."""
