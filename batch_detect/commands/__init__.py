"""The commands: what a user types. The CLI and each command's own module (dry run, inspect, compare, quantize,
report, status, verify) and the progress a run prints."""
