"""Inputs: what to process, as a stream. Listing a folder, prefix, glob or manifest in sorted order, containers (tar,
Parquet), the plan cut into shards, the history of earlier runs, and the bytes of one URI from any store."""
