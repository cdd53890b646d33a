"""Several devices, free of Lightning: the replica exchange thread, its flat buffers, and dynamic batch claiming.

Built on torch.distributed (gloo on CPU, NCCL on GPU) and the default group's store; uses the engine's parameter
buckets, never the Lightning integration.
"""
