"""hotbed's worker agent: runs sandboxes on one node through a runtime."""
