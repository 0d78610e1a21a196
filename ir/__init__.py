"""The lwqc IR: matmul sites, blocks, annotations, plans, packed weights (no other imports)."""
