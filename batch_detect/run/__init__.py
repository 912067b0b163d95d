"""The run: a plan through the workers into the output. Preparing and checking, the listing thread, dispatch to Ray
actors or worker processes (Ray lives in distributed.py alone), the shard worker, sizing, commits, the manifest."""
