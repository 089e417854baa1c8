"""Device mesh, FSDP2 for the frozen target, expert parallelism, DDP for the draft (DESIGN section 6).

Works on any nn.Module through what the registry specs declare. Training is single-process until the
parallelism issue lands; nothing here is used yet.
"""
