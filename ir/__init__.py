"""The lwqc IR: matmul sites, blocks, annotations, plans and packed weights (imports nothing else)."""
