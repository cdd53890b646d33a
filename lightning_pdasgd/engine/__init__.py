"""The engine of one rank, free of Lightning: forward hand-off, backward threads, layer-wise updates of parameter
buckets, lazy weight reads, staleness compensation, the divergence guard and the engine's metrics.

Nothing here imports Lightning, the exchange between ranks (``distributed``) or the Lightning integration; what a
session needs from those layers is handed in (``session.Peers``).
"""
