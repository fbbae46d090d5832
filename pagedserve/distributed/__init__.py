"""Tensor parallelism across processes (torch.distributed): parallel.py is this process's place in
the group and its collectives, shard.py cuts a checkpoint into one rank's weights, workers.py starts
and drives the ranks other than the engine's."""
