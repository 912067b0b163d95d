"""The output: what a run leaves in its folder or prefix. The one schema of each table, staged shards and parts, the
commit log, the lease of the one writer, and the checks of the location before anything is written."""
